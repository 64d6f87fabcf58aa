"""Append-only store of finished cells, so an analysis that dies at 90 % resumes instead of restarting.

``RUN/analysis/cells.jsonl``: the first line is a header describing the grid's *settings* (model and
data fingerprints, metrics, initializer, …); every further line is one finished cell, written and
fsync'ed as soon as it is computed. A rerun with the same settings reuses the cells it finds and
computes only the missing ones; a grid with more groups, seeds or checkpoints extends the store.
Other settings are refused with a message naming what differs: results are never silently mixed.
A torn last line (a crash mid-write) is ignored and recomputed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from criticality.errors import CriticalityError
from criticality.files import write_text

KIND = "criticality-cells"
FORMAT = 1


def cell_key(cell: Mapping[str, Any]) -> Hashable:
    # alpha / sigma: interpolate and noise cells (None elsewhere, and in rows stored before they existed)
    return (cell["op"], cell["group"], cell["checkpoint"], cell["seed"], cell.get("alpha"), cell.get("sigma"))


class CellStore:
    """Finished cells by key; :meth:`add` appends one durably."""

    def __init__(self, path: str | os.PathLike, settings: Mapping[str, Any]):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(dict(settings), default=str))
        self.rows: dict[Hashable, dict[str, Any]] = {}
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:  # atomically, so that a kill can never leave a torn header
            write_text(self.path, json.dumps({"kind": KIND, "format": FORMAT, "settings": self.settings}) + "\n")

    def add(self, row: Mapping[str, Any]) -> None:
        line = json.dumps(dict(row), allow_nan=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[cell_key(row)] = dict(row)

    def _load(self) -> None:
        try:
            lines = self.path.read_text().split("\n")
            header = json.loads(lines[0])
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
                row = json.loads(line)
                self.rows[cell_key(row)] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # an empty trailing line, or one torn by a crash: recompute that cell
            kept.append(line)
        if lines[-1]:
            # The file does not end in a newline (a write cut short): keep the whole rows only, so that
            # later appends start on a fresh line instead of gluing onto a torn one.
            write_text(self.path, "\n".join(kept) + "\n")
