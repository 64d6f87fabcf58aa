"""Anytime-valid confidence sequences for a mean of bounded values, by betting.

A fixed-n interval looked at after every chunk of examples loses its coverage: stopping as soon as it
clears a threshold picks the lucky moments. A *confidence sequence* ``(C_1, C_2, ...)`` keeps it at every
moment at once: ``P(∃n: μ ∉ C_n) ≤ α``, so a procedure may look after each chunk and stop whenever it likes.

The construction is Waudby-Smith & Ramdas's betting confidence sequence (*Estimating means of bounded random
variables by betting*, JRSS-B 86:1, 2024; the predictable plug-in bets of their §5.2; anytime validity by
Ville's inequality as in Howard, Ramdas, McAuliffe & Sekhon, *Time-uniform, nonparametric, nonasymptotic
confidence sequences*, Ann. Stat. 49:2, 2021). For values scaled to ``x ∈ [0, 1]`` and a candidate mean
``m``, a gambler who bets ``λ_i`` (chosen from ``x_1..x_{i-1}`` only) on "the mean is above m" holds

    K⁺_n(m) = Π_{i≤n} (1 + λ_i (x_i − m)),      and on "below m":  K⁻_n(m) = Π_{i≤n} (1 − λ_i (x_i − m)).

Under the true mean both are non-negative martingales starting at 1, so by Ville's inequality each exceeds
``2/α`` at *any* time with probability at most ``α/2``. ``C_n`` holds the m that neither gambler has beaten:
``{m : K⁺_n(m) < 2/α and K⁻_n(m) < 2/α}``. The bets here do not depend on ``m`` and lie in ``[0, 3/4]``, so
every factor is at least 1/4 and ``K⁺`` falls, ``K⁻`` rises with m: each end of ``C_n`` is one root, found by
bisection, and "is the mean above t?" is one product at ``m = t`` (:func:`rejects`).

The bets: ``λ_i = min(3/4, sqrt(2 log(2/α) / (σ̂²_{i-1} · i · log(i + 1))))`` with the running estimates
``μ̂_i = (1/2 + Σ_{j≤i} x_j) / (i + 1)`` and ``σ̂²_i = (1/4 + Σ_{j≤i} (x_j − μ̂_j)²) / (i + 1)`` (WSR eq. 26–27).
Small variance (rarely discordant pairs) gives large bets, so the sequence is narrow where the data are
quiet, as an empirical-Bernstein bound would be.

Paired Δ of a 0/1 metric lies in ``[−1, 1]`` per example (``lo=-1, hi=1``); the adaptive evaluation
(:mod:`criticality.core.adaptive`) uses these sequences on the per-example differences.
"""

from __future__ import annotations

import math

import numpy as np

MAX_BET = 0.75  # WSR's truncation c: every factor of the capital stays ≥ 1 − c
_BISECTIONS = 60  # each end to 2**-60 of the range


def bets(x: np.ndarray, alpha: float) -> np.ndarray:
    """``(n,)`` predictable bets λ_i ∈ [0, MAX_BET] for values ``x (n,)`` in [0, 1]: λ_i uses x_1..x_{i-1} only."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    i = np.arange(1, n + 1, dtype=np.float64)  # 1..n
    mu = (0.5 + np.cumsum(x)) / (i + 1)  # μ̂_i, (n,)
    var = (0.25 + np.cumsum((x - mu) ** 2)) / (i + 1)  # σ̂²_i, (n,)
    before = np.concatenate([[0.25], var[:-1]])  # σ̂²_{i-1}; σ̂²_0 = 1/4
    return np.minimum(MAX_BET, np.sqrt(2 * math.log(2 / alpha) / (before * i * np.log(i + 1))))


def log_capital(x: np.ndarray, m: float, lam: np.ndarray, side: int) -> float:
    """log K⁺_n(m) (``side=+1``) or log K⁻_n(m) (``side=-1``) of values ``x`` in [0, 1] with bets ``lam``."""
    return float(np.log1p(side * lam * (np.asarray(x, dtype=np.float64) - m)).sum())


def _scaled(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not hi > lo:
        raise ValueError(f"the bounds must satisfy lo < hi, got [{lo}, {hi}]")
    x = (np.asarray(values, dtype=np.float64) - lo) / (hi - lo)
    if len(x) and (x.min() < -1e-12 or x.max() > 1 + 1e-12):
        raise ValueError(f"values outside the stated bounds [{lo}, {hi}]")
    return np.clip(x, 0.0, 1.0)


def rejects(values: np.ndarray, t: float, alpha: float, *, above: bool, lo: float = -1.0, hi: float = 1.0) -> bool:
    """Whether the sequence at level ``alpha`` (two-sided, ``alpha/2`` a side), after ``values``, has ruled out
    every mean ``≤ t`` (``above=True``: its low end is above t) or every mean ``≥ t`` (``above=False``: its high
    end is below t). One product, no bisection."""
    x = _scaled(values, lo, hi)
    if not len(x):
        return False
    m = min(1.0, max(0.0, (t - lo) / (hi - lo)))
    return log_capital(x, m, bets(x, alpha), 1 if above else -1) >= math.log(2 / alpha)


def confidence_sequence(values: np.ndarray, alpha: float, *, lo: float = -1.0, hi: float = 1.0
                        ) -> tuple[float, float]:
    """``(low, high)``: the betting confidence sequence for the mean of ``values`` (each in ``[lo, hi]``) at
    level ``1 − alpha``, at time n = len(values). Valid at every n at once (see the module docstring)."""
    x = _scaled(values, lo, hi)
    if not len(x):
        return lo, hi
    lam, bar = bets(x, alpha), math.log(2 / alpha)
    # low: K⁺ falls with m and K⁺(1) ≤ 1 < 2/α; every m with K⁺(m) ≥ 2/α is ruled out.
    a, b = 0.0, 1.0
    if log_capital(x, 0.0, lam, 1) < bar:
        b = 0.0
    for _ in range(_BISECTIONS if b > 0 else 0):
        mid = (a + b) / 2
        a, b = (mid, b) if log_capital(x, mid, lam, 1) >= bar else (a, mid)
    low = a  # the largest m known ruled out: the end reported is never narrower than the set
    # high: K⁻ rises with m and K⁻(0) ≤ 1 < 2/α; every m with K⁻(m) ≥ 2/α is ruled out.
    a, b = 0.0, 1.0
    if log_capital(x, 1.0, lam, -1) < bar:
        a = 1.0
    for _ in range(_BISECTIONS if a < 1 else 0):
        mid = (a + b) / 2
        a, b = (a, mid) if log_capital(x, mid, lam, -1) >= bar else (mid, b)
    high = b
    return lo + low * (hi - lo), lo + high * (hi - lo)
