"""Module criticality (Chatterji, Neyshabur & Sedghi, ICLR 2020): how far back, under how much noise, can a group go?

::

    mc = criticality.module_criticality(model, checkpoints, (x_test, y_test), eps=0.02, draws=3)
    mc.table    # per group: mu, alpha, sigma, n, delta_norm, scale, points evaluated
    mc.points   # every evaluated (group, alpha, sigma): mean error over draws, feasible, mu, search round
    mc.total    # network criticality: sum of the groups' mu

For group i, ``θᵢ(α) = (1 − α)·θᵢ⁰ + α·θᵢᶠ`` (every other group as trained) plus Gaussian noise ``u``::

    μᵢ = min over α ∈ alphas, σ ∈ sigmas of  α²·‖θᵢᶠ − θᵢ⁰‖²_F / σ_absᵢ²
         subject to  E_u[error(θᵢ(α) + u)] ≤ final error + ε

**Noise convention** (as in :mod:`criticality.interventions`): ``u`` has standard deviation
``σ_abs = σ · sᵢ`` per entry, ``sᵢ = ‖θᵢᶠ − θᵢ⁰‖₂ / √nᵢ`` (the RMS of the group's movement over its nᵢ
parameter entries), σ ∈ (0, 1]. So ``μᵢ = nᵢ · α² / σ²``: the formula of the paper with the noise scale
measured in units of the group's own movement instead of absolute units (which would make μ depend on
the parametrization). The expectation is the mean over ``draws`` fixed noise draws (seeds 0 … draws−1,
the same direction z for every α and σ of one seed).

**Search.** For each α the best σ is the largest feasible one, so instead of the full α × σ grid the
search bisects the sorted ``sigmas`` for each α — assuming the mean error grows with σ (feasible σ form
a prefix of the grid) — and drops an α once even its largest remaining σ cannot beat the group's best
μ so far. ``search="grid"`` evaluates every point; under the monotonicity assumption both give the same
μ (checked by the tests). Cells go through the analysis grid's engine and store (op ``noise`` with an
``alpha``), so a killed search resumes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from criticality.core.engine import Data
from criticality.core.ops import Cell
from criticality.core.plan import Plan, PlanSpec, make_plan
from criticality.core.run import run_cells
from criticality.core.state import buffer_keys
from criticality.errors import CriticalityError
from criticality.infra.files import atomic_path
from criticality.interventions.interpolate import check_unit
from criticality.interventions.noise import NOISE_CONVENTION, noise_scale, parameter_keys

DEFAULT_EPS = 0.02  # tolerated rise of the test error above the final model's (absolute, e.g. 2 points)
SEARCH_ALPHAS = tuple(round(a, 2) for a in np.linspace(0, 1, 11))
SEARCH_SIGMAS = tuple(round(s, 2) for s in np.linspace(0.05, 1, 20))
DEFAULT_DRAWS = 3
SEARCHES = ("bisect", "grid")


@dataclass
class ModuleCriticality:
    table: pd.DataFrame  # one row per group
    points: pd.DataFrame  # every evaluated (group, alpha, sigma)
    total: float  # Σ μ over groups (inf when some group has no feasible point)
    summary: dict[str, Any] = field(default_factory=dict)


def module_criticality(model: nn.Module, checkpoints: Mapping[int, Mapping[str, torch.Tensor]], data: Data, *,
                       groups: Any = "model", eps: float = DEFAULT_EPS, alphas: Sequence[float] = SEARCH_ALPHAS,
                       sigmas: Sequence[float] = SEARCH_SIGMAS, draws: int = DEFAULT_DRAWS, source: int = 0,
                       search: str = "bisect", engine: str = "fast", batch_size: int = 1000,
                       device: str | torch.device = "cpu", max_examples: int | None = None, buffers: str = "reset",
                       store: str | None = None, progress: bool = False, final: int | None = None) -> ModuleCriticality:
    """μ per group and the network total Σμ (see the module docstring); ``store`` makes it resumable."""
    spec = PlanSpec(groups=groups, seeds=0, final=final, engine=engine, batch_size=batch_size,
                    max_examples=max_examples, buffers=buffers, ops=())
    plan = make_plan(model, checkpoints, spec)
    return search_plan(plan, data, eps=eps, alphas=alphas, sigmas=sigmas, draws=draws, source=source, search=search,
                       device=device, store=store, progress=progress)


def search_plan(plan: Plan, data: Data, *, eps: float = DEFAULT_EPS, alphas: Sequence[float] = SEARCH_ALPHAS,
                sigmas: Sequence[float] = SEARCH_SIGMAS, draws: int = DEFAULT_DRAWS, source: int = 0,
                search: str = "bisect", device: str | torch.device = "cpu", store: str | None = None,
                progress: bool = False, final_error: float | None = None) -> ModuleCriticality:
    """Module criticality of the groups of an analysis :class:`~criticality.core.analysis.Plan` (``final_error``:
    the trained model's, when already evaluated on ``data``)."""
    alphas = check_unit(alphas, "alphas")
    sigmas = check_unit(sigmas, "sigmas", zero=False)
    if search not in SEARCHES:
        raise CriticalityError(f"unknown search {search!r}; choose {' or '.join(SEARCHES)}")
    if draws < 1:
        raise CriticalityError(f"module criticality needs at least one noise draw, got {draws}")
    if eps < 0 or not math.isfinite(eps):
        raise CriticalityError(f"eps must be a non-negative number, got {eps}")
    if source not in plan.checkpoints:
        raise CriticalityError(f"source epoch {source} is not among the checkpoints {sorted(plan.checkpoints)}")
    probe = _Prober(plan, data, draws, source, device, store, progress)
    final_error = probe.final_error() if final_error is None else final_error
    limit = final_error + eps + 1e-9  # errors are k/n: a rise of exactly eps is allowed
    if search == "grid":
        probe.points([(g, a, s) for g in plan.groups.names for a in alphas for s in sigmas], limit)
    else:
        _bisect(probe, plan.groups.names, alphas, sigmas, limit)
    return _result(plan, probe, eps, final_error, alphas, sigmas, draws, source, search)


def _bisect(probe: _Prober, names: Sequence[str], alphas: Sequence[float], sigmas: Sequence[float],
            limit: float) -> None:
    """Per (group, α), bisect for the largest feasible σ; all pairs advance together, one engine call a round."""
    bounds = {(g, a): [-1, len(sigmas)] for g in names for a in alphas}  # lo feasible (-1: none yet), hi not
    best = dict.fromkeys(names, math.inf)  # α²/σ² of the best feasible point so far
    while bounds:
        for (g, a), (lo, hi) in list(bounds.items()):
            # Done, or even the largest σ still possible (sigmas[hi - 1]) cannot beat the group's best.
            if hi - lo <= 1 or (a / sigmas[hi - 1]) ** 2 >= best[g]:
                del bounds[(g, a)]
        mids = {pair: (lo + hi) // 2 for pair, (lo, hi) in bounds.items()}
        feasible = probe.points([(g, a, sigmas[m]) for (g, a), m in mids.items()], limit)
        for (g, a), m in mids.items():
            if feasible[(g, a, sigmas[m])]:
                bounds[(g, a)][0] = m
                best[g] = min(best[g], (a / sigmas[m]) ** 2)
            else:
                bounds[(g, a)][1] = m


class _Prober:
    """Evaluates points (group, α, σ) as noise cells over ``draws`` seeds, once each, and keeps them all."""

    def __init__(self, plan: Plan, data: Data, draws: int, source: int, device, store, progress):
        self.plan, self.data, self.draws, self.source = plan, data, draws, source
        self.device, self.store, self.progress = device, store, progress
        self.rows: dict[tuple[str, float, float], dict[str, Any]] = {}
        self.round = 0

    def final_error(self) -> float:
        return float(self._run([Cell("final", checkpoint=self.plan.final_epoch)])[0]["error"])

    def points(self, points: Sequence[tuple[str, float, float]], limit: float) -> dict[tuple, bool]:
        new = [p for p in dict.fromkeys(points) if p not in self.rows]
        cells = [Cell("noise", g, checkpoint=self.source, seed=s, alpha=a, sigma=v)
                 for g, a, v in new for s in range(self.draws)]
        rows = self._run(cells) if cells else []
        for i, p in enumerate(new):
            errors = [r["error"] for r in rows[i * self.draws:(i + 1) * self.draws]]
            losses = [r["loss"] for r in rows[i * self.draws:(i + 1) * self.draws]]
            self.rows[p] = {"group": p[0], "alpha": p[1], "sigma": p[2], "error": float(np.mean(errors)),
                            "error_std": float(np.std(errors)), "loss": float(np.mean(losses)),
                            "draws": self.draws, "feasible": bool(np.mean(errors) <= limit), "round": self.round}
        self.round += 1
        return {p: self.rows[p]["feasible"] for p in points}

    def _run(self, cells: list[Cell]) -> list[dict[str, Any]]:
        plan = dataclasses.replace(self.plan, cells=cells)  # the caller's plan keeps its grid
        return run_cells(plan, self.data, device=self.device, store=self.store, progress=self.progress)


def _result(plan: Plan, probe: _Prober, eps: float, final_error: float, alphas, sigmas, draws: int, source: int,
            search: str) -> ModuleCriticality:
    final, start = plan.checkpoints[plan.final_epoch], plan.checkpoints[source]
    buffers = buffer_keys(plan.model)
    columns = ["group", "alpha", "sigma", "error", "error_std", "loss", "draws", "feasible", "round"]
    points = pd.DataFrame(list(probe.rows.values()), columns=columns)
    rows, mus = [], []
    for g in plan.groups.names:
        keys = parameter_keys(plan.keys(g), final, buffers)
        n = sum(final[k].numel() for k in keys)
        scale = noise_scale(final, start, keys)
        pts = points[points.group == g]
        mu_pts = n * (pts.alpha / pts.sigma) ** 2  # = α²‖Δθ‖² / (σ·s)²
        points.loc[pts.index, "mu"] = mu_pts
        ok = pts[pts.feasible]
        if ok.empty:
            best = {"alpha": math.nan, "sigma": math.nan, "mu": math.inf}
        else:
            i = mu_pts[ok.index].idxmin()
            best = {"alpha": float(pts.alpha[i]), "sigma": float(pts.sigma[i]), "mu": float(mu_pts[i])}
        mus.append(best["mu"])
        rows.append({"group": g, **best, "n": n, "delta_norm": scale * math.sqrt(n), "scale": scale,
                     "points": len(pts), "grid_points": len(alphas) * len(sigmas)})
    table = pd.DataFrame(rows)
    total = float(sum(mus))
    summary = {"eps": eps, "final_error": final_error, "draws": draws, "source": source, "search": search,
               "alphas": list(alphas), "sigmas": list(sigmas), "total": total,
               "mu": {r["group"]: r["mu"] for r in rows}, "points_evaluated": len(points),
               "grid_points": len(alphas) * len(sigmas) * len(plan.groups.names),
               "cells_evaluated": len(points) * draws + 1,
               "convention": "mu = alpha^2 ||theta_f - theta_0||_F^2 / (sigma * s)^2 = n alpha^2 / sigma^2, with "
                             + NOISE_CONVENTION,
               "assumption": "the mean error over the draws grows with sigma for each alpha (bisection)"
                             if search == "bisect" else None}
    return ModuleCriticality(table, points, total, summary)


def write(result: ModuleCriticality, out: str | Path) -> list[Path]:
    """``module_criticality.csv`` (per group) and ``module_criticality_points.csv`` (every point) in ``out``."""
    out = Path(out)
    paths = [out / "module_criticality.csv", out / "module_criticality_points.csv"]
    for frame, path in zip((result.table, result.points), paths, strict=True):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
    return paths
