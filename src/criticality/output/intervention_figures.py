"""Figures of the interventions beyond the paper, drawn from the saved tables; nothing here evaluates a model.

:func:`criticality.output.figures.draw_run` draws them from ``RUN/analysis/cells.csv`` (interpolate, noise
and skip rows), ``module_criticality.csv`` and ``proxies.csv``, for what ran::

    figures/interpolation_error.png   test error vs α, one line per group (α = 0: re-init, α = 1: trained)
    figures/noise_error.png           test error vs σ (mean ± std over draws), one line per group
    figures/skip_error.png            Δ test error when each skippable group's module is the identity
    figures/module_criticality.png    μ per group (log scale), network criticality in the title
    figures/proxies.png               Block Influence vs Δ test error of reinit@0 / skip, with Spearman ρ
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from criticality.output.canvas import literal, new_figure


def numeric(cells: pd.DataFrame) -> pd.DataFrame:
    """``cells`` with alpha, sigma, error and delta_error as floats (NaN where absent)."""
    cells = cells.copy()
    for col in ("alpha", "sigma", "error", "delta_error"):  # alpha/sigma: absent from tables of older runs
        cells[col] = pd.to_numeric(cells[col], errors="coerce") if col in cells.columns else np.nan
    return cells


def _final(cells: pd.DataFrame) -> float:
    return float(cells.loc[cells.op == "final", "error"].iloc[0])


def _legend(ax, n: int) -> None:
    ax.legend(title="group", fontsize=7, frameon=False, ncol=1 if n <= 10 else 2,
              loc="center left", bbox_to_anchor=(1.0, 0.5))


def interpolation_lines(cells: pd.DataFrame, title: str = "") -> Figure:
    """Test error of ``θ(α) = (1 − α)·θ_source + α·θ_final`` for each group, against α."""
    cells = numeric(cells)
    rows = cells[cells.op == "interpolate"]
    fig, ax = new_figure()
    for group, g in rows.groupby("group", sort=False):
        g = g.sort_values("alpha")
        ax.plot(g.alpha, g.error, marker="o", ms=3, label=literal(group))
    ax.axhline(_final(cells), color="0.3", lw=0.8, ls="--", label="final")
    ax.set_xlabel("α (0 = checkpoint %s, 1 = trained)" % (rows.checkpoint.iloc[0] if len(rows) else 0))
    ax.set_ylabel("test error")
    ax.set_title(title or "Interpolation towards the checkpoint, one group at a time", fontsize=10)
    _legend(ax, rows.group.nunique())
    return fig


def noise_lines(cells: pd.DataFrame, title: str = "") -> Figure:
    """Mean test error over draws (band: ± std) of each group with noise of relative scale σ."""
    cells = numeric(cells)
    rows = cells[(cells.op == "noise") & cells.alpha.isna()]
    fig, ax = new_figure()
    for group, g in rows.groupby("group", sort=False):
        stats = g.groupby("sigma").error.agg(["mean", "std"]).fillna(0.0)
        line, = ax.plot(stats.index, stats["mean"], marker="o", ms=3, label=literal(group))
        ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"],
                        color=line.get_color(), alpha=0.15, lw=0)
    ax.axhline(_final(cells), color="0.3", lw=0.8, ls="--", label="final")
    ax.set_xlabel("σ (noise std / RMS of the group's training movement)")
    ax.set_ylabel("test error (mean over draws)")
    ax.set_title(title or "Gaussian noise on one group at a time", fontsize=10)
    _legend(ax, rows.group.nunique())
    return fig


def _bars(labels: list[str], values: np.ndarray, ylabel: str, title: str, log: bool = False) -> Figure:
    fig, ax = new_figure(max(4.0, 0.35 * len(labels) + 2.0), 3.6)
    x = np.arange(len(labels))
    ax.bar(x, np.where(np.isfinite(values), values, np.nan), color="#4c72b0")
    for i, v in enumerate(values):  # the value on every bar: zeros vanish on a log scale, inf/nan draw nothing
        ax.annotate(f"{v:.3g}", (i, 1.0), xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=7,
                    color="0.25")
    ax.set_xticks(x, [literal(s) for s in labels], rotation=60 if len(labels) > 6 else 0,
                  ha="right" if len(labels) > 6 else "center", fontsize=8)
    if log and np.any(np.isfinite(values) & (values > 0)):
        ax.set_yscale("log")
    else:
        ax.axhline(0, color="0.3", lw=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return fig


def skip_bars(cells: pd.DataFrame, title: str = "") -> Figure:
    rows = numeric(cells)
    rows = rows[rows.op == "skip"]
    return _bars(list(rows.group), rows.delta_error.to_numpy(dtype=float), "Δ test error (module → identity)",
                 title or "Skipping modules: one group (or joint group, or run of blocks) at a time")


def criticality_bars(table: pd.DataFrame, summary: dict | None = None, title: str = "") -> Figure:
    summary = summary or {}
    total = summary.get("total", float(table.mu.sum()))
    note = f"Σμ = {total:.3g}, ε = {summary.get('eps', '?')}, {summary.get('draws', '?')} noise draws"
    return _bars(list(table.group), table.mu.to_numpy(dtype=float), "module criticality μ (log)",
                 title or f"Module criticality\n{note}", log=True)


def proxies_scatter(proxies: pd.DataFrame, cells: pd.DataFrame, correlations: list[dict]) -> Figure:
    """Block Influence of each block against the Δ test error of reinit@0 and of skip for its group."""
    cells = numeric(cells)
    fig, ax = new_figure()
    rho = {(r["target"], r["proxy"]): r["spearman"] for r in correlations}
    targets = {"reinit@0": cells[(cells.op == "reinit") & (pd.to_numeric(cells.checkpoint) == 0)],
               "skip": cells[cells.op == "skip"]}
    for (target, rows), marker in zip(targets.items(), ("o", "s"), strict=True):
        delta = rows.drop_duplicates("group").set_index("group").delta_error
        matched = proxies[proxies.group.isin(delta.index)]
        if matched.empty:
            continue
        r = rho.get((target, "bi"))  # summary.json writes an undefined ρ (NaN) as null
        r = float("nan") if r is None else float(r)
        note = f"Spearman ρ = {r:.2f}" if np.isfinite(r) else "ρ undefined: < 3 blocks or a constant side"
        ax.scatter(matched.bi, delta.reindex(matched.group), marker=marker, label=f"{target} ({note})")
    ax.set_xlabel("Block Influence (1 − mean cos(input, output))")
    ax.set_ylabel("Δ test error")
    ax.set_title("Does the one-pass proxy rank blocks like the interventions?", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    return fig
