"""Paper-layout figures drawn from the analysis tables; nothing here evaluates a model.

Restyling a figure means re-running :func:`draw_run` on a finished run directory: it reads
``RUN/analysis/cells.csv``, ``distances.csv`` and ``summary.json`` and writes ``RUN/figures/``.
Figures are plain :class:`matplotlib.figure.Figure` objects rendered by the Agg canvas (no pyplot, so
importing this module never changes a notebook's backend).

Heatmap layout (paper Figs 1, 2, 8): rows = layer groups (single layers, then joint groups, whose member
layers carry a ``*``); columns = ``rand`` (re-randomization, mean over seeds), one column per re-init
checkpoint (epoch ascending), ``final`` (the trained model). Deep nets (> 8 groups) are transposed, as in
the paper's Figs 4-6. Non-finite cells are grey, hatched, and annotated ``nan`` / ``inf``.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from criticality.core.distances import LABELS as DISTANCE_LABELS
from criticality.core.verdicts import straddling
from criticality.errors import CriticalityError
from criticality.infra.files import atomic_path

DPI = 150
NORMS = tuple(DISTANCE_LABELS)  # l2, linf (the paper's), l2_rel, linf_rel, cosine (ours)
AUTO_TRANSPOSE_ABOVE = 8  # groups; deeper nets get layers as columns
_CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="0.82")
_METRIC_LABEL = {"error": "test error", "loss": "test loss (cross-entropy)"}
_CELL_NA = ["", "nan", "NaN", "<NA>"]


# ----------------------------------------------------------------------------- tables -> grids


def group_order(cells: pd.DataFrame) -> list[str]:
    """Groups in order of first appearance, single-layer groups before joint ones."""
    rows = cells[cells["op"] != "final"]
    groups = list(dict.fromkeys(rows["group"]))
    joint = _joint_set(rows)
    return [g for g in groups if g not in joint] + [g for g in groups if g in joint]


def group_label(group: str, joint: bool, max_members: int = 4) -> str:
    """Row label: a joint group's member layers each get a ``*`` (``fc2*+fc3*``), long ones are cut."""
    if not joint:
        return group
    members = [f"{m}*" for m in group.split("+")]
    if len(members) > max_members:
        return f"{members[0]}+{members[1]}+…+{members[-1]} ({len(members)})"
    return "+".join(members)


def robustness_grid(cells: pd.DataFrame, metric: str = "error") -> tuple[pd.DataFrame, pd.Series, int]:
    """The heatmap's numbers: (grid, rand_std, n_seeds).

    ``grid`` has one row per group (:func:`group_order`) and columns ``rand``, the re-init checkpoints
    as strings (epoch ascending) and ``final``; ``rand`` is absent when the table has no
    re-randomization rows. ``rand_std`` is the std over seeds (ddof=0) per group.
    """
    if metric not in cells.columns:
        raise CriticalityError(f"cells table has no column {metric!r} (columns: {', '.join(cells.columns)})")
    final = cells.loc[cells["op"] == "final", metric]
    if len(final) != 1:
        raise CriticalityError(f"cells table needs exactly one 'final' row, found {len(final)}")
    groups = group_order(cells)
    values = cells[metric].astype(float)
    rand_rows = cells["op"] == "rerandomize"
    rand = values[rand_rows].groupby(cells.loc[rand_rows, "group"])
    reinit_rows = cells["op"] == "reinit"
    reinit = cells[reinit_rows].assign(v=values[reinit_rows], checkpoint=lambda d: d["checkpoint"].astype(int))
    wide = reinit.pivot_table(index="group", columns="checkpoint", values="v", aggfunc="mean", dropna=False)
    wide = wide.reindex(index=groups, columns=sorted(wide.columns))
    wide.columns = [str(c) for c in wide.columns]
    grid = pd.DataFrame(index=pd.Index(groups, name="group"))
    if rand_rows.any():
        grid["rand"] = rand.mean().reindex(groups)
    grid = grid.join(wide)
    grid["final"] = float(final.iloc[0])
    n_seeds = int(rand.size().max()) if rand_rows.any() else 0
    std = rand.std(ddof=0).reindex(groups) if rand_rows.any() else pd.Series(np.nan, index=groups)
    return grid, std, n_seeds


def distance_grid(distances: pd.DataFrame, norm: str = "l2") -> pd.DataFrame:
    """Groups (order of first appearance) × checkpoints (ascending, as strings) of one distance."""
    if norm not in NORMS:
        raise CriticalityError(f"unknown norm {norm!r} (known: {', '.join(NORMS)})")
    if norm not in distances.columns:
        raise CriticalityError(f"distances table has no column {norm!r}")
    groups = list(dict.fromkeys(distances["group"]))
    d = distances.assign(checkpoint=distances["checkpoint"].astype(int), v=distances[norm].astype(float))
    wide = d.pivot_table(index="group", columns="checkpoint", values="v", aggfunc="mean", dropna=False)
    wide = wide.reindex(index=groups, columns=sorted(wide.columns))
    wide.columns = [str(c) for c in wide.columns]
    wide.index.name = "group"
    return wide


def _joint_set(cells: pd.DataFrame) -> set[str]:
    if "joint" in cells.columns:
        return set(cells.loc[cells["joint"].astype(bool), "group"])
    return {g for g in cells["group"] if "+" in g}


def _finite_max(values: np.ndarray, default: float = 1.0) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size and finite.max() > 0 else default


# ----------------------------------------------------------------------------- figures


def robustness_heatmap(
    cells: pd.DataFrame,
    metric: str = "error",
    transpose: bool | None = None,
    vmax: float | None = None,
    title: str | None = None,
    *,
    groups: list[str] | None = None,
    threshold: float | None = None,
    axis: str = "epoch",
) -> Figure:
    """The paper's robustness heatmap of ``metric`` ("error" or "loss", any numeric column works); ``axis``
    names what the checkpoints count (``step`` for HF Trainer folders).

    ``vmax``: top of the colour scale (bottom is 0); pass the chance error for ``metric="error"``
    (default 1.0); for other metrics the default is the largest finite value. ``transpose=None`` puts
    layers on the columns when there are more than 8 groups. ``groups`` keeps only those rows.
    ``threshold``: outline the re-init cells whose Δ interval (``delta_<metric>_low/high``) straddles it.
    """
    grid, std, n_seeds = robustness_grid(cells, metric)
    if groups is not None:
        grid, std = grid.loc[groups], std.loc[groups]
    joint = _joint_set(cells[cells["op"] != "final"])
    values = grid.to_numpy(dtype=float)  # (groups, columns)
    if vmax is None:
        vmax = 1.0 if metric == "error" else _finite_max(values)
    texts = np.vectorize(_fmt, otypes=[object])(values)
    if "rand" in grid.columns and n_seeds > 1:
        col = grid.columns.get_loc("rand")
        for i, s in enumerate(std.to_numpy(dtype=float)):
            if np.isfinite(values[i, col]) and np.isfinite(s):
                texts[i, col] = f"{values[i, col]:.2f}\n±{s:.2f}"
    rows = [group_label(g, g in joint) for g in grid.index]
    n_single = sum(g not in joint for g in grid.index)
    # White lines between the rand | checkpoints | final blocks and the single | joint rows.
    col_breaks = ([1] if "rand" in grid.columns else []) + [len(grid.columns) - 1]
    seeds = f", mean ± std over {n_seeds} seeds" if n_seeds > 1 else ""
    note = f"rand = re-randomized{seeds}; 0, 1, … = re-initialized to that checkpoint; final = trained model"
    unsure = straddling(cells, metric, threshold) if threshold is not None else set()
    marks = np.array([[(g, c) in unsure for c in grid.columns] for g in grid.index], dtype=bool)
    if marks.any():
        note += f"\ndashed outline: the 95 % interval of Δ straddles the threshold {threshold:g} (inconclusive)"
    return _heatmap(
        values,
        texts,
        rows,
        list(grid.columns),
        transpose=len(rows) > AUTO_TRANSPOSE_ABOVE if transpose is None else transpose,
        vmax=vmax,
        title=title or f"Robustness: {_METRIC_LABEL.get(metric, metric)}",
        row_axis="layer group (* = reset jointly)" if joint else "layer group",
        col_axis=f"re-init checkpoint ({axis})",
        cbar=_METRIC_LABEL.get(metric, metric),
        row_breaks=[n_single] if 0 < n_single < len(rows) else [],
        col_breaks=col_breaks,
        note=note,
        marks=marks,
    )


def distance_heatmap(
    distances: pd.DataFrame,
    norm: str = "l2",
    transpose: bool | None = None,
    vmax: float | None = None,
    title: str | None = None,
    axis: str = "epoch",
) -> Figure:
    """Distance of each group's parameters at each checkpoint to checkpoint 0 (Fig 1b, c); ``norm`` is a
    column of distances.csv (see :mod:`criticality.distances`), named on the colour bar and title; ``axis``
    names what the checkpoints count."""
    grid = distance_grid(distances, norm)
    values = grid.to_numpy(dtype=float)  # (groups, checkpoints)
    digits = 3 if _finite_max(values, default=1.0) < 0.1 else 2  # cosine distances are often tiny
    joint = {g for g in grid.index if "+" in g}
    rows = [group_label(g, g in joint) for g in grid.index]
    return _heatmap(
        values,
        np.vectorize(lambda v: _fmt(v, digits), otypes=[object])(values),
        rows,
        list(grid.columns),
        transpose=len(rows) > AUTO_TRANSPOSE_ABOVE if transpose is None else transpose,
        vmax=_finite_max(values) if vmax is None else vmax,
        title=title or f"Distance to initialization: {DISTANCE_LABELS[norm]}",
        row_axis="layer group",
        col_axis=f"checkpoint ({axis})",
        cbar=DISTANCE_LABELS[norm],
        row_breaks=[],
        col_breaks=[],
    )


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
    fig = Figure(figsize=(max(5.0, 0.9 * len(widths) * max(len(depths), 1) + 2.5), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
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


def _literal(label: str) -> str:
    """Escape ``$`` so a layer name is never parsed as mathtext."""
    return str(label).replace("$", r"\$")


def _fmt(v: float, digits: int = 2) -> str:
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}f}"


def _heatmap(
    values, texts, rows, cols, *, transpose, vmax, title, row_axis, col_axis, cbar, row_breaks, col_breaks, note=None,
    marks=None,
) -> Figure:
    """Draw ``values`` (rows × cols) annotated with ``texts``; transposed puts rows on the x axis."""
    if transpose:
        values, texts, marks = values.T, texts.T, None if marks is None else marks.T
        rows, cols, row_axis, col_axis = cols, rows, col_axis, row_axis
        row_breaks, col_breaks = col_breaks, row_breaks
    rows, cols = [_literal(r) for r in rows], [_literal(c) for c in cols]
    n_rows, n_cols = values.shape
    label_w = 0.075 * max((len(r) for r in rows), default=1)  # inches for the row labels
    col_label_h = 0.065 * max((len(c) for c in cols), default=1) if transpose else 0.0
    fig = Figure(
        figsize=(min(24.0, 2.4 + label_w + 0.62 * n_cols), min(24.0, 1.6 + col_label_h + 0.42 * n_rows)),
        layout="constrained",
    )
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(values)
    im = ax.imshow(masked, cmap=_CMAP, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    fontsize = 7 if n_cols > 12 else 8
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            if np.isfinite(v):
                r, g, b, _ = _CMAP(im.norm(v))
                color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            else:
                ax.add_patch(
                    Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.55", linewidth=0)
                )
                color = "0.15"
            ax.text(j, i, texts[i, j], ha="center", va="center", fontsize=fontsize, color=color)
            if marks is not None and marks[i, j]:  # inconclusive: the interval straddles the threshold
                ax.add_patch(Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, edgecolor=color, lw=1.2, ls="--"))
    for b in row_breaks:  # boundaries: a line between index b - 1 and b
        ax.axhline(b - 0.5, color="white", lw=3)
    for b in col_breaks:
        ax.axvline(b - 0.5, color="white", lw=3)
    ax.set_xticks(range(n_cols), cols, rotation=60 if transpose else 0, ha="right" if transpose else "center")
    ax.set_yticks(range(n_rows), rows)
    ax.tick_params(length=0)
    ax.set_xlabel(col_axis, fontsize=8)
    ax.set_ylabel(row_axis, fontsize=8)
    ax.set_title(title, fontsize=10)
    if note:
        fig.supxlabel(note, fontsize=7, color="0.3")
    for spine in ax.spines.values():
        spine.set_visible(False)
    over = _finite_max(values, default=0.0) > vmax  # the colour bar shows that the scale clips
    fig.colorbar(im, ax=ax, label=cbar, shrink=0.9, extend="max" if over else "neither")
    return fig


# ----------------------------------------------------------------------------- files


def save(fig: Figure, path_without_suffix: str | Path) -> list[Path]:
    """Write ``<path>.png`` (150 dpi) and ``<path>.svg`` atomically; close the figure. Returns both paths."""
    base = Path(path_without_suffix)
    written = []
    for fmt in ("png", "svg"):
        target = base.with_name(f"{base.name}.{fmt}")
        with atomic_path(target) as tmp:
            # No dates in the metadata, so re-drawing identical tables gives identical files.
            meta = {"Date": None} if fmt == "svg" else {"Software": None}
            fig.savefig(tmp, format=fmt, dpi=DPI, metadata=meta)
        written.append(target)
    if "matplotlib.pyplot" in sys.modules:  # only pyplot-managed figures need closing there
        sys.modules["matplotlib.pyplot"].close(fig)
    return written


def read_cells(path: str | Path) -> pd.DataFrame:
    """``cells.csv`` back into the analysis dtypes (the final row's empty group stays ``""``)."""
    numeric = ["checkpoint", "seed", "error", "loss", "n", "delta_error", "delta_loss", "delta_error_low",
               "delta_error_high", "delta_loss_low", "delta_loss_high", "p_value"]
    df = pd.read_csv(
        path, keep_default_na=False, na_values={c: _CELL_NA for c in numeric}, dtype={"group": str, "op": str}
    )
    for col in ("checkpoint", "seed"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col]).astype("Int64")
    for col in ("joint", "finite"):
        if col in df.columns and df[col].dtype != bool:
            df[col] = df[col].astype(str).str.lower().eq("true")
    return df


def read_distances(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values={c: _CELL_NA for c in NORMS}, dtype={"group": str})


def _name_of(v) -> str:
    return str(v.get("name", v)) if isinstance(v, dict) else str(v)


def draw_run(run_dir: str | Path) -> list[Path]:
    """Draw every figure of a finished run into ``RUN/figures/`` from its tables; returns the paths."""
    run = Path(run_dir)
    analysis = run / "analysis"
    cells_path = analysis / "cells.csv"
    if not cells_path.is_file():
        raise CriticalityError(f"no analysis table at {cells_path}; run `criticality analyze` first")
    summary = json.loads((analysis / "summary.json").read_text()) if (analysis / "summary.json").is_file() else {}
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    cells = read_cells(cells_path)
    columns = (config.get("experiment") or {}).get("columns")
    if columns:  # the paper's checkpoint columns (registry field), the final epoch always drawn
        cells = cells[(cells["op"] != "reinit") | cells["checkpoint"].isin(columns)]
    chance = float(summary.get("chance_error", 1.0))
    # Inconclusive cells are outlined on the error heatmaps when the verdicts were judged on Δ error.
    marks_at = summary.get("threshold") if summary.get("verdict_metric", "error") == "error" else None
    where = " · ".join(_name_of(config[k]) for k in ("model", "data") if config.get(k))
    suffix = f" — {where}" if where else ""
    out = run / "figures"
    paths: list[Path] = []
    paths += save(
        robustness_heatmap(cells, "error", vmax=chance, title=f"Test error{suffix}", threshold=marks_at),
        out / "robustness_error",
    )
    paths += save(robustness_heatmap(cells, "loss", title=f"Test loss{suffix}"), out / "robustness_loss")
    joint = [g for g in group_order(cells) if g in _joint_set(cells[cells["op"] != "final"])]
    if joint:
        singles = set(group_order(cells)) - set(joint)
        rows = [m for g in joint for m in g.split("+") if m in singles]
        rows = list(dict.fromkeys(rows)) + joint
        fig = robustness_heatmap(
            cells, "error", vmax=chance, groups=rows, title=f"Joint vs single-layer resets: test error{suffix}",
            threshold=marks_at,
        )
        paths += save(fig, out / "joint_error")
    if (analysis / "distances.csv").is_file():
        distances = read_distances(analysis / "distances.csv")
        if columns:
            final = int(distances["checkpoint"].max())
            distances = distances[distances["checkpoint"].isin([*columns, final])]
        for norm in NORMS:
            if norm in distances.columns:
                paths += save(
                    distance_heatmap(distances, norm, title=f"{DISTANCE_LABELS[norm]}{suffix}"),
                    out / f"distance_{norm}",
                )
    from criticality.output import (
        intervention_figures as plots_interventions,  # the interventions' figures, for the ops that ran
    )

    paths += plots_interventions.draw(run)
    return paths
