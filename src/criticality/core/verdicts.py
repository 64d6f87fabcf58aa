"""The statistics of a grid's table: each cell's paired interval and p against the final model, and
per group the verdict (critical / robust / inconclusive) from re-initialization to epoch 0.

Inputs are the tidy table of :func:`criticality.core.analysis.tabulate` and the cells' per-example records
(:mod:`criticality.core.records`), one per table row (None where a cell has none); the numbers come from
:mod:`criticality.core.statistics`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from criticality.core import resampling, statistics
from criticality.core.records import Record
from criticality.errors import CriticalityError

DEFAULT_THRESHOLD = 0.02  # Δ test error at checkpoint 0 at or below which a layer counts as robust
# The verdict metric when none is chosen: the first of these that was measured, else the first metric.
# "agreement" is judged by its drop, named "disagreement" (see judged()).
VERDICT_METRICS = ("error", "token_error", "agreement")
DISAGREEMENT = "disagreement"  # 1 - agreement: the fraction of examples (tokens) whose top-1 changed


def verdict_metric(metrics: Sequence[str], chosen: str | None = None) -> str:
    """The measured metric the verdicts judge: ``chosen``, else error, else token_error, else agreement
    (label-free data), else the first metric. ``"disagreement"`` names agreement's drop."""
    metrics = list(metrics)
    if chosen is None:
        return next((m for m in VERDICT_METRICS if m in metrics), metrics[0] if metrics else "error")
    if chosen == DISAGREEMENT and DISAGREEMENT not in metrics and "agreement" in metrics:
        return "agreement"
    if chosen not in metrics:
        raise CriticalityError(f"verdict metric {chosen!r} is not among the metrics {metrics}")
    return chosen


def judged(table: pd.DataFrame, records: Sequence[Record | None], metric: str
           ) -> tuple[pd.DataFrame, list[Record | None], str]:
    """The table, records and metric name the verdicts read. ``agreement`` (higher is better, 1 for the
    final model) is judged as ``disagreement`` = 1 - agreement, so that "Δ ≤ threshold is robust" reads as
    for error: a group is robust when resetting it changes the top-1 prediction of at most ``threshold`` of
    the examples (tokens). Any other metric is judged as it is."""
    if metric != "agreement":
        return table, list(records), metric
    view, d = table.copy(), DISAGREEMENT
    view[d], view[f"delta_{d}"] = 1 - view["agreement"], -view["delta_agreement"]
    if "delta_agreement_low" in view:
        view[f"delta_{d}_low"], view[f"delta_{d}_high"] = -view["delta_agreement_high"], -view["delta_agreement_low"]
    flipped = [None if r is None or "agreement" not in r else
               {**r, d: (r["agreement"][1] - r["agreement"][0], r["agreement"][1])} for r in records]
    return view, flipped, d

_ELEMENTS_AT_ONCE = 1 << 23  # cells × units bootstrapped together (64 MiB of float64 values)


def table_resamples(records: Sequence[Record | None], final_row: int, metrics: Sequence[str],
                    seed: int) -> resampling.Resamples | None:
    """The one set of bootstrap resamples a table's intervals share (seeded by ``seed``), or None when every
    metric among ``metrics`` is 0/1 (those get the score interval), the final row has no records, or the table
    has ``BOOTSTRAP_BELOW`` units or more (nothing is resampled then)."""
    final = records[final_row] if records else None
    if final is None or all(m not in final or _binary(final[m]) for m in metrics):
        return None
    n = len(next(iter(final.values()))[0])
    return resampling.Resamples(n, statistics.RESAMPLES, seed) if n < resampling.BOOTSTRAP_BELOW else None


def intervals(records: list[Record | None], final_row: int, metric: str,
              seed: int | resampling.Resamples) -> np.ndarray:
    """``(rows, 2)`` paired intervals of Δ metric against the final row; NaN without records.

    0/1 records (error; agreement for a classifier) get Tango's score interval from their discordant counts
    (:func:`~criticality.core.statistics.score_intervals`: exact, no resampling, honest when nothing
    changed); any other metric the bootstrap-t interval over units (examples, or sequences)
    (:func:`~criticality.core.resampling.studentized_intervals`) on ``seed``'s resamples (a
    :class:`~criticality.core.resampling.Resamples` shared by the table, or a seed for one). A cell whose
    units count other tokens than the final model's gets the percentile bootstrap. The final row itself is
    [0, 0]: its Δ is zero by construction, not an estimate.
    """
    out = np.full((len(records), 2), np.nan)
    final = records[final_row]
    if final is None or metric not in final:
        return out
    f_values, f_counts = final[metric]
    have = [i for i, r in enumerate(records) if r is not None and metric in r and len(r[metric][0]) == len(f_values)]
    if _binary(final[metric]):
        binary = [i for i in have if _binary(records[i][metric])]
        have = sorted(set(have) - set(binary))
        if binary:
            b, c = np.array([statistics.discordant(records[i][metric][0], f_values) for i in binary]).T  # (K,)
            out[binary] = statistics.score_intervals(b, c, len(f_values))
    shared = [i for i in have if np.array_equal(records[i][metric][1], f_counts)]  # the usual case
    if shared:
        draws = seed if isinstance(seed, resampling.Resamples) or len(f_values) >= resampling.BOOTSTRAP_BELOW \
            else resampling.Resamples(len(f_values), statistics.RESAMPLES, seed)
        step = max(1, _ELEMENTS_AT_ONCE // max(1, len(f_values)))
        for at in range(0, len(shared), step):
            rows = shared[at:at + step]
            values = np.stack([records[i][metric][0] for i in rows])  # (K, N)
            out[rows] = resampling.studentized_intervals(values, f_values, f_counts, rng=draws)
    for i in sorted(set(have) - set(shared)):
        rng = seed.seed if isinstance(seed, resampling.Resamples) else seed
        out[i] = statistics.paired_intervals(records[i][metric][0][None], f_values, records[i][metric][1][None],
                                             f_counts, rng=rng)[0]
    out[final_row] = 0.0
    return out


def settle(delta: float, low: float, high: float, n: int, threshold: float,
           pair: tuple[Record | None, Record | None], metric: str) -> float:
    """Units that would settle an inconclusive verdict: from the score interval when the cell's and the final
    model's ``metric`` records (``pair``) are 0/1, else the bootstrap's 1/√n rule (NaN for [0, 0]: no unit
    differs, nothing to extrapolate). ``n`` and the answer count the records' units:
    examples, or sequences for sequence models (never tokens); :func:`units` names them."""
    cell, final = pair
    if cell is not None and final is not None and metric in cell and metric in final \
            and _binary(cell[metric]) and _binary(final[metric]) and len(cell[metric][0]) == len(final[metric][0]):
        b, c = statistics.discordant(cell[metric][0], final[metric][0])
        return statistics.score_examples_to_settle(b, c, len(final[metric][0]), threshold)
    if low == high == 0:
        return float("nan")
    return statistics.examples_to_settle(delta, low, high, n, threshold)


def units(records: Sequence[Record | None], metric: str) -> str:
    """What the table's units are for ``metric``: ``"sequences"`` when a record counts more than one token
    per unit, else ``"examples"``."""
    found = next((r[metric] for r in records if r is not None and metric in r), None)
    return "sequences" if found is not None and not (np.asarray(found[1]) == 1).all() else "examples"


def p_values(records: list[Record | None], final_row: int, metric: str, seed: int = 0) -> np.ndarray:
    """Paired p of each row against the final row: exact McNemar for a 0/1 metric (one 0/1 value per example),
    else the sign-flip permutation test over units (:func:`~criticality.core.resampling.sign_flip_p`, exact
    up to 16 differing units, else Monte Carlo seeded by ``seed``). NaN without records."""
    out = np.full(len(records), np.nan)
    final = records[final_row]
    if final is None or metric not in final:
        return out
    f_values, f_counts = final[metric]
    rows = [i for i, r in enumerate(records) if r is not None and metric in r and len(r[metric][0]) == len(f_values)]
    binary = [i for i in rows if _binary(final[metric]) and _binary(records[i][metric])]
    for i in binary:
        out[i] = statistics.mcnemar(*statistics.discordant(records[i][metric][0], f_values))
    rest = [i for i in rows if i not in binary]
    if rest:
        values = np.stack([records[i][metric][0] for i in rest])  # (K, N)
        counts = np.stack([records[i][metric][1] for i in rest])  # (K, N)
        out[rest] = resampling.sign_flip_p(values, f_values, counts, f_counts, rng=seed)
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
    re-randomized error over draws, with a two-level interval (draws × units,
    :func:`~criticality.core.statistics.two_level_intervals`) when records are given
    (``rerandomize_<metric>_*`` when the table has no error column). An interval of [0, 0] from a resampled
    metric (no unit differs) is inconclusive, never robust. ``units`` names what ``examples_to_settle`` counts
    (examples, or sequences).
    """
    reinit = table[table.op == "reinit"]
    if reinit.empty:
        raise CriticalityError("no re-initialization cells: verdicts need a checkpoint before the final one")
    first = int(reinit.checkpoint.min())
    if first != 0:
        raise CriticalityError(f"no epoch 0 (initialization) among the checkpoints (earliest is {first}); "
                               "verdicts compare against the initialization")
    records = list(records) if records is not None else [None] * len(table)
    rand_metric = "error" if "error" in table.columns else metric  # the re-randomized columns' metric
    final_at = int(table.index[table.op == "final"][0]) if (table.op == "final").any() else None
    out, draws = [], []  # draws: per group, the records of its re-randomization cells
    unit_name = units(records, metric)  # what examples_to_settle counts: examples, or sequences
    for group, cells in table[table.op != "final"].groupby("group", sort=False):
        if not ((cells.op == "reinit") & (cells.checkpoint == 0)).any():
            continue  # not a group of the grid (a run of blocks skipped together): nothing to judge
        at0 = cells[(cells.op == "reinit") & (cells.checkpoint == 0)].iloc[0]
        rand = cells[cells.op == "rerandomize"]
        delta, low, high = (float(at0.get(f"delta_{metric}{s}", np.nan)) for s in ("", "_low", "_high"))
        row = {"group": group, "joint": bool(at0.joint), f"delta_{metric}": delta,
               f"delta_{metric}_low": low, f"delta_{metric}_high": high, "p_value": float(at0.get("p_value", np.nan)),
               "threshold": threshold, "point_verdict": statistics.point_verdict(delta, threshold)}
        if metric != "error" and "delta_error" in at0:
            row |= {c: float(at0.get(c, np.nan)) for c in ("delta_error", "delta_error_low", "delta_error_high")}
        row["units"] = unit_name
        row["examples_to_settle"] = settle(delta, low, high, int(at0.n), threshold,
                                           (records[at0.name], None if final_at is None else records[final_at]), metric)
        errors = rand[rand_metric] if rand_metric in rand else pd.Series(dtype=float)
        row |= {f"rerandomize_{rand_metric}_mean": float(errors.mean()) if len(errors) else float("nan"),
                f"rerandomize_{rand_metric}_std": float(errors.std(ddof=0)) if len(errors) else float("nan")}
        out.append(row)
        draws.append([records[i] for i in rand.index])
    df = pd.DataFrame(out)
    df[[f"rerandomize_{rand_metric}_low", f"rerandomize_{rand_metric}_high"]] = _rerandomized(draws, rand_metric)
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
    # [0, 0] from a resampled interval means no unit differs: no evidence either way (the score interval of a
    # 0/1 metric is never [0, 0]).
    return [(statistics.verdict(lo, hi, threshold) if not lo == hi == 0 else "inconclusive")
            if np.isfinite([lo, hi]).all() else point
            for lo, hi, point in zip(low, high, df["point_verdict"], strict=True)]


def _rerandomized(draws: list[list[Record | None]], metric: str = "error") -> np.ndarray:
    """``(groups, 2)``: two-level interval of each group's re-randomized ``metric`` (NaN without records);
    groups with as many draws on the same units (same counts) are computed together."""
    out = np.full((len(draws), 2), np.nan)
    usable: dict[tuple, list[int]] = {}
    for j, recs in enumerate(draws):
        if recs and all(r is not None and metric in r for r in recs):
            counts = {r[metric][1].tobytes() for r in recs}
            if len(counts) == 1:
                usable.setdefault((len(recs), counts.pop()), []).append(j)
    for rows in usable.values():
        values = np.stack([[r[metric][0] for r in draws[j]] for j in rows])  # (G, S, N)
        counts = draws[rows[0]][0][metric][1]
        out[rows] = statistics.two_level_intervals(values, counts)[:, 1:]
    return out


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
