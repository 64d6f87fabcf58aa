"""The verdict table on synthetic records, and the heatmap's marks for inconclusive cells.

Run: ``.venv/bin/pytest tests/test_verdicts.py -q`` (a few seconds).

Records are made by hand so that each group's outcome is known: a group that changes nothing (robust, p = 1),
one that breaks a third of the examples (critical), one whose Δ sits on the threshold (inconclusive), and a
sequence-style metric (values summed over tokens, counts per sequence) judged with its own threshold. Error
(0/1 per example) gets Tango's score interval from the discordant counts, other metrics the bootstrap; and
``analyze(..., max_examples=10)`` on a group that changes nothing is not robust.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from matplotlib.patches import Rectangle
from torch import nn

import criticality
from criticality.core import resampling, statistics
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
    # no discordant example among N: Tango's score interval ±z²/(N + z²), not the bootstrap's [0, 0]
    z2 = scipy.stats.norm.ppf(0.975) ** 2
    assert v.loc["same", "delta_error_low"] == pytest.approx(-z2 / (N + z2), abs=1e-12)
    assert v.loc["same", "delta_error_high"] == pytest.approx(z2 / (N + z2), abs=1e-12)
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
    # not 0/1: the sign-flip permutation test over units, Monte Carlo at 4,999 flips (never below 1/5000)
    assert table.p_value.notna().all() and table.p_value[0] == 1.0 and table.p_value[1] == 1.0  # final, "same"
    assert table.p_value[4] == pytest.approx(1 / 5000)  # "broken": +1 nat per token, no flip is as extreme
    nll = [r["nll"] for r in records]
    expected = resampling.sign_flip_p(np.stack([v for v, _ in nll]), nll[0][0], np.stack([c for _, c in nll]),
                                      nll[0][1], rng=0)
    np.testing.assert_array_equal(table.p_value, expected)
    v = verdicts(table, 0.5, records, metric="nll").set_index("group")
    assert v.loc["broken", "delta_nll"] == pytest.approx(1.0)  # one nat per token, ratio of sums
    assert v.loc["broken", "verdict"] == "critical"  # every sequence +1 nat per token: [1, 1], no spread
    # no sequence differs: the resampled interval is [0, 0], which is no evidence, so not "robust"
    assert (v.loc["same", "delta_nll_low"], v.loc["same", "delta_nll_high"]) == (0.0, 0.0)
    assert v.loc["same", "verdict"] == "inconclusive" and v.loc["same", "units"] == "sequences"
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


def test_error_gets_the_score_interval_and_other_metrics_the_bootstrap():
    rows, records = _rows()
    table = tabulate(rows, ["error", "nll"], records, seed=5)
    final = records[0]["error"][0]
    for i, rec in enumerate(records[1:], start=1):  # b, c counted here by hand, then the documented function
        wrong = rec["error"][0]
        b, c = int(((wrong == 1) & (final == 0)).sum()), int(((wrong == 0) & (final == 1)).sum())
        expected = statistics.score_intervals([b], [c], [N])[0]
        assert (table.delta_error_low[i], table.delta_error_high[i]) == tuple(expected)
        boot = resampling.studentized_intervals(rec["nll"][0][None], records[0]["nll"][0], records[0]["nll"][1],
                                                rng=resampling.Resamples(N, 2000, 5))[0]
        assert (table.delta_nll_low[i], table.delta_nll_high[i]) == tuple(boot)
    assert (table.delta_error_low[0], table.delta_error_high[0]) == (0.0, 0.0)  # the final row: Δ ≡ 0
    v = verdicts(table, 0.02, records).set_index("group")
    b, c = statistics.discordant(records[7]["error"][0], final)  # the "edge" group's re-init cell
    assert v.loc["edge", "examples_to_settle"] == statistics.score_examples_to_settle(b, c, N, 0.02)


def test_ten_examples_with_nothing_changed_are_not_robust():
    """The issue's case end to end: ``max_examples=10``, a group identical at epoch 0 and at the end."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    end = {**start, "2.weight": start["2.weight"] + 0.5 * torch.randn_like(start["2.weight"])}
    x = torch.randn(40, 4)
    model.load_state_dict(end)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels: the final model's own predictions
    result = criticality.analyze(model, {0: start, 1: end}, (x, y), seeds=1, max_examples=10, progress=False)
    row = result.verdicts.set_index("group").loc["0"]  # the first layer: the same weights at epoch 0 and 1
    assert row.delta_error == 0.0 and row.p_value == 1.0
    z2 = scipy.stats.norm.ppf(0.975) ** 2
    assert row.delta_error_high == pytest.approx(z2 / (10 + z2), abs=1e-12)  # 0.278, not 0
    assert row.verdict == "inconclusive" and row.point_verdict == "robust"
    assert row.examples_to_settle == 189  # z²(1 − t)/t at t = 0.02, rounded up


def test_analyze_pins_every_interval_and_p_to_the_documented_functions_at_stats_seed():
    """Through ``analyze()``: loss intervals are ``studentized_intervals`` on ``Resamples(N, 2000, stats_seed)``,
    error intervals the score interval, the loss p-values ``sign_flip_p`` seeded by ``stats_seed``, and the
    re-randomized interval ``two_level_intervals``; the summary records the settings."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    end = {k: v + 0.3 * torch.randn_like(v) for k, v in start.items()}
    x, y = torch.randn(120, 4), torch.randint(0, 3, (120,))
    result = criticality.analyze(model, {0: start, 1: end}, (x, y), seeds=2, stats_seed=7, verdict_metric="loss",
                                 metrics=["error", "loss"], progress=False, init="shuffle")
    table, examples = result.table, result.records
    final = examples.records[examples.find(op="final")]
    assert result.summary["bootstrap"]["seed"] == 7 and result.summary["bootstrap"]["resamples"] == 2000
    cells = list(examples.records.values())  # one per table row, in the table's order
    assert len(cells) == len(table) and cells[int(np.flatnonzero(table.op == "final")[0])] is final
    loss = np.stack([c["loss"][0] for c in cells])  # (rows, N)
    expected = resampling.studentized_intervals(loss, final["loss"][0], final["loss"][1],
                                                rng=resampling.Resamples(120, statistics.RESAMPLES, 7))
    expected[table.op == "final"] = 0.0
    np.testing.assert_array_equal(table[["delta_loss_low", "delta_loss_high"]].to_numpy(), expected)
    p = resampling.sign_flip_p(loss, final["loss"][0], np.ones_like(loss), final["loss"][1], rng=7)
    np.testing.assert_array_equal(table.p_value.to_numpy(), p)
    b, c = np.array([statistics.discordant(cell["error"][0], final["error"][0]) for cell in cells]).T
    score = statistics.score_intervals(b, c, 120)
    score[table.op == "final"] = 0.0
    np.testing.assert_array_equal(table[["delta_error_low", "delta_error_high"]].to_numpy(), score)
    v = result.verdicts.set_index("group")
    for group in v.index:
        rand = [cells[i]["error"][0] for i in np.flatnonzero((table.op == "rerandomize") & (table.group == group))]
        _, low, high = statistics.two_level_interval(np.stack(rand))
        assert (v.loc[group, "rerandomize_error_low"], v.loc[group, "rerandomize_error_high"]) == (low, high)
    assert (v.units == "examples").all() and v.p_value.notna().all()
