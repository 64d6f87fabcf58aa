"""The plain reference path: evaluate a model on data, or a variant of it by deepcopy + ``load_state_dict``.

:func:`evaluate_naive` is what the fast :class:`criticality.core.engine.Engine` is checked against. Both
split the data into the same batches and run the same operations on them, so errors agree exactly and
losses to float rounding of the sums. Results are :class:`CellResult`: the means
``{metric: float, "n": examples}`` with the per-example ``records`` (see :mod:`criticality.core.metrics`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from criticality.core import batches, stubs
from criticality.core.batches import Data, Output, iter_batches
from criticality.core.caches import invalidate
from criticality.core.hooks import eval_mode
from criticality.core.metrics import DEFAULT_METRICS, CellResult, Records, needs_reference, resolve

__all__ = ["evaluate", "evaluate_naive"]


def evaluate(model: nn.Module, data: Data, *, metrics: Any = DEFAULT_METRICS, batch_size: int = 1000,
             device: str | torch.device = "cpu", limit: int | None = None, output: Output = None,
             reference: nn.Module | None = None) -> CellResult:
    """Each metric of ``model`` (in eval mode; modes are restored) over ``data``.

    ``reference`` is the model whose logits ``agreement``/``kl`` compare with (default: ``model`` itself).
    """
    metrics = resolve(metrics)
    reference = model if reference is None and needs_reference(metrics) else reference
    records = Records(metrics)
    with eval_mode(model, reference), torch.inference_mode():
        for batch in iter_batches(data, batch_size, limit):
            inputs, targets = batches.to_device(batch, device)
            logits = batches.call(model, inputs, output)
            ref = None if reference is None else batches.call(reference, inputs, output)
            records.score(metrics, logits, inputs, targets, ref)
    return records.result()


def evaluate_naive(model: nn.Module, state: Mapping[str, torch.Tensor], data: Data, *,
                   metrics: Any = DEFAULT_METRICS, batch_size: int = 1000, device: str | torch.device = "cpu",
                   limit: int | None = None, output: Output = None, skip: Sequence[str] = (),
                   reference_state: Mapping[str, torch.Tensor] | None = None) -> CellResult:
    """The reference: deepcopy, ``load_state_dict``, evaluate in batches. Obviously correct, slow.

    ``skip``: modules that return their input instead; ``reference_state``: the final model, which
    ``agreement``/``kl`` compare with.
    """
    m = copy.deepcopy(model).to(device)
    m.load_state_dict(state)
    invalidate(m)  # the copy's caches hold values derived from the caller's weights
    reference = None
    if needs_reference(resolve(metrics)):
        reference = copy.deepcopy(model).to(device)
        reference.load_state_dict(state if reference_state is None else reference_state)
        invalidate(reference)
    run = lambda: evaluate(m, data, metrics=metrics, batch_size=batch_size, device=device,  # noqa: E731
                           limit=limit, output=output, reference=reference)
    if not skip:
        return run()
    first = batches.to_device(next(iter_batches(data, 2, limit)), device)
    with torch.inference_mode():
        shapes = stubs.shapes_of(lambda: batches.call(m.eval(), first[0], output),
                                 {p: m.get_submodule(p) for p in skip})
    with stubs.skipping(m, skip, shapes):
        return run()
