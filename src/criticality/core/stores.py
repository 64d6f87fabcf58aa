"""Append-only store of finished cells, so an analysis that dies at 90 % resumes instead of restarting.

``RUN/analysis/cells.jsonl``: the first line is a header describing the grid's *settings* (model and
data fingerprints, metrics, initializer, …); every further line is one finished cell, written and
fsync'ed as soon as it is computed. A rerun with the same settings reuses the cells it finds and
computes only the missing ones; more seeds (or other ``reinit_to`` epochs) extend the store. Other
groups, checkpoints or any other setting are refused with a message naming what differs: results are
never silently mixed. A torn last line (a crash mid-write) is ignored and recomputed.

Rows are keyed by cell, not by process: under ``torchrun`` each rank appends to its own
``cells.rank{R}-of-{W}.jsonl``, and every store also reads the rows of its siblings (``cells.jsonl`` and
any ``cells.rank*.jsonl`` beside it whose header holds the same settings), so finished cells are reused
whatever the number of processes that resumes the analysis. Numbers follow :mod:`criticality.files`'
strict JSON (NaN/inf as strings).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from criticality.errors import CriticalityError
from criticality.infra.files import dumps, loads, write_text

KIND = "criticality-cells"
FORMAT = 1


def cell_key(cell: Mapping[str, Any]) -> Hashable:
    # alpha / sigma: interpolate and noise cells (None elsewhere, and in rows stored before they existed)
    return (cell["op"], cell["group"], cell["checkpoint"], cell["seed"], cell.get("alpha"), cell.get("sigma"))


class CellStore:
    """Finished cells by key; :meth:`add` appends one durably."""

    def __init__(self, path: str | os.PathLike, settings: Mapping[str, Any]):
        self.path = Path(path)
        self.settings = loads(dumps(dict(settings)))
        self.rows: dict[Hashable, dict[str, Any]] = {}
        for body in sibling_lines(self.path, KIND, FORMAT, self.settings):
            self._parse(body)
        lines = open_lines(self.path, KIND, FORMAT, self.settings, "cells")
        drop_torn(self.path, lines, self._parse(lines[1:]))

    def add(self, row: Mapping[str, Any]) -> None:
        append_line(self.path, dumps(dict(row)))
        self.rows[cell_key(row)] = dict(row)

    def _parse(self, lines: list[str]) -> list[str]:
        """Take in the rows of ``lines``; returns the whole lines (an empty or torn one is skipped: recomputed)."""
        kept = []
        for line in lines:
            try:
                row = loads(line)
                self.rows[cell_key(row)] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            kept.append(line)
        return kept


# The file format both stores share (this one and criticality.examples'): a header line, then appended lines.

def open_lines(path: Path, kind: str, fmt: int, settings: Mapping[str, Any], what: str) -> list[str]:
    """The lines of the store at ``path``, its header checked against ``kind``, ``fmt`` and ``settings``;
    a new store gets its header written atomically (a kill can never leave a torn header)."""
    if not (path.exists() and path.stat().st_size > 0):
        header = dumps({"kind": kind, "format": fmt, "settings": settings})
        write_text(path, header + "\n")
        return [header, ""]
    try:
        lines = path.read_text().split("\n")
        header = loads(lines[0])
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # JSONDecodeError (and UnicodeDecodeError above) are ValueErrors
        raise CriticalityError(f"{path} has no readable header; delete it to start the analysis anew") from e
    if header.get("kind") != kind or header.get("format") != fmt:
        raise CriticalityError(f"{path} was written by an incompatible version "
                               f"(format {header.get('format')!r}, expected {fmt}); delete it to start anew")
    old = header.get("settings", {})
    differs = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if differs:
        raise CriticalityError(f"{path} holds {what} of an analysis with other settings "
                               f"(differs: {', '.join(differs)}); refusing to mix them — delete it or use "
                               "another output directory")
    return lines


def drop_torn(path: Path, lines: list[str], kept: list[str]) -> None:
    """When the file does not end in a newline (a write cut short), keep its header and the ``kept`` whole
    lines only, so that later appends start on a fresh line instead of gluing onto a torn one."""
    if lines[-1]:
        write_text(path, "\n".join([lines[0], *kept]) + "\n")


def append_line(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def sibling_lines(path: Path, kind: str, fmt: int, settings: Mapping[str, Any]) -> list[list[str]]:
    """The lines after the header of every other store of the same analysis (``<base>.jsonl`` and
    ``<base>.rank*.jsonl`` beside ``path``) whose header holds the same settings; anything unreadable is skipped."""
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
        if isinstance(header, dict) and header.get("kind") == kind and header.get("format") == fmt \
                and header.get("settings") == settings:
            out.append(lines[1:])
    return out
