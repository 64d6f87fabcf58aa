"""The depth-pruning curve, drawn from ``pruning.csv`` (:mod:`criticality.pipelines.prune`); nothing here evaluates.

    figures/pruning.png   Δ metric vs blocks removed, the 95 % paired interval as a band, the threshold dashed,
                          each step labelled with the index of the block it removed
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from criticality.output.canvas import new_figure, save


def pruning_curve(table: pd.DataFrame, metric: str, threshold: float | None = None, title: str = "") -> Figure:
    """Δ ``metric`` against the full model after each step, with its interval."""
    t = table.sort_values("step")
    fig, ax = new_figure()
    ax.fill_between(t.step, t.delta_low, t.delta_high, color="C0", alpha=0.25, lw=0, label="95 % paired interval")
    ax.plot(t.step, t.delta, color="C0", marker="o", ms=4, label=f"Δ {metric}")
    for _, row in t[t.step > 0].iterrows():
        ax.annotate(str(int(row.removed_index)), (row.step, row.delta), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7)
    if threshold is not None:
        ax.axhline(threshold, color="0.3", lw=0.8, ls="--", label=f"threshold {threshold:g}")
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set_xticks(list(t.step))
    ax.set_xlabel("blocks removed (label: index of the block removed at that step)")
    ax.set_ylabel(f"Δ {metric} vs the full model")
    ax.set_title(title or "Depth pruning, one block at a time", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    return fig


def draw_pruning(table: pd.DataFrame, path_without_suffix: str | Path, *, metric: str,
                 threshold: float | None = None) -> list[Path]:
    """Write ``<path>.png`` and ``<path>.svg``."""
    return save(pruning_curve(table, metric, threshold), path_without_suffix)
