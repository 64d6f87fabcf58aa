"""Adaptive evaluation: stop each cell as soon as its verdict is decided (``analyze(..., adaptive=True)``).

Most cells of a grid are decided long before the test set runs out: a layer whose reset costs +0.30 error is
critical after a few hundred examples. :func:`run_adaptive` evaluates the data in a fixed, seeded random order
(:func:`order`) in growing chunks (:func:`schedule`). After each chunk every open cell's per-example Δ of the
verdict metric (cell − final model, paired, in [−1, 1]) gets its anytime-valid confidence sequence
(:mod:`criticality.core.sequences`), and the cell stops when the sequence lies above the threshold (critical)
or at or below it (robust). A cell that never decides runs to the end and gets the fixed-n interval of
:mod:`criticality.core.verdicts`, like every cell of a full evaluation.

The guarantee: each of the K judged cells (every cell but the final model's) gets its sequence at level
α/K (Bonferroni), α = 1 − LEVEL = 0.05. Each sequence holds the true Δ at every moment at once with
probability ≥ 1 − α/K, so the probability that *any* verdict made by stopping early is wrong is ≤ α.

Every chunk goes through the fast engine with only the open cells: they share the prefix outputs the engine
caches for that chunk's examples, and closed cells cost nothing more. The final model is evaluated on all
examples (its records pair with every cell's, whatever its length, and its row is the full test set's).
Per-example records are kept in evaluation order: a cell's records are its first ``n`` examples of that order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from criticality.core import batches, canary, sequences, statistics
from criticality.core.engine import Data, Engine, evaluate_naive
from criticality.core.metrics import CellResult
from criticality.core.ops import Cell
from criticality.core.plan import Plan
from criticality.core.records import Record, as_record
from criticality.core.verdicts import verdict_metric
from criticality.errors import CriticalityError

ALPHA = round(1 - statistics.LEVEL, 12)  # 0.05: the chance that any early verdict of the grid is wrong, at most
FIRST_CHUNK = 256  # examples in the first chunk
GROWTH = 1.5  # each chunk this many times the examples seen so far, at least (so at most ~log_1.5(N) looks)
LOW, HIGH = "adaptive_low", "adaptive_high"  # the columns of a stopped cell's sequence (Δ of the verdict metric)


@dataclass(frozen=True)
class Judge:
    """What the stopping rule judges: Δ ``metric`` against ``threshold`` (``sign=-1``: a metric judged by its drop,
    agreement as disagreement), with ``cells`` judged cells in the whole grid (the Bonferroni count), the
    order seeded by ``seed``."""

    metric: str
    threshold: float
    cells: int
    seed: int = 0
    sign: int = 1
    alpha: float = ALPHA

    @property
    def level(self) -> float:
        """Each cell's sequence level: α split evenly over the judged cells."""
        return self.alpha / max(1, self.cells)


def judge_for(plan: Plan, metric: str | None, threshold: float, seed: int = 0) -> Judge | None:
    """The stopping rule of an adaptive plan (None when it is not adaptive): every cell but the final one is
    judged on ``metric`` (resolved as the verdicts resolve it; agreement by its drop) against ``threshold``."""
    if not plan.adaptive:
        return None
    metric = verdict_metric(list(plan.metrics), metric)
    return Judge(metric, float(threshold), cells=len(plan.cells) - 1, seed=int(seed),
                 sign=-1 if metric == "agreement" else 1)


def order(n: int, seed: int) -> np.ndarray:
    """``(n,)`` the evaluation order: a permutation of the examples seeded by ``seed``."""
    return np.random.default_rng(seed).permutation(n)


def schedule(n: int, first: int | None = None, growth: float | None = None) -> list[int]:
    """The examples seen after each chunk: ``first`` (default FIRST_CHUNK), then growing by ``growth`` (default
    GROWTH), ending at ``n``."""
    first, growth = first or FIRST_CHUNK, growth or GROWTH
    ends, seen = [], 0
    while seen < n:
        seen = min(n, max(first, math.ceil(seen * growth)))
        ends.append(seen)
    return ends


def decide(delta: np.ndarray, judge: Judge) -> str | None:
    """``critical`` / ``robust`` when the sequence of the per-example Δ ``(n,)`` has cleared the threshold, else
    None. Critical is tested just above the threshold (2 × TOLERANCE), so the reported sequence's low end reads as
    above it under :func:`criticality.core.statistics.verdict`'s tolerance; robust at the threshold itself."""
    judged = judge.sign * np.asarray(delta, dtype=np.float64)
    if sequences.rejects(judged, judge.threshold + 2 * statistics.TOLERANCE, judge.level, above=True):
        return "critical"
    if sequences.rejects(judged, judge.threshold, judge.level, above=False):
        return "robust"
    return None


def run_adaptive(plan: Plan, cells: Sequence[Cell], data: Data, judge: Judge, device: Any = "cpu"
                 ) -> Iterator[tuple[Cell, CellResult]]:
    """Evaluate ``cells`` adaptively; yields ``(cell, result)`` as cells stop, the final model's first.

    A stopped cell's result holds its metrics and records over the examples it saw (``n``) and the sequence's
    ends under :data:`LOW` / :data:`HIGH` (Δ of ``judge.metric``, in its own sign)."""
    if not cells:
        return
    ordered = _ordered(data, plan.max_examples, judge.seed)
    n = batches.batch_len(ordered[0])
    final_cell = Cell("final", checkpoint=plan.final_epoch)
    engine = None if plan.engine == "naive" else Engine(
        plan.model, plan.checkpoints[plan.final_epoch], ordered, metrics=plan.metrics, batch_size=plan.batch_size,
        device=device, output=plan.output, blocks=_blocks(plan))
    engine = canary.guard(plan, cells, ordered, device, engine)
    (_, final), = list(_chunk(plan, engine, [final_cell], ordered, device))  # every example
    reference = _binary(as_record(final.records), judge.metric)
    if final_cell in cells:
        yield final_cell, final
    open_cells = [c for c in cells if c != final_cell]
    parts: dict[Cell, list[CellResult]] = {c: [] for c in open_cells}
    start = 0
    for end in schedule(n):
        if not open_cells:
            return
        for cell, result in _chunk(plan, engine, open_cells, _take(ordered, slice(start, end)), device):
            parts[cell].append(result)
        start = end
        for cell in list(open_cells):
            merged = _merged(parts[cell])
            delta = _binary(as_record(merged.records), judge.metric) - reference[:end]
            if end == n or decide(delta, judge) is not None:
                if end < n:  # stopped early: the sequence carries the verdict; at n the fixed-n interval does
                    low, high = sequences.confidence_sequence(judge.sign * delta, judge.level)
                    merged[LOW], merged[HIGH] = (low, high) if judge.sign > 0 else (-high, -low)
                open_cells.remove(cell)
                del parts[cell]
                yield cell, merged


def _chunk(plan: Plan, engine: Engine | None, cells: list[Cell], chunk: tuple[Any, Any], device: Any
           ) -> Iterator[tuple[Cell, CellResult]]:
    """The open cells' results on one chunk: through the engine (``engine.data`` is read at each pass), or one by
    one with the plain reference when the plan asks for ``engine="naive"``."""
    if engine is not None:
        engine.data = chunk
        yield from engine.evaluate([plan.variant(c) for c in cells])
        return
    final = plan.checkpoints[plan.final_epoch]
    for cell in cells:
        yield cell, evaluate_naive(plan.model, plan.state(cell), chunk, metrics=plan.metrics,
                                   batch_size=plan.batch_size, device=device, output=plan.output,
                                   skip=plan.variant(cell).skip, reference_state=final)


def _ordered(data: Data, limit: int | None, seed: int) -> tuple[Any, Any]:
    """The data's first ``limit`` examples, in the seeded evaluation order."""
    whole = batches.in_memory(data)
    if whole is None:
        raise CriticalityError("adaptive evaluation needs the evaluation data in memory (tensors (x, y), x alone or a "
                               "dict of tensors), to take examples in a random order; got a loader "
                               f"({type(data).__name__})")
    inputs, targets = whole
    n = batches.batch_len(inputs)
    n = n if limit is None else min(n, limit)
    return _take((inputs, targets), torch.from_numpy(order(n, seed)))


def _take(batch: tuple[Any, Any], index: slice | torch.Tensor) -> tuple[Any, Any]:
    """``(inputs, targets)`` at ``index`` (a slice or an index tensor); dict inputs key by key."""
    def take(t: Any) -> Any:
        if t is None:
            return None
        return {k: v[index] for k, v in t.items()} if isinstance(t, Mapping) else t[index]
    return take(batch[0]), take(batch[1])


def _blocks(plan: Plan) -> list[tuple[str, Any]] | None:
    return None if plan.blocks is None else [(p, plan.model.get_submodule(p)) for p in plan.blocks]


def _binary(record: Record, metric: str) -> np.ndarray:
    """The metric's per-example 0/1 values ``(n,)``; refused for any other metric."""
    values, counts = record[metric]
    if not ((counts == 1).all() and ((values == 0) | (values == 1)).all()):
        raise CriticalityError(f"adaptive evaluation needs a verdict metric with one 0/1 value per example (error, or "
                               f"agreement of a classifier); {metric!r} has other values (tokens of a sequence, or "
                               "a loss): its per-example Δ has no known bound, which the confidence sequence needs")
    return values


def _merged(parts: list[CellResult]) -> CellResult:
    """One result from a cell's chunk results: records concatenated, metrics recomputed over all of them."""
    out = CellResult()
    out.records = {}
    for name in parts[0].records:
        values = torch.cat([p.records[name][0] for p in parts])
        counts = torch.cat([p.records[name][1] for p in parts])
        out.records[name] = (values, counts)
        out[name] = float(values.sum() / counts.sum())
    out["n"] = sum(p["n"] for p in parts)
    return out


def restate(table: pd.DataFrame, records: list[Record | None], metrics: Sequence[str], metric: str) -> pd.DataFrame:
    """The table of an adaptive run: a stopped cell's Δ of every metric against the final model on the same
    examples (its first ``n``), its verdict metric's interval from its confidence sequence, its other
    intervals and its p-value NaN (a fixed-n interval or test after stopping early would not be valid)."""
    table = table.copy()
    final_at = table.index[table.op == "final"][0]
    full = int(table.at[final_at, "n"])
    final = records[final_at]
    for i in table.index[table["n"] < full]:
        k = int(table.at[i, "n"])
        for m in metrics:
            f_values, f_counts = final[m]
            table.at[i, f"delta_{m}"] = table.at[i, m] - float(f_values[:k].sum() / f_counts[:k].sum())
            for end in ("low", "high"):
                if f"delta_{m}_{end}" in table:
                    table.at[i, f"delta_{m}_{end}"] = np.nan
        table.at[i, f"delta_{metric}_low"], table.at[i, f"delta_{metric}_high"] = table.at[i, LOW], table.at[i, HIGH]
        table.at[i, "p_value"] = np.nan
    return table
