"""The file format of the append-only stores (finished cells, per-example records): JSON lines.

A store file is a header line ``{"kind", "format", "settings"}`` followed by one line per entry, each
appended and fsync'ed as soon as it exists. The rules, the same for every store:

- the header is written atomically when the file is new (a kill never leaves a torn header); an existing
  header must name the same ``kind`` and a format this version reads, and hold the same ``settings``,
  else a one-line :class:`CriticalityError` says what differs (results are never silently mixed);
- a torn last line (a crash mid-write) is dropped, so later appends start on a fresh line;
- a file in an older format the store still reads is rewritten once, atomically, in the current one;
- under ``torchrun`` each rank writes ``<base>.rank{R}-of-{W}.jsonl``; a store also reads the entries of
  its siblings (``<base>.jsonl`` and ``<base>.rank*.jsonl`` beside it) whose header holds the same settings.

Lines are strict JSON (:func:`criticality.infra.files.dumps`: NaN/inf as strings). How a line is parsed is
the store's business: :func:`open_store` hands the lines to its ``parse``, which returns the whole ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from criticality.errors import CriticalityError
from criticality.infra.files import dumps, loads, write_text

__all__ = ["append_line", "open_store"]

Parse = Callable[[list[str]], list[str]]  # lines -> the whole (parsed) ones; torn or empty lines left out
Upgrade = Callable[[str], str]  # one line of an older format -> the same entry in the current format


def open_store(path: Path, kind: str, fmt: int, settings: Mapping[str, Any], what: str, parse: Parse, *,
               older: Mapping[int, Upgrade] | None = None) -> None:
    """Read the siblings of the store at ``path`` and the store itself into ``parse``; create the file
    when new, drop a torn last line, rewrite a file of an ``older`` format in format ``fmt``.

    ``what`` names the entries in the error for other settings ("cells", "records")."""
    older = dict(older or {})
    formats = (fmt, *older)
    for body in _sibling_lines(path, kind, formats, settings):
        parse(body)
    lines, found = _open_lines(path, kind, fmt, formats, settings, what)
    kept = parse(lines[1:])
    if found != fmt:
        kept = [older[found](line) for line in kept]
        write_text(path, "\n".join([_header(kind, fmt, settings), *kept]) + "\n")
    elif lines[-1]:  # no final newline: the last write was cut short
        write_text(path, "\n".join([lines[0], *kept]) + "\n")


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync it: once this returns, the entry survives a crash."""
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _header(kind: str, fmt: int, settings: Mapping[str, Any]) -> str:
    return dumps({"kind": kind, "format": fmt, "settings": settings})


def _open_lines(path: Path, kind: str, fmt: int, formats: tuple[int, ...], settings: Mapping[str, Any],
                what: str) -> tuple[list[str], int]:
    """The lines of the store and its format, the header checked; a new store gets its header."""
    if not (path.exists() and path.stat().st_size > 0):
        header = _header(kind, fmt, settings)
        write_text(path, header + "\n")
        return [header, ""], fmt
    try:
        lines = path.read_text().split("\n")
        header = loads(lines[0])
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # JSONDecodeError (and UnicodeDecodeError above) are ValueErrors
        raise CriticalityError(f"{path} has no readable header; delete it to start the analysis anew") from e
    if header.get("kind") != kind or header.get("format") not in formats:
        raise CriticalityError(f"{path} was written by an incompatible version (format {header.get('format')!r}, "
                               f"this version reads {', '.join(map(str, formats))}); delete it to start anew")
    old = header.get("settings", {})
    differs = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if differs:
        raise CriticalityError(f"{path} holds {what} of an analysis with other settings "
                               f"(differs: {', '.join(differs)}); refusing to mix them — delete it or use "
                               "another output directory")
    return lines, header["format"]


def _sibling_lines(path: Path, kind: str, formats: tuple[int, ...], settings: Mapping[str, Any]) -> list[list[str]]:
    """The lines after the header of every other store of the same analysis whose header holds the same
    settings; anything unreadable is skipped."""
    base = path.name.split(".")[0]
    if not path.parent.is_dir():
        return []
    names = [path.parent / f"{base}.jsonl", *sorted(path.parent.glob(f"{base}.rank*.jsonl"))]
    out = []
    for sibling in (p for p in names if p != path and p.is_file()):
        try:
            lines = sibling.read_text().split("\n")
            header = loads(lines[0])
        except (OSError, ValueError):
            continue
        if isinstance(header, dict) and header.get("kind") == kind and header.get("format") in formats \
                and header.get("settings") == settings:
            out.append(lines[1:])
    return out
