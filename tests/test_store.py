"""The stores (cells and per-example records; one file format, criticality.infra.jsonl): rows keyed by
cell, so a sharded analysis resumes whatever the number of processes.

Run: ``.venv/bin/pytest tests/test_store.py -q`` (a few seconds; CPU).

Checks: cells stored by 2 shards are all reused, with their per-example records, by 3 shards and by one
process (nothing recomputed); a stored cell whose records are missing is computed again (the statistics
need them), and only that one; a sibling store of other settings is ignored, never mixed in; NaN/inf in a
stored row round-trip through strict JSON; the record store writes strict JSON too (format 2), reads and
upgrades a format-1 file (bare NaN, torn last line), and refuses a format it does not know.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from criticality.core import records as examples
from criticality.core import run
from criticality.core.plan import PlanSpec, make_plan
from criticality.core.run import run_cells
from criticality.core.stores import CellStore, cell_key
from criticality.errors import CriticalityError
from criticality.pipelines.grid import merge_shards as _merge_shards
from toy import fcn


def _plan():
    g = torch.Generator().manual_seed(0)
    model = fcn()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    end = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    x, y = torch.randn(60, 1, 6, 6, generator=g), torch.randint(0, 5, (60,), generator=g)
    plan = make_plan(model, {0: start, 2: end}, PlanSpec("auto", 1, init="torch", batch_size=30))
    return plan, (x, y)


def test_sharded_cells_are_reused_by_any_world_size(tmp_path, caplog, monkeypatch):
    plan, data = _plan()
    two = [run_cells(plan, data, store=str(tmp_path / f"cells.rank{r}-of-2.jsonl"), shard=(r, 2), progress=False)
           for r in range(2)]
    caplog.clear()
    caplog.set_level(logging.INFO, logger="criticality")
    def no_evaluation(plan, cells, *args, **kwargs):
        assert not cells, f"stored cells were computed again: {cells}"
        return iter(())

    monkeypatch.setattr(run, "_evaluate", no_evaluation)
    three = [run_cells(plan, data, store=str(tmp_path / f"cells.rank{r}-of-3.jsonl"), shard=(r, 3), progress=False)
             for r in range(3)]
    one = run_cells(plan, data, store=str(tmp_path / "cells.jsonl"), progress=False)
    assert "computing 0" in caplog.text  # the library logs it; the CLI shows it on stderr
    merged2, merged3 = _merge_shards(two, plan), _merge_shards(three, plan)
    assert [cell_key(r) for r in one] == [cell_key(c.as_dict()) for c in plan.cells]
    assert [r["error"] for r in merged2] == [r["error"] for r in merged3] == [r["error"] for r in one]
    for a, b in zip(merged2, one, strict=True):  # the records came back too, from the shards' files
        for m in ("error", "loss"):
            np.testing.assert_array_equal(a["records"][m][0], b["records"][m][0])
    assert one[0]["targets"] is not None and len(one[0]["targets"]) == 60


def test_cells_stored_without_records_are_computed_again(tmp_path, monkeypatch):
    plan, data = _plan()
    store = tmp_path / "cells.jsonl"
    whole = run_cells(plan, data, store=str(store), progress=False)
    # As if a crash fell between a cell's two appends, or the store predates records: drop two of them.
    lines = examples.examples_path(store).read_text().splitlines()
    lost = {cell_key(c.as_dict()) for c in plan.cells[1:3]}
    examples.examples_path(store).write_text(
        "\n".join(s for s in lines if '"cell"' not in s or cell_key(json.loads(s)["cell"]) not in lost) + "\n")
    computed = []
    evaluate = run._evaluate

    def counting(plan, cells, *args, **kwargs):
        computed.extend(cell_key(c.as_dict()) for c in cells)
        return evaluate(plan, cells, *args, **kwargs)

    monkeypatch.setattr(run, "_evaluate", counting)
    again = run_cells(plan, data, store=str(store), progress=False)
    assert set(computed) == lost and len(computed) == 2
    for a, b in zip(again, whole, strict=True):
        assert a["records"] is not None and a["error"] == b["error"]
        np.testing.assert_array_equal(a["records"]["loss"][0], b["records"]["loss"][0])
    computed.clear()
    run_cells(plan, data, store=str(store), progress=False)
    assert computed == []  # now every stored cell has its records


def test_a_sibling_store_of_other_settings_is_ignored(tmp_path):
    CellStore(tmp_path / "cells.rank0-of-2.jsonl", {"a": 1}).add({"op": "final", "group": "", "checkpoint": 2,
                                                                  "seed": None, "error": 0.5})
    assert CellStore(tmp_path / "cells.jsonl", {"a": 2}).rows == {}
    assert len(CellStore(tmp_path / "cells.rank1-of-2.jsonl", {"a": 1}).rows) == 1


def test_non_finite_rows_round_trip_as_strict_json(tmp_path):
    store = CellStore(tmp_path / "cells.jsonl", {"a": 1})
    store.add({"op": "final", "group": "", "checkpoint": 2, "seed": None, "error": math.nan, "loss": math.inf})
    line = (tmp_path / "cells.jsonl").read_text().splitlines()[1]
    assert json.loads(line, parse_constant=lambda c: 1 / 0)["loss"] == "Infinity"
    row = next(iter(CellStore(tmp_path / "cells.jsonl", {"a": 1}).rows.values()))
    assert math.isnan(row["error"]) and row["loss"] == math.inf


def _record_line(cell):
    values, counts = np.array([0.0, 1.0, 1.0]), np.ones(3)
    return {"cell": cell, "records": {"error": {"values": examples.encode(values),
                                                "counts": examples.encode(counts, counts=True)}}}


def test_records_are_strict_json_and_the_old_format_is_read_and_upgraded(tmp_path):
    cell = {"op": "final", "group": "", "checkpoint": 2, "seed": None, "error": math.nan, "loss": math.inf}
    store = examples.ExampleStore(tmp_path / "examples.jsonl", {"a": 1})
    store.add(cell, {"error": (np.array([0.0, 1.0, 1.0]), np.ones(3))})
    header, line = (tmp_path / "examples.jsonl").read_text().splitlines()
    assert json.loads(header)["format"] == examples.FORMAT == 2
    strict = json.loads(line, parse_constant=lambda c: 1 / 0)  # no bare NaN/Infinity anywhere
    assert strict["cell"]["error"] == "NaN" and strict["cell"]["loss"] == "Infinity"

    # format 1 (json.dumps(allow_nan=True)): a bare NaN, and a torn last line
    old = tmp_path / "old" / "examples.jsonl"
    old.parent.mkdir()
    old.write_text("\n".join([json.dumps({"kind": examples.KIND, "format": 1, "settings": {"a": 1}}),
                              json.dumps(_record_line(cell), allow_nan=True), '{"cell": {"op"']))
    assert "NaN" in old.read_text().splitlines()[1]
    for _ in range(2):  # the first opening upgrades the file in place, the second reads format 2
        again = examples.ExampleStore(old, {"a": 1})
        (key, got), = again.records.items()
        assert key == cell_key(cell) and math.isnan(again.cells[key]["error"]) and again.cells[key]["loss"] == math.inf
        assert np.array_equal(got["error"][0], [0.0, 1.0, 1.0]) and np.array_equal(got["error"][1], np.ones(3))
        header, line = old.read_text().splitlines()
        assert json.loads(header)["format"] == 2
        assert json.loads(line, parse_constant=lambda c: 1 / 0)["cell"]["error"] == "NaN"


def test_a_store_of_an_unknown_format_is_refused(tmp_path):
    path = tmp_path / "examples.jsonl"
    path.write_text(json.dumps({"kind": examples.KIND, "format": 99, "settings": {"a": 1}}) + "\n")
    with pytest.raises(CriticalityError, match="incompatible version .*format 99, this version reads 2, 1"):
        examples.ExampleStore(path, {"a": 1})
