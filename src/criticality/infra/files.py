"""Atomic file writes: a crash never leaves a half-written file that a later run trusts.

Every output (checkpoints, tables, figures, the report) is written to a temporary file in the same
directory, flushed and fsync'ed, then renamed over the target, which POSIX makes atomic. A failed write
(disk full, read-only directory, Ctrl-C) removes the temporary file and leaves the old one as it was.

One permission rule for every output: ``0666 & ~umask`` (0644 under the usual umask 022, see
:func:`output_mode`), applied after the writer has finished, since some writers (safetensors) create the
file anew with mode 0600.

JSON is strict (RFC 8259) everywhere: non-finite numbers are written as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` (jq, browsers and ``json.loads(..., parse_constant=...)``-free readers
accept them); :func:`read_json` and :func:`loads` turn those strings back into floats.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


@functools.cache
def output_mode() -> int:
    """The permission bits of every output, ``0o666 & ~umask``, read once on first use (not at import).

    Linux states the umask in ``/proc/self/status``; elsewhere the only portable way to read it is to set
    it and put it back, which is why this happens once, lazily, and not as a side effect of the import."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return 0o666 & ~int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write by name (matplotlib, safetensors); on success it
    replaces ``path``, on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    os.chmod(tmp, output_mode())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.chmod(tmp, output_mode())  # again: a writer may have replaced the file (safetensors makes 0600)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # "No space left on device (RUN/analysis/cells.csv)", not a bare errno
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by its string (``"NaN"``, ``"Infinity"``, ``"-Infinity"``)."""
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return f if math.isfinite(f) else ("NaN" if math.isnan(f) else ("Infinity" if f > 0 else "-Infinity"))
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON text of ``obj`` (non-finite floats as strings; other unknown types through ``str``)."""
    return json.dumps(finite_json(obj), allow_nan=False, default=str, **kw)


def _revive(obj: dict) -> dict:
    return {k: NON_FINITE[v] if isinstance(v, str) and v in NON_FINITE else v for k, v in obj.items()}


def loads(text: str) -> Any:
    """Parse JSON written by :func:`dumps`: the strings ``"NaN"``/``"Infinity"``/``"-Infinity"`` held as
    object values become floats again."""
    return json.loads(text, object_hook=_revive)


def read_json(path: str | os.PathLike) -> Any:
    return loads(Path(path).read_text())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path) as f:
        f.write(dumps(obj, indent=2) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
