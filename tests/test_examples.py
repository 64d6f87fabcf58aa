"""Per-example records: the store's encoding and resumability, and records inside an analysis.

Run: ``.venv/bin/pytest tests/test_examples.py -q`` (about 10 s on 2 cores).

The records must reproduce each cell's error and loss, survive a torn write, come back from
``Result.examples`` / ``Result.per_class``, and feed the table's intervals and the three-way verdicts.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from criticality.core import records as ex
from criticality.core.analysis import analyze
from criticality.core.engine import evaluate_naive
from criticality.core.stores import cell_key
from criticality.errors import CriticalityError
from test_analysis import BATCH, make_data, trajectory

SETTINGS = {"model": "toy", "data": "abc"}


@pytest.mark.parametrize("values,counts,enc", [
    (np.array([0, 1, 1, 0, 1, 0, 0, 0, 1], float), np.ones(9), "bits"),
    (np.array([0.5, 2.25, np.float32(0.1)], float), np.ones(3), "f4"),
    (np.array([0.1, 2.0, 3.3]), np.array([3, 1, 7], float), "f8"),
])
def test_encodings_round_trip_exactly(values, counts, enc):
    assert ex.encode(values)["enc"] == enc
    assert ex.encode(counts, counts=True)["enc"] == ("ones" if (counts == 1).all() else "f4")
    np.testing.assert_array_equal(ex.decode(ex.encode(values)), values)
    np.testing.assert_array_equal(ex.decode(ex.encode(counts, counts=True)), counts)
    bits = ex.encode(np.ones(10_000))
    assert len(bits["data"]) <= 1_668  # 1.25 kB of bits, in base64


def _cell(group, seed=None):
    return {"op": "rerandomize", "group": group, "joint": False, "checkpoint": None, "seed": seed}


def test_store_resumes_and_ignores_a_torn_line(tmp_path):
    path = tmp_path / "examples.jsonl"
    store = ex.ExampleStore(path, SETTINGS)
    a = {"error": (np.array([1.0, 0, 1]), np.ones(3)), "loss": (np.array([0.5, 0.25, 2.0]), np.ones(3))}
    store.add(_cell("fc1", 0), a)
    store.add_targets(np.array([2, 0, 1]))
    store.add(_cell("fc2", 0), a)
    text = path.read_text()
    path.write_text(text[:-25])  # a crash in the middle of the last line
    again = ex.ExampleStore(path, SETTINGS)
    assert list(again.records) == [cell_key(_cell("fc1", 0))]
    np.testing.assert_array_equal(again.records[cell_key(_cell("fc1", 0))]["loss"][0], a["loss"][0])
    np.testing.assert_array_equal(again.targets, [2, 0, 1])
    again.add(_cell("fc2", 0), a)  # appends on a fresh line, after the whole ones
    assert len(ex.ExampleStore(path, SETTINGS).records) == 2
    with pytest.raises(CriticalityError, match="differs: data"):
        ex.ExampleStore(path, {**SETTINGS, "data": "other"})


def test_examples_path_sits_beside_the_cells():
    assert ex.examples_path("run/analysis/cells.jsonl").name == "examples.jsonl"
    assert ex.examples_path("a/cells.rank1-of-2.jsonl").name == "examples.rank1-of-2.jsonl"


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    model, states = trajectory("fcn")
    data = make_data(n=300, seed=7)
    store = tmp_path_factory.mktemp("run") / "cells.jsonl"
    kw = dict(groups="auto", seeds=2, batch_size=BATCH, progress=False, engine="naive", store=str(store))
    return analyze(model, states, data, **kw), (model, states, data, kw)


def test_records_reproduce_every_cell(analysed):
    result, _ = analysed
    for _, row in result.table.iterrows():
        where = {"group": row.group, "checkpoint": None if pd.isna(row.checkpoint) else int(row.checkpoint),
                 "seed": None if pd.isna(row.seed) else int(row.seed)}
        per = result.examples(op=row.op, **where)
        assert len(per) == row.n
        assert per.error.mean() == row.error  # k / n, exactly
        assert per.loss.sum() / len(per) == pytest.approx(row.loss, rel=1e-12)
    final = result.examples()
    assert final.target.tolist() == make_data(n=300, seed=7)[1].tolist()
    with pytest.raises(CriticalityError, match="2 cells"):
        result.examples(op="rerandomize", group=result.table.group.iloc[1])


def test_table_intervals_and_verdicts(analysed):
    result, _ = analysed
    t, v = result.table, result.verdicts
    final = t[t.op == "final"].iloc[0]
    assert (final.delta_error_low, final.delta_error_high, final.p_value) == (0.0, 0.0, 1.0)
    assert (t.delta_error_low <= t.delta_error + 1e-12).all() and (t.delta_error <= t.delta_error_high + 1e-12).all()
    assert (t.delta_loss_low <= t.delta_loss_high).all()
    assert t.p_value.between(0, 1).all()
    assert set(v.verdict) <= {"critical", "robust", "inconclusive"}
    for _, row in v.iterrows():
        expected = ("critical" if row.delta_error_low > 0.02 else
                    "robust" if row.delta_error_high <= 0.02 else "inconclusive")
        assert row.verdict == expected
        assert np.isnan(row.examples_to_settle) == (expected != "inconclusive")
        assert row.rerandomize_error_low <= row.rerandomize_error_mean <= row.rerandomize_error_high
    assert (v.p_holm >= v.p_value).all()
    assert result.summary["verdict_rule"] == "interval"


def test_resume_and_point_rule_and_per_class(analysed):
    result, (model, states, data, kw) = analysed
    again = analyze(model, states, data, **kw, verdict="point")  # every cell comes from the stores
    pd.testing.assert_frame_equal(again.table, result.table)
    assert (again.verdicts.verdict == again.verdicts.point_verdict).all()
    assert (again.verdicts.verdict == np.where(again.verdicts.delta_error <= 0.02, "robust", "critical")).all()
    group = result.table.group.iloc[1]
    pc = result.per_class(op="reinit", group=group, checkpoint=0)
    per = result.examples(op="reinit", group=group, checkpoint=0)
    assert pc.n.sum() == len(per)
    assert (pc.n * pc.error).sum() == pytest.approx(per.error.sum())
    assert (pc.delta_error == pc.error - pc.final_error).all()


def test_naive_records_are_the_plain_loop():
    model, states = trajectory("fcn")
    x, y = make_data(n=50, seed=3)
    cell = evaluate_naive(model, states[3], (x, y), metrics={"error": lambda lo, t: (lo.argmax(1) != t).double()},
                          batch_size=16)
    rec = cell.records
    model.load_state_dict(states[3])
    with torch.no_grad():
        want = (model.eval()(x).argmax(1) != y).double().numpy()
    np.testing.assert_array_equal(rec["error"][0], want)
    assert dict(cell) == {"error": want.mean(), "n": 50}
    assert json.loads(json.dumps(ex.encode(rec["error"][0])))["enc"] == "bits"
