"""The ``interpolate`` operation: the group at ``(1 - α)·θ_source + α·θ_final`` (column ``alpha``; ``checkpoint`` =
the source, default epoch 0). α = 0 is re-initialization to the source, α = 1 the trained model."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from criticality.core import surgery
from criticality.core.ops import Cell, Operation, StateDict, group_keys, register
from criticality.core.plan import Plan
from criticality.errors import CriticalityError

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)


def check_unit(values: Sequence[float], what: str, *, zero: bool = True) -> tuple[float, ...]:
    """Sorted, distinct values in [0, 1] (``zero=False``: in (0, 1])."""
    out = tuple(sorted({float(v) for v in values}))
    bad = [v for v in out if not (0.0 <= v <= 1.0) or (v == 0.0 and not zero) or math.isnan(v)]
    if bad or not out:
        raise CriticalityError(f"{what} must be {'' if zero else 'positive '}numbers in [0, 1], got {list(values)}")
    return out


def check_source(plan: Plan, source: int) -> None:
    if source not in plan.checkpoints:
        raise CriticalityError(f"interpolation/noise source epoch {source} is not among the checkpoints "
                               f"{sorted(plan.checkpoints)}")


def interpolated(plan: Plan, cell: Cell) -> StateDict:
    """The final state with the cell's group at weight ``cell.alpha`` between its source and the final model."""
    return surgery.interpolate(plan.final_state, plan.checkpoints[cell.checkpoint], group_keys(plan, cell),
                               cell.alpha)


@register
@dataclass(frozen=True)
class Interpolate(Operation):
    """One cell per weight of ``alphas``, from checkpoint ``source``."""

    name: ClassVar[str] = "interpolate"
    alphas: Sequence[float] = DEFAULT_ALPHAS
    source: int = 0

    def bind(self, plan: Plan, probe: Any) -> Interpolate:
        check_source(plan, self.source)
        return dataclasses.replace(self, alphas=check_unit(self.alphas, "alphas"))

    def size(self) -> int:
        return len(self.alphas)

    def cells(self, group: str, joint: bool) -> list[Cell]:
        return [Cell("interpolate", group, checkpoint=self.source, joint=joint, alpha=a) for a in self.alphas]

    def state(self, plan: Plan, cell: Cell) -> StateDict:
        return interpolated(plan, cell)

    def moved_keys(self, plan: Plan, cell: Cell) -> tuple[str, ...]:
        return tuple(group_keys(plan, cell))

    def summary(self, plan: Plan) -> dict[str, Any]:
        return {"alphas": list(self.alphas)}
