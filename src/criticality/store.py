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
from criticality.files import dumps, loads, write_text

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
        for sibling in self._siblings():
            self.rows.update(_matching_rows(sibling, self.settings))
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:  # atomically, so that a kill can never leave a torn header
            write_text(self.path, dumps({"kind": KIND, "format": FORMAT, "settings": self.settings}) + "\n")

    def _siblings(self) -> list[Path]:
        """The other stores of the same analysis: ``<base>.jsonl`` and ``<base>.rank*.jsonl``."""
        base = self.path.name.split(".")[0]
        if not self.path.parent.is_dir():
            return []
        names = [self.path.parent / f"{base}.jsonl", *sorted(self.path.parent.glob(f"{base}.rank*.jsonl"))]
        return [p for p in names if p != self.path and p.is_file()]

    def add(self, row: Mapping[str, Any]) -> None:
        line = dumps(dict(row))
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[cell_key(row)] = dict(row)

    def _load(self) -> None:
        try:
            lines = self.path.read_text().split("\n")
            header = loads(lines[0])
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # JSONDecodeError (and UnicodeDecodeError above) are ValueErrors
            raise CriticalityError(f"{self.path} has no readable header; delete it to start the analysis anew") from e
        if header.get("kind") != KIND or header.get("format") != FORMAT:
            raise CriticalityError(f"{self.path} was written by an incompatible version "
                                   f"(format {header.get('format')!r}, expected {FORMAT}); delete it to start anew")
        old = header.get("settings", {})
        differs = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
        if differs:
            raise CriticalityError(f"{self.path} holds cells of an analysis with other settings "
                                   f"(differs: {', '.join(differs)}); refusing to mix them — delete it or use "
                                   "another output directory")
        kept = lines[:1]
        for line in lines[1:]:
            try:
                row = loads(line)
                self.rows[cell_key(row)] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # an empty trailing line, or one torn by a crash: recompute that cell
            kept.append(line)
        if lines[-1]:
            # The file does not end in a newline (a write cut short): keep the whole rows only, so that
            # later appends start on a fresh line instead of gluing onto a torn one.
            write_text(self.path, "\n".join(kept) + "\n")


def _matching_rows(path: Path, settings: Mapping[str, Any]) -> dict[Hashable, dict[str, Any]]:
    """The whole rows of another store of the same settings (read only; anything unreadable is skipped)."""
    try:
        lines = path.read_text().split("\n")
        header = loads(lines[0])
    except (OSError, ValueError):
        return {}
    if not isinstance(header, dict) or header.get("kind") != KIND or header.get("format") != FORMAT \
            or header.get("settings") != settings:
        return {}
    rows = {}
    for line in lines[1:]:
        try:
            row = loads(line)
            rows[cell_key(row)] = row
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return rows
