"""The ``swap`` operation (Lad et al. 2024): two adjacent blocks of the model's stack exchange their weights, so
the model runs them in the other order. One cell per adjacent pair, named ``a+b`` as a joint group is, after
every group's cells (like ``skip_runs``).

A pair can be swapped when both blocks hold the same state-dict entries (relative names, shapes, dtypes);
every entry moves, parameters and buffers (a block's norm statistics go with it whatever ``buffers`` says).
Other pairs are listed with the reason in the summary (``swap_refused``); a stack without any swappable pair
is an error. The stack is :func:`criticality.core.stacks.find_stack`'s, or the plan's ``blocks``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from criticality.core import surgery
from criticality.core.ops import Cell, Operation, StateDict, register
from criticality.core.plan import Plan
from criticality.core.stacks import find_stack
from criticality.errors import CriticalityError


def block_state(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """The block's state-dict entries, by name relative to the block."""
    return dict(model.get_submodule(path).state_dict(keep_vars=True))


def swap_refusal(model: nn.Module, a: str, b: str) -> str | None:
    """Why blocks ``a`` and ``b`` cannot exchange weights, or None."""
    sa, sb = block_state(model, a), block_state(model, b)
    if not sa:
        return f"block {a!r} holds no state"
    if set(sa) != set(sb):
        odd = sorted(set(sa) ^ set(sb))[:3]
        return f"blocks {a!r} and {b!r} hold different entries ({', '.join(odd)}, …)"
    for k in sa:
        if sa[k].shape != sb[k].shape or sa[k].dtype != sb[k].dtype:
            return (f"{a}.{k} is {tuple(sa[k].shape)} {sa[k].dtype} but {b}.{k} is "
                    f"{tuple(sb[k].shape)} {sb[k].dtype}")
    return None


def swapped(final: StateDict, a: str, b: str, names: list[str]) -> surgery.Overlay:
    """``final`` with blocks ``a`` and ``b`` exchanged: each entry ``a.k`` takes ``b.k`` and back (copies)."""
    changed = {}
    for k in names:
        changed[f"{a}.{k}"] = final[f"{b}.{k}"].detach().clone()
        changed[f"{b}.{k}"] = final[f"{a}.{k}"].detach().clone()
    return surgery.Overlay(final, changed)


@register
@dataclass(frozen=True)
class Swap(Operation):
    """One cell per pair of adjacent blocks with the same state layout: the two exchanged."""

    name: ClassVar[str] = "swap"
    pairs: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # cell name → the two paths, once bound
    refused: Mapping[str, str] = field(default_factory=dict)  # pair name → why it gets no cell

    def bind(self, plan: Plan, probe: Any) -> Swap:
        if plan.buffers == "recalibrate":
            raise CriticalityError("swap cannot be combined with buffers='recalibrate' (a swapped pair is not a "
                                   "group whose norm statistics could be recomputed)")
        blocks = list(plan.blocks) if plan.blocks else [p for p, _ in find_stack(plan.model)]
        if len(blocks) < 2:
            raise CriticalityError(f"swap needs a stack of at least 2 blocks; found {len(blocks)} (pass blocks=[...])")
        pairs, refused = {}, {}
        for a, b in zip(blocks, blocks[1:], strict=False):
            why = swap_refusal(plan.model, a, b)
            if why:
                refused[f"{a}+{b}"] = why
            else:
                pairs[f"{a}+{b}"] = (a, b)
        if not pairs:
            raise CriticalityError(f"no adjacent blocks can be swapped ({'; '.join(refused.values())})")
        return dataclasses.replace(self, pairs=pairs, refused=refused)

    def extra_cells(self) -> list[Cell]:
        return [Cell("swap", name, joint=True) for name in self.pairs]

    def _pair(self, cell: Cell) -> tuple[str, str]:
        if cell.group not in self.pairs:
            raise CriticalityError(f"{cell.group!r} is not a pair of adjacent blocks that can be swapped: "
                                   f"{self.refused.get(cell.group, 'not bound to this plan')}")
        return self.pairs[cell.group]

    def state(self, plan: Plan, cell: Cell) -> StateDict:
        a, b = self._pair(cell)
        return swapped(plan.final_state, a, b, sorted(block_state(plan.model, a)))

    def moved_keys(self, plan: Plan, cell: Cell) -> tuple[str, ...]:
        a, b = self._pair(cell)
        names = sorted(block_state(plan.model, a))
        return tuple(f"{p}.{k}" for p in (a, b) for k in names)

    def summary(self, plan: Plan) -> dict[str, Any]:
        return {"swap_pairs": {g: list(p) for g, p in self.pairs.items()}, "swap_refused": dict(self.refused)}
