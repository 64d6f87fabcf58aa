"""File-format readers: IDX (MNIST, Fashion-MNIST) and CIFAR-10's python pickles, each checked exactly."""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

from criticality.errors import CriticalityError


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (plain or gzip) → uint8 array with ``ndim`` dims, checked exactly."""
    try:
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise CriticalityError(f"{path}: cannot read IDX file ({e})") from e
    head = 4 + 4 * ndim
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise CriticalityError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000 0803/0801)")
    if raw[2] != 0x08:
        raise CriticalityError(f"{path}: IDX dtype code 0x{raw[2]:02x}, expected 0x08 (unsigned byte)")
    if raw[3] != ndim:
        raise CriticalityError(f"{path}: IDX file has {raw[3]} dimensions, expected {ndim}")
    if len(raw) < head:
        raise CriticalityError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    if len(raw) - head != math.prod(dims):
        raise CriticalityError(f"{path}: IDX payload is {len(raw) - head} bytes but dims {dims} need "
                               f"{math.prod(dims)} (truncated or corrupt)")
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's ndarray reconstructor, whatever module holds it
_CIFAR_GLOBALS = {  # everything the CIFAR-10 python pickles reference (numpy 1.x and 2.x module names)
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and builtins only; any other global is refused, never imported."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _CIFAR_GLOBALS:
            return _CIFAR_GLOBALS[(module, name)]
        raise CriticalityError(f"{self.path}: refusing to unpickle {module}.{name} (not a CIFAR-10 batch)")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 python batch → (uint8 (N, 3, 32, 32), int64 (N,))."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, path).load()
    except CriticalityError:
        raise
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise CriticalityError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from e
    data, labels = (obj.get(b"data"), obj.get(b"labels")) if isinstance(obj, dict) else (None, None)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise CriticalityError(f"{path}: not a CIFAR-10 batch (needs 'data': uint8 array (N, 3072))")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise CriticalityError(f"{path}: CIFAR-10 'labels' are not integers") from e
    if y.shape != (len(data),) or (y.size and (y.min() < 0 or y.max() > 9)):
        raise CriticalityError(f"{path}: CIFAR-10 'labels' must be {len(data)} integers in 0..9")
    return data.reshape(-1, 3, 32, 32), y  # rows are 1024 red, 1024 green, 1024 blue values

