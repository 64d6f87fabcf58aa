"""The analysis pipeline, written once: a plan's cells evaluated (resumable), finished into a
:class:`~criticality.core.analysis.Result`, described, extended by the extra ops and written to ``out``.

Used by ``criticality analyze`` (:mod:`criticality.pipelines.analyze_run`), ``analyze-hf``
(:mod:`criticality.pipelines.analyze_hf`) and the LM experiment (:mod:`criticality.pipelines.lm_experiment`);
each builds its own plan and says what its summary adds. Writes::

    out/cells.jsonl (cells.rank<r>-of-<W>.jsonl under torchrun)   the resumable cell store
    out/cells.csv, distances.csv, summary.json                      output.tables.write_tables (rank 0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from criticality.core import adaptive
from criticality.core.analysis import DEFAULT_THRESHOLD, Result, finish
from criticality.core.run import run_cells
from criticality.core.stores import cell_key
from criticality.errors import CriticalityError
from criticality.infra import distributed
from criticality.infra.provenance import provenance
from criticality.output.tables import write_tables
from criticality.pipelines.extras import run_extras


def one_process(device: str | torch.device) -> distributed.Context:
    """The context of a process that is not part of a torchrun group, on ``device`` (already resolved)."""
    return distributed.Context(rank=0, world=1, local_rank=0, device=torch.device(device))


def store_path(out: Path, ctx: distributed.Context) -> Path:
    """This process's cell store in ``out``: one file per rank under torchrun."""
    return out / ("cells.jsonl" if ctx.world == 1 else f"cells.rank{ctx.rank}-of-{ctx.world}.jsonl")


def analyse_plan(plan: Any, data: Any, out: Path, ctx: distributed.Context, *,
                 threshold: float = DEFAULT_THRESHOLD, verdict: str = "interval", verdict_metric: str | None = None,
                 describe: Callable[[Result], Mapping[str, Any]] | None = None, extras: Sequence[str] = (),
                 extras_options: Mapping[str, Any] | None = None, write: bool = True,
                 progress: bool = True) -> Result | None:
    """Evaluate ``plan`` on ``data`` (this rank's share), finish it and, on rank 0, return the Result.

    ``describe(result)`` may add derived columns to ``result.table`` and returns what the summary adds
    (data set, chance error, …); ``extras`` (``criticality``, ``proxies``) then run with ``extras_options``
    (draws, alphas, sigmas, eps) and write their tables beside cells.csv. ``write=False`` leaves the tables
    to the caller. Other ranks return None once rank 0 has written.
    """
    store = store_path(out, ctx)
    rows = run_cells(plan, data, device=ctx.device, store=str(store),
                     shard=(ctx.rank, ctx.world) if ctx.world > 1 else None, progress=progress and ctx.is_main,
                     judge=adaptive.judge_for(plan, verdict_metric, threshold))  # None unless plan.adaptive
    rows = merge_shards(distributed.gather(rows), plan)
    if not ctx.is_main:
        distributed.barrier()  # return once rank 0 has written the tables
        return None
    result = finish(plan, rows, threshold=threshold, verdict=verdict, verdict_metric=verdict_metric,
                    provenance={**provenance(), "world_size": ctx.world, "device": str(ctx.device)})
    if describe is not None:
        result.summary.update(describe(result))
    if extras:
        options = {"draws": 0, **(extras_options or {})}
        result.summary.update(run_extras(plan, data, out, result.table, extras, device=ctx.device, store=str(store),
                                         progress=progress, **options))
    if write:
        write_tables(out, result.table, result.distances, result.summary)
    distributed.barrier()
    return result


def merge_shards(shards: list[list[dict]], plan: Any) -> list[dict]:
    """The shards' rows back in grid order, matched by cell key (rank r evaluated cells r, r + W, …; a rank
    beyond the number of cells evaluated none). Every cell must come back exactly once."""
    world = len(shards)
    if [len(s) for s in shards] != [len(plan.cells[r::world]) for r in range(world)]:
        raise CriticalityError(f"shards of {[len(s) for s in shards]} rows do not split {len(plan.cells)} cells "
                               f"over {world} processes")
    by_key = {cell_key(row): row for shard in shards for row in shard}
    merged = []
    for r, cell in enumerate(plan.cells):
        key = cell_key(cell.as_dict())
        if key not in by_key or cell_key(shards[r % world][r // world]) != key:
            raise CriticalityError(f"shard row {cell_key(shards[r % world][r // world])} is out of place "
                                   f"(expected {key})")
        merged.append(by_key[key])
    return merged
