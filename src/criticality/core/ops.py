"""Operations: the kinds of cell of the analysis grid, behind one small interface and one registry.

A cell ``(op, group, checkpoint, seed, alpha, sigma)`` is one variant of the trained model. Its operation says
which cells a group gets (from the operation's own parameters: ``reinit_to``, ``seeds``, ``alphas`` …), the
state dict the cell evaluates, the keys that state moves (known before any surgery, for the engine), the
modules that return their input instead of running (``skip``), and what the analysis summary records.

This module defines the paper's operations: ``final`` (the trained model), ``reinit`` (a group back to an
earlier checkpoint) and ``rerandomize`` (a group from a fresh draw). :mod:`criticality.interventions` adds
``interpolate``, ``noise`` and ``skip`` with :func:`register`, as any other operation would be added: a
dataclass whose fields are its parameters, named like :func:`criticality.analyze`'s keywords.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from criticality.core import surgery
from criticality.core.groups import Groups
from criticality.core.initializers import InitScheme
from criticality.core.state import buffer_keys, moving_keys
from criticality.errors import CriticalityError

StateDict = Mapping[str, torch.Tensor]
PAPER_OPS = ("reinit", "rerandomize")
RERANDOMIZE_SALT = 1_000_003  # draw seed s: each module drawn from draw_seed(SALT + s, its path) (Rerandomize)


@dataclass(frozen=True)
class Cell:
    op: str  # a registered operation's name
    group: str = ""  # "" for the final model; members joined by "+" for a joint group
    checkpoint: int | None = None  # epoch: reinit's target, interpolate's / noise's source (and the final row)
    seed: int | None = None  # generator seed, for rerandomize and noise
    joint: bool = False
    alpha: float | None = None  # interpolation weight of the final model (interpolate; noise in module criticality)
    sigma: float | None = None  # noise std relative to the group's movement RMS (see interventions.noise)

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.op, "group": self.group, "joint": self.joint,
                "checkpoint": self.checkpoint, "seed": self.seed, "alpha": self.alpha, "sigma": self.sigma}


class Plan(Protocol):
    """What an operation reads of the analysis plan (:class:`criticality.core.plan.Plan`)."""

    model: nn.Module
    checkpoints: Mapping[int, StateDict]
    groups: Groups
    joint: dict[str, tuple[str, ...]]
    init: InitScheme
    start_epoch: int
    buffers: str
    batch_size: int
    output: Any

    @property
    def final_state(self) -> StateDict: ...

    def keys(self, group: str) -> tuple[str, ...]: ...


class Operation:
    """One kind of cell. Subclasses are frozen dataclasses whose fields are the operation's parameters; the
    cell carries every value its state needs, so any plan can evaluate any registered operation's cells."""

    name: ClassVar[str]

    @classmethod
    def configure(cls, options: Mapping[str, Any]) -> Operation:
        """The operation with the parameters it has among ``options`` (:func:`criticality.analyze`'s keywords)."""
        return cls(**{f.name: options[f.name] for f in dataclasses.fields(cls) if f.name in options})

    def bind(self, plan: Plan, probe: Any) -> Operation:
        """This operation checked against ``plan`` (model, checkpoints, groups) and ``probe`` (a batch source of
        the evaluation data), with defaults that depend on them filled in."""
        return self

    def size(self) -> int:
        """Cells per group at most, once bound (the grid-size guard)."""
        return 0

    def cells(self, group: str, joint: bool) -> list[Cell]:
        return []

    def extra_cells(self) -> list[Cell]:
        """Cells that belong to no single group (a run of blocks skipped together), after every group's."""
        return []

    def state(self, plan: Plan, cell: Cell) -> StateDict:
        """The full state dict the cell evaluates: an :class:`~criticality.core.surgery.Overlay` of new tensors
        over the final checkpoint, which is read for no other key."""
        return surgery.Overlay(plan.final_state, {})

    def moved_keys(self, plan: Plan, cell: Cell) -> tuple[str, ...]:
        """The keys :meth:`state` gives new tensors, known without doing the surgery."""
        return ()

    def skip(self, plan: Plan, cell: Cell) -> tuple[str, ...]:
        """Paths of the modules that return their input in this cell instead of running."""
        return ()

    def summary(self, plan: Plan) -> dict[str, Any]:
        """What the analysis summary records about this operation's cells."""
        return {}


OPERATIONS: dict[str, type[Operation]] = {}


def register(cls: type[Operation]) -> type[Operation]:
    """Class decorator: make an operation available to the grid under ``cls.name``."""
    OPERATIONS[cls.name] = cls
    return cls


def check_ops(ops: Sequence[str] | str) -> tuple[str, ...]:
    """The grid's ops, validated; ``final`` is implied (the grid always holds the trained model)."""
    if isinstance(ops, str):
        ops = [o for o in ops.split(",") if o]
    unknown = [o for o in ops if o not in OPERATIONS]
    if unknown:
        raise CriticalityError(f"unknown op {unknown[0]!r}; choose from {', '.join(choices())}")
    return tuple(dict.fromkeys(o for o in ops if o != "final"))


def choices() -> list[str]:
    """The operations a grid can ask for (``final`` is always there)."""
    return [name for name in OPERATIONS if name != "final"]


def build(ops: Sequence[str | Operation] | str, options: Mapping[str, Any]) -> list[Operation]:
    """The grid's operations, in the order given: a name is the registered operation configured from ``options``
    (:func:`criticality.analyze`'s keywords); an :class:`Operation` object (``Interpolate(alphas=(0, 0.5))``)
    comes with its own parameters."""
    given = {o.name: o for o in ([] if isinstance(ops, str) else ops) if isinstance(o, Operation)}
    names = check_ops(ops if isinstance(ops, str) else [getattr(o, "name", o) for o in ops])
    return [given[name] if name in given else OPERATIONS[name].configure(options) for name in names]


def group_keys(plan: Plan, cell: Cell) -> list[str]:
    """The keys of the cell's group that its change moves (buffers stay under ``buffers="keep"``)."""
    return moving_keys(plan.keys(cell.group), plan.buffers, buffer_keys(plan.model))


@register
@dataclass(frozen=True)
class Final(Operation):
    """The trained model itself: the row every Δ is measured against."""

    name: ClassVar[str] = "final"


@register
@dataclass(frozen=True)
class Reinit(Operation):
    """The group back to its values at ``checkpoint`` (each epoch of ``reinit_to``; default every epoch before
    the final one)."""

    name: ClassVar[str] = "reinit"
    reinit_to: Sequence[int] | None = None

    def bind(self, plan: Plan, probe: Any) -> Reinit:
        epochs = sorted(plan.checkpoints)
        to = [e for e in epochs if e < plan.final_epoch] if self.reinit_to is None else sorted(self.reinit_to)
        for e in to:
            if e not in plan.checkpoints:
                raise CriticalityError(f"cannot re-initialize to epoch {e}: no such checkpoint (have {epochs})")
        if 0 not in to:
            raise CriticalityError(f"reinit_to {to} leaves out epoch 0, which the verdicts compare against")
        return dataclasses.replace(self, reinit_to=tuple(to))

    def size(self) -> int:
        return len(self.reinit_to)

    def cells(self, group: str, joint: bool) -> list[Cell]:
        return [Cell("reinit", group, checkpoint=e, joint=joint) for e in self.reinit_to]

    def state(self, plan: Plan, cell: Cell) -> StateDict:
        return surgery.reinit(plan.final_state, plan.checkpoints[cell.checkpoint], plan.keys(cell.group),
                              buffers=plan.buffers, buffer_keys=buffer_keys(plan.model))

    def moved_keys(self, plan: Plan, cell: Cell) -> tuple[str, ...]:
        return tuple(group_keys(plan, cell))


@register
@dataclass(frozen=True)
class Rerandomize(Operation):
    """The group from a fresh draw of the init scheme, one per seed of ``seeds``."""

    name: ClassVar[str] = "rerandomize"
    seeds: Sequence[int] = ()

    def size(self) -> int:
        return len(self.seeds)

    def cells(self, group: str, joint: bool) -> list[Cell]:
        return [Cell("rerandomize", group, seed=s, joint=joint) for s in self.seeds]

    def state(self, plan: Plan, cell: Cell) -> StateDict:
        fresh = fresh_draw(plan, cell.group, cell.seed)  # ours alone: its tensors are taken, not copied
        return surgery.rerandomize(plan.final_state, fresh, plan.keys(cell.group), buffers=plan.buffers,
                                   buffer_keys=buffer_keys(plan.model), copy=False)

    def moved_keys(self, plan: Plan, cell: Cell) -> tuple[str, ...]:
        return tuple(group_keys(plan, cell))


def fresh_draw(plan: Plan, group: str, seed: int) -> StateDict:
    """The group's tensors drawn by :func:`surgery.fresh_group` from seed ``RERANDOMIZE_SALT + seed``.

    Made when asked and not kept: memory is one group's tensors, never a whole model nor one copy per seed.
    The salt keeps draw ``seed`` apart from a training run initialized with the same small seed: a "fresh"
    draw equal to the layer's own initial values would be re-initialization, not re-randomization. Such a
    collision (every drawn, non-constant tensor of the group equal to epoch 0) is refused.
    """
    start = plan.checkpoints[plan.start_epoch]
    fresh = surgery.fresh_group(plan.model, plan.init, RERANDOMIZE_SALT + seed, plan.keys(group), start=start)
    # Only drawn tensors count: a constant one (a norm's weight 1) equals its initial value by design.
    floats = [k for k in fresh if fresh[k].is_floating_point() and fresh[k].numel() > 1
              and not torch.all(fresh[k] == fresh[k].flatten()[0])]
    same = [k for k in floats if torch.equal(fresh[k], start[k].to(fresh[k].device))]
    if same and len(same) == len(floats):
        raise CriticalityError(f"re-randomization seed {seed} reproduces the initialization of group {group!r} "
                               "exactly; choose other seeds")
    return fresh
