"""The canary: before a grid runs on the fast engine, one variant per group is evaluated by the engine and by
the plain reference on the probe batch (the first two examples); when they differ, the fast path cannot see
some variant's weights (a module keeps state derived from them that :mod:`criticality.core.caches` does not
know), and the caller falls back to the reference for the whole model, with a warning naming the groups.

The comparison is on the logits themselves, per example: a fixed random projection of each example's logits
and their mean absolute value (float64), equal within a tolerance of ``TOLERANCE`` relative to the logits'
scale (or a few rounding steps of a low-precision model). The variant of a group is its re-initialization to
the earliest checkpoint when the grid has one (the largest change), else its first cell.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from criticality.core import batches
from criticality.core.batches import Data, iter_batches
from criticality.core.engine import Engine
from criticality.core.evaluate import evaluate_naive
from criticality.core.metrics import Metric
from criticality.core.ops import Cell
from criticality.core.plan import Plan

TOLERANCE = 1e-5  # relative to the mean |logit|; LeViT's stale bias cache moved a loss by 1e-4


class Logits(Metric):
    """Per example: ``what="projection"`` a fixed random projection of the logits (scaled by 1/√size),
    ``"scale"`` their mean absolute value, ``"eps"`` the logits' rounding step (finfo eps)."""

    needs_labels = False

    def __init__(self, what: str):
        self.what = what

    def __call__(self, logits, targets, reference, mask=None):
        flat = logits.detach().flatten(1).to(torch.float64)  # (N, everything)
        ones = torch.ones(len(flat), dtype=torch.int64, device=flat.device)
        if self.what == "eps":
            eps = torch.finfo(logits.dtype).eps if logits.is_floating_point() else 0.0
            return torch.full((len(flat),), eps, dtype=torch.float64, device=flat.device), ones
        if self.what == "scale":
            return flat.abs().mean(dim=1), ones
        g = torch.Generator().manual_seed(0)
        w = torch.randn(flat.shape[1], generator=g, dtype=torch.float64).to(flat.device)
        return flat @ w / flat.shape[1] ** 0.5, ones


METRICS = {name: Logits(name) for name in ("projection", "scale", "eps")}


def variants(plan: Plan, cells: Sequence[Cell]) -> dict[str, Cell]:
    """Group → the cell its canary evaluates, for the groups of ``cells`` (the final model's cell has none)."""
    picked: dict[str, Cell] = {}
    for cell in cells:
        if cell.op == "final":
            continue
        old = picked.get(cell.group)
        if old is None or (cell.op == "reinit" and (old.op != "reinit" or cell.checkpoint < old.checkpoint)):
            picked[cell.group] = cell
    return picked


def mismatches(plan: Plan, cells: Sequence[Cell], data: Data, device, fast: Engine) -> list[str]:
    """The groups whose canary variant gives other logits on the fast engine (the grid's ``fast``, on ``data``)
    than on the plain reference."""
    picked = variants(plan, cells)
    first = next(iter_batches(data, 2, plan.max_examples), None)
    if not picked or first is None:
        return []
    probe = [batches.first_examples(first, 2)]  # one batch (inputs, targets) of two examples: the engine's probe
    got = fast.evaluate_on(probe, METRICS, [plan.variant(c) for c in picked.values()])
    bad = []
    for group, cell in picked.items():
        want = evaluate_naive(plan.model, plan.state(cell), probe, metrics=METRICS, batch_size=2, device=device,
                              output=plan.output, skip=plan.variant(cell).skip)
        if not _close(got[cell].records, want.records):
            bad.append(group)
    return bad


def _close(a, b) -> bool:
    """Per example, projections equal within the tolerance (NaN matching NaN)."""
    scale = torch.as_tensor(b["scale"][0]).abs()
    tol = torch.maximum(TOLERANCE * scale, 8 * torch.as_tensor(b["eps"][0]) * scale) + 1e-12
    x, y = torch.as_tensor(a["projection"][0]), torch.as_tensor(b["projection"][0])
    same = ((x - y).abs() <= tol) | (x.isnan() & y.isnan())
    return bool(same.all())


def guard(plan: Plan, cells: Sequence[Cell], data: Data, device, fast: Engine | None) -> Engine | None:
    """``fast``, or ``None`` (evaluate with the plain reference) with a warning when a canary variant's logits
    differ between the two paths."""
    bad = mismatches(plan, cells, data, device, fast) if fast is not None else []
    if not bad:
        return fast
    warnings.warn(f"{type(plan.model).__name__}: the fast engine's logits differ from the plain reference's for "
                  f"group(s) {', '.join(bad)} (a module keeps state derived from its weights that swapping them "
                  "does not reach); every cell of this model is evaluated by the plain reference instead "
                  "(engine='naive': the same numbers, slower)", stacklevel=5)
    return None
