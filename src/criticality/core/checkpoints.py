"""Checkpoint files: one safetensors file per epoch with a JSON sidecar, in a sortable layout.

A run directory holds::

    RUN/checkpoints/epoch_0000.safetensors   # θ at epoch 0 = the initialization, always present
    RUN/checkpoints/epoch_0000.json          # {"epoch": 0, "sha256": ..., "n_tensors": ..., ...}

A checkpoint counts as complete only when both files exist; the sidecar is written last, so a crash
between the two leaves an epoch that :func:`list_epochs` ignores. Loading checks the sha256 recorded in
the sidecar, so a truncated or altered file is refused rather than trusted. :func:`load_checkpoints`
gives lazy, read-only state dicts (:mod:`criticality.trajectory`): tensors are read per key when used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from criticality.core.trajectory import LazyCheckpoint, TensorFile, epoch_files, run_files, sidecar_sha256
from criticality.errors import CriticalityError
from criticality.infra.files import atomic_path, sha256_file, write_json

StateDict = dict[str, torch.Tensor]


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, epoch: int) -> Path:
    return checkpoint_dir(run_dir) / f"epoch_{epoch:04d}.safetensors"


def save_checkpoint(run_dir: str | Path, epoch: int, state: Mapping[str, torch.Tensor], **meta) -> Path:
    """Write ``state`` for ``epoch`` atomically, then its sidecar (with ``meta`` added to it)."""
    path = checkpoint_path(run_dir, epoch)
    # Clone: safetensors refuses tensors that share storage (tied weights) and non-contiguous views.
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"epoch": str(epoch)})
    sidecar = {"epoch": epoch, "file": path.name, "sha256": sha256_file(path), "n_tensors": len(tensors)}
    write_json(path.with_suffix(".json"), {**sidecar, **meta})
    return path


def list_epochs(run_dir: str | Path) -> list[int]:
    """Epochs with a complete checkpoint (tensor file and sidecar), ascending."""
    directory = checkpoint_dir(run_dir)
    return sorted(epoch_files(directory)) if directory.is_dir() else []


def load_checkpoint(run_dir: str | Path, epoch: int) -> StateDict:
    """Load one epoch's state dict, checking it against the checksum in its sidecar."""
    path = checkpoint_path(run_dir, epoch)
    if epoch not in list_epochs(run_dir):
        raise CriticalityError(f"no complete checkpoint for epoch {epoch} in {checkpoint_dir(run_dir)}")
    sha256 = sidecar_sha256(path)
    if not sha256:
        raise CriticalityError(f"checkpoint sidecar {path.with_suffix('.json')} is unreadable: it holds no sha256")
    TensorFile(path, sha256).verify()
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CriticalityError(f"checkpoint {path} is not a readable safetensors file: {e}") from e


def load_checkpoints(run_dir: str | Path, epochs: Iterable[int] | None = None) -> dict[int, LazyCheckpoint]:
    """Several epochs (default: all complete ones) as a mapping epoch -> read-only state dict whose tensors
    are read per key when used (see :mod:`criticality.trajectory`); every file's sha256 is checked here,
    streaming, so that an altered file is refused before any work starts."""
    found = run_files(checkpoint_dir(run_dir)) if checkpoint_dir(run_dir).is_dir() else {}
    epochs = sorted(found) if epochs is None else sorted(epochs)
    if not epochs:
        raise CriticalityError(f"no checkpoints in {checkpoint_dir(run_dir)}; train first "
                               "(`criticality train`) or check the run directory")
    for e in epochs:
        if e not in found:
            raise CriticalityError(f"no complete checkpoint for epoch {e} in {checkpoint_dir(run_dir)}")
    out = {e: found[e] for e in epochs}
    for checkpoint in out.values():  # every file against its sidecar now, streaming: errors before any cell
        checkpoint.verify()
    return out


def check_compatible(model: nn.Module, state: Mapping[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Raise a :class:`CriticalityError` listing every key or shape by which ``state`` misfits ``model``."""
    own = model.state_dict()
    if not isinstance(state, Mapping):
        raise CriticalityError(f"{where} is a {type(state).__name__}, not a state dict (a mapping key -> tensor)")
    # A lazy checkpoint holds tensors only (safetensors, or pickles checked when read): reading each to
    # check would load the whole trajectory.
    odd = [] if isinstance(state, LazyCheckpoint) else \
        sorted(str(k) for k in set(own) & set(state) if not isinstance(state[k], torch.Tensor))
    if odd:
        raise CriticalityError(f"{where}: {odd[0]} is a {type(state[odd[0]]).__name__}, not a tensor")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    # A lazy checkpoint tells shapes from its file header, without reading the tensors.
    shape = state.shape_of if isinstance(state, LazyCheckpoint) else (lambda k: tuple(state[k].shape))
    shapes = sorted(f"{k}: {shape(k)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if shape(k) != tuple(own[k].shape))
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f", … ({len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CriticalityError(f"{where} does not fit the model (another architecture?) — " + "; ".join(problems))
