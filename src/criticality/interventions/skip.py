"""The ``skip`` operation: the group's module returns its input (identity), in the module's own return
structure (a tensor, a tuple whose first element is the hidden state, or a dict / ``ModelOutput`` holding it).

The module is not removed: its ``forward`` is overridden for the cell (as nnsight's ``skip``, by
:func:`criticality.core.stubs.skipping`), so its parameters, the attributes its parent reads (HF's
``attention_type``, ``layer_idx``) and the state-dict keys stay. It applies when a group is exactly the state of
one module (a residual block, a transformer layer, a linear layer with a square weight) that maps its input to
an output of the same shape, checked on one probe batch; other groups get no skip cells and :class:`SkipPlan`
says why.

A joint group (``joint=[["model.layers.1", "model.layers.2"]]``) whose keys are not one module's skips each of
its member groups' modules at once; it is refused when any member is, with that member's reason.
``skip_runs=k`` adds one cell per run of ``k`` consecutive blocks of the model's stack
(:func:`criticality.core.stacks.find_stack`, or the plan's ``blocks``), named by the blocks' module paths
joined with ``+`` as a joint group is (Gromov et al. drop such runs); these cells come after every group's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from criticality.core.batches import Output, call, iter_batches, to_device
from criticality.core.hooks import eval_mode, hooks
from criticality.core.ops import Cell, Operation, register
from criticality.core.plan import Plan
from criticality.core.stacks import find_stack
from criticality.core.stubs import Shape, first_input, hidden_of, shape_of
from criticality.errors import CriticalityError


@dataclass(frozen=True)
class SkipPlan:
    """Which groups can be skipped: group → module path (or several, for joint groups and runs of blocks), the
    modules' return structures, and refusals."""

    paths: dict[str, str] = field(default_factory=dict)  # a group that is one module → its path
    outputs: dict[str, Shape] = field(default_factory=dict)  # path → return structure (see core.stubs.Shape)
    refused: dict[str, str] = field(default_factory=dict)  # group → why it gets no skip cells
    joint: dict[str, tuple[str, ...]] = field(default_factory=dict)  # joint group or run → its modules' paths

    def modules(self, group: str) -> tuple[str, ...]:
        """The paths of the modules a skip cell of ``group`` replaces by the identity (() if none)."""
        if group in self.paths:
            return (self.paths[group],)
        return self.joint.get(group, ())


@register
@dataclass(frozen=True)
class Skip(Operation):
    """One cell per group whose module(s) can return their input (found on a probe batch when bound), and with
    ``skip_runs=k`` one per run of k consecutive blocks."""

    name: ClassVar[str] = "skip"
    skip_runs: int | None = None  # k: every run of k consecutive blocks of the stack as one more cell
    found: SkipPlan = field(default_factory=SkipPlan)
    runs: tuple[str, ...] = ()  # the runs' cell names, once bound

    def bind(self, plan: Plan, probe: Any) -> Skip:
        blocks = (plan.blocks or [p for p, _ in find_stack(plan.model)]) if self.skip_runs is not None else []
        runs = block_runs(blocks, self.skip_runs)
        runs = {name: paths for name, paths in runs.items() if name not in plan.joint}  # already a joint group
        if runs and plan.buffers == "recalibrate":
            raise CriticalityError("skip_runs cannot be combined with buffers='recalibrate' (a run is not a group "
                                   "whose norm statistics could be recomputed); use joint groups instead")
        joint = {name: members_of(plan.groups.members, keys) for name, keys in plan.joint.items()}
        found = plan_skips_on(plan.model, plan.groups.members, probe, plan.batch_size, plan.output,
                              joint=joint, runs=runs)
        return dataclasses.replace(self, found=found, runs=tuple(runs))

    def size(self) -> int:
        return 1

    def cells(self, group: str, joint: bool) -> list[Cell]:
        return [Cell("skip", group, joint=joint)] if self.found.modules(group) else []

    def extra_cells(self) -> list[Cell]:
        return [Cell("skip", r, joint=True) for r in self.runs if r in self.found.joint]

    def skip(self, plan: Plan, cell: Cell) -> tuple[str, ...]:
        paths = self.found.modules(cell.group)
        if not paths:
            raise CriticalityError(f"group {cell.group!r} cannot be skipped: "
                                   f"{self.found.refused.get(cell.group, 'the plan has no skip operation')}")
        return paths

    def summary(self, plan: Plan) -> dict[str, Any]:
        modules = {**self.found.paths, **{g: list(p) for g, p in self.found.joint.items()}}
        return {"skip_modules": modules, "skip_refused": dict(self.found.refused)}


def block_runs(blocks: Sequence[str], k: int | None) -> dict[str, tuple[str, ...]]:
    """Every run of ``k`` consecutive ``blocks`` (module paths, in execution order): name ``a+b`` → paths."""
    if k is None:
        return {}
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CriticalityError(f"skip_runs must be a positive number of consecutive blocks, got {k!r}")
    if len(blocks) < k:
        raise CriticalityError(f"skip_runs={k} needs a stack of at least {k} blocks; found {len(blocks)}"
                               + (f" ({', '.join(blocks)})" if blocks else "; pass blocks=[...]"))
    runs = [tuple(blocks[i:i + k]) for i in range(len(blocks) - k + 1)]
    return {"+".join(run): run for run in runs}


def members_of(groups: Mapping[str, Sequence[str]], keys: Collection[str]) -> tuple[str, ...]:
    """The groups whose keys together are ``keys`` (a joint group's members; groups share no key)."""
    wanted = set(keys)
    return tuple(g for g, own in groups.items() if own and set(own) <= wanted)


def plan_skips_on(model: nn.Module, groups: Mapping[str, Sequence[str]], data: Any, batch_size: int,
                  output: Output = None, *, joint: Mapping[str, Sequence[str]] | None = None,
                  runs: Mapping[str, Sequence[str]] | None = None) -> SkipPlan:
    """:func:`plan_skips` on the first (at most 2) examples of the evaluation ``data``."""
    if data is None:
        raise CriticalityError("the skip op needs data to check each module's input and output shapes")
    first = next(iter_batches(data, min(batch_size, 2)), None)
    if first is None:
        raise CriticalityError("no data to evaluate on")
    device = next(iter(model.state_dict().values()), torch.empty(0)).device
    inputs, _ = to_device(first, device)
    return plan_skips(model, groups, inputs, output, joint=joint, runs=runs)


def module_of(model: nn.Module, keys: Collection[str], name: str | None = None) -> str | None:
    """Path of the module whose state-dict keys are exactly ``keys`` (the one named ``name`` if it is one of
    them, else the outermost), or None. The root module itself never counts."""
    wanted = set(keys)
    hits = []
    for path, module in model.named_modules():
        if not path:
            continue
        own = {f"{path}.{k}" for k in module.state_dict(keep_vars=True)}
        if own == wanted:
            hits.append(path)
    if name in hits:
        return name
    return min(hits, key=lambda p: p.count("."), default=None)


def plan_skips(model: nn.Module, groups: Mapping[str, Sequence[str]], probe: Any, output: Output = None, *,
               joint: Mapping[str, Sequence[str]] | None = None,
               runs: Mapping[str, Sequence[str]] | None = None) -> SkipPlan:
    """Find each group's module and check on ``probe`` (a batch of inputs) that it maps a shape to itself
    (``output``: where the logits are in the model's output, see :func:`criticality.core.batches.call`).

    ``joint``: joint group → its member groups (names in ``groups``). When the joint group's keys are one
    module's (a layer's sub-layers together) that module is skipped, else every member's module at once; the
    joint group is refused when a member is, with the member's reason. ``runs``: name → module paths skipped
    together (runs of blocks), refused when one of them cannot be skipped."""
    joint, runs = dict(joint or {}), dict(runs or {})
    paths, refused = {}, {}
    for group, keys in {**groups, **{g: [k for m in ms for k in groups[m]] for g, ms in joint.items()}}.items():
        path = module_of(model, keys, group)
        if path is not None:
            paths[group] = path
        elif group not in joint:
            refused[group] = "its keys are not the state of one module (several modules, or part of one)"
    several = {g: ms for g, ms in joint.items() if g not in paths}
    probed = {*paths.values(), *(p for ps in runs.values() for p in ps)}
    seen = _probe_io(model, sorted(probed), probe, output)
    outputs = {}
    for group, path in list(paths.items()):
        why = _skip_refusal(seen.get(path))
        if why:
            refused[group] = f"module {path!r} {why}"
            del paths[group]
        else:
            outputs[path] = seen[path]["outputs"]
    together = {}
    for name, members in several.items():
        whys = [f"member {m!r}: {refused[m]}" for m in members if m not in paths]
        if len(members) < 2:
            whys = whys or ["its keys are not those of two or more groups"]
        if whys:
            refused[name] = "; ".join(whys)
        else:
            together[name] = tuple(paths[m] for m in members)
    for name, blocks in runs.items():
        whys = [f"block {p!r} {why}" for p in blocks if (why := _skip_refusal(seen.get(p)))]
        if whys:
            refused[name] = "; ".join(whys)
        else:
            together[name] = tuple(blocks)
            outputs.update({p: seen[p]["outputs"] for p in blocks})
    if not paths and not together:
        reasons = "; ".join(f"{g}: {r}" for g, r in refused.items())
        raise CriticalityError(f"no group can be skipped ({reasons})")
    return SkipPlan(paths, outputs, refused, together)


def _skip_refusal(io: dict | None) -> str | None:
    if io is None:
        return "is not called in the model's forward"
    if io["input"] is None:
        return "takes no tensor input"
    if io["output"] is None:
        return f"returns a {io['type']}, not a tensor, a tuple starting with one or a mapping holding one"
    if io["input"] != io["output"]:
        return f"maps shape {io['input']} to {io['output']}: the identity cannot replace it"
    return None


def _probe_io(model: nn.Module, paths: Sequence[str], probe: Any, output: Output) -> dict[str, dict]:
    """Input/output shapes and return structure of the modules at ``paths`` on one forward of ``probe``."""
    seen: dict[str, dict] = {}

    def hook(path):
        def record(module, args, kwargs, output):
            x = first_input(args, kwargs)
            first = hidden_of(output)
            seen.setdefault(path, {
                "input": tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else None,
                "output": tuple(first.shape[1:]) if isinstance(first, torch.Tensor) else None,
                "outputs": shape_of(output) if first is not None else None,
                "type": type(output).__name__})
        return record

    with hooks([(model.get_submodule(p), hook(p)) for p in paths], with_kwargs=True), eval_mode(model), \
            torch.inference_mode():
        call(model, probe, output)
    return seen
