"""Checkpoint trajectories read lazily: checkpoint number → a read-only state dict whose tensors are read
from disk one key at a time (safetensors ``safe_open``, memory-mapped), so an analysis never holds the
whole trajectory in memory.

``trajectory(PATH)`` recognises three layouts::

    RUN/checkpoints/epoch_0000.safetensors (+ epoch_0000.json)   this project's run directory (epochs)
    FOLDER/step_100.safetensors, epoch_3.safetensors, 0100.safetensors   a plain folder, one file a checkpoint
    OUTPUT/checkpoint-500/model.safetensors                      an HF Trainer output folder (steps);
    OUTPUT/checkpoint-500/model-00001-of-00002.safetensors …     sharded, with model.safetensors.index.json

The initialization must be among them (checkpoint 0: ``epoch_0000``, ``step_0``, ``checkpoint-0``) or be
given as ``init_checkpoint`` (a file or a ``save_pretrained`` folder); without it there is nothing to
re-initialize to, and that is an error. A safetensors file with a JSON sidecar holding ``sha256`` (this
project's format) is checked against it, streaming, once: a run directory's files when the trajectory is
read, other files before their first tensor is read. ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` files are
read only with ``torch.load(weights_only=True)`` (memory-mapped where the file allows it): a pickle
holding anything but tensors is refused, never run.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from criticality.core.state import tied_keys
from criticality.errors import CriticalityError
from criticality.infra.files import sha256_file

SAFETENSORS = (".safetensors",)
PICKLES = (".bin", ".pt", ".pth", ".ckpt")  # torch.load(weights_only=True) only
_NUMBERED = re.compile(r"^(?P<prefix>.*?)(?P<n>\d+)$")  # step_100, epoch_0003, 0100, ckpt-7
_HF_DIR = re.compile(r"^checkpoint-(\d+)$")


class TensorFile:
    """One checkpoint file, opened on first use; a sidecar sha256 (when known) is checked before that."""

    def __init__(self, path: Path, sha256: str | None = None):
        self.path, self.sha256 = path, sha256
        self._handle = None  # safe_open handle, or the dict torch.load gave (memory-mapped)
        self._verified = sha256 is None

    def identity(self) -> str:
        """What names this file's content without reading it: its sidecar sha256, a hub cache's blob name
        (``snapshots/SHA/FILE`` links to ``blobs/<sha256 of the content>``), else name, size, mtime."""
        if self.sha256:
            return f"sha256:{self.sha256}"
        if self.path.is_symlink() and self.path.resolve().parent.name == "blobs":
            return f"blob:{self.path.resolve().name}"
        stat = self.path.stat()
        return f"{self.path.name}:{stat.st_size}:{stat.st_mtime_ns}"

    def verify(self) -> None:
        if not self._verified:
            if sha256_file(self.path) != self.sha256:  # streams the file in 1 MB blocks
                raise CriticalityError(f"checkpoint {self.path} does not match the sha256 in its sidecar "
                                       "(truncated or altered); delete it to retrain that epoch")
            self._verified = True

    def keys(self) -> list[str]:
        return list(self._open().keys())

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._open()
        return tuple(handle[key].shape) if isinstance(handle, dict) else tuple(handle.get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        self.verify()
        handle = self._open()
        if isinstance(handle, dict):
            return handle[key]
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CriticalityError(f"checkpoint {self.path}: cannot read {key!r}: {e}") from e

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the tensor (its first dimension), reading only those from a safetensors file."""
        self.verify()
        handle = self._open()
        if isinstance(handle, dict):
            return handle[key][start:stop]
        try:
            return handle.get_slice(key)[start:stop]
        except (SafetensorError, OSError) as e:
            raise CriticalityError(f"checkpoint {self.path}: cannot read {key!r}: {e}") from e

    def close(self) -> None:
        self._handle = None

    def _open(self):
        # Opened per call and dropped: a mapping kept open would keep every page read through it in this
        # process's resident memory. Only a pickle too old to memory-map is loaded once and kept.
        if self.path.suffix not in PICKLES:
            return _safe_open(self.path)
        if self._handle is not None:
            return self._handle
        state, mapped = _read_pickle(self.path)
        if not mapped:
            self._handle = state
        return state

    def __getstate__(self):  # handles are not picklable; reopen in the other process
        return {**self.__dict__, "_handle": None}


def _safe_open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CriticalityError(f"checkpoint {path} is not a readable safetensors file: {e}") from e


def _read_pickle(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A torch-saved state dict, with ``weights_only=True`` (never runs code from the file), and whether
    its tensors are memory-mapped (copy-on-write: the file is never written)."""
    mapped = True
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            mapped = False
            obj = torch.load(path, map_location="cpu", weights_only=True)  # an old, non-zip file
    except pickle.UnpicklingError as e:
        raise CriticalityError(f"{path} holds pickled objects other than tensors (code?); refusing to unpickle it "
                               "(only torch.load(weights_only=True) is used) — save it as safetensors") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CriticalityError(f"{path} is not a readable torch checkpoint: {str(e).splitlines()[0]}") from e
    for key in ("state_dict", "model", "model_state_dict"):  # Lightning / common training-loop wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CriticalityError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj, mapped


class Derived:
    """One model tensor made from checkpoint tensors: renamed (one part, no ``combine``) or fused as
    transformers does on load (MoE experts stored one per expert, stacked in memory). ``combine`` takes
    the parts' tensors in order and returns the model's tensor; it must also work on meta tensors, which
    is how :meth:`shape` answers without reading anything."""

    def __init__(self, parts: Sequence[tuple[TensorFile, str]],
                 combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None):
        if combine is None and len(parts) != 1:
            raise ValueError("a Derived tensor of several parts needs a combine function")
        self.parts, self.combine = list(parts), combine

    @property
    def files(self) -> list[TensorFile]:
        return [f for f, _ in self.parts]

    def describe(self) -> str:
        return "+".join(k for _, k in self.parts) + ("" if self.combine is None else "|fused")

    def tensor(self, key: str) -> torch.Tensor:
        tensors = [f.tensor(k) for f, k in self.parts]
        return tensors[0] if self.combine is None else self.combine(tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        if self.combine is None:
            f, k = self.parts[0]
            return f.shape(k)
        return tuple(self.combine([torch.empty(f.shape(k), device="meta") for f, k in self.parts]).shape)


class LazyCheckpoint(Mapping):
    """A read-only state dict over one or more files; ``self[key]`` reads that tensor only.

    A tensor read twice while the first one is still referenced is the same object (a weak cache), as
    with an in-memory dict: surgery recognises untouched entries by identity. ``aliases`` maps keys the
    files leave out (tied weights) to the key that holds their values.
    """

    def __init__(self, where: Mapping[str, TensorFile | Derived], name: str,
                 aliases: Mapping[str, str] | None = None):
        self._where, self.name = dict(where), name
        self._aliases = dict(aliases or {})
        self._cache: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()

    def __getitem__(self, key: str) -> torch.Tensor:
        key = self._aliases.get(key, key)
        tensor = self._cache.get(key)
        if tensor is None:
            if key not in self._where:
                raise KeyError(key)
            tensor = self._where[key].tensor(key)
            self._cache[key] = tensor
        return tensor

    def __iter__(self) -> Iterator[str]:
        yield from self._where
        yield from (k for k in self._aliases if k not in self._where)

    def __len__(self) -> int:
        return len(self._where) + sum(k not in self._where for k in self._aliases)

    def __contains__(self, key: object) -> bool:
        return key in self._where or key in self._aliases

    def __repr__(self) -> str:
        return f"LazyCheckpoint({self.name}, {len(self)} tensors)"

    @property
    def files(self) -> list[TensorFile]:
        held = (f for src in self._where.values() for f in (src.files if isinstance(src, Derived) else [src]))
        return list({id(f): f for f in held}.values())

    def file_key(self, key: str) -> tuple[TensorFile, str] | None:
        """The file and the key in it that hold ``key`` as it is, or None when it is derived (fused)."""
        key = self._aliases.get(key, key)
        src = self._where[key]
        if isinstance(src, Derived):
            return src.parts[0] if src.combine is None else None
        return src, key

    def mapped(self, where: Mapping[str, TensorFile | Derived]) -> LazyCheckpoint:
        """The same files under other keys (``where`` built from :meth:`sources`), aliases kept."""
        return LazyCheckpoint(where, self.name, self._aliases)

    def sources(self) -> dict[str, TensorFile | Derived]:
        """Key → where its tensor comes from (a file, or a :class:`Derived`)."""
        return dict(self._where)

    def shape_of(self, key: str) -> tuple[int, ...]:
        """The tensor's shape from the file header, without reading the tensor."""
        key = self._aliases.get(key, key)
        return self._where[key].shape(key)

    def with_aliases(self, aliases: Mapping[str, str]) -> LazyCheckpoint:
        return LazyCheckpoint(self._where, self.name, {**self._aliases, **aliases})

    def fingerprint(self) -> str:
        """An identity of the content from sidecar hashes (else file name, size and mtime): reads nothing."""
        h = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: f.path.name):
            h.update(f.identity().encode() + b"\n")
        h.update(json.dumps(sorted(self._aliases.items())).encode())
        derived = sorted((k, s.describe()) for k, s in self._where.items() if isinstance(s, Derived))
        if derived:
            h.update(json.dumps(derived).encode())
        return "files:" + h.hexdigest()[:16]

    def verify(self) -> None:
        for f in self.files:
            f.verify()


class Trajectory(Mapping):
    """Checkpoint number (epoch or step, see ``axis``) → :class:`LazyCheckpoint`, ascending."""

    def __init__(self, checkpoints: Mapping[int, LazyCheckpoint], axis: str, layout: str, path: Path,
                 labels: Mapping[int, str] | None = None, extra: Mapping[str, object] | None = None):
        self._checkpoints = dict(sorted(checkpoints.items()))
        self.axis, self.layout, self.path = axis, layout, path
        # number → what the user calls it (a hub revision such as step1000-tokens4B, a repository id)
        self.labels = {n: (labels or {}).get(n, c.name) for n, c in self._checkpoints.items()}
        self.extra = dict(extra or {})  # what the summary's checkpoints section adds (tokens per number, …)

    def __getitem__(self, number: int) -> LazyCheckpoint:
        return self._checkpoints[number]

    def __iter__(self) -> Iterator[int]:
        return iter(self._checkpoints)

    def __len__(self) -> int:
        return len(self._checkpoints)

    def __repr__(self) -> str:
        return f"Trajectory({self.path}, {self.layout}, {self.axis}s {list(self)})"

    def verify(self) -> None:
        """Check every file against its sidecar now (else each is checked before its first read)."""
        for checkpoint in self.values():
            checkpoint.verify()


def trajectory(path: str | Path, init_checkpoint: str | Path | None = None) -> Trajectory:
    """The checkpoints under ``path`` (see the module docstring), read lazily; checkpoint 0 is the
    initialization, found there or given as ``init_checkpoint``."""
    path = Path(path)
    found = discover(path)
    if init_checkpoint is not None:
        if 0 in found:
            raise CriticalityError(f"{path} already holds checkpoint 0 ({found[0].name}); drop --init-checkpoint "
                                   "or remove it")
        found = Trajectory({0: checkpoint_at(Path(init_checkpoint)), **found}, found.axis, found.layout, path)
    if 0 not in found:
        raise CriticalityError(f"{path}: no initialization among the checkpoints ({found.axis}s {list(found)}); "
                               f"save the model before training as {found.axis} 0 (e.g. checkpoint-0/ or "
                               "step_0.safetensors) or pass --init-checkpoint PATH")
    return found


def discover(path: Path) -> Trajectory:
    """Every checkpoint under ``path`` (any numbers, initialization or not)."""
    if not path.exists():
        raise CriticalityError(f"{path} does not exist")
    if path.is_file():
        raise CriticalityError(f"{path} is one file; a trajectory is a folder of checkpoints "
                               "(pass the file as --init-checkpoint if it is the initialization)")
    if (path / "checkpoints").is_dir() and (path / "config.json").is_file() and run_files(path / "checkpoints"):
        found = Trajectory(run_files(path / "checkpoints"), "epoch", "run directory", path)
        found.verify()  # this project's files have sidecars: check them all now, streaming
        return found
    hf = {int(m.group(1)): d for d in path.iterdir() if d.is_dir() and (m := _HF_DIR.match(d.name))}
    if hf:
        return Trajectory({n: checkpoint_at(d) for n, d in hf.items()}, "step", "HF Trainer folder", path)
    numbered = _numbered_files(path)
    if numbered:
        axis = "epoch" if all("epoch" in f.stem.lower() for f in numbered.values()) else "step"
        return Trajectory({n: _single(f) for n, f in numbered.items()}, axis, "folder of files", path)
    raise CriticalityError(f"{path}: no checkpoints found — expected a run directory "
                           "(checkpoints/epoch_0000.safetensors), an HF Trainer folder (checkpoint-<step>/) "
                           "or files named by step or epoch "
                           "(step_100.safetensors, epoch_3.safetensors, 0100.safetensors)")


def run_files(directory: Path) -> dict[int, LazyCheckpoint]:
    """This project's run directory, lazily: epoch → checkpoint (see :func:`epoch_files`)."""
    return {epoch: _single(f) for epoch, f in epoch_files(directory).items()}


def epoch_files(directory: Path) -> dict[int, Path]:
    """This project's layout: epoch_NNNN.safetensors counts once its sidecar exists (written last)."""
    out = {}
    for f in directory.glob("epoch_*.safetensors"):
        m = re.match(r"^epoch_(\d{4,})$", f.stem)
        if m and f.with_suffix(".json").is_file():
            out[int(m.group(1))] = f
    return out


def _numbered_files(directory: Path) -> dict[int, Path]:
    files = [f for f in directory.iterdir() if f.is_file() and f.suffix in SAFETENSORS + PICKLES]
    by_prefix: dict[str, dict[int, Path]] = {}
    for f in sorted(files, key=lambda f: f.suffix not in SAFETENSORS):  # safetensors first: preferred
        m = _NUMBERED.match(f.stem)
        if m:
            by_prefix.setdefault(m.group("prefix"), {}).setdefault(int(m.group("n")), f)
    if len(by_prefix) > 1:
        shown = ", ".join(f"{p or '(none)'}N" for p in sorted(by_prefix))
        raise CriticalityError(f"{directory}: files are named in {len(by_prefix)} ways ({shown}); keep one "
                               "trajectory per folder")
    return next(iter(by_prefix.values()), {})


def _single(path: Path) -> LazyCheckpoint:
    file = TensorFile(path, sidecar_sha256(path))
    return LazyCheckpoint({k: file for k in file.keys()}, path.name)


def sidecar_sha256(path: Path) -> str | None:
    sidecar = path.with_suffix(".json")
    if path.suffix not in SAFETENSORS or not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text())
    except (ValueError, OSError) as e:
        raise CriticalityError(f"checkpoint sidecar {sidecar} is unreadable: {e}") from e
    return meta.get("sha256") if isinstance(meta, dict) else None


def checkpoint_at(path: Path) -> LazyCheckpoint:
    """One checkpoint: a file, or a ``save_pretrained`` / ``checkpoint-<step>`` folder (sharded or not)."""
    if not path.exists():
        raise CriticalityError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix not in SAFETENSORS + PICKLES:
            raise CriticalityError(f"{path}: not a checkpoint file (.safetensors, or .bin/.pt/.pth/.ckpt)")
        return _single(path)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            return _sharded(path, index)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return _single(path / name)
    raise CriticalityError(f"{path}: no model.safetensors, sharded model-*.safetensors with an index, "
                           "or pytorch_model.bin in this folder")


def _sharded(folder: Path, index: Path) -> LazyCheckpoint:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CriticalityError(f"{index} is not a readable shard index ({e})") from e
    files = {name: TensorFile(folder / name) for name in set(weight_map.values())}
    missing = sorted(name for name, f in files.items() if not f.path.is_file())
    if missing:
        raise CriticalityError(f"{folder}: shards named in {index.name} are missing: {', '.join(missing)}")
    return LazyCheckpoint({key: files[name] for key, name in weight_map.items()}, folder.name)


def alias_tied(checkpoint: Mapping[str, torch.Tensor], model: torch.nn.Module) -> Mapping[str, torch.Tensor]:
    """``checkpoint`` with the model's tied keys it leaves out (``lm_head.weight`` when tied to the embedding,
    as ``save_pretrained`` writes it) answered by the key that shares their storage."""
    aliases = {}
    for tied in tied_keys(model):
        held = [k for k in tied if k in checkpoint]
        aliases.update({k: held[0] for k in tied if held and k not in checkpoint})
    if not aliases:
        return checkpoint
    if isinstance(checkpoint, LazyCheckpoint):
        return checkpoint.with_aliases(aliases)
    return {**checkpoint, **{k: checkpoint[v] for k, v in aliases.items()}}
