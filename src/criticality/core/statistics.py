"""Is a verdict more than noise? Paired statistics on per-example records (pure numpy).

Every cell is evaluated on the same examples as the final model, so a difference between the two is
*paired*: resampling picks example indices once and applies them to both models. A metric arrives as
per-example ``values (N,)`` and ``counts (N,)`` (1 per example for classification; the token count of
each sequence for sequence models, whose values are sums over its tokens), and its value on a set of
examples is the ratio of sums ``Σ values / Σ counts``. The bootstrap therefore resamples examples
(sequences, never tokens) and recomputes that ratio.

- :func:`paired_bootstrap` / :func:`paired_intervals`: percentile interval of Δ = variant − final (the table
  uses it only for a cell whose units count other tokens than the final model's).
- :func:`score_intervals`: Tango's score interval of Δ for 0/1 outcomes (error): exact arithmetic on the
  discordant counts, no resampling, not degenerate when no example changed (used for 0/1 records).
- :func:`mcnemar`: exact two-sided McNemar p on the discordant counts of two 0/1 records.
- :func:`holm`: Holm's step-down correction of a table's p-values.
- :func:`verdict` and :func:`examples_to_settle`: critical / robust / inconclusive against a threshold.
- :func:`two_level_interval`: the mean over re-randomization draws, a t interval over draws and units.
- :func:`per_class_error`: error per true class from an error record.

Intervals and p-values of the other metrics (loss; token metrics over sequences) are in
:mod:`criticality.core.resampling`.

Randomness is an argument: a seed or a :class:`numpy.random.Generator`. Resample ``r`` uses row ``r`` of
``rng.integers(0, n, size=(resamples, n))``; rows are drawn in chunks, which gives the same stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from statistics import NormalDist

import numpy as np
import pandas as pd
from scipy import special

RESAMPLES = 2000
LEVEL = 0.95
TOLERANCE = 1e-9  # errors are k/n: a Δ of exactly the threshold must not read as 0.020000000000000004 > 0.02
_CHUNK_ELEMENTS = 1 << 20  # resample indices held at once (8 MiB of int64; about 4 such arrays live)
VERDICTS = ("critical", "robust", "inconclusive")

Rng = np.random.Generator | int


def _rng(rng: Rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def resample_weights(n: int, resamples: int, rng: Rng) -> Iterator[np.ndarray]:
    """Chunks of ``(rows, n)`` float64: how often each example appears in each resample.

    Row ``r`` (over all chunks) counts the indices ``rng.integers(0, n, size=(resamples, n))[r]``; a sum
    over a resample is then a matrix product, exact for integer values.
    """
    rng = _rng(rng)
    rows = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, resamples, rows):
        r = min(rows, resamples - start)
        idx = rng.integers(0, n, size=(r, n))  # (r, n)
        flat = (idx + n * np.arange(r)[:, None]).ravel()
        yield np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float64)


def _counts(counts: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    return np.ones(shape) if counts is None else np.broadcast_to(np.asarray(counts, dtype=np.float64), shape)


def paired_intervals(variants: np.ndarray, final: np.ndarray, counts: np.ndarray | None = None,
                     final_counts: np.ndarray | None = None, *, resamples: int = RESAMPLES,
                     level: float = LEVEL, rng: Rng = 0) -> np.ndarray:
    """Percentile bootstrap intervals of Δ = ratio(variant) − ratio(final) for K variants at once.

    ``variants (K, N)``, ``final (N,)``; ``counts (K, N)`` or ``(N,)`` and ``final_counts (N,)`` default to 1
    per example (``final_counts`` defaults to ``counts`` when that is 1-D). All K variants share the same
    resamples. Returns ``(K, 2)``: low, high.
    """
    variants = np.atleast_2d(np.asarray(variants, dtype=np.float64))  # (K, N)
    final = np.asarray(final, dtype=np.float64)  # (N,)
    k, n = variants.shape
    if final.shape != (n,):
        raise ValueError(f"final record has shape {final.shape}, the variants {variants.shape}")
    if final_counts is None:
        final_counts = counts if counts is not None and np.ndim(counts) == 1 else None
    shared = (counts is None or np.ndim(counts) == 1) and (final_counts is None or final_counts is counts)
    # Columns: the K variants' values, the final values, then the counts: one shared column (the usual case,
    # the same examples and tokens for every model) or the K variants' counts and the final counts.
    c_var = _counts(counts, (n,) if shared else (k, n))
    c_fin = _counts(final_counts, (n,))
    columns = np.concatenate([variants, final[None], np.atleast_2d(c_var)] + ([] if shared else [c_fin[None]])).T
    deltas = np.empty((resamples, k))
    at = 0
    for w in resample_weights(n, resamples, rng):
        sums = w @ columns  # (r, K + 2) or (r, 2K + 2)
        var_counts, fin_counts = (sums[:, -1:], sums[:, -1]) if shared else (sums[:, k + 1:2 * k + 1], sums[:, -1])
        with np.errstate(invalid="ignore", divide="ignore"):
            deltas[at:at + len(w)] = sums[:, :k] / var_counts - (sums[:, k] / fin_counts)[:, None]
        at += len(w)
    return np.array([_percentiles(deltas[:, j], level) for j in range(k)]).reshape(k, 2)  # (K, 2)


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    # One 1-D call per column: numpy's 2-D quantile path rounds its interpolation differently.
    tail = round((1 - level) / 2, 12)  # 0.025, not 0.025000000000000022
    low, high = np.quantile(samples, [tail, 1 - tail])
    return float(low), float(high)


def paired_bootstrap(variant: np.ndarray, final: np.ndarray, counts: np.ndarray | None = None, *,
                     resamples: int = RESAMPLES, level: float = LEVEL, rng: Rng = 0) -> tuple[float, float]:
    """``(low, high)``: the ``level`` percentile bootstrap interval of Δ = variant − final (one variant)."""
    low, high = paired_intervals(np.asarray(variant)[None], final, counts, resamples=resamples, level=level,
                                 rng=rng)[0]
    return float(low), float(high)


def discordant(variant_wrong: np.ndarray, final_wrong: np.ndarray) -> tuple[int, int]:
    """``(b, c)``: b examples the final model gets right and the variant wrong, c the other way round."""
    v, f = np.asarray(variant_wrong).astype(bool), np.asarray(final_wrong).astype(bool)
    return int((v & ~f).sum()), int((~v & f).sum())


EXACT_BELOW = 5000  # discordant pairs up to which the tail is summed in exact integers, log-space beyond


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p: the binomial test of ``b`` successes in ``b + c`` trials at p = 1/2.

    ``p = min(1, 2 · P(X ≤ min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)``; 1 when there is no discordant
    pair. Agrees with ``scipy.stats.binomtest(b, b + c).pvalue`` (the symmetric case of its rule).
    """
    n, k = b + c, min(b, c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    if n == 0 or b == c:
        return 1.0
    if n < EXACT_BELOW:
        term, tail = 1, 1
        for i in range(k):  # C(n, i + 1) from C(n, i), exact big integers
            term = term * (n - i) // (i + 1)
            tail += term
        return min(1.0, 2 * tail / 2 ** n)  # int / int rounds correctly, however large
    i = np.arange(k + 1)
    log_terms = (math.lgamma(n + 1) - np.array([math.lgamma(j + 1) + math.lgamma(n - j + 1) for j in i])
                 - n * math.log(2))
    top = log_terms.max()
    return float(min(1.0, 2 * math.exp(top) * np.exp(log_terms - top).sum()))


_BISECTIONS = 64  # halvings of [-1, 1]: the ends are exact to float precision


def z_quantile(level: float = LEVEL) -> float:
    """The two-sided standard normal quantile of ``level`` (1.959964 for 0.95)."""
    return NormalDist().inv_cdf(0.5 + level / 2)


def tango_statistic(b: np.ndarray | float, c: np.ndarray | float, n: np.ndarray | float,
                    delta0: np.ndarray | float) -> np.ndarray:
    """Tango's score statistic for H0: Δ = ``delta0``, Δ = p_b − p_c the difference of paired proportions.

    ``b`` pairs changed one way (final right, variant wrong), ``c`` the other way, ``n`` pairs in all
    (broadcast arrays; counts may be fractional). With q̂ the maximum-likelihood p_c under H0 (the
    positive root of 2n·q² + (−b − c + (2n − b + c)·Δ0)·q − c·Δ0(1 − Δ0) = 0),
    ``Z = (b − c − n·Δ0) / sqrt(n·(2q̂ + Δ0(1 − Δ0)))``. Tango, T. (1998), "Equivalence test and confidence
    interval for the difference in proportions for the paired-sample design", Stat. Med. 17:891-908.
    """
    b, c, n, d0 = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (b, c, n, delta0)))
    a2 = 4 * n  # 2·A
    lin = -b - c + (2 * n - b + c) * d0  # B
    const = -c * d0 * (1 - d0)  # C ≤ 0 on [-1, 1], so the discriminant is ≥ B²
    root = np.sqrt(np.maximum(lin * lin - 2 * a2 * const, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        # (root − B) / 2A loses digits when B > 0 is large; the product of the roots gives the same q̂ there
        q = np.where(lin > 0, -2 * const / (lin + root), (root - lin) / a2)
        return (b - c - n * d0) / np.sqrt(n * (2 * q + d0 * (1 - d0)))


def score_intervals(b: np.ndarray | Sequence[float], c: np.ndarray | Sequence[float],
                    n: np.ndarray | Sequence[float] | float, *, level: float = LEVEL) -> np.ndarray:
    """``(K, 2)``: Tango's score interval of Δ = (b − c) / n for paired 0/1 outcomes, {Δ0 : |Z(Δ0)| ≤ z}.

    The interval for error: with no discordant pair it is not [0, 0] but ±z²/(n + z²) (±0.278 at n = 10,
    ±0.0095 at n = 400), and its coverage stays near ``level`` when discordance is rare (Tango 1998;
    Fagerland, Lydersen & Laake 2014, "Recommended tests and confidence intervals for paired binomial
    proportions", Stat. Med. 33:2850-2875). Deterministic: each end is found by bisection of the monotone
    :func:`tango_statistic` on [−1, Δ] and [Δ, 1]. NaN where n = 0.
    """
    b, c, n = np.broadcast_arrays(*(np.atleast_1d(np.asarray(x, dtype=np.float64)) for x in (b, c, n)))
    if (b < 0).any() or (c < 0).any() or (b + c > n).any():
        raise ValueError("discordant counts must be non-negative and b + c at most n")
    z = z_quantile(level)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = (b - c) / n  # (K,)
    lo_low, hi_low = np.full(d.shape, -1.0), d.copy()  # the low end lies in [-1, Δ]: Z(low) = +z
    lo_high, hi_high = d.copy(), np.full(d.shape, 1.0)  # the high end in [Δ, 1]: Z(high) = −z
    for _ in range(_BISECTIONS):
        mid = (lo_low + hi_low) / 2
        outside = tango_statistic(b, c, n, mid) > z  # NaN (0/0 on a degenerate end) counts as inside
        lo_low, hi_low = np.where(outside, mid, lo_low), np.where(outside, hi_low, mid)
        mid = (lo_high + hi_high) / 2
        outside = tango_statistic(b, c, n, mid) < -z
        lo_high, hi_high = np.where(outside, lo_high, mid), np.where(outside, mid, hi_high)
    out = np.stack([hi_low, lo_high], axis=1)  # (K, 2): the innermost points found outside never count
    out[n <= 0] = np.nan
    return out


def score_examples_to_settle(b: float, c: float, n: int, threshold: float, *, level: float = LEVEL) -> float:
    """How many examples would make the score interval of an inconclusive Δ clear ``threshold`` (NaN if settled).

    With the proportions b/n and c/n held, Tango's Z at any Δ0 grows exactly as √n, so the interval clears
    the threshold once ``m ≥ n · (z / Z(threshold))²``. Infinite when Δ sits on the threshold. Unlike the
    bootstrap rule this holds with no discordant pair too (n = 10, none changed: 189 examples at 0.02).
    """
    low, high = score_intervals([b], [c], [n], level=level)[0]
    delta = (b - c) / n if n > 0 else float("nan")
    if verdict(low, high, threshold) != "inconclusive" or not np.isfinite([delta, low, high]).all():
        return float("nan")
    if abs(delta - threshold) <= TOLERANCE:
        return float("inf")
    z_t = float(tango_statistic(b, c, n, threshold))
    return float(max(n + 1, math.ceil(n * (z_quantile(level) / z_t) ** 2)))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as given); NaN entries stay NaN and do not count."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def verdict(low: float, high: float, threshold: float) -> str:
    """``critical`` when the interval lies above ``threshold``, ``robust`` when it lies at or below it,
    ``inconclusive`` when it straddles it (or is unknown)."""
    if low > threshold + TOLERANCE:
        return "critical"
    if high <= threshold + TOLERANCE:
        return "robust"
    return "inconclusive"


def point_verdict(delta: float, threshold: float) -> str:
    """The paper's rule on the point estimate alone: robust when Δ ≤ threshold, else critical."""
    return "robust" if delta <= threshold + TOLERANCE else "critical"


def examples_to_settle(delta: float, low: float, high: float, n: int, threshold: float) -> float:
    """Roughly how many examples would make an inconclusive interval clear ``threshold`` (NaN if settled).

    The interval's half-width shrinks as 1/√n around the point estimate, so the side facing the threshold
    must shrink from ``delta − low`` (or ``high − delta``) to ``|delta − threshold|``. Infinite when the
    estimate sits on the threshold. A hint, assuming Δ stays where it is.
    """
    if verdict(low, high, threshold) != "inconclusive" or not np.isfinite([delta, low, high]).all():
        return float("nan")
    gap = abs(delta - threshold)
    if gap <= TOLERANCE:
        return float("inf")
    side = delta - low if delta > threshold else high - delta
    return float(math.ceil(n * (side / gap) ** 2))


def two_level_interval(values: np.ndarray, counts: np.ndarray | None = None, *,
                       level: float = LEVEL) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the mean over S draws of a per-draw ratio: draws and test examples both vary.

    ``values (S, N)``: one record per re-randomization draw on the same N units; ``counts (N,)``. See
    :func:`two_level_intervals`.
    """
    mean, low, high = two_level_intervals(np.asarray(values)[None], counts, level=level)[0]
    return float(mean), float(low), float(high)


def two_level_intervals(values: np.ndarray, counts: np.ndarray | None = None, *,
                        level: float = LEVEL) -> np.ndarray:
    """``(G, 3)``: mean, low, high for G groups, ``values (G, S, N)``: S draws on the same N units.

    The target is the mean over draws of the metric on the whole population of units (what other draws on
    another test set estimate). With yₛᵢ = vₛᵢ / c̄ (c̄ the mean count), draw s's value is mₛ = meanᵢ yₛᵢ and
    the estimate m̄ = mean mₛ = μ + (draw shifts) + (units) + (draw × unit noise). Read as a two-way layout
    with mean squares MS_draws, MS_units (ratio-linearized: ȳᵢ − m̄·cᵢ/c̄) and MS_resid, Var(m̄) splits into
    v_draw = MS_draws/(N·S) (the draws' shifts and noise: what the mₛ spread by, estimated from S − 1
    degrees of freedom) and v_unit = max(0, MS_units − MS_resid)/(N·S) (which units the test set holds).
    Each part gets its own quantile, the Student t at S − 1 degrees of freedom (2 draws: 12.7) and the normal,
    and the half-width is √(t²·v_draw + z²·v_unit). So two or three draws give a wide interval rather than a
    confident one (a pooled Welch-Satterthwaite t undercovers there: 0.87 at 2 draws). Coverage measured in
    docs/statistics.md: 0.935-0.968 at 2, 3 and 5 draws. One draw: z·√(MS_units/N), the units' part alone (it
    covers that draw's population value, not the mean over draws). Clipped to the range of the per-unit
    values vₛᵢ/cᵢ (error: [0, 1]). Deterministic: nothing is resampled.
    """
    values = np.asarray(values, dtype=np.float64)  # (G, S, N)
    g, s, n = values.shape
    c = _counts(counts, (n,)).astype(np.float64)  # (N,)
    y = values / c.mean()  # (G, S, N)
    per_draw = y.mean(2)  # (G, S)
    means = per_draw.mean(1)  # (G,)
    unit_means = y.mean(1)  # (G, N)
    ms_units = s * ((unit_means - means[:, None] * c / c.mean()) ** 2).sum(1) / max(n - 1, 1)  # (G,)
    if s > 1:
        ms_draws = n * ((per_draw - means[:, None]) ** 2).sum(1) / (s - 1)
        resid = y - unit_means[:, None, :] - per_draw[:, :, None] + means[:, None, None]  # (G, S, N)
        ms_resid = (resid ** 2).sum((1, 2)) / max((n - 1) * (s - 1), 1)
        v_draw, v_unit = ms_draws / (n * s), np.maximum(ms_units - ms_resid, 0.0) / (n * s)
        t_draw = float(special.stdtrit(s - 1, 0.5 + level / 2))
    else:
        v_draw, v_unit, t_draw = np.zeros(g), ms_units / n, 0.0
    half = np.sqrt(t_draw ** 2 * v_draw + z_quantile(level) ** 2 * v_unit)
    share = values / np.where(c > 0, c, 1.0)  # (G, S, N): the metric is a weighted mean of these
    low = np.maximum(means - half, share.min((1, 2)))
    high = np.minimum(means + half, share.max((1, 2)))
    return np.stack([means, low, high], axis=1)  # (G, 3)


def per_class_error(wrong: np.ndarray, targets: np.ndarray) -> pd.DataFrame:
    """Error per true class: columns ``class``, ``n`` (examples), ``error`` (fraction wrong)."""
    wrong, targets = np.asarray(wrong, dtype=np.float64), np.asarray(targets)
    if wrong.shape != targets.shape:
        raise ValueError(f"error record {wrong.shape} and targets {targets.shape} differ in shape")
    classes, inverse = np.unique(targets, return_inverse=True)
    n = np.bincount(inverse, minlength=len(classes))
    errors = np.bincount(inverse, weights=wrong, minlength=len(classes)) / n
    return pd.DataFrame({"class": classes, "n": n, "error": errors})
