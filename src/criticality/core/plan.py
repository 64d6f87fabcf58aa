"""The plan of an analysis: what :func:`criticality.analyze` was asked (:class:`PlanSpec`), checked against the
model and its checkpoints and laid out as the grid's cells (:class:`Plan`), before anything is evaluated.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from criticality.core import batches, ops, surgery
from criticality.core import metrics as metrics_mod
from criticality.core.checkpoints import check_compatible
from criticality.core.engine import Data, Metric, Variant
from criticality.core.groups import Groups, GroupSpec, default_spec, resolve
from criticality.core.groups import joint as joint_group
from criticality.core.hooks import eval_mode
from criticality.core.initializers import InitScheme, choose, draw_schemes, initial_state, scheme_name
from criticality.core.ops import Cell, Operation
from criticality.core.state import BUFFER_MODES, fingerprint
from criticality.errors import CriticalityError

log = logging.getLogger(__name__)
StateDict = Mapping[str, torch.Tensor]
MAX_CELLS = 100_000  # a larger grid is a typo (--seeds 100000000000): each cell is a pass over the data
ENGINES = ("fast", "naive")


@dataclass(frozen=True)
class PlanSpec:
    """What an analysis is asked to do (the keywords of :func:`criticality.analyze`, which documents each)."""

    groups: GroupSpec | Groups | None = None  # None: the model's own layer_groups(), else blocks, else auto
    seeds: int | Sequence[int] = 3  # a count or the seeds of the fresh draws (rerandomize, noise)
    joint: Sequence[Sequence[str]] | None = None  # groups reset together, e.g. [["fc2", "fc3"]]
    final: int | None = None  # the trained model's epoch (default: the largest)
    reinit_to: Sequence[int] | None = None  # reinit targets (default: every epoch before the final one)
    init: InitScheme | None = None  # the draw scheme (default: chosen by initializers.choose)
    metrics: Sequence[str] | Mapping[str, Metric] | None = None  # None: chosen from the logits (metrics.choose)
    engine: str = "fast"  # or "naive": the plain reference path
    batch_size: int = 1000  # examples per forward pass
    max_examples: int | None = None  # evaluate on the first n examples only
    buffers: str = "reset"  # a group's running statistics: reset with it, keep as trained, or recalibrate
    calibration: Data | None = None  # training batches for buffers="recalibrate"
    output: batches.Output = None  # where the logits are in the model's output (see batches.call)
    blocks: Sequence[str] | None = None  # the block stack's module paths (default: found by stacks.find_stack)
    ops: Sequence[str | Operation] | str = ops.PAPER_OPS  # registered names or Operation objects (see core.ops)
    alphas: Sequence[float] | None = None  # interpolate's weights (None: the operation's default)
    sigmas: Sequence[float] | None = None  # noise's relative scales (None: the operation's default)
    source: int = 0  # interpolate's and noise's source epoch
    skip_runs: int | None = None  # skip's runs of k consecutive blocks, each one more joint cell (None: none)
    adaptive: bool = False  # stop each cell once its verdict is decided (see criticality.core.adaptive)

    def options(self) -> dict[str, Any]:
        """The values operations take their parameters from (:meth:`Operation.configure`); None: their default."""
        values = {"reinit_to": self.reinit_to, "seeds": self.seeds, "alphas": self.alphas, "sigmas": self.sigmas,
                  "source": self.source, "skip_runs": self.skip_runs}
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class Plan:
    """Everything needed to evaluate the grid's cells, independent of where they run."""

    model: nn.Module
    checkpoints: Mapping[int, StateDict]
    groups: Groups
    joint: dict[str, tuple[str, ...]]
    final_epoch: int
    init: InitScheme
    metrics: dict[str, Metric]
    engine: str = "fast"
    batch_size: int = 1000
    max_examples: int | None = None
    buffers: str = "reset"
    calibration: Data | None = None  # training batches for buffers="recalibrate"
    start_epoch: int = 0  # the initialization: shuffle draws permute it; draws must not reproduce it
    output: batches.Output = None  # where the logits are in the model's output (see batches.call)
    blocks: Sequence[str] | None = None  # the block stack's module paths (None: found by stacks.find_stack)
    ops: dict[str, Operation] = field(default_factory=dict)  # the bound operations, in table order
    cells: list[Cell] = field(default_factory=list)
    adaptive: bool = False  # cells stop once their verdict is decided (criticality.core.adaptive)
    metrics_spec: dict[str, Any] = field(default_factory=dict)  # the metrics and how they came: given or chosen

    @property
    def final_state(self) -> StateDict:
        return self.checkpoints[self.final_epoch]

    def keys(self, group: str) -> tuple[str, ...]:
        return self.joint[group] if group in self.joint else self.groups.members[group]

    def operation(self, name: str) -> Operation:
        """The plan's operation ``name``, else the registered one with its defaults (a caller may evaluate
        cells of an operation the grid did not ask for: module criticality's noise cells)."""
        if name in self.ops:
            return self.ops[name]
        if name not in ops.OPERATIONS:
            raise CriticalityError(f"unknown op {name!r}; choose from {', '.join(ops.choices())}")
        return ops.OPERATIONS[name]()

    def state(self, cell: Cell) -> StateDict:
        """The full state dict of the variant a cell evaluates, made by its operation: an
        :class:`~criticality.core.surgery.Overlay` of the group's new tensors over the final checkpoint, which
        is read for no other key (a lazy checkpoint is never loaded whole per cell)."""
        with initial_state(self.checkpoints[self.start_epoch]):  # constants a scheme takes from epoch 0
            state = self.operation(cell.op).state(self, cell)
        if self.buffers == "recalibrate" and cell.op != "final":
            inputs = (x for x, _ in batches.iter_batches(self.calibration, self.batch_size))
            state = surgery.recalibrate(self.model, state, self.keys(cell.group), inputs)
        return state

    def entries(self, cell: Cell) -> dict[str, torch.Tensor]:
        """The entries in which the cell's variant differs from the final model (surgery's new tensors),
        and only those: memory is the group's, not the model's."""
        state = self.state(cell)
        if isinstance(state, surgery.Overlay) and state.base is self.final_state:
            return dict(state.changed)
        final = self.final_state  # a plain state dict (another op's surgery): by identity
        return {k: v for k, v in state.items() if v is not final[k]}

    def moved_keys(self, cell: Cell) -> tuple[str, ...]:
        """The keys :meth:`entries` returns, known without doing the surgery."""
        return self.operation(cell.op).moved_keys(self, cell)

    def variant(self, cell: Cell) -> Variant:
        """The cell for the engine: its tensors are made when it is evaluated, not before."""
        return Variant(cell, lambda: self.entries(cell), keys=self.moved_keys(cell),
                       skip=self.operation(cell.op).skip(self, cell))

    def summary(self) -> dict[str, Any]:
        """What the operations record in the analysis summary (nothing for the paper's two alone)."""
        out: dict[str, Any] = {}
        for op in self.ops.values():
            out.update(op.summary(self))
        if set(self.ops) - {"final", *ops.PAPER_OPS}:
            out = {"ops": [name for name in self.ops if name != "final"], **out}
        return out

    def settings(self) -> dict[str, Any]:
        """What must match for stored cells to be reused (see :mod:`criticality.core.stores`)."""
        return {"model": type(self.model).__name__, "keys": fingerprint(self.model.state_dict()),
                "checkpoints": {e: fingerprint(sd) for e, sd in sorted(self.checkpoints.items())},
                "final": self.final_epoch, "init": scheme_name(self.init), "metrics": sorted(self.metrics),
                "draws": "per-module",  # stores of versions that drew whole models hold other re-randomizations
                "groups": {g: list(k) for g, k in {**self.groups.members, **self.joint}.items()},
                "max_examples": self.max_examples, "buffers": self.buffers, "batch_size": self.batch_size}


def grid(plan: Plan) -> list[Cell]:
    """Every cell, in table order: the final model, then per group its cells operation by operation, then the
    operations' cells of no single group."""
    cells = [Cell("final", checkpoint=plan.final_epoch)]
    for name in [*plan.groups.names, *plan.joint]:
        for op in plan.ops.values():
            cells += op.cells(name, name in plan.joint)
    for op in plan.ops.values():
        cells += op.extra_cells()
    return cells


def make_plan(model: nn.Module, checkpoints: Mapping[int, StateDict], spec: PlanSpec = PlanSpec(), *,
              probe: Data | None = None) -> Plan:
    """Check ``spec`` against the model and its checkpoints and lay out the grid; raises
    :class:`CriticalityError`. ``probe``: the evaluation data, which the ``skip`` operation runs one batch of."""
    _check_settings(spec)
    final = _final_epoch(checkpoints, spec.final)
    for e, sd in checkpoints.items():
        check_compatible(model, sd, where=f"checkpoint of epoch {e}")
    groups = spec.groups
    if groups is None:
        groups = default_spec(model)
        log.info("criticality: groups=%r (%s: %s)", groups, type(model).__name__,
                 "it declares layer_groups()" if groups == "model" else "no layer_groups() declared")
    resolved = groups if isinstance(groups, Groups) else resolve(model, groups)
    joints = dict(joint_group(resolved, members) for members in (spec.joint or []))
    names, metrics_spec = _metrics(model, spec, probe)
    metric_fns = metrics_mod.resolve(names)
    if not metric_fns:  # any metric can carry the verdicts (verdicts.verdict_metric picks one)
        raise CriticalityError("no metrics given; e.g. metrics=('error', 'loss'), ('token_error', 'nll') for a "
                               "language model, or ('agreement', 'kl') for unlabelled data")
    seeds = _seeds(spec.seeds)
    init = _init_scheme(model, spec.init, seeds)
    plan = Plan(model, checkpoints, resolved, joints, final, init, metric_fns, spec.engine, spec.batch_size,
                spec.max_examples, spec.buffers, spec.calibration, output=spec.output, blocks=spec.blocks,
                adaptive=spec.adaptive, metrics_spec={"metrics": list(metric_fns), **metrics_spec})
    chosen = ops.build(spec.ops, {**spec.options(), "seeds": seeds})
    plan.ops = {"final": ops.OPERATIONS["final"]()} | {op.name: op.bind(plan, probe) for op in chosen}
    n_groups = len(resolved.names) + len(joints)
    per_group = sum(op.size() for op in plan.ops.values())
    extra = sum(len(op.extra_cells()) for op in plan.ops.values())
    n_cells = 1 + n_groups * per_group + extra
    if n_cells > MAX_CELLS:
        runs = f" + {extra} runs" if extra else ""
        raise CriticalityError(f"the grid has {n_cells:,} cells ({n_groups} groups × {per_group} cells + 1{runs}), "
                               f"each a full pass over the evaluation data; at most {MAX_CELLS:,} are run (fewer "
                               "seeds, checkpoints, alphas or sigmas)")
    plan.cells = grid(plan)
    return plan


def _metrics(model: nn.Module, spec: PlanSpec, probe: Data | None) -> tuple[Any, dict[str, str]]:
    """The metrics to measure and how they came: as given, else chosen from the model's logits on the first two
    examples of ``probe`` (:func:`criticality.core.metrics.choose`, said on the log), else the classifier's
    default when there is no data to look at or the model does not run on it (the first cell then says why)."""
    if spec.metrics is not None:
        return spec.metrics, {"source": "given"}
    default = metrics_mod.DEFAULT_METRICS
    first = None if probe is None else next(batches.iter_batches(probe, 2, spec.max_examples), None)
    if first is None:
        return default, {"source": "default", "reason": "no data to look at"}
    device = next(iter(model.state_dict().values()), torch.empty(0)).device
    inputs, targets = batches.to_device(batches.first_examples(first, 2), device)
    try:
        with eval_mode(model), torch.inference_mode():
            logits = batches.call(model, inputs, spec.output)
    except (RuntimeError, ValueError, TypeError, IndexError, CriticalityError):
        return default, {"source": "default", "reason": "the model did not run on the first batch"}
    names, why = metrics_mod.choose(logits, targets)
    log.info("criticality: metrics=%s (%s: %s)", ", ".join(names), type(model).__name__, why)
    return names, {"source": "chosen", "reason": why}


def _check_settings(spec: PlanSpec) -> None:
    if spec.engine not in ENGINES:
        raise CriticalityError(f"unknown engine {spec.engine!r}; choose one of {', '.join(ENGINES)}")
    if spec.batch_size < 1:
        raise CriticalityError(f"batch size must be a positive integer, got {spec.batch_size}")
    if spec.max_examples is not None and spec.max_examples < 1:
        raise CriticalityError(f"--max-examples must be positive, got {spec.max_examples}")
    if spec.buffers not in BUFFER_MODES:
        raise CriticalityError(f"unknown buffer mode {spec.buffers!r}; choose one of {', '.join(BUFFER_MODES)}")
    if spec.buffers == "recalibrate" and spec.calibration is None:
        raise CriticalityError("buffers='recalibrate' needs calibration data (training batches)")


def _final_epoch(checkpoints: Mapping[int, StateDict], final: int | None) -> int:
    """The final epoch, after checking that the checkpoints hold it and the initialization (epoch 0)."""
    if not checkpoints:
        raise CriticalityError("no checkpoints given: analysis needs at least the final model and epoch 0")
    epochs = sorted(checkpoints)
    final = epochs[-1] if final is None else final
    if final not in checkpoints:
        raise CriticalityError(f"final epoch {final} is not among the checkpoints {epochs}")
    # The verdicts compare against re-initialization to epoch 0: refuse now, not after every cell has run.
    if epochs[0] != 0:
        raise CriticalityError(f"no epoch 0 (the initialization) among the checkpoints (earliest is {epochs[0]}); "
                               "re-initialization and the verdicts need it")
    if final == 0:
        raise CriticalityError("the checkpoint set holds only epoch 0 (the initialization); train at least one "
                               "epoch first")
    return final


def _seeds(seeds: int | Sequence[int]) -> list[int]:
    if isinstance(seeds, int) and not 0 <= seeds <= MAX_CELLS:
        raise CriticalityError(f"seeds must be a count from 0 to {MAX_CELLS}, got {seeds}")
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if any(s < 0 for s in seeds):
        raise CriticalityError(f"seeds must be non-negative, got {seeds}")
    return seeds


def _init_scheme(model: nn.Module, init: InitScheme | None, seeds: list[int]) -> InitScheme:
    if init is not None and not isinstance(init, str) and not callable(init):
        raise CriticalityError(f"init must be a scheme name ({', '.join(draw_schemes())}) or a callable that "
                               f"initializes a model, got {type(init).__name__} {init!r}")
    init, guessed = choose(model, init)
    if guessed and seeds:
        warnings.warn(f"{type(model).__name__} records no init_scheme: re-randomizing with its modules' own "
                      "reset_parameters (init='torch'); pass init= if training used another scheme "
                      "(init='shuffle' works for any model)", stacklevel=4)
    if isinstance(init, str) and init not in draw_schemes():
        raise CriticalityError(f"unknown init scheme {init!r}; choose one of {', '.join(draw_schemes())} or a callable")
    return init
