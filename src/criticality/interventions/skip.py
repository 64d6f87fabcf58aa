"""The ``skip`` operation: the group's module returns its input (identity), in the module's own return
structure (a tensor, or a tuple whose first element is the hidden state).

The module is not removed: its ``forward`` is overridden for the cell (as nnsight's ``skip``, by
:func:`criticality.core.stubs.skipping`), so its parameters, the attributes its parent reads (HF's
``attention_type``, ``layer_idx``) and the state-dict keys stay. It applies when a group is exactly the state of
one module (a residual block, a transformer layer, a linear layer with a square weight) that maps its input to
an output of the same shape, checked on one probe batch; other groups get no skip cells and :class:`SkipPlan`
says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from criticality.core.batches import Output, call, iter_batches
from criticality.core.hooks import eval_mode, hooks
from criticality.core.ops import Cell, Operation, register
from criticality.core.plan import Plan
from criticality.core.stubs import Shape, first_input, shape_of
from criticality.errors import CriticalityError


@dataclass(frozen=True)
class SkipPlan:
    """Which groups can be skipped: group → module path, the module's return structure, and refusals."""

    paths: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Shape] = field(default_factory=dict)  # path → return structure (see core.stubs.Shape)
    refused: dict[str, str] = field(default_factory=dict)  # group → why it gets no skip cells


@register
@dataclass(frozen=True)
class Skip(Operation):
    """One cell per group whose module can return its input (found on a probe batch when bound)."""

    name: ClassVar[str] = "skip"
    found: SkipPlan = field(default_factory=SkipPlan)

    def bind(self, plan: Plan, probe: Any) -> Skip:
        members = {**plan.groups.members, **plan.joint}
        found = plan_skips_on(plan.model, members, probe, plan.batch_size, plan.output)
        return dataclasses.replace(self, found=found)

    def size(self) -> int:
        return 1

    def cells(self, group: str, joint: bool) -> list[Cell]:
        return [Cell("skip", group, joint=joint)] if group in self.found.paths else []

    def skip(self, plan: Plan, cell: Cell) -> tuple[str, ...]:
        if cell.group not in self.found.paths:
            raise CriticalityError(f"group {cell.group!r} cannot be skipped: "
                                   f"{self.found.refused.get(cell.group, 'the plan has no skip operation')}")
        return (self.found.paths[cell.group],)

    def summary(self, plan: Plan) -> dict[str, Any]:
        return {"skip_modules": dict(self.found.paths), "skip_refused": dict(self.found.refused)}


def plan_skips_on(model: nn.Module, groups: Mapping[str, Sequence[str]], data: Any, batch_size: int,
                  output: Output = None) -> SkipPlan:
    """:func:`plan_skips` on the first (at most 2) examples of the evaluation ``data``."""
    if data is None:
        raise CriticalityError("the skip op needs data to check each module's input and output shapes")
    first = next(iter_batches(data, min(batch_size, 2)), None)
    if first is None:
        raise CriticalityError("no data to evaluate on")
    device = next(iter(model.state_dict().values()), torch.empty(0)).device
    inputs = first[0]
    inputs = {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, Mapping) else inputs.to(device)
    return plan_skips(model, groups, inputs, output)


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


def plan_skips(model: nn.Module, groups: Mapping[str, Sequence[str]], probe: Any, output: Output = None) -> SkipPlan:
    """Find each group's module and check on ``probe`` (a batch of inputs) that it maps a shape to itself
    (``output``: where the logits are in the model's output, see :func:`criticality.core.batches.call`)."""
    paths, refused = {}, {}
    for group, keys in groups.items():
        path = module_of(model, keys, group)
        if path is None:
            refused[group] = "its keys are not the state of one module (several modules, or part of one)"
        else:
            paths[group] = path
    seen = _probe_io(model, sorted(set(paths.values())), probe, output)
    outputs = {}
    for group, path in list(paths.items()):
        io = seen.get(path)
        why = _skip_refusal(io)
        if why:
            refused[group] = f"module {path!r} {why}"
            del paths[group]
        else:
            outputs[path] = io["outputs"]
    if not paths:
        reasons = "; ".join(f"{g}: {r}" for g, r in refused.items())
        raise CriticalityError(f"no group can be skipped ({reasons})")
    return SkipPlan(paths, outputs, refused)


def _skip_refusal(io: dict | None) -> str | None:
    if io is None:
        return "is not called in the model's forward"
    if io["input"] is None:
        return "takes no tensor input"
    if io["output"] is None:
        return f"returns a {io['type']}, not a tensor or a tuple starting with one"
    if io["input"] != io["output"]:
        return f"maps shape {io['input']} to {io['output']}: the identity cannot replace it"
    return None


def _probe_io(model: nn.Module, paths: Sequence[str], probe: Any, output: Output) -> dict[str, dict]:
    """Input/output shapes and return structure of the modules at ``paths`` on one forward of ``probe``."""
    seen: dict[str, dict] = {}

    def hook(path):
        def record(module, args, kwargs, output):
            x = first_input(args, kwargs)
            first = output[0] if isinstance(output, tuple) and output else output
            seen.setdefault(path, {
                "input": tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else None,
                "output": tuple(first.shape[1:]) if isinstance(first, torch.Tensor) else None,
                "outputs": shape_of(output) if isinstance(first, torch.Tensor) else None,
                "type": type(output).__name__})
        return record

    with hooks([(model.get_submodule(p), hook(p)) for p in paths], with_kwargs=True), eval_mode(model), \
            torch.inference_mode():
        call(model, probe, output)
    return seen
