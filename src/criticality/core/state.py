"""Facts about a model's state dict that surgery, groups, operations and checkpoints share: which keys name
one tied tensor, which are buffers, which keys a group's change moves, and an exact identity of a state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping

import torch
from torch import nn

from criticality.errors import CriticalityError

BUFFER_MODES = ("reset", "keep", "recalibrate")  # a group's running statistics: move with it, stay, or recompute


def tied_keys(model: nn.Module) -> list[tuple[str, ...]]:
    """Sets of state-dict keys that name one and the same tensor (``wte.weight``, ``lm_head.weight``), in
    state-dict order."""
    by_tensor: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(v), []).append(k)
    return [tuple(ks) for ks in by_tensor.values() if len(ks) > 1]


def first_of_tied(model: nn.Module) -> dict[str, str]:
    """Each key of a tied tensor → the first key naming that tensor (the first maps to itself)."""
    return {k: tied[0] for tied in tied_keys(model) for k in tied}


def buffer_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of ``model`` that are buffers (running statistics, counters)."""
    return {name for name, _ in model.named_buffers()}


def moving_keys(keys: Collection[str], buffers: str, buffer_keys: Collection[str]) -> list[str]:
    """The keys of a group that a change of the group moves: all of them, except the buffers under
    ``buffers="keep"`` (``"recalibrate"`` moves them too; recalibration then recomputes them)."""
    if buffers not in BUFFER_MODES:
        raise CriticalityError(f"unknown buffer mode {buffers!r}; choose one of {', '.join(BUFFER_MODES)}")
    if buffers == "keep":
        kept = set(buffer_keys)
        return [k for k in keys if k not in kept]
    return list(keys)


def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """An exact identity of a state dict's values (sha256 over keys, shapes and bytes). A lazy checkpoint
    names its files instead (sidecar sha256, else name, size, mtime), so that nothing is read for it."""
    if callable(getattr(state, "fingerprint", None)):
        return state.fingerprint()
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # the buffer, not a bytes copy
    return h.hexdigest()[:16]
