"""Every figure of an analysis, drawn from its saved tables by one composer; nothing here evaluates a model.

Restyling a figure means re-running :func:`draw_run` on a finished run directory: it reads
``RUN/analysis/cells.csv``, ``distances.csv``, ``summary.json`` (and the interventions' tables) and writes
``RUN/figures/``. Each figure is one function of :class:`RunTables` listed in :data:`FIGURES`; a figure
whose table or metric is absent draws nothing. Adding a figure = one function here, listed there.
Figures are plain :class:`matplotlib.figure.Figure` objects rendered by the Agg canvas (no pyplot, so
importing this module never changes a notebook's backend).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from criticality.core.distances import LABELS as DISTANCE_LABELS
from criticality.errors import CriticalityError
from criticality.infra.files import read_json
from criticality.output import intervention_figures as interventions
from criticality.output.canvas import DPI, new_figure, save
from criticality.output.heatmaps import (
    distance_grid,
    distance_heatmap,
    group_label,
    group_order,
    joint_set,
    robustness_grid,
    robustness_heatmap,
)
from criticality.output.tables import NORMS, read_cells, read_distances, read_summary
from criticality.output.text import metric_label

__all__ = ["DPI", "FIGURES", "HEATMAP_METRICS", "NORMS", "RunTables", "distance_grid", "distance_heatmap",
           "draw_run", "group_label", "group_order", "read_cells", "read_distances", "read_run_tables",
           "robustness_grid", "robustness_heatmap", "save", "width_bars"]

# The robustness heatmaps, each drawn when cells.csv has the column: (metric, title, top of the colour scale:
# "chance" = the summary's chance error, a number, or None = the largest finite value).
HEATMAP_METRICS = (("token_accuracy", "Token accuracy", None), ("error", "Test error", "chance"),
                   ("loss", "Test loss", None), ("token_error", "Token error", 1.0),
                   ("nll", "NLL (nats/token)", None))


@dataclass(frozen=True)
class RunTables:
    """What the figures of one analysis are drawn from."""

    analysis: Path  # the folder holding cells.csv, summary.json, module_criticality.csv, proxies.csv
    cells: pd.DataFrame
    distances: pd.DataFrame | None  # None without distances.csv
    summary: dict[str, Any]
    suffix: str  # " — model · data" for the titles ("" when the config names neither)
    axis: str  # what the checkpoint numbers count: epoch, or step for HF Trainer folders


def read_run_tables(run_dir: str | Path, analysis: str | Path | None = None) -> RunTables:
    """The tables of ``analysis`` (default ``RUN/analysis``), restricted to the experiment's paper columns
    when its config (``analysis/config.json``, else ``RUN/config.json``) names them."""
    run = Path(run_dir)
    analysis = Path(analysis) if analysis is not None else run / "analysis"
    if not (analysis / "cells.csv").is_file():
        raise CriticalityError(f"no analysis table at {analysis / 'cells.csv'}; run `criticality analyze` first")
    config_path = next((p for p in (analysis / "config.json", run / "config.json") if p.is_file()), None)
    config = read_json(config_path) if config_path else {}
    summary = read_summary(analysis, missing_ok=True)
    cells = read_cells(analysis / "cells.csv")
    distances = read_distances(analysis / "distances.csv") if (analysis / "distances.csv").is_file() else None
    columns = (config.get("experiment") or {}).get("columns")
    if columns:  # the paper's checkpoint columns (registry field), the final epoch always drawn
        cells = cells[(cells["op"] != "reinit") | cells["checkpoint"].isin(columns)]
        if distances is not None:
            final = int(distances["checkpoint"].max())
            distances = distances[distances["checkpoint"].isin([*columns, final])]
    where = " · ".join(_name_of(config[k]) for k in ("model", "data") if config.get(k))
    axis = (summary.get("checkpoints") or {}).get("axis") or "epoch"
    return RunTables(analysis, cells, distances, summary, f" — {where}" if where else "", axis)


def _name_of(v: Any) -> str:
    return str(v.get("name", v)) if isinstance(v, dict) else str(v)


def _scale_top(t: RunTables, top: Any) -> float | None:
    return float(t.summary.get("chance_error", 1.0)) if top == "chance" else top


def _marks_at(t: RunTables, metric: str) -> float | None:
    """The threshold whose inconclusive cells are outlined, on the heatmaps of the verdict metric only."""
    return t.summary.get("threshold") if t.summary.get("verdict_metric", "error") == metric else None


# ----------------------------------------------------------------------------- the figures


def robustness_figures(t: RunTables, out: Path) -> list[Path]:
    """``robustness_<metric>``: the paper's heatmap of every metric in :data:`HEATMAP_METRICS` that ran."""
    paths: list[Path] = []
    for metric, title, top in HEATMAP_METRICS:
        if metric in t.cells.columns:
            fig = robustness_heatmap(t.cells, metric, vmax=_scale_top(t, top), title=f"{title}{t.suffix}",
                                     threshold=_marks_at(t, metric), axis=t.axis)
            paths += save(fig, out / f"robustness_{metric}")
    return paths


def joint_figure(t: RunTables, out: Path) -> list[Path]:
    """``joint_<verdict metric>``: each joint group beside the single-layer groups of its members."""
    metric = t.summary.get("verdict_metric") or "error"
    joint = [g for g in group_order(t.cells) if g in joint_set(t.cells[t.cells["op"] != "final"])]
    if not joint or metric not in t.cells.columns:
        return []
    singles = set(group_order(t.cells)) - set(joint)
    rows = list(dict.fromkeys(m for g in joint for m in g.split("+") if m in singles)) + joint
    top = next((top for m, _, top in HEATMAP_METRICS if m == metric), None)
    fig = robustness_heatmap(t.cells, metric, vmax=_scale_top(t, top), groups=rows, axis=t.axis,
                             title=f"Joint vs single-layer resets: {metric_label(metric, 'axis')}{t.suffix}",
                             threshold=_marks_at(t, metric))
    return save(fig, out / f"joint_{metric}")


def distance_figures(t: RunTables, out: Path) -> list[Path]:
    """``distance_<norm>``: each group's distance to checkpoint 0, for every norm in distances.csv."""
    if t.distances is None or not len(t.distances):
        return []
    return [p for norm in NORMS if norm in t.distances.columns
            for p in save(distance_heatmap(t.distances, norm, title=f"{DISTANCE_LABELS[norm]}{t.suffix}",
                                           axis=t.axis), out / f"distance_{norm}")]


def interpolation_figure(t: RunTables, out: Path) -> list[Path]:
    """``interpolation_error``: test error against α, one line per group."""
    if not (t.cells.op == "interpolate").any():
        return []
    return save(interventions.interpolation_lines(t.cells), out / "interpolation_error")


def noise_figure(t: RunTables, out: Path) -> list[Path]:
    """``noise_error``: test error against σ (mean ± std over draws), one line per group."""
    if not ((t.cells.op == "noise") & interventions.numeric(t.cells).alpha.isna()).any():
        return []
    return save(interventions.noise_lines(t.cells), out / "noise_error")


def skip_figure(t: RunTables, out: Path) -> list[Path]:
    """``skip_error``: Δ test error when each skippable group's module is the identity."""
    if not (t.cells.op == "skip").any():
        return []
    return save(interventions.skip_bars(t.cells), out / "skip_error")


def criticality_figure(t: RunTables, out: Path) -> list[Path]:
    """``module_criticality``: μ per group (log scale)."""
    if not (t.analysis / "module_criticality.csv").is_file():
        return []
    table = pd.read_csv(t.analysis / "module_criticality.csv", dtype={"group": str})
    return save(interventions.criticality_bars(table, t.summary.get("module_criticality")),
                out / "module_criticality")


def proxies_figure(t: RunTables, out: Path) -> list[Path]:
    """``proxies``: Block Influence against the Δ test error of reinit@0 and skip."""
    if not (t.analysis / "proxies.csv").is_file():
        return []
    table = pd.read_csv(t.analysis / "proxies.csv", dtype={"group": str, "block": str})
    correlations = (t.summary.get("proxies") or {}).get("spearman", [])
    return save(interventions.proxies_scatter(table, t.cells, correlations), out / "proxies")


FIGURES: tuple[Callable[[RunTables, Path], list[Path]], ...] = (
    robustness_figures, joint_figure, distance_figures,
    interpolation_figure, noise_figure, skip_figure, criticality_figure, proxies_figure,
)


def draw_run(run_dir: str | Path, *, analysis: str | Path | None = None,
             figures: str | Path | None = None) -> list[Path]:
    """Draw every figure of :data:`FIGURES` from the tables in ``analysis`` (default ``RUN/analysis``) into
    ``figures`` (default ``RUN/figures``); returns the written paths."""
    tables = read_run_tables(run_dir, analysis)
    out = Path(figures) if figures is not None else Path(run_dir) / "figures"
    return [p for figure in FIGURES for p in figure(tables, out)]


# ----------------------------------------------------------------------------- across runs


def width_bars(df: pd.DataFrame, title: str | None = None) -> Figure:
    """Fig 3: one bar per (hidden width, model depth): mean ± 1 std (ddof=1) over seeds of ``delta_error``,
    the Δ test error after re-initializing a layer to checkpoint 0, averaged over layers 2..L per run
    (runner's widths.csv: ``width, depth, seed, delta_error``; without ``depth`` one depth is assumed)."""
    missing = {"width", "seed", "delta_error"} - set(df.columns)
    if missing:
        raise CriticalityError(f"width table lacks columns {', '.join(sorted(missing))}")
    df = df.assign(depth=df["depth"] if "depth" in df.columns else 0)
    per_run = df.groupby(["depth", "width", "seed"])["delta_error"].mean()  # mean over layers (old tables)
    stats = per_run.groupby(["depth", "width"]).agg(["mean", "std", "count"]).fillna({"std": 0.0})
    depths, widths = sorted(df["depth"].unique()), sorted(df["width"].unique())
    fig, ax = new_figure(max(5.0, 0.9 * len(widths) * max(len(depths), 1) + 2.5), 3.6)
    bar = 0.8 / max(len(depths), 1)
    x = np.arange(len(widths))
    for k, d in enumerate(depths):
        s = stats.xs(d, level="depth").reindex(widths)
        label = f"FCN {d}×H" if d else None
        ax.bar(x + (k - (len(depths) - 1) / 2) * bar, s["mean"], bar, yerr=s["std"], capsize=2, label=label)
    ax.set_xticks(x, [str(w) for w in widths])
    ax.set_xlabel("hidden width H")
    ax.set_ylabel("Δ test error, re-init to epoch 0\n(mean over layers 2..L)")
    ax.axhline(0, color="0.3", lw=0.8)
    if any(depths):
        ax.legend(fontsize=8, frameon=False)
    n = int(stats["count"].max()) if len(stats) else 0
    title = title or "Re-initialization robustness vs width"
    ax.set_title(textwrap.fill(f"{title} (mean ± 1 std over {n} seeds)", 60), fontsize=10)
    return fig
