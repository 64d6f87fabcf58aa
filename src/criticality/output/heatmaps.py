"""The paper-layout heatmaps: robustness (paper Figs 1a, 2, 4-10) and distance to initialization (Figs 1b, c).

Heatmap layout: rows = layer groups (single layers, then joint groups, whose member layers carry a ``*``);
columns = ``rand`` (re-randomization, mean over seeds), one column per re-init checkpoint (ascending),
``final`` (the trained model). Deep nets (> 8 groups) are transposed, as in the paper's Figs 4-6.
Non-finite cells are grey, hatched, and annotated ``nan`` / ``inf``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from criticality.core.distances import LABELS as DISTANCE_LABELS
from criticality.core.verdicts import straddling
from criticality.errors import CriticalityError
from criticality.output.canvas import CMAP, finite_max, literal, new_figure
from criticality.output.tables import NORMS
from criticality.output.text import metric_label, number

AUTO_TRANSPOSE_ABOVE = 8  # groups; deeper nets get layers as columns


# ----------------------------------------------------------------------------- tables -> grids


def group_order(cells: pd.DataFrame) -> list[str]:
    """Groups in order of first appearance, single-layer groups before joint ones."""
    rows = cells[cells["op"] != "final"]
    groups = list(dict.fromkeys(rows["group"]))
    joint = joint_set(rows)
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


def joint_set(cells: pd.DataFrame) -> set[str]:
    """The joint groups: the ``joint`` column where the table has one, else the names with a ``+``."""
    if "joint" in cells.columns:
        return set(cells.loc[cells["joint"].astype(bool), "group"])
    return {g for g in cells["group"] if "+" in g}


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
    joint = joint_set(cells[cells["op"] != "final"])
    values = grid.to_numpy(dtype=float)  # (groups, columns)
    if vmax is None:
        vmax = 1.0 if metric == "error" else finite_max(values)
    texts = np.vectorize(lambda v: number(v, digits=2), otypes=[object])(values)
    if "rand" in grid.columns and n_seeds > 1:
        col = grid.columns.get_loc("rand")
        for i, s in enumerate(std.to_numpy(dtype=float)):
            if np.isfinite(values[i, col]) and np.isfinite(s):
                texts[i, col] = f"{values[i, col]:.2f}\n±{s:.2f}"
    partial = _partial(cells)
    for i, g in enumerate(grid.index):
        for j, c in enumerate(grid.columns):
            if (g, c) in partial and np.isfinite(values[i, j]):
                texts[i, j] = f"{texts[i, j]}†"
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
    if partial:
        note += (f"\n† adaptive evaluation stopped the cell early (verdict decided): its value rests on fewer than "
                 f"all {int(cells.loc[cells['op'] == 'final', 'n'].iloc[0]):,} examples")
    return _heatmap(
        values,
        texts,
        rows,
        list(grid.columns),
        transpose=len(rows) > AUTO_TRANSPOSE_ABOVE if transpose is None else transpose,
        vmax=vmax,
        title=title or f"Robustness: {metric_label(metric, 'axis')}",
        row_axis="layer group (* = reset jointly)" if joint else "layer group",
        col_axis=f"re-init checkpoint ({axis})",
        cbar=metric_label(metric, "axis"),
        row_breaks=[n_single] if 0 < n_single < len(rows) else [],
        col_breaks=col_breaks,
        note=note,
        marks=marks,
    )


def _partial(cells: pd.DataFrame) -> set[tuple[str, str]]:
    """``(group, column)`` of the heatmap cells resting on fewer examples than the final model's (an adaptive
    run's early stops): a re-init checkpoint's column, or ``rand`` when any of its draws stopped early."""
    if "n" not in cells.columns or not (cells["op"] == "final").any():
        return set()
    full = cells.loc[cells["op"] == "final", "n"].iloc[0]
    short = cells[(cells["n"] < full) & cells["op"].isin(["reinit", "rerandomize"])]
    return {(g, "rand" if op == "rerandomize" else str(int(c)))
            for g, op, c in zip(short["group"], short["op"], short["checkpoint"], strict=True)}


def distance_heatmap(
    distances: pd.DataFrame,
    norm: str = "l2",
    transpose: bool | None = None,
    vmax: float | None = None,
    title: str | None = None,
    axis: str = "epoch",
) -> Figure:
    """Distance of each group's parameters at each checkpoint to checkpoint 0 (Fig 1b, c); ``norm`` is a
    column of distances.csv (see :mod:`criticality.core.distances`), named on the colour bar and title; ``axis``
    names what the checkpoints count."""
    grid = distance_grid(distances, norm)
    values = grid.to_numpy(dtype=float)  # (groups, checkpoints)
    digits = 3 if finite_max(values, default=1.0) < 0.1 else 2  # cosine distances are often tiny
    joint = {g for g in grid.index if "+" in g}
    rows = [group_label(g, g in joint) for g in grid.index]
    return _heatmap(
        values,
        np.vectorize(lambda v: number(v, digits=digits), otypes=[object])(values),
        rows,
        list(grid.columns),
        transpose=len(rows) > AUTO_TRANSPOSE_ABOVE if transpose is None else transpose,
        vmax=finite_max(values) if vmax is None else vmax,
        title=title or f"Distance to initialization: {DISTANCE_LABELS[norm]}",
        row_axis="layer group",
        col_axis=f"checkpoint ({axis})",
        cbar=DISTANCE_LABELS[norm],
        row_breaks=[],
        col_breaks=[],
    )


def _heatmap(
    values, texts, rows, cols, *, transpose, vmax, title, row_axis, col_axis, cbar, row_breaks, col_breaks, note=None,
    marks=None,
) -> Figure:
    """Draw ``values`` (rows × cols) annotated with ``texts``; transposed puts rows on the x axis."""
    if transpose:
        values, texts, marks = values.T, texts.T, None if marks is None else marks.T
        rows, cols, row_axis, col_axis = cols, rows, col_axis, row_axis
        row_breaks, col_breaks = col_breaks, row_breaks
    rows, cols = [literal(r) for r in rows], [literal(c) for c in cols]
    n_rows, n_cols = values.shape
    label_w = 0.075 * max((len(r) for r in rows), default=1)  # inches for the row labels
    col_label_h = 0.065 * max((len(c) for c in cols), default=1) if transpose else 0.0
    fig, ax = new_figure(min(24.0, 2.4 + label_w + 0.62 * n_cols), min(24.0, 1.6 + col_label_h + 0.42 * n_rows))
    masked = np.ma.masked_invalid(values)
    im = ax.imshow(masked, cmap=CMAP, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    fontsize = 7 if n_cols > 12 else 8
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            if np.isfinite(v):
                r, g, b, _ = CMAP(im.norm(v))
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
    over = finite_max(values, default=0.0) > vmax  # the colour bar shows that the scale clips
    fig.colorbar(im, ax=ax, label=cbar, shrink=0.9, extend="max" if over else "neither")
    return fig
