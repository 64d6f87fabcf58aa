"""The ``noise`` operation: Gaussian noise added to the group's parameters (columns ``sigma``, ``seed``).

**Scale convention**: the noise on every entry has standard deviation ``σ · s`` with
``s = ‖θ_final − θ_source‖₂ / √n`` over the group's n floating-point parameter entries — the RMS of how far
training moved the group — so σ = 1 is noise as large as the training movement, whatever the layer's size or
parametrization. Buffers (running statistics) get no noise. The draw ``z ~ N(0, I)`` comes from a generator
seeded by ``(seed, group)`` only, so every σ (and α) of one seed scales the same direction (common random
numbers: error curves over σ are smooth, not re-drawn per point). A noise cell may also carry ``alpha``
(module criticality, :mod:`criticality.interventions.module_criticality`): then the noise is added to the
interpolated group ``θ(α)``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from criticality.core import surgery
from criticality.core.ops import Cell, Operation, StateDict, group_keys, register
from criticality.core.plan import Plan
from criticality.core.state import buffer_keys, first_of_tied
from criticality.errors import CriticalityError
from criticality.interventions.interpolate import check_source, check_unit, interpolated

DEFAULT_SIGMAS = (0.1, 0.25, 0.5, 1.0)
NOISE_SALT = 2_000_029  # noise draw (seed, group) uses generator seed SALT·(seed + 1) + crc32(group)
NOISE_CONVENTION = ("noise std per entry = sigma * ||theta_final - theta_source||_2 / sqrt(n), over the group's n "
                    "floating-point parameter entries (the RMS of its training movement); buffers get no noise; "
                    "z ~ N(0, I) drawn per (seed, group), shared by every sigma and alpha")


def parameter_keys(keys: Collection[str], state: Mapping[str, torch.Tensor], buffer_keys: Collection[str]) -> list[str]:
    """The group's floating-point parameter keys: the entries that receive noise."""
    buffers = set(buffer_keys)
    return [k for k in keys if k not in buffers and state[k].is_floating_point()]


def noise_scale(final: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], keys: Sequence[str]) -> float:
    """``s = ‖θ_final − θ_source‖₂ / √n`` over ``keys`` (float64): the RMS of the group's movement."""
    if not keys:
        return 0.0
    sq = sum(float((final[k].detach().double().cpu() - source[k].detach().double().cpu()).pow(2).sum()) for k in keys)
    n = sum(final[k].numel() for k in keys)
    return math.sqrt(sq / n) if n else 0.0


def noise_generator(seed: int, group: str) -> torch.Generator:
    """The generator of noise draw ``seed`` for ``group``: independent across groups and seeds."""
    return torch.Generator().manual_seed(NOISE_SALT * (seed + 1) + zlib.crc32(group.encode()))


def add_noise(state: Mapping[str, torch.Tensor], keys: Sequence[str], std: float,
              generator: torch.Generator, ties: Mapping[str, str] | None = None) -> surgery.Overlay:
    """A copy of ``state`` with ``N(0, std²)`` noise added to every entry of ``keys``.

    ``z`` is drawn on the CPU in float32, key by key in ``keys`` order, so a draw does not depend on the
    device. ``ties`` maps a key to the first key of the same tied tensor, which gives it the same values.
    """
    out: dict[str, torch.Tensor] = {}  # the new entries; ``state`` is read for ``keys`` only
    ties = ties or {}
    for k in keys:
        if k in ties and ties[k] in state and ties[k] != k:
            out[k] = out[ties[k]] if ties[k] in out else state[ties[k]]
            continue
        v = state[k].detach()
        z = torch.randn(v.shape, generator=generator, dtype=torch.float32)
        out[k] = (v + (std * z).to(device=v.device, dtype=v.dtype)) if std else v.clone()
    return surgery.Overlay(state, out)


def noisy_keys(plan: Plan, cell: Cell) -> list[str]:
    """The entries of the cell's group that receive noise: its moving floating-point parameters."""
    return parameter_keys(group_keys(plan, cell), plan.final_state, buffer_keys(plan.model))


@register
@dataclass(frozen=True)
class Noise(Operation):
    """One cell per σ of ``sigmas`` and seed of ``seeds``, the scale measured from checkpoint ``source``."""

    name: ClassVar[str] = "noise"
    sigmas: Sequence[float] = DEFAULT_SIGMAS
    seeds: Sequence[int] = ()
    source: int = 0

    def bind(self, plan: Plan, probe: Any) -> Noise:
        check_source(plan, self.source)
        if not self.seeds:
            raise CriticalityError("the noise op averages over draws: give at least one seed")
        return dataclasses.replace(self, sigmas=check_unit(self.sigmas, "sigmas"))

    def size(self) -> int:
        return len(self.sigmas) * len(self.seeds)

    def cells(self, group: str, joint: bool) -> list[Cell]:
        return [Cell("noise", group, checkpoint=self.source, seed=s, joint=joint, sigma=v)
                for v in self.sigmas for s in self.seeds]

    def state(self, plan: Plan, cell: Cell) -> StateDict:
        base = interpolated(plan, cell) if cell.alpha is not None else surgery.Overlay(plan.final_state, {})
        keys = noisy_keys(plan, cell)
        scale = noise_scale(plan.final_state, plan.checkpoints[cell.checkpoint], keys)
        return add_noise(base, keys, cell.sigma * scale, noise_generator(cell.seed, cell.group),
                         first_of_tied(plan.model))

    def moved_keys(self, plan: Plan, cell: Cell) -> tuple[str, ...]:
        return tuple(group_keys(plan, cell) if cell.alpha is not None else noisy_keys(plan, cell))

    def summary(self, plan: Plan) -> dict[str, Any]:
        scales = {}
        for group in [*plan.groups.names, *plan.joint]:
            keys = noisy_keys(plan, Cell("noise", group))
            scales[group] = noise_scale(plan.final_state, plan.checkpoints[self.source], keys)
        return {"noise": {"convention": NOISE_CONVENTION, "sigmas": list(self.sigmas),
                          "draws": sorted(set(self.seeds)), "scale": scales}}
