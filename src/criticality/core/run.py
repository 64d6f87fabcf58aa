"""Evaluating a plan's cells: :func:`run_cells` runs them on the fast engine or the plain reference, resumes
from and extends a store, and keeps every cell's per-example records. Before the fast engine runs, the canary
(:mod:`criticality.core.canary`) checks one variant per group against the reference; a model that fails it is
evaluated by the reference, with a warning."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from criticality.core import batches, canary
from criticality.core.adaptive import Judge, order, run_adaptive
from criticality.core.engine import Data, Engine, evaluate_naive
from criticality.core.ops import Cell
from criticality.core.plan import Plan
from criticality.core.records import ExampleStore, as_record, class_targets, examples_path
from criticality.core.stacks import find_stack
from criticality.core.stores import CellStore, cell_key
from criticality.errors import CriticalityError
from criticality.infra import distributed

log = logging.getLogger(__name__)


def run_cells(plan: Plan, data: Data, *, device: str | torch.device = "cpu", store: str | None = None,
              shard: tuple[int, int] | None = None, progress: bool = True, judge: Judge | None = None
              ) -> list[dict[str, Any]]:
    """Evaluate the plan's cells (this shard's share), reusing and extending ``store``; rows in grid order.

    Each row carries its cell's per-example records under ``"records"`` (see :mod:`criticality.core.records`).
    ``judge``: evaluate adaptively, each cell stopping once its verdict is decided (:mod:`criticality.core.adaptive`;
    records and targets are then in its seeded evaluation order).
    """
    cells = plan.cells if shard is None else plan.cells[shard[0]::shard[1]]
    settings = {**plan.settings(), "data": data_fingerprint(data, plan.max_examples)}
    if judge is not None:  # stored cells of another order, rule or threshold are not reused
        settings["adaptive"] = {"seed": judge.seed, "metric": judge.metric, "threshold": judge.threshold,
                                "alpha": judge.alpha, "cells": judge.cells}
    if store and Path(store).is_dir():
        raise CriticalityError(f"store {store} is a directory; give the path of a cells.jsonl file (created if absent)")
    saved = CellStore(store, settings) if store else None
    kept = ExampleStore(examples_path(store), settings) if store else None  # per-example records
    keys = [cell_key(c.as_dict()) for c in cells]
    wanted = set(keys)
    # A stored cell is reused with its records (from any rank's store); one without them (a store from
    # before records existed, or a crash between the two appends) is recomputed: statistics need them.
    done = {k: {**r, "records": kept.records[k]} for k, r in (saved.rows.items() if saved else [])
            if k in wanted and k in kept.records}
    todo = [c for c, k in zip(cells, keys, strict=True) if k not in done]
    if done and distributed.is_main():  # under torchrun: rank 0's line only
        log.info("resuming: %d of %d cells already done (%s), computing %d", len(done), len(cells), store, len(todo))
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="cells", unit="cell", disable=not progress)
    results = _evaluate(plan, todo, data, device) if judge is None else run_adaptive(plan, todo, data, judge, device)
    for cell, result in _data_errors(results):
        raw, result = getattr(result, "records", None), dict(result)  # the engine's per-example records
        raw = result.pop("records", raw)
        if not raw:
            raise CriticalityError(f"the {plan.engine} engine gave no per-example records for cell {cell}; "
                                   "the verdicts' intervals need them")
        records = as_record(raw)
        row = {**cell.as_dict(), **result}
        if "nll" in result:
            row["perplexity"] = math.exp(result["nll"]) if result["nll"] < 700 else math.inf
        done[cell_key(row)] = {**row, "records": records}
        if saved:  # records first: a stored row always has its records beside it
            kept.add(cell.as_dict(), records)
            saved.add(row)  # a recomputed cell's new line replaces its old one (the last line wins)
        bar.update()
    bar.close()
    if kept is not None and kept.targets is None and (targets := _targets(data, plan, judge)) is not None:
        kept.add_targets(targets)
    rows = [done[k] for k in keys]
    if rows:  # the data's labels ride on the first row, for Result.per_class
        rows[0] = {**rows[0], "targets": kept.targets if kept is not None else _targets(data, plan, judge)}
    return rows


def _targets(data: Data, plan: Plan, judge: Judge | None = None) -> np.ndarray | None:
    """The evaluation data's labels (one class per example), or None; in the adaptive order under ``judge``."""
    targets = class_targets(y for _, y in batches.iter_batches(data, plan.batch_size, plan.max_examples))
    return targets if targets is None or judge is None else targets[order(len(targets), judge.seed)]


def _data_errors(results: Any) -> Any:
    """``results``, with a failure before the first cell is done (the probe batch and the first cell, which
    are the unmodified model on the user's data) turned into one line about the data: wrong shapes,
    dtypes, label ranges or lengths fail there, in torch, with a RuntimeError / ValueError / IndexError."""
    results = iter(results)
    try:
        first = next(results)
    except StopIteration:
        return
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        reason = " ".join(str(e).split())[:300]
        raise CriticalityError(f"the model cannot be evaluated on the data ({type(e).__name__}: {reason}); check "
                               "the inputs' shape and dtype and that the labels are class indices, one per "
                               "example") from e
    yield first
    yield from results


def _evaluate(plan: Plan, cells: list[Cell], data: Data, device) -> Any:
    if not cells:
        return
    fast = None
    if plan.engine == "fast":
        fast = Engine(plan.model, plan.final_state, data, metrics=plan.metrics, batch_size=plan.batch_size,
                      device=device, limit=plan.max_examples, output=plan.output, blocks=_blocks(plan))
    fast = canary.guard(plan, cells, data, device, fast)
    final = plan.checkpoints[plan.final_epoch]
    if fast is None:
        for cell in cells:
            yield cell, evaluate_naive(plan.model, plan.state(cell), data, metrics=plan.metrics,
                                       batch_size=plan.batch_size, device=device, limit=plan.max_examples,
                                       output=plan.output, skip=plan.variant(cell).skip, reference_state=final)
        return
    # closing: the caller's model gets its own tensors back even when the consumer stops early
    with contextlib.closing(fast.evaluate([plan.variant(c) for c in cells])) as results:
        yield from results


def _blocks(plan: Plan) -> list[tuple[str, nn.Module]]:
    if plan.blocks is None:
        return find_stack(plan.model)
    try:
        return [(p, plan.model.get_submodule(p)) for p in plan.blocks]
    except AttributeError as err:
        raise CriticalityError(f"blocks: {err}") from None


def data_fingerprint(data: Data, limit: int | None = None) -> str:
    """An identity of the evaluation data: all of it for tensors; size and first batch for a loader."""
    h = hashlib.sha256()
    whole = batches.in_memory(data)
    if whole is not None:
        tensors = [t[:limit] if limit else t for t in _flat(whole)]
    else:
        first = next(batches.iter_batches(data, 1000, limit), (torch.empty(0), None))
        tensors = _flat(first)
        h.update(f"{type(data).__name__}:{len(getattr(data, 'dataset', data)) if hasattr(data, '__len__') else '?'}"
                 .encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _flat(batch: tuple) -> list[torch.Tensor]:
    """The tensors of a batch ``(inputs, targets)``, dict inputs in key order, no targets left out."""
    inputs, targets = batch
    found = [inputs[k] for k in sorted(inputs)] if isinstance(inputs, Mapping) else [inputs]
    return found + ([] if targets is None else [targets])
