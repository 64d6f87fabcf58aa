"""The statistics of a grid's table: each cell's paired interval and p against the final model, and
per group the verdict (critical / robust / inconclusive) from re-initialization to epoch 0.

Inputs are the tidy table of :func:`criticality.analysis.tabulate` and the cells' per-example records
(:mod:`criticality.examples`), one per table row (None where a cell has none); the numbers come from
:mod:`criticality.statistics`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from criticality import statistics
from criticality.errors import CriticalityError
from criticality.examples import Record

DEFAULT_THRESHOLD = 0.02  # Δ test error at checkpoint 0 at or below which a layer counts as robust

_CELLS_AT_ONCE = 64  # variants bootstrapped together (the same resamples): bounds (cells × N) memory


def intervals(records: list[Record | None], final_row: int, metric: str, seed: int) -> np.ndarray:
    """``(rows, 2)`` paired intervals of Δ metric against the final row; NaN without records."""
    out = np.full((len(records), 2), np.nan)
    final = records[final_row]
    if final is None or metric not in final:
        return out
    f_values, f_counts = final[metric]
    have = [i for i, r in enumerate(records) if r is not None and metric in r and len(r[metric][0]) == len(f_values)]
    for at in range(0, len(have), _CELLS_AT_ONCE):
        rows = have[at:at + _CELLS_AT_ONCE]
        values = np.stack([records[i][metric][0] for i in rows])  # (K, N)
        counts = np.stack([records[i][metric][1] for i in rows])  # (K, N)
        out[rows] = statistics.paired_intervals(values, f_values, counts, f_counts, rng=seed)
    return out


def p_values(records: list[Record | None], final_row: int, metric: str) -> np.ndarray:
    """Exact McNemar p of each row against the final row, for a 0/1 metric (one value per example)."""
    out = np.full(len(records), np.nan)
    final = records[final_row]
    if final is None or metric not in final or not _binary(final[metric]):
        return out
    for i, r in enumerate(records):
        if r is not None and metric in r and _binary(r[metric]) and len(r[metric][0]) == len(final[metric][0]):
            out[i] = statistics.mcnemar(*statistics.discordant(r[metric][0], final[metric][0]))
    return out


def _binary(record: tuple[np.ndarray, np.ndarray]) -> bool:
    values, counts = record
    return bool((counts == 1).all() and ((values == 0) | (values == 1)).all())


def verdicts(table: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD,
             records: Sequence[Record | None] | None = None, *, rule: str = "interval", metric: str = "error",
             seed: int = 0) -> pd.DataFrame:
    """Per group: Δ ``metric`` when re-initialized to the first checkpoint, its interval and p, the verdict.

    ``rule="interval"``: critical when the interval's low end exceeds ``threshold``, robust when its high
    end is at most ``threshold``, inconclusive otherwise (``examples_to_settle`` hints how many examples
    would decide it); ``p_holm`` corrects ``p_value`` over the table's groups. ``rule="point"``: the
    paper's rule on Δ alone (``point_verdict`` holds it under either rule). ``rerandomize_error_*``: the
    re-randomized error over draws, with a two-level interval (draws × examples) when records are given.
    """
    reinit = table[table.op == "reinit"]
    if reinit.empty:
        raise CriticalityError("no re-initialization cells: verdicts need a checkpoint before the final one")
    first = int(reinit.checkpoint.min())
    if first != 0:
        raise CriticalityError(f"no epoch 0 (initialization) among the checkpoints (earliest is {first}); "
                               "verdicts compare against the initialization")
    records = list(records) if records is not None else [None] * len(table)
    out = []
    for group, cells in table[table.op != "final"].groupby("group", sort=False):
        at0 = cells[(cells.op == "reinit") & (cells.checkpoint == 0)].iloc[0]
        rand = cells[cells.op == "rerandomize"]
        delta, low, high = (float(at0.get(f"delta_{metric}{s}", np.nan)) for s in ("", "_low", "_high"))
        row = {"group": group, "joint": bool(at0.joint), f"delta_{metric}": delta,
               f"delta_{metric}_low": low, f"delta_{metric}_high": high, "p_value": float(at0.get("p_value", np.nan)),
               "threshold": threshold, "point_verdict": statistics.point_verdict(delta, threshold)}
        if metric != "error" and "delta_error" in at0:
            row |= {c: float(at0.get(c, np.nan)) for c in ("delta_error", "delta_error_low", "delta_error_high")}
        row["examples_to_settle"] = statistics.examples_to_settle(delta, low, high, int(at0.n), threshold)
        row |= _rerandomized(rand, [records[i] for i in rand.index], seed)
        out.append(row)
    df = pd.DataFrame(out)
    df.insert(df.columns.get_loc("threshold"), "p_holm", statistics.holm(df["p_value"].to_numpy()))
    df.insert(df.columns.get_loc("point_verdict"), "verdict", _apply(rule, df, metric, threshold))
    return df


def _apply(rule: str, df: pd.DataFrame, metric: str, threshold: float) -> list[str]:
    if rule == "point":
        return list(df["point_verdict"])
    low, high = df[f"delta_{metric}_low"].to_numpy(), df[f"delta_{metric}_high"].to_numpy()
    if not np.isfinite(np.concatenate([low, high])).all():
        warnings.warn("some groups have no per-example records (an engine that gives none, or cells stored by an "
                      "older version): their verdict falls back "
                      "to the point rule", stacklevel=3)
    return [statistics.verdict(lo, hi, threshold) if np.isfinite([lo, hi]).all() else point
            for lo, hi, point in zip(low, high, df["point_verdict"], strict=True)]


def _rerandomized(rand: pd.DataFrame, records: list[Record | None], seed: int) -> dict[str, float]:
    """Mean and std of the re-randomized error over draws, and its two-level interval from the records."""
    errors = rand["error"] if "error" in rand else pd.Series(dtype=float)
    low = high = float("nan")
    usable = [r["error"] for r in records if r is not None and "error" in r]
    if usable and len(usable) == len(records) and len({len(v) for v, _ in usable}) == 1:
        _, low, high = statistics.two_level_interval(np.stack([v for v, _ in usable]), usable[0][1], rng=seed)
    return {"rerandomize_error_mean": float(errors.mean()) if len(errors) else float("nan"),
            "rerandomize_error_std": float(errors.std(ddof=0)) if len(errors) else float("nan"),
            "rerandomize_error_low": low, "rerandomize_error_high": high}


def straddling(cells: pd.DataFrame, metric: str, threshold: float) -> set[tuple[str, str]]:
    """``(group, checkpoint as str)`` of the re-init cells whose Δ ``metric`` interval has low ≤ threshold <
    high: the cells a heatmap marks as inconclusive. Empty when the table has no intervals."""
    low, high = f"delta_{metric}_low", f"delta_{metric}_high"
    if low not in cells.columns or high not in cells.columns:
        return set()
    reinit = cells[cells["op"] == "reinit"]
    at = threshold + statistics.TOLERANCE
    unsure = reinit[(reinit[low] <= at) & (reinit[high] > at)]
    return set(zip(unsure["group"], unsure["checkpoint"].astype(int).astype(str), strict=True))
