"""Paired statistics against independent references.

Run: ``.venv/bin/pytest tests/test_statistics.py -q`` (a few seconds).

The bootstrap against an explicit Python loop over the same resamples, McNemar against
``scipy.stats.binomtest``, Holm against a case computed by hand, and the invariants: a variant equal to
the final model gives [0, 0] and p = 1; swapping the two models flips the interval.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from criticality.core import statistics as st


def _brute_deltas(variant, final, counts, resamples, seed):
    """The definition, one resample at a time, in plain Python sums."""
    n = len(final)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    out = []
    for row in idx:
        v = sum(float(variant[i]) for i in row)
        f = sum(float(final[i]) for i in row)
        c = sum(float(counts[i]) for i in row)
        out.append(v / c - f / c)
    return np.array(out)


def test_bootstrap_matches_brute_force_on_errors_exactly():
    rng = np.random.default_rng(1)
    final = (rng.random(57) < 0.2).astype(float)
    variant = np.where(rng.random(57) < 0.15, 1 - final, final)
    brute = np.quantile(_brute_deltas(variant, final, np.ones(57), 300, 7), [0.025, 0.975])
    st._CHUNK_ELEMENTS, old = 57 * 4, st._CHUNK_ELEMENTS  # several chunks: the stream must not change
    try:
        low, high = st.paired_bootstrap(variant, final, resamples=300, rng=7)
    finally:
        st._CHUNK_ELEMENTS = old
    assert (low, high) == (brute[0], brute[1])


def test_bootstrap_ratio_of_sums_for_sequences():
    rng = np.random.default_rng(2)
    counts = rng.integers(1, 30, size=40).astype(float)  # tokens per sequence
    final = rng.random(40) * counts  # sums of per-token losses
    variant = final + rng.normal(0.3, 0.5, 40) * counts
    brute = np.quantile(_brute_deltas(variant, final, counts, 200, 3), [0.025, 0.975])
    got = st.paired_bootstrap(variant, final, counts, resamples=200, rng=3)
    np.testing.assert_allclose(got, brute, rtol=1e-12)


def test_many_variants_share_resamples_and_match_one_by_one():
    rng = np.random.default_rng(3)
    final = (rng.random(80) < 0.3).astype(float)
    variants = np.stack([np.where(rng.random(80) < p, 1 - final, final) for p in (0.0, 0.1, 0.4)])
    many = st.paired_intervals(variants, final, resamples=500, rng=11)
    for k in range(3):
        assert tuple(many[k]) == st.paired_bootstrap(variants[k], final, resamples=500, rng=11)
    assert tuple(many[0]) == (0.0, 0.0)  # equal to the final model


def test_swapping_the_models_flips_the_interval():
    rng = np.random.default_rng(4)
    a, b = rng.random(100), rng.random(100)
    low, high = st.paired_bootstrap(a, b, resamples=1000, rng=5)
    low2, high2 = st.paired_bootstrap(b, a, resamples=1000, rng=5)
    assert low2 == pytest.approx(-high, abs=1e-12) and high2 == pytest.approx(-low, abs=1e-12)
    assert low < high


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (3, 3), (7, 2), (2, 7), (40, 61), (0, 30), (2600, 2750),
                                 (3000, 3300), (9000, 9100)])
def test_mcnemar_matches_scipy(b, c):
    expected = 1.0 if b + c == 0 else scipy.stats.binomtest(b, b + c, 0.5).pvalue
    assert st.mcnemar(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_on_records_and_identity():
    wrong = np.array([1, 0, 0, 1, 0, 1, 1, 0], dtype=float)
    assert st.discordant(wrong, wrong) == (0, 0) and st.mcnemar(*st.discordant(wrong, wrong)) == 1.0
    variant = np.array([1, 1, 1, 1, 0, 1, 0, 0], dtype=float)
    assert st.discordant(variant, wrong) == (2, 1)


def test_holm_by_hand():
    # sorted: 0.01 (×4 → 0.04), 0.02 (×3 → 0.06), 0.03 (×2 → 0.06, monotone), 0.5 (×1 → 0.5)
    got = st.holm([0.03, 0.5, 0.01, 0.02])
    np.testing.assert_allclose(got, [0.06, 0.5, 0.04, 0.06])
    got = st.holm([0.9, np.nan, 0.6])  # 0.6 ×2 → 1 (capped), 0.9 → max(1, 0.9)
    assert got[0] == 1.0 and np.isnan(got[1]) and got[2] == 1.0


def test_verdicts_and_examples_to_settle():
    assert st.verdict(0.03, 0.05, 0.02) == "critical"
    assert st.verdict(-0.01, 0.02, 0.02) == "robust"  # at the threshold counts as robust
    assert st.verdict(0.01, 0.03, 0.02) == "inconclusive"
    assert math.isnan(st.examples_to_settle(0.04, 0.03, 0.05, 1000, 0.02))
    # Δ 0.03, lower half-width 0.02 must shrink to 0.01: (0.02 / 0.01)² = 4 × the examples.
    assert st.examples_to_settle(0.03, 0.01, 0.05, 1000, 0.02) == pytest.approx(4000, abs=1)
    assert st.examples_to_settle(0.02, 0.0, 0.04, 1000, 0.02) == math.inf


def test_two_level_interval_matches_brute_force():
    rng = np.random.default_rng(6)
    values = (rng.random((3, 45)) < np.array([[0.3], [0.5], [0.4]])).astype(float)
    mean, low, high = st.two_level_interval(values, resamples=200, rng=9)
    g = np.random.default_rng(9)
    draws = g.integers(0, 3, size=(200, 3))
    idx = g.integers(0, 45, size=(200, 45))
    stats = [sum(sum(values[d, i] for i in row) / 45 for d in ds) / 3 for ds, row in zip(draws, idx, strict=True)]
    brute = np.quantile(stats, [0.025, 0.975])
    assert mean == pytest.approx(values.mean())
    np.testing.assert_allclose([low, high], brute, rtol=1e-12)
    assert low <= mean <= high


def test_per_class_error():
    df = st.per_class_error(np.array([1, 0, 0, 1, 1]), np.array([2, 0, 2, 2, 0]))
    assert df["class"].tolist() == [0, 2] and df.n.tolist() == [2, 3]
    np.testing.assert_allclose(df.error, [0.5, 2 / 3])


def test_two_level_intervals_batched_equal_one_by_one():
    rng = np.random.default_rng(8)
    values = (rng.random((4, 3, 60)) < 0.4).astype(float)
    many = st.two_level_intervals(values, resamples=300, rng=2)
    for g in range(4):
        assert tuple(many[g]) == st.two_level_interval(values[g], resamples=300, rng=2)
