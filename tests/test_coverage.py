"""Seeded coverage simulations of the intervals that are not Tango's: token metrics and re-randomization.

Run: ``PYTHONPATH=src .venv/bin/pytest tests/test_coverage.py -q`` (about 30 s of CPU).
``PYTHONPATH=src .venv/bin/python tests/test_coverage.py`` prints the tables of docs/statistics.md.

- Token metrics: n sequences of 16 to 256 tokens (from 2,000 sequences on, the Student-t interval alone); in
  a sequence each token is, independently, "b" (final right, cell wrong) with probability p_b·gᵢ and "c" with
  p_c·gᵢ, where gᵢ ~ Gamma(1, 1) makes some sequences change much more than others (tokens of a sequence
  are not independent). The true Δ token error is p_b − p_c; 1,000 test sets per row share one set of the
  table's 2,000 resamples, as a table's cells do.
- Two-level (re-randomization): S draws on n examples; example i has error rate aᵢ, draw s shifts every rate
  by δₛ ~ N(0, σ_b²); the target is the mean error over draws and examples. 2,000 test sets per row.
- End to end: ``analyze()`` on benchmarks/coverage_end_to_end.py's lookup model gives the interval of
  ``statistics.score_intervals`` on the test set's discordant counts, whose exact coverage
  tests/test_statistics.py asserts (the full end-to-end table is that script's).

Coverage is asserted in [0.93, 0.985]; the upper end only where at least three tokens are expected to
change (fewer: any honest interval covers nearly always).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest

from criticality.core import resampling as rs
from criticality.core import statistics as st

REPS = 1000
TOKEN_ROWS = [(n, disc, delta, 16, 256) for n in (30, 100, 400, 2000) for disc in (0.005, 0.02, 0.1)
              for delta in (0, 0.01, 0.05) if delta <= disc] + \
             [(30, disc, 0, length, length) for disc in (0.005, 0.1) for length in (16, 256)]
TWO_LEVEL_ROWS = [(s, n, sb, lo, hi) for s in (2, 3, 5) for n in (100, 1000) for sb in (0.0, 0.03, 0.1)
                  for lo, hi in ((0.2, 0.8), (0.75, 0.95))]


def token_coverage(n: int, disc: float, delta: float, shortest: int, longest: int, reps: int = REPS,
                   seed: int = 1) -> float:
    """Share of ``reps`` simulated test sets whose :func:`resampling.studentized_intervals` holds p_b − p_c."""
    rng = np.random.default_rng(seed)
    pb, pc = (disc + delta) / 2, (disc - delta) / 2
    tokens = rng.integers(shortest, longest + 1, size=n)  # (N,) one design per row
    g = rng.gamma(1.0, 1.0, size=(reps, n))  # (R, N) how much each sequence changes
    qb = np.minimum(pb * g, 1.0)
    qc = np.minimum(pc * g, 1.0 - qb)
    b = rng.binomial(tokens, qb)
    c = rng.binomial(tokens - b, np.where(qb < 1, qc / np.maximum(1 - qb, 1e-12), 0.0))
    d = (b - c).astype(float)  # (R, N): per sequence, tokens that went wrong minus tokens that went right
    out = rs.studentized_intervals(d, np.zeros(n), tokens.astype(float), rng=rs.Resamples(n, st.RESAMPLES, 2))
    return float(np.mean((out[:, 0] <= delta + 1e-12) & (delta - 1e-12 <= out[:, 1])))


def two_level_coverage(s: int, n: int, sb: float, lo: float, hi: float, reps: int = 2000, seed: int = 4) -> float:
    """Share of ``reps`` simulated sets of S draws whose :func:`statistics.two_level_intervals` holds the target."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(lo, hi, size=(reps, 1, n))
    shift = rng.normal(0, sb, size=(reps, s, 1))
    values = (rng.random((reps, s, n)) < np.clip(a + shift, 0, 1)).astype(float)  # (R, S, N)
    truth = _target(sb, lo, hi)
    out = st.two_level_intervals(values)
    return float(np.mean((out[:, 1] <= truth) & (truth <= out[:, 2])))


@functools.cache
def _target(sb: float, lo: float, hi: float) -> float:
    """E over rates and shifts of the clipped error rate (Monte Carlo, 2·10⁶ draws: ±0.0003)."""
    big = np.random.default_rng(99)
    return float(np.clip(big.uniform(lo, hi, 2_000_000) + big.normal(0, sb, 2_000_000), 0, 1).mean())


@pytest.mark.parametrize(("n", "disc", "delta", "shortest", "longest"), TOKEN_ROWS)
def test_token_metric_interval_covers(n, disc, delta, shortest, longest):
    cov = token_coverage(n, disc, delta, shortest, longest)
    assert cov >= 0.93
    if n * shortest * disc >= 3:
        assert cov <= 0.985


@pytest.mark.parametrize(("s", "n", "sb", "lo", "hi"), TWO_LEVEL_ROWS)
def test_two_level_interval_covers(s, n, sb, lo, hi):
    assert 0.93 <= two_level_coverage(s, n, sb, lo, hi) <= 0.985


def test_end_to_end_intervals_are_the_score_interval_of_the_test_sets_counts():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from coverage_end_to_end import replicate  # noqa: PLC0415  (a script, not a package)

    for n, pb, pc in ((100, 0.05, 0.01), (400, 0.01, 0.0)):
        for low, high, b, c in replicate(n, pb, pc, reps=3, seed=5):
            assert (low, high) == tuple(st.score_intervals([b], [c], [n])[0])


if __name__ == "__main__":
    print("| sequences | tokens each | discordance | Δ | coverage |\n|---|---|---|---|---|")
    for row in TOKEN_ROWS:
        n, disc, delta, shortest, longest = row
        print(f"| {n} | {shortest}-{longest} | {disc:.1%} | {delta} | {token_coverage(*row):.3f} |", flush=True)
    print("\n| draws | examples | σ between draws | error rates | coverage |\n|---|---|---|---|---|")
    for row in TWO_LEVEL_ROWS:
        s, n, sb, lo, hi = row
        print(f"| {s} | {n:,} | {sb} | {lo}-{hi} | {two_level_coverage(*row):.3f} |", flush=True)
