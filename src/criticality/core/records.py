"""Per-example records of every cell, kept beside the cell store so that statistics never re-evaluate.

A *record* maps a metric to ``(values float64 (N,), counts (N,))`` in data order: one entry per example
(per sequence for sequence models, whose values are sums over its tokens and counts its token count).
The cell's value is ``values.sum() / counts.sum()``.

``RUN/analysis/examples.jsonl`` works like ``cells.jsonl`` (:mod:`criticality.core.stores`; the file rules
are :mod:`criticality.infra.jsonl`'s): a header line with the grid's settings, then one line per finished
cell, appended and fsync'ed as soon as the cell is done, keyed by the same cell key. A torn last line is
ignored (that cell is recomputed). Lines are strict JSON (format 2: a NaN in a cell's fields is the string
``"NaN"``, as in the cell store); format 1 files (bare ``NaN``) are still read, and rewritten in format 2
when a store opens them. Arrays are stored
compactly as base64: 0/1 values bit-packed (10,000 examples: 1.25 kB), values that survive float32
exactly as float32, others as float64; counts that are all 1 are not stored at all. The labels of the
evaluation data (when they are one class per example) are kept once, for :func:`per_class`.

Like the cell store, each rank of a sharded analysis writes its own ``examples.rank{R}-of-{W}.jsonl`` and
every store also reads the records of its siblings (``examples.jsonl``, ``examples.rank*.jsonl`` beside it
with the same settings), so records are reused whatever the number of processes that resumes.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from criticality.core import statistics
from criticality.core.stores import cell_key
from criticality.errors import CriticalityError
from criticality.infra.files import dumps, loads
from criticality.infra.jsonl import append_line, open_store

KIND = "criticality-examples"
FORMAT = 2  # 2: strict JSON (NaN as "NaN"); 1: json.dumps(allow_nan=True), read and upgraded

Record = dict[str, tuple[np.ndarray, np.ndarray]]  # metric → (values (N,), counts (N,))


def examples_path(cells_path: str | os.PathLike) -> Path:
    """The records file beside a cell store: ``cells.jsonl`` → ``examples.jsonl`` (shards likewise)."""
    path = Path(cells_path)
    return path.with_name(path.name.replace("cells", "examples", 1) if "cells" in path.name
                          else f"{path.stem}.examples.jsonl")


def encode(array: np.ndarray, *, counts: bool = False) -> dict[str, Any]:
    """The smallest exact encoding of a 1-D array: ``ones`` (counts only), ``bits``, ``f4`` or ``f8``."""
    a = np.asarray(array, dtype=np.float64).ravel()
    if counts and (a == 1).all():
        return {"enc": "ones", "n": len(a)}
    if not counts and ((a == 0) | (a == 1)).all():
        return {"enc": "bits", "n": len(a), "data": _b64(np.packbits(a.astype(bool)))}
    if np.array_equal(a.astype(np.float32).astype(np.float64), a, equal_nan=True):  # e.g. float32 losses
        return {"enc": "f4", "n": len(a), "data": _b64(a.astype("<f4"))}
    return {"enc": "f8", "n": len(a), "data": _b64(a.astype("<f8"))}


def decode(d: Mapping[str, Any]) -> np.ndarray:
    n, enc = int(d["n"]), d["enc"]
    if enc == "ones":
        return np.ones(n)
    raw = base64.b64decode(d["data"])
    if enc == "bits":
        return np.unpackbits(np.frombuffer(raw, np.uint8), count=n).astype(np.float64)
    if enc in ("f4", "f8"):
        return np.frombuffer(raw, f"<{enc}").astype(np.float64)
    raise ValueError(f"unknown encoding {enc!r}")


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def as_record(raw: Mapping[str, Any]) -> Record:
    """A record from the engine (``{metric: (values, counts)}``, tensors or arrays) as float64 arrays."""
    out = {}
    for name, (values, counts) in raw.items():
        v = np.asarray(_numpy(values), dtype=np.float64).ravel()
        c = np.broadcast_to(np.asarray(_numpy(counts), dtype=np.float64).ravel(), v.shape).copy()
        out[name] = (v, c)
    return out


def _numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


class ExampleStore:
    """Records by cell key; :meth:`add` appends one durably. Same file rules as the cell store."""

    def __init__(self, path: str | os.PathLike, settings: Mapping[str, Any]):
        self.path = Path(path)
        self.settings = loads(dumps(dict(settings)))
        self.records: dict[Hashable, Record] = {}
        self.cells: dict[Hashable, dict[str, Any]] = {}
        self.targets: np.ndarray | None = None
        open_store(self.path, KIND, FORMAT, self.settings, "records", self._parse,
                   older={1: lambda line: dumps(loads(line))})  # loads reads bare NaN too

    def add(self, cell: Mapping[str, Any], record: Record) -> None:
        line = {"cell": dict(cell), "records": {m: {"values": encode(v), "counts": encode(c, counts=True)}
                                                for m, (v, c) in record.items()}}
        append_line(self.path, dumps(line))
        self.records[cell_key(cell)] = record
        self.cells[cell_key(cell)] = dict(cell)

    def add_targets(self, targets: np.ndarray) -> None:
        append_line(self.path, dumps({"targets": encode(targets)}))
        self.targets = np.asarray(targets, dtype=np.float64)

    def _parse(self, lines: list[str]) -> list[str]:
        """Take in the records (and labels) of ``lines``; returns the whole lines (torn ones are skipped)."""
        kept = []
        for line in lines:
            try:
                obj = loads(line)
                if "targets" in obj:
                    self.targets = decode(obj["targets"])
                else:
                    record = {m: (decode(r["values"]), decode(r["counts"])) for m, r in obj["records"].items()}
                    self.records[cell_key(obj["cell"])] = record
                    self.cells[cell_key(obj["cell"])] = obj["cell"]
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # an empty trailing line, or one torn by a crash: recompute that cell
            kept.append(line)
        return kept


@dataclass
class Examples:
    """The records of a grid's cells in memory (what :class:`criticality.core.analysis.Result` holds)."""

    records: dict[Hashable, Record] = field(default_factory=dict)
    cells: dict[Hashable, dict[str, Any]] = field(default_factory=dict)
    targets: np.ndarray | None = None

    def find(self, **where: Any) -> Hashable:
        """The one cell whose fields equal ``where`` (``op="final"`` finds the trained model)."""
        hits = [k for k, c in self.cells.items() if all(_same(c.get(f), v) for f, v in where.items())]
        if len(hits) != 1:
            have = ", ".join(str(k) for k in list(self.cells)[:12])
            raise CriticalityError(f"{len(hits)} cells with records match {where} (need exactly one; cells: {have})")
        return hits[0]

    def frame(self, key: Hashable) -> pd.DataFrame:
        """One row per example: ``example``, ``target`` (when known), each metric, ``<metric>_count`` when
        counts are not all 1."""
        columns: dict[str, Any] = {"example": np.arange(len(next(iter(self.records[key].values()))[0]))}
        if self.targets is not None and len(self.targets) == len(columns["example"]):
            columns["target"] = self.targets.astype(np.int64)
        for m, (v, c) in self.records[key].items():
            columns[m] = v
            if not (c == 1).all():
                columns[f"{m}_count"] = c.astype(np.int64)
        return pd.DataFrame(columns)


def _same(a: Any, b: Any) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and a == b)


def per_class(examples: Examples, metric: str = "error", **where: Any) -> pd.DataFrame:
    """Error per true class of one cell next to the final model's: ``class, n, error, final_error,
    delta_error`` (the names follow ``metric``)."""
    if examples.targets is None:
        raise CriticalityError("no labels were recorded for these examples (label-free or sequence data)")
    key, final = examples.find(**where), examples.find(op="final")
    if metric not in examples.records[key]:
        raise CriticalityError(f"no {metric!r} records (have {', '.join(examples.records[key])})")
    cell = statistics.per_class_error(examples.records[key][metric][0], examples.targets)
    base = statistics.per_class_error(examples.records[final][metric][0], examples.targets)
    return cell.rename(columns={"error": metric}).assign(
        **{f"final_{metric}": base["error"].to_numpy(), f"delta_{metric}": cell["error"] - base["error"]})


def class_targets(targets: Iterable[Any]) -> np.ndarray | None:
    """The labels as one class index per example, or None when they are not (sequences, soft labels)."""
    parts = [np.asarray(_numpy(t)) for t in targets]
    if not parts or any(p.ndim != 1 or not np.issubdtype(p.dtype, np.integer) for p in parts):
        return None
    return np.concatenate(parts)
