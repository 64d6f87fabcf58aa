"""The verdict table on synthetic records, and the heatmap's marks for inconclusive cells.

Run: ``.venv/bin/pytest tests/test_verdicts.py -q`` (a few seconds).

Records are made by hand so that each group's outcome is known: a group that changes nothing (robust, p = 1),
one that breaks a third of the examples (critical), one whose Δ sits on the threshold (inconclusive), and a
sequence-style metric (values summed over tokens, counts per sequence) judged with its own threshold.
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.patches import Rectangle

from criticality.core import statistics
from criticality.core.analysis import tabulate
from criticality.core.verdicts import straddling, verdicts
from criticality.output import figures as plots

N = 400


def _rows():
    rng = np.random.default_rng(0)
    final = (rng.random(N) < 0.1).astype(float)
    tokens = rng.integers(1, 20, N).astype(float)
    nll = rng.random(N) * tokens

    def flip(p):
        return np.where(rng.random(N) < p, 1.0, final)

    variants = {"same": final, "broken": flip(0.35), "edge": flip(0.02)}
    rows = [("final", "", 3, None, final, nll)]
    for g, wrong in variants.items():
        rows += [("reinit", g, 0, None, wrong, nll + (g == "broken") * tokens)]
        rows += [("rerandomize", g, None, s, flip(0.5), nll + tokens) for s in (0, 1)]
    out, records = [], []
    for op, g, ckpt, seed, wrong, seq in rows:
        rec = {"error": (wrong, np.ones(N)), "nll": (seq, tokens)}
        out.append({"op": op, "group": g, "joint": False, "checkpoint": ckpt, "seed": seed,
                    "error": wrong.mean(), "nll": seq.sum() / tokens.sum(), "n": N})
        records.append(rec)
    return out, records


def test_three_outcomes_holm_and_settling():
    rows, records = _rows()
    table = tabulate(rows, ["error", "nll"], records)
    v = verdicts(table, 0.02, records).set_index("group")
    assert v.loc["same", "verdict"] == "robust" and v.loc["same", "p_value"] == 1.0
    assert (v.loc["same", "delta_error_low"], v.loc["same", "delta_error_high"]) == (0.0, 0.0)
    assert v.loc["broken", "verdict"] == "critical" and v.loc["broken", "p_value"] < 1e-6
    assert v.loc["edge", "verdict"] == "inconclusive" and v.loc["edge", "examples_to_settle"] > N
    np.testing.assert_allclose(v.p_holm, statistics.holm(v.p_value))
    b, c = statistics.discordant(records[4]["error"][0], records[0]["error"][0])
    assert v.loc["broken", "p_value"] == statistics.mcnemar(b, c)
    assert (v.rerandomize_error_low < v.rerandomize_error_mean).all()
    assert (v.rerandomize_error_mean < v.rerandomize_error_high).all()
    point = verdicts(table, 0.02, records, rule="point").set_index("group")
    assert point.loc["edge", "verdict"] in ("robust", "critical")


def test_a_verdict_on_a_sequence_metric_uses_its_own_threshold():
    rows, records = _rows()
    table = tabulate(rows, ["error", "nll"], records, p_metric="nll")
    assert table.p_value.isna().all()  # no McNemar for a non-0/1 metric
    v = verdicts(table, 0.5, records, metric="nll").set_index("group")
    assert v.loc["broken", "delta_nll"] == pytest.approx(1.0)  # one nat per token, ratio of sums
    assert v.loc["broken", "verdict"] == "critical" and v.loc["same", "verdict"] == "robust"
    assert "delta_error_low" in v.columns


def test_heatmap_outlines_inconclusive_cells():
    rows, records = _rows()
    table = tabulate(rows, ["error", "nll"], records)
    assert straddling(table, "error", 0.02) == {("edge", "0")}
    fig = plots.robustness_heatmap(table, "error", threshold=0.02)
    dashed = [p for p in fig.axes[0].patches if isinstance(p, Rectangle) and p.get_linestyle() == "--"]
    assert len(dashed) == 1
    plain = plots.robustness_heatmap(table, "error")
    assert not [p for p in plain.axes[0].patches if isinstance(p, Rectangle) and p.get_linestyle() == "--"]
