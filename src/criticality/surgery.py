"""Model surgery as pure functions on state dicts.

Every function returns a new dict and never mutates its inputs: replaced entries are fresh tensors,
the other entries are the caller's own tensors, shared and left untouched. Key accounting is strict: a
key that is absent from either side is an error, never a silent no-op.

- :func:`reinit` puts a group back to its values at an earlier checkpoint.
- :func:`rerandomize` puts a group to a fresh draw from the initializer (:func:`fresh_state`).
- :func:`interpolate` moves a group along the straight line between two checkpoints.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping

import torch
from torch import nn

from criticality.errors import CriticalityError
from criticality.initializers import InitScheme, initialize, scheme_name

StateDict = dict[str, torch.Tensor]
BUFFER_MODES = ("reset", "keep", "recalibrate")


def replace(base: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor],
            keys: Collection[str]) -> StateDict:
    """A copy of ``base`` whose ``keys`` are taken from ``source``."""
    _check_keys(base, source, keys)
    out = dict(base)
    for k in keys:
        out[k] = source[k].detach().clone()
    return out


def reinit(final: Mapping[str, torch.Tensor], checkpoint: Mapping[str, torch.Tensor], keys: Collection[str],
           *, buffers: str = "reset", buffer_keys: Collection[str] = ()) -> StateDict:
    """Re-initialization: ``final`` with the group ``keys`` taken from ``checkpoint``.

    ``buffers="reset"`` takes every key of the group from the checkpoint (running statistics included);
    ``"keep"`` leaves the keys listed in ``buffer_keys`` as trained.
    """
    return replace(final, checkpoint, _moving(keys, buffers, buffer_keys))


def rerandomize(final: Mapping[str, torch.Tensor], fresh: Mapping[str, torch.Tensor], keys: Collection[str],
                *, buffers: str = "reset", buffer_keys: Collection[str] = ()) -> StateDict:
    """Re-randomization: ``final`` with the group ``keys`` taken from a fresh draw (see :func:`fresh_state`)."""
    return replace(final, fresh, _moving(keys, buffers, buffer_keys))


def interpolate(final: Mapping[str, torch.Tensor], checkpoint: Mapping[str, torch.Tensor],
                keys: Collection[str], alpha: float) -> StateDict:
    """``final`` with the group at ``(1 - alpha) * checkpoint + alpha * final`` (alpha = 1: unchanged).

    Integer entries (BatchNorm's ``num_batches_tracked``) cannot be interpolated: they come from
    ``final`` when ``alpha >= 0.5`` and from ``checkpoint`` otherwise.
    """
    _check_keys(final, checkpoint, keys)
    out = dict(final)
    for k in keys:
        a, b = checkpoint[k], final[k]
        if a.is_floating_point():
            out[k] = torch.lerp(a.detach(), b.detach().to(a.dtype), alpha)
        else:
            out[k] = (b if alpha >= 0.5 else a).detach().clone()
    return out


def fresh_state(model: nn.Module, init: InitScheme, generator: torch.Generator) -> StateDict:
    """The state dict of a fresh copy of ``model`` initialized by ``init`` from ``generator``.

    The copy is made on the CPU, so the draw is the same whatever device ``model`` sits on; custom
    initialization schemes are honoured because the scheme runs on the model's own modules. Every
    parameter must be drawn anew: one that the scheme leaves alone would keep the values of the model
    passed in (its trained or initial values), which is not a re-randomization, so it is an error.
    """
    fresh = copy.deepcopy(model).to("cpu")
    with torch.no_grad():
        for p in fresh.parameters():
            if p.is_floating_point():
                p.fill_(float("nan"))  # a marker: whatever the scheme does not draw stays NaN
    initialize(fresh, init, generator)
    missed = [k for k, p in fresh.named_parameters() if p.is_floating_point() and torch.isnan(p).any()]
    if missed:
        raise CriticalityError(f"the init scheme {scheme_name(init)!r} does not draw {', '.join(missed[:6])}"
                               f"{' …' if len(missed) > 6 else ''}: give analyze() an init=callable that "
                               "initializes every parameter (e.g. the model's own init function)")
    return {k: v.detach() for k, v in fresh.state_dict().items()}


def recalibrate(model: nn.Module, state: Mapping[str, torch.Tensor], keys: Collection[str],
                batches: Iterable[torch.Tensor]) -> StateDict:
    """``state`` with the running statistics of the norm layers among ``keys`` recomputed.

    The variant model runs forward over ``batches`` (training inputs) with those norm layers in training
    mode and ``momentum=None`` (an exact average over the batches); everything else stays in eval mode
    and no parameter changes. Other groups' buffers stay as they are in ``state``.
    """
    m = copy.deepcopy(model).to("cpu").eval()
    m.load_state_dict(state)
    keys = set(keys)
    norms = [mod for name, mod in m.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
             and f"{name}.running_mean" in keys]
    if not norms:
        return dict(state)
    for mod in norms:
        mod.reset_running_stats()
        mod.momentum = None
        mod.train()
    with torch.no_grad():
        for x in batches:
            m(x.to("cpu"))
    fresh = m.state_dict()
    out = dict(state)
    for k in keys:
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            out[k] = fresh[k].detach().clone()
    return out


def buffer_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of ``model`` that are buffers (running statistics, counters)."""
    return {name for name, _ in model.named_buffers()}


def _moving(keys: Collection[str], buffers: str, buffer_keys: Collection[str]) -> list[str]:
    if buffers not in BUFFER_MODES:
        raise CriticalityError(f"unknown buffer mode {buffers!r}; choose one of {', '.join(BUFFER_MODES)}")
    if buffers == "keep":
        return [k for k in keys if k not in set(buffer_keys)]
    return list(keys)  # "recalibrate" moves them too; recalibrate() then recomputes them


def _check_keys(base: Mapping, source: Mapping, keys: Collection[str]) -> None:
    if not keys:
        raise CriticalityError("surgery on an empty group of keys")
    for side, d in (("the model's state", base), ("the source state", source)):
        absent = [k for k in keys if k not in d]
        if absent:
            raise CriticalityError(f"keys not in {side}: {', '.join(absent[:8])}")
    for k in keys:
        if base[k].shape != source[k].shape:
            raise CriticalityError(f"shape of {k!r} differs: {tuple(base[k].shape)} vs {tuple(source[k].shape)}")
