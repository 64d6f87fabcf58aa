"""The robustness grid: operations × groups × sources → one tidy table (verdicts: verdicts.py, distances:
distances.py).

::

    result = criticality.analyze(model, checkpoints={0: sd0, 1: sd1, 10: sd10, 40: sd40},
                                 data=(x_test, y_test), groups="auto", seeds=3, joint=None)
    result.table      # one row per cell: op, group, joint, checkpoint, seed, error, loss, n, delta_*, finite
    result.distances  # group, checkpoint, n, l2, linf (the paper's), l2_rel, linf_rel, cosine (distances.py)
    result.verdicts   # group, Δ error at checkpoint 0 with its interval and p, verdict (critical / robust /
                      # inconclusive), examples that would settle it, re-randomized error with its interval
    result.examples(op="reinit", group="fc1", checkpoint=0)  # one row per test example
    result.per_class(op="reinit", group="fc1", checkpoint=0)  # error per true class vs the final model

The grid is general: a cell is ``(op, group, checkpoint, seed, alpha, sigma)``; ``op`` is ``final`` (the trained
model), ``reinit`` (group back to ``checkpoint``), ``rerandomize`` (group from a fresh draw with ``seed``), or one of
the interventions of :mod:`criticality.interventions`: ``interpolate`` (``alpha``), ``noise`` (``sigma``, ``seed``)
and ``skip``.
Joint groups (``joint=[["fc2", "fc3"]]``) get the same cells under the name ``fc2+fc3``. Every cell keeps
per-example records (:mod:`criticality.examples`), from which :mod:`criticality.statistics` gives each
cell's paired interval of Δ against the final model. This module knows nothing of the model zoo, the data
sets or the CLI.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from criticality import interventions
from criticality.adapters.initializers import draws_summary
from criticality.core import batches, statistics, surgery
from criticality.core import engine as engine_mod
from criticality.core import metrics as metrics_mod
from criticality.core.checkpoints import check_compatible
from criticality.core.distances import distances  # noqa: F401  (re-exported: analysis.distances)
from criticality.core.engine import Data, Engine, Metric, Variant
from criticality.core.groups import Groups, GroupSpec, default_spec, resolve
from criticality.core.groups import joint as joint_group
from criticality.core.initializers import DRAW_SCHEMES, InitScheme, choose, scheme_name
from criticality.core.records import (
    Examples,
    ExampleStore,
    Record,
    as_record,
    class_targets,
    examples_path,
)
from criticality.core.stacks import find_stack
from criticality.core.stores import CellStore, cell_key
from criticality.core.verdicts import DEFAULT_THRESHOLD, intervals, judged, p_values, verdicts
from criticality.core.verdicts import verdict_metric as choose_metric
from criticality.errors import CriticalityError
from criticality.infra import distributed

StateDict = Mapping[str, torch.Tensor]
MAX_CELLS = 100_000  # a larger grid is a typo (--seeds 100000000000): each cell is a pass over the data
ENGINES = ("fast", "naive")
VERDICT_RULES = ("interval", "point")  # three outcomes from the paired interval, or the paper's point rule
LABEL_FREE = ("agreement", "kl")  # built-in metrics that compare with the final model, not with labels
RERANDOMIZE_SALT = 1_000_003  # draw seed s: each module drawn from draw_seed(SALT + s, its path) (Plan._draw)


@dataclass(frozen=True)
class Cell:
    op: str  # one of interventions.OPS
    group: str = ""  # "" for the final model; members joined by "+" for a joint group
    checkpoint: int | None = None  # epoch: reinit's target, interpolate's / noise's source (and the final row)
    seed: int | None = None  # generator seed, for rerandomize and noise
    joint: bool = False
    alpha: float | None = None  # interpolation weight of the final model (interpolate; noise in module criticality)
    sigma: float | None = None  # noise std relative to the group's movement RMS (see interventions)

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.op, "group": self.group, "joint": self.joint,
                "checkpoint": self.checkpoint, "seed": self.seed, "alpha": self.alpha, "sigma": self.sigma}


@dataclass
class Result:
    table: pd.DataFrame
    distances: pd.DataFrame
    verdicts: pd.DataFrame
    groups: Groups
    joint: dict[str, tuple[str, ...]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    records: Examples = field(default_factory=Examples)

    def examples(self, op: str = "final", **where: Any) -> pd.DataFrame:
        """One cell's per-example records, one row per example in data order (see
        :meth:`criticality.examples.Examples.frame`); ``where`` picks the cell: ``group=``, ``checkpoint=``,
        ``seed=`` (and any other cell field). ``result.examples()`` is the final model."""
        return self.records.frame(self.records.find(op=op, **where))

    def per_class(self, op: str = "final", metric: str = "error", **where: Any) -> pd.DataFrame:
        """Error (or another 0/1 metric) per true class of one cell, beside the final model's."""
        from criticality.core.records import per_class

        return per_class(self.records, metric, op=op, **where)


def grid(group_names: Sequence[str], joint_names: Sequence[str], reinit_to: Sequence[int],
         seeds: Sequence[int], final_epoch: int, ops: Sequence[str] = interventions.PAPER_OPS, *,
         alphas: Sequence[float] = (), sigmas: Sequence[float] = (), source: int = 0,
         skippable: Sequence[str] = ()) -> list[Cell]:
    """Every cell, in table order: the final model, then per group its cells op by op (``ops`` order)."""
    cells = [Cell("final", checkpoint=final_epoch)]
    for name in [*group_names, *joint_names]:
        j = name in joint_names
        per_op = {
            "rerandomize": [Cell("rerandomize", name, seed=s, joint=j) for s in seeds],
            "reinit": [Cell("reinit", name, checkpoint=e, joint=j) for e in reinit_to],
            "interpolate": [Cell("interpolate", name, checkpoint=source, joint=j, alpha=a) for a in alphas],
            "noise": [Cell("noise", name, checkpoint=source, seed=s, joint=j, sigma=v) for v in sigmas for s in seeds],
            "skip": [Cell("skip", name, joint=j)] if name in skippable else [],
        }
        for op in ops:
            cells += per_op[op]
    return cells


def analyze(model: nn.Module, checkpoints: Mapping[int, StateDict], data: Data, *,
            groups: GroupSpec | Groups | None = None, seeds: int | Sequence[int] = 3,
            joint: Sequence[Sequence[str]] | None = None, final: int | None = None,
            reinit_to: Sequence[int] | None = None, init: InitScheme | None = None,
            metrics: Sequence[str] | Mapping[str, Metric] = ("error", "loss"), engine: str = "fast",
            batch_size: int = 1000, device: str | torch.device = "cpu", max_examples: int | None = None,
            threshold: float = DEFAULT_THRESHOLD, buffers: str = "reset", store: str | None = None,
            shard: tuple[int, int] | None = None, progress: bool = True,
            provenance: Mapping[str, Any] | None = None, calibration: Data | None = None,
            output: batches.Output = None, blocks: Sequence[str] | None = None, verdict: str = "interval",
            verdict_metric: str | None = None, stats_seed: int = 0,
            ops: Sequence[str] = interventions.PAPER_OPS, alphas: Sequence[float] = interventions.DEFAULT_ALPHAS,
            sigmas: Sequence[float] = interventions.DEFAULT_SIGMAS, source: int = 0) -> Result:
    """Measure re-initialization and re-randomization robustness of every group of ``model``.

    ``checkpoints`` maps epoch → state dict; the final model is the largest epoch unless ``final`` names
    one. ``groups`` defaults to the model's own ``layer_groups()`` when it declares them, else one group
    per block of its stack (``"blocks"``), else ``"auto"`` (see :mod:`criticality.groups`); the spec used
    is said on stderr and recorded as ``summary["groups_spec"]``. ``reinit_to`` defaults to every epoch
    before the final one. ``seeds`` is a count or a list of seeds for the fresh draws, which use ``init``
    (default: chosen by :func:`criticality.initializers.choose`: ``hf`` for Hugging Face models, ``timm``
    for timm models, ``model.init_scheme``, else the modules' own ``reset_parameters``; ``"shuffle"``
    works for any model). ``engine="naive"`` evaluates every cell with the plain
    reference. ``store`` names a cells.jsonl file that makes the run resumable. ``shard=(rank, world)``
    evaluates only this rank's share of the cells (see :mod:`criticality.distributed`).
    ``buffers``: a group's norm-layer running statistics move with it (``reset``, default), stay as
    trained (``keep``), or are recomputed for each variant on the ``calibration`` batches (``recalibrate``).
    ``data``: tensors ``(x, y)``, ``x`` alone (unlabelled), or a loader of tuples or of dict batches (HF style);
    ``metrics``: names (``error``, ``loss``, ``token_error``, ``nll``, ``agreement``, ``kl``) or functions, see
    :mod:`criticality.metrics`; ``output``: where the logits are in the model's output (a key or a function).
    ``blocks``: module paths of the model's repeated block stack, in execution order, for the fast engine's
    prefix reuse (default: found, see :func:`criticality.stacks.find_stack`).
    ``verdict="interval"`` calls a group critical / robust only when the 95 % paired-bootstrap interval of
    its Δ ``verdict_metric`` (at re-initialization to epoch 0) clears ``threshold`` (in that metric's units;
    default ``error``, else ``token_error``, else ``agreement`` judged as ``disagreement`` = 1 − agreement,
    the fraction of examples whose top-1 prediction changed; else the first metric), inconclusive otherwise;
    ``"point"`` is the paper's rule on Δ alone. ``stats_seed`` seeds the bootstrap.
    ``ops`` picks the operations (default the paper's two; see :mod:`criticality.interventions` for
    ``interpolate`` over ``alphas`` from checkpoint ``source``, ``noise`` over ``sigmas`` × ``seeds`` and
    ``skip``).
    """
    plan = make_plan(model, checkpoints, groups, seeds, joint, final, reinit_to, init, metrics, engine, batch_size,
                     max_examples, buffers, calibration=calibration, output=output, blocks=blocks, ops=ops,
                     alphas=alphas, sigmas=sigmas, source=source, probe=data)
    verdict_metric = choose_metric(list(plan.metrics), verdict_metric)  # refused now, not after every cell
    rows = run_cells(plan, data, device=device, store=store, shard=shard, progress=progress)
    return finish(plan, rows, threshold=threshold, provenance=provenance, verdict=verdict,
                  verdict_metric=verdict_metric, stats_seed=stats_seed)


@dataclass
class Plan:
    """Everything needed to evaluate the grid's cells, independent of where they run."""

    model: nn.Module
    checkpoints: Mapping[int, StateDict]
    groups: Groups
    joint: dict[str, tuple[str, ...]]
    cells: list[Cell]
    final_epoch: int
    init: InitScheme
    metrics: dict[str, Metric]
    engine: str
    batch_size: int
    max_examples: int | None
    buffers: str
    calibration: Data | None = None  # training batches for buffers="recalibrate"
    start_epoch: int = 0  # the initialization: shuffle draws permute it; draws must not reproduce it
    output: batches.Output = None  # where the logits are in the model's output (see batches.call)
    blocks: Sequence[str] | None = None  # the block stack's module paths (None: found by stacks.find_stack)
    skips: interventions.SkipPlan = field(default_factory=interventions.SkipPlan)

    def keys(self, group: str) -> tuple[str, ...]:
        return self.joint[group] if group in self.joint else self.groups.members[group]

    def state(self, cell: Cell) -> StateDict:
        """The full state dict of the variant a cell evaluates, made by :mod:`surgery`: an
        :class:`~criticality.surgery.Overlay` of the group's new tensors over the final checkpoint, which
        is read for no other key (a lazy checkpoint is never loaded whole per cell)."""
        final = self.checkpoints[self.final_epoch]
        if cell.op == "final":
            return surgery.Overlay(final, {})
        buffer_keys, keys = surgery.buffer_keys(self.model), self.keys(cell.group)
        if cell.op in interventions.NEW_OPS:
            state = interventions.cell_state(self, cell)
        elif cell.op == "reinit":
            state = surgery.reinit(final, self.checkpoints[cell.checkpoint], keys, buffers=self.buffers,
                                   buffer_keys=buffer_keys)
        else:
            state = surgery.rerandomize(final, self.fresh(cell.group, cell.seed), keys, buffers=self.buffers,
                                        buffer_keys=buffer_keys, copy=False)  # the draw is ours alone
        if self.buffers == "recalibrate":
            inputs = (x for x, _ in batches.iter_batches(self.calibration, self.batch_size))
            state = surgery.recalibrate(self.model, state, keys, inputs)
        return state

    def fresh(self, group: str, seed: int) -> StateDict:
        """The group's fresh draw for ``seed``, made when asked and not kept: memory is one group's tensors,
        never a whole model nor one copy per seed. (The engine asks once per chunk of batches; more than
        one chunk redraws, which costs a group's init, small beside evaluating a chunk.)"""
        return self._draw(group, seed)

    def _draw(self, group: str, seed: int) -> StateDict:
        """The group's tensors drawn by :func:`surgery.fresh_group` from seed ``RERANDOMIZE_SALT + seed``.

        The salt keeps draw ``seed`` apart from a training run initialized with the same small seed: a
        "fresh" draw equal to the layer's own initial values would be re-initialization, not
        re-randomization. Such a collision (every drawn, non-constant tensor of the group equal to epoch 0)
        is refused.
        """
        start = self.checkpoints[self.start_epoch]
        fresh = surgery.fresh_group(self.model, self.init, RERANDOMIZE_SALT + seed, self.keys(group), start=start)
        # Only drawn tensors count: a constant one (a norm's weight 1) equals its initial value by design.
        floats = [k for k in fresh if fresh[k].is_floating_point() and fresh[k].numel() > 1
                  and not torch.all(fresh[k] == fresh[k].flatten()[0])]
        same = [k for k in floats if torch.equal(fresh[k], start[k].to(fresh[k].device))]
        if same and len(same) == len(floats):
            raise CriticalityError(f"re-randomization seed {seed} reproduces the initialization of group {group!r} "
                                   "exactly; choose other seeds")
        return fresh

    def entries(self, cell: Cell) -> dict[str, torch.Tensor]:
        """The entries in which the cell's variant differs from the final model (surgery's new tensors),
        and only those: memory is the group's, not the model's."""
        state = self.state(cell)
        if isinstance(state, surgery.Overlay) and state.base is self.checkpoints[self.final_epoch]:
            return dict(state.changed)
        final = self.checkpoints[self.final_epoch]  # a plain state dict (another op's surgery): by identity
        return {k: v for k, v in state.items() if v is not final[k]}

    def moved_keys(self, cell: Cell) -> tuple[str, ...]:
        """The keys :meth:`entries` returns, known without doing the surgery."""
        if cell.op == "final":
            return ()
        if cell.op in interventions.NEW_OPS:
            return interventions.moved_keys(self, cell)
        keys = self.keys(cell.group)
        if self.buffers == "keep":
            kept = surgery.buffer_keys(self.model)
            keys = tuple(k for k in keys if k not in kept)
        return tuple(keys)

    def variant(self, cell: Cell) -> Variant:
        """The cell for the engine: its tensors are made when it is evaluated, not before."""
        skip = (self.skips.paths[cell.group],) if cell.op == "skip" else ()
        return Variant(cell, lambda: self.entries(cell), keys=self.moved_keys(cell), skip=skip)

    def settings(self) -> dict[str, Any]:
        """What must match for stored cells to be reused (see :mod:`criticality.store`)."""
        return {"model": type(self.model).__name__, "keys": _fingerprint(self.model.state_dict()),
                "checkpoints": {e: _fingerprint(sd) for e, sd in sorted(self.checkpoints.items())},
                "final": self.final_epoch, "init": scheme_name(self.init), "metrics": sorted(self.metrics),
                "draws": "per-module",  # round 1 drew whole models: its stored re-randomizations differ
                "groups": {g: list(k) for g, k in {**self.groups.members, **self.joint}.items()},
                "max_examples": self.max_examples, "buffers": self.buffers, "batch_size": self.batch_size}


def make_plan(model, checkpoints, groups, seeds, joint, final, reinit_to, init, metrics, engine, batch_size,
              max_examples, buffers, *, calibration: Data | None = None, output: batches.Output = None,
              blocks: Sequence[str] | None = None,
              ops: Sequence[str] = interventions.PAPER_OPS, alphas: Sequence[float] = interventions.DEFAULT_ALPHAS,
              sigmas: Sequence[float] = interventions.DEFAULT_SIGMAS, source: int = 0,
              probe: Data | None = None) -> Plan:
    """Check every argument of :func:`analyze` and lay out the grid; raises :class:`CriticalityError`."""
    if not checkpoints:
        raise CriticalityError("no checkpoints given: analysis needs at least the final model and epoch 0")
    if engine not in ENGINES:
        raise CriticalityError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if batch_size < 1:
        raise CriticalityError(f"batch size must be a positive integer, got {batch_size}")
    if max_examples is not None and max_examples < 1:
        raise CriticalityError(f"--max-examples must be positive, got {max_examples}")
    if isinstance(seeds, int) and not 0 <= seeds <= MAX_CELLS:
        raise CriticalityError(f"seeds must be a count from 0 to {MAX_CELLS}, got {seeds}")
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if any(s < 0 for s in seeds):
        raise CriticalityError(f"seeds must be non-negative, got {seeds}")
    epochs = sorted(checkpoints)
    final = epochs[-1] if final is None else final
    if final not in checkpoints:
        raise CriticalityError(f"final epoch {final} is not among the checkpoints {epochs}")
    reinit_to = [e for e in epochs if e < final] if reinit_to is None else sorted(reinit_to)
    for e in reinit_to:
        if e not in checkpoints:
            raise CriticalityError(f"cannot re-initialize to epoch {e}: no such checkpoint (have {epochs})")
    # The verdicts compare against re-initialization to epoch 0: refuse now, not after every cell has run.
    if epochs[0] != 0:
        raise CriticalityError(f"no epoch 0 (the initialization) among the checkpoints (earliest is {epochs[0]}); "
                               "re-initialization and the verdicts need it")
    if final == 0:
        raise CriticalityError("the checkpoint set holds only epoch 0 (the initialization); train at least one "
                               "epoch first")
    if 0 not in reinit_to:
        raise CriticalityError(f"reinit_to {reinit_to} leaves out epoch 0, which the verdicts compare against")
    for e, sd in checkpoints.items():
        check_compatible(model, sd, where=f"checkpoint of epoch {e}")
    if groups is None:
        groups = default_spec(model)
        print(f"criticality: groups={groups!r} ({type(model).__name__}: "
              f"{'it declares layer_groups()' if groups == 'model' else 'no layer_groups() declared'})",
              file=sys.stderr)
    resolved = groups if isinstance(groups, Groups) else resolve(model, groups)
    joints = dict(joint_group(resolved, members) for members in (joint or []))
    metric_fns = metrics_mod.resolve(metrics)
    if not metric_fns:  # any metric can carry the verdicts (verdicts.verdict_metric picks one)
        raise CriticalityError("no metrics given; e.g. metrics=('error', 'loss'), ('token_error', 'nll') for a "
                               "language model, or ('agreement', 'kl') for unlabelled data")
    ops = interventions.check_ops(ops)
    alphas = interventions.check_unit(alphas, "alphas") if "interpolate" in ops else ()
    sigmas = interventions.check_unit(sigmas, "sigmas") if "noise" in ops else ()
    if ("interpolate" in ops or "noise" in ops) and source not in checkpoints:
        raise CriticalityError(f"interpolation/noise source epoch {source} is not among the checkpoints {epochs}")
    if "noise" in ops and not seeds:
        raise CriticalityError("the noise op averages over draws: give at least one seed")
    per_group = len(seeds) * ("rerandomize" in ops) + len(reinit_to) * ("reinit" in ops) + len(alphas) \
        + len(sigmas) * len(seeds) + ("skip" in ops)  # cells per group, at most
    n_cells = 1 + (len(resolved.names) + len(joints)) * per_group
    if n_cells > MAX_CELLS:
        raise CriticalityError(f"the grid has {n_cells:,} cells ({len(resolved.names) + len(joints)} groups × "
                               f"{per_group} cells + 1), each a full pass over the evaluation data; at most "
                               f"{MAX_CELLS:,} are run (fewer seeds, checkpoints, alphas or sigmas)")
    skips = interventions.plan_skips_on(model, {**resolved.members, **joints}, probe, batch_size) \
        if "skip" in ops else interventions.SkipPlan()
    cells = grid(resolved.names, list(joints), reinit_to, seeds, final, ops, alphas=alphas, sigmas=sigmas,
                 source=source, skippable=list(skips.paths))
    init, guessed = choose(model, init)
    if guessed and seeds:
        warnings.warn(f"{type(model).__name__} records no init_scheme: re-randomizing with its modules' own "
                      "reset_parameters (init='torch'); pass init= if training used another scheme "
                      "(init='shuffle' works for any model)", stacklevel=3)
    if isinstance(init, str) and init not in DRAW_SCHEMES:
        raise CriticalityError(f"unknown init scheme {init!r}; choose one of {', '.join(DRAW_SCHEMES)} or a callable")
    if buffers not in surgery.BUFFER_MODES:
        raise CriticalityError(f"unknown buffer mode {buffers!r}; choose one of {', '.join(surgery.BUFFER_MODES)}")
    if buffers == "recalibrate" and calibration is None:
        raise CriticalityError("buffers='recalibrate' needs calibration data (training batches)")
    return Plan(model, checkpoints, resolved, joints, cells, final, init, metric_fns, engine, batch_size,
                max_examples, buffers, calibration, output=output, blocks=blocks, skips=skips)


def run_cells(plan: Plan, data: Data, *, device: str | torch.device = "cpu", store: str | None = None,
              shard: tuple[int, int] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate the plan's cells (this shard's share), reusing and extending ``store``; rows in grid order.

    Each row carries its cell's per-example records under ``"records"`` (see :mod:`criticality.examples`).
    """
    cells = plan.cells if shard is None else plan.cells[shard[0]::shard[1]]
    settings = {**plan.settings(), "data": data_fingerprint(data, plan.max_examples)}
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
        print(f"resuming: {len(done)} of {len(cells)} cells already done ({store}), computing {len(todo)}",
              file=sys.stderr)
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="cells", unit="cell", disable=not progress)
    for cell, result in _data_errors(_evaluate(plan, todo, data, device)):
        raw, result = getattr(result, "records", None), dict(result)  # the engine's records (contract 3)
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
    if kept is not None and kept.targets is None and (targets := _targets(data, plan)) is not None:
        kept.add_targets(targets)
    rows = [done[k] for k in keys]
    if rows:  # the data's labels ride on the first row, for Result.per_class
        rows[0] = {**rows[0], "targets": kept.targets if kept is not None else _targets(data, plan)}
    return rows


def _targets(data: Data, plan: Plan) -> np.ndarray | None:
    """The evaluation data's labels (one class per example), or None."""
    return class_targets(y for _, y in engine_mod.iter_batches(data, plan.batch_size, plan.max_examples))


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
    final = plan.checkpoints[plan.final_epoch]
    if plan.engine == "naive":
        for cell in cells:
            yield cell, engine_mod.evaluate_naive(plan.model, plan.state(cell), data, metrics=plan.metrics,
                                                  batch_size=plan.batch_size, device=device,
                                                  limit=plan.max_examples, output=plan.output,
                                                  skip=plan.variant(cell).skip, reference_state=final)
        return
    fast = Engine(plan.model, final, data, metrics=plan.metrics, batch_size=plan.batch_size, device=device,
                  limit=plan.max_examples, output=plan.output, blocks=_blocks(plan))
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


def finish(plan: Plan, rows: list[dict[str, Any]], *, threshold: float = DEFAULT_THRESHOLD,
           provenance: Mapping[str, Any] | None = None, verdict: str = "interval",
           verdict_metric: str | None = None, stats_seed: int = 0) -> Result:
    """Turn evaluated rows into the :class:`Result`: deltas with intervals, distances, verdicts, summary."""
    if verdict not in VERDICT_RULES:
        raise CriticalityError(f"unknown verdict rule {verdict!r}; choose one of {', '.join(VERDICT_RULES)}")
    # error when measured, else token_error, else agreement (judged as disagreement), else the first metric
    measured = choose_metric(list(plan.metrics), verdict_metric)
    records = [r.get("records") for r in rows]
    targets = next((r["targets"] for r in rows if r.get("targets") is not None), None)
    # Intervals for every metric but the label-free ones beside a labelled verdict metric (they cost a
    # bootstrap each and judge nothing there: agreement and kl are on by default in the CLI).
    spread = [m for m in plan.metrics if m == measured or m not in LABEL_FREE]
    own = [m for m, fn in plan.metrics.items() if not fn.needs_reference] or list(plan.metrics)
    table = tabulate(rows, list(plan.metrics), records, seed=stats_seed, p_metric=measured, interval_metrics=spread,
                     finite_metrics=own)
    dist = distances(plan.checkpoints, {**plan.groups.members, **plan.joint}, plan.model)
    # Verdicts compare re-initialization to epoch 0: none when the ops left reinit out.
    view, view_records, verdict_metric = judged(table, records, measured)
    verdict_table = verdicts(view, threshold, view_records, rule=verdict, metric=verdict_metric, seed=stats_seed) \
        if (table.op == "reinit").any() else pd.DataFrame()
    final = table[table.op == "final"].iloc[0]
    summary = {
        "final_epoch": plan.final_epoch,
        **{f"final_{m}": float(final[m]) for m in plan.metrics},
        "threshold": threshold,
        "verdict_rule": verdict,
        "verdict_metric": verdict_metric,
        "bootstrap": {"resamples": statistics.RESAMPLES, "level": statistics.LEVEL, "seed": stats_seed},
        # NaN (no interval, settled verdict) becomes null: JSON without NaN, and summaries compare equal.
        "verdicts": verdict_table.astype(object).where(verdict_table.notna(), None).to_dict(orient="records"),
        "groups_spec": plan.groups.spec,
        "coverage": plan.groups.coverage(),
        "joint": {g: list(k) for g, k in plan.joint.items()},
        "settings": {"init": scheme_name(plan.init), "engine": plan.engine, "batch_size": plan.batch_size,
                     "max_examples": plan.max_examples, "buffers": plan.buffers,
                     "seeds": sorted({c.seed for c in plan.cells if c.seed is not None})},
        "draws": draws_summary(plan.model, scheme_name(plan.init), {**plan.groups.members, **plan.joint}),
        "non_finite_cells": int((~table.finite).sum()),
        "provenance": dict(provenance or {}),
        **interventions.summary(plan),
    }
    kept = {cell_key(r): rec for r, rec in zip(rows, records, strict=True) if rec is not None}
    cells = {cell_key(r): {k: r[k] for k in Cell("final").as_dict()} for r in rows if cell_key(r) in kept}
    return Result(table, dist, verdict_table, plan.groups, plan.joint, summary, Examples(kept, cells, targets))


def tabulate(rows: Sequence[Mapping[str, Any]], metric_names: Sequence[str],
             records: Sequence[Record | None] | None = None, *, seed: int = 0,
             p_metric: str = "error", interval_metrics: Sequence[str] | None = None,
             finite_metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows → the tidy table, with ``delta_<metric>`` against the final model and a ``finite`` flag.

    With ``records`` (one per row, None where missing) every cell also gets ``delta_<metric>_low/high``
    (95 % paired-bootstrap interval, the same resamples for every cell, seeded by ``seed``) and
    ``p_value`` (exact McNemar on ``p_metric``'s discordant examples when its records are 0/1; NaN else).
    ``interval_metrics`` limits the intervals to those metrics (default: all). ``finite`` checks
    ``finite_metrics`` (default: all): metrics measured against the final model's own predictions
    (agreement, kl) are non-finite in every cell when the final model is, so they do not say which cells are.
    """
    table = pd.DataFrame([{k: v for k, v in r.items() if k not in ("records", "targets")} for r in rows])
    finals = table[table.op == "final"]
    if finals.empty:
        raise CriticalityError("the grid has no final-model cell to compare against")
    for m in metric_names:
        table[f"delta_{m}"] = table[m] - float(finals.iloc[0][m])
    records = list(records) if records is not None else [None] * len(table)
    for m in metric_names if interval_metrics is None else [m for m in metric_names if m in interval_metrics]:
        table[[f"delta_{m}_low", f"delta_{m}_high"]] = intervals(records, finals.index[0], m, seed)
    table["p_value"] = p_values(records, finals.index[0], p_metric)
    checked = list(metric_names if finite_metrics is None else finite_metrics)
    table["finite"] = np.isfinite(table[checked].to_numpy(dtype=float)).all(axis=1)
    for col in ("checkpoint", "seed"):
        table[col] = table[col].astype("Int64")
    for col in ("alpha", "sigma"):  # absent from rows stored before these ops existed
        table[col] = table[col].astype(float) if col in table else np.nan
    table["n"] = table["n"].astype(int)
    return table




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


def _fingerprint(state: StateDict) -> str:
    """An exact identity of a state dict's values (sha256 over keys, shapes and bytes). A lazy checkpoint
    names its files instead (sidecar sha256, else name, size, mtime), so that nothing is read for it."""
    if callable(getattr(state, "fingerprint", None)):
        return state.fingerprint()
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # the buffer, not a bytes copy
    return h.hexdigest()[:16]

