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
whatever the number of processes that resumes the analysis. The file rules are :mod:`criticality.infra.jsonl`'s;
numbers follow :mod:`criticality.infra.files`' strict JSON (NaN/inf as strings).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from criticality.infra.files import dumps, loads
from criticality.infra.jsonl import append_line, open_store

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
        open_store(self.path, KIND, FORMAT, self.settings, "cells", self._parse)

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
