"""Intervals and p-values over units (core/resampling.py) against plain references.

Run: ``PYTHONPATH=src .venv/bin/pytest tests/test_resampling.py -q`` (a few seconds).

The bootstrap-t interval is recomputed resample by resample with explicit index draws and per-resample
loops; the sign-flip test by enumerating every swap in plain Python and against ``scipy.stats.permutation_test``;
the Monte Carlo branch lies within its stated resolution of the exact p.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats

from criticality.core import resampling as rs
from criticality.core import statistics as st


def _tokens(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    counts = rng.integers(3, 30, n).astype(float)
    final = rng.binomial(counts.astype(int), 0.3).astype(float)
    variant = np.minimum(final + rng.poisson(0.8, n) - rng.poisson(0.3, n), counts).clip(0)
    return variant, final, counts


def test_studentized_interval_matches_a_loop_over_resamples():
    variant, final, counts = _tokens(40, 1)
    got = rs.studentized_intervals(variant[None], final, counts, resamples=300, rng=4)[0]
    idx = np.random.default_rng(4).integers(0, 40, size=(300, 40))  # the documented resample rows
    d = variant - final
    delta = d.sum() / counts.sum()
    se = math.sqrt(sum((d[i] - delta * counts[i]) ** 2 for i in range(40))) / counts.sum()
    t = []
    for row in idx:
        dd, cc = d[row], counts[row]
        boot = dd.sum() / cc.sum()
        t.append((boot - delta) / (math.sqrt(sum((dd - boot * cc) ** 2)) / cc.sum()))
    t_low, t_high = np.quantile(t, [0.025, 0.975])
    student = scipy.stats.t.ppf(0.975, 39) * math.sqrt(40 / 39)
    low, high = min(delta - t_high * se, delta - student * se), max(delta - t_low * se, delta + student * se)
    np.testing.assert_allclose(got, [low, high], rtol=1e-9)


def test_shared_resamples_equal_the_seeded_stream_and_every_variant_alone():
    variants = np.stack([_tokens(50, s)[0] for s in range(4)])
    _, final, counts = _tokens(50, 0)
    shared = rs.Resamples(50, 500, 9)
    many = rs.studentized_intervals(variants, final, counts, rng=shared)
    for k in range(4):
        np.testing.assert_array_equal(many[k], rs.studentized_intervals(variants[k][None], final, counts,
                                                                       resamples=500, rng=9)[0])
    with pytest.raises(ValueError, match="units"):
        rs.studentized_intervals(variants[:, :10], final[:10], counts[:10], rng=shared)


def test_studentized_interval_with_no_differing_unit_is_zero_and_clipped_to_the_units_range():
    _, final, counts = _tokens(30, 2)
    assert tuple(rs.studentized_intervals(final[None], final, counts, rng=0)[0]) == (0.0, 0.0)
    one = final.copy()
    one[3] += 2  # one sequence, two more tokens wrong: an infinite t* in every resample that misses it
    low, high = rs.studentized_intervals(one[None], final, counts, rng=0)[0]
    assert 0.0 <= low <= 2 / counts.sum() <= high <= 2 / counts[3] + 1e-15


def _brute_p(variant, final, cv, cf):
    """Every swap of every unit, in plain Python: the share with |Δ*| ≥ |Δ|."""
    def delta(swap):
        v = sum(f if s else x for x, f, s in zip(variant, final, swap, strict=True))
        f_ = sum(x if s else f for x, f, s in zip(variant, final, swap, strict=True))
        c_v = sum(b if s else a for a, b, s in zip(cv, cf, swap, strict=True))
        c_f = sum(a if s else b for a, b, s in zip(cv, cf, swap, strict=True))
        return v / c_v - f_ / c_f
    observed = abs(delta([False] * len(variant)))
    swaps = list(itertools.product((False, True), repeat=len(variant)))
    return sum(abs(delta(s)) >= observed * (1 - 1e-12) for s in swaps) / len(swaps)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sign_flip_exact_equals_enumeration_with_different_counts(seed):
    rng = np.random.default_rng(seed)
    variant, final = rng.normal(size=9), rng.normal(size=9)
    cv, cf = rng.integers(1, 5, 9).astype(float), rng.integers(1, 5, 9).astype(float)
    got = rs.sign_flip_p(variant[None], final, cv[None], cf)[0]
    assert got == pytest.approx(_brute_p(variant, final, cv, cf), abs=1e-15)


def test_sign_flip_exact_equals_scipy_paired_permutation_test():
    rng = np.random.default_rng(5)
    variant, final = rng.exponential(1.0, 12), rng.exponential(0.8, 12)
    ref = scipy.stats.permutation_test((variant, final), lambda a, b: np.mean(a - b), permutation_type="samples",
                                       n_resamples=np.inf).pvalue
    assert rs.sign_flip_p(variant[None], final)[0] == pytest.approx(ref, rel=1e-12)


def test_sign_flip_monte_carlo_is_within_its_resolution_of_the_exact_p():
    rng = np.random.default_rng(7)
    n = 18  # above EXACT_UNITS: Monte Carlo, yet 2^18 swaps are few enough to enumerate here
    d = rng.normal(0.35, 1.0, n)
    signs = 1.0 - 2.0 * np.array(list(itertools.product((0, 1), repeat=n)), dtype=float)  # (2^18, 18)
    exact = np.mean(np.abs(signs @ d) >= abs(d.sum()) * (1 - 1e-12))
    got = rs.sign_flip_p(d[None], np.zeros(n), rng=3)[0]
    assert abs(got - exact) < 4 * math.sqrt(exact * (1 - exact) / rs.FLIPS) + 1 / (rs.FLIPS + 1)
    assert rs.sign_flip_p(d[None], np.zeros(n), exact_units=n)[0] == pytest.approx(exact, abs=1e-15)
    far = rs.sign_flip_p((np.ones(40) * 5)[None], np.zeros(40), rng=0)[0]
    assert far == 1 / (rs.FLIPS + 1)  # never 0: the observed swap counts
    assert rs.sign_flip_p(d[None], d)[0] == 1.0  # nothing differs


def test_two_level_interval_is_wide_with_two_draws_that_disagree():
    values = np.stack([np.r_[np.ones(60), np.zeros(40)], np.r_[np.ones(40), np.zeros(60)]])  # 0.6 and 0.4
    mean, low, high = st.two_level_interval(values)
    assert mean == pytest.approx(0.5) and (low, high) == (0.0, 1.0)  # t₁ = 12.7 times 0.1: clipped to [0, 1]
    mean, low, high = st.two_level_interval(values * 0.5 + 0.25)  # draws 0.55 and 0.45, units in [0.25, 0.75]
    assert (low, high) == (0.25, 0.75)


def test_from_bootstrap_below_units_the_interval_is_the_student_t_one():
    rng = np.random.default_rng(3)
    n = rs.BOOTSTRAP_BELOW
    counts = rng.integers(1, 9, n).astype(float)
    d = rng.normal(0.1, 1.0, n) * counts
    low, high = rs.studentized_intervals(d[None], np.zeros(n), counts, rng=0)[0]
    delta = d.sum() / counts.sum()
    se = math.sqrt(((d - delta * counts) ** 2).sum()) / counts.sum() * math.sqrt(n / (n - 1))
    half = scipy.stats.t.ppf(0.975, n - 1) * se
    np.testing.assert_allclose([low, high], [delta - half, delta + half], rtol=1e-10)
