"""Adaptive evaluation (``analyze(..., adaptive=True)``) and its confidence sequences.

Run: ``.venv/bin/pytest tests/test_adaptive.py -q`` (about half a minute).

- the betting confidence sequence against a plain reference: the bets by an explicit loop over the WSR
  formulas, the set {m : neither capital ≥ 2/α} scanned on a grid by explicit products; known values
  (no data: the whole range; a sign flip mirrors the interval);
- its guarantee, simulated (seeded): over replications of paired 0/1 outcomes with the true Δ near the
  threshold, the stopping rule's wrong verdicts stay ≤ α, while the fixed-n score interval checked after every
  chunk (the thing a confidence sequence replaces) is wrong more often than α in the same replications;
- end to end on a small trained classifier: with ``adaptive`` off the table and summary carry nothing new; with
  it on, every cell's verdict agrees with the full evaluation's wherever that one is conclusive, stopped cells
  rest on fewer examples with Δ paired on those examples and the sequence's ends as their interval, the final
  model on all of them; a store resumes without recomputing; loaders and unbounded verdict metrics are refused.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import criticality
from criticality import cli
from criticality.core import adaptive, sequences, statistics
from criticality.core.adaptive import Judge, decide, schedule
from criticality.errors import CriticalityError
from criticality.output import heatmaps, report
from criticality.paper.train import train
from criticality.paper.training.config import TrainConfig

ALPHA = 0.05


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy models: one thread is faster than two fighting over a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference_bets(x: np.ndarray, alpha: float) -> np.ndarray:
    """WSR's predictable plug-in bets, one example at a time."""
    out, total, squares = [], 0.0, 0.0
    for i, xi in enumerate(x, start=1):
        before = (0.25 + squares) / i  # σ̂²_{i-1}, with σ̂²_0 = 1/4
        out.append(min(sequences.MAX_BET, math.sqrt(2 * math.log(2 / alpha) / (before * i * math.log(i + 1)))))
        total += xi
        mu = (0.5 + total) / (i + 1)
        squares += (xi - mu) ** 2
    return np.array(out)


def reference_set(values: np.ndarray, alpha: float, grid: np.ndarray) -> np.ndarray:
    """The grid points of Δ in [−1, 1] that neither gambler has beaten (explicit products)."""
    x = (values + 1) / 2
    lam = reference_bets(x, alpha)
    keep = []
    for delta in grid:
        m = (delta + 1) / 2
        up = down = 1.0
        for li, xi in zip(lam, x, strict=True):
            up *= 1 + li * (xi - m)
            down *= 1 - li * (xi - m)
        keep.append(up < 2 / alpha and down < 2 / alpha)
    return np.array(keep)


def paired(n: int, p_b: float, p_c: float, rng: np.random.Generator) -> np.ndarray:
    """``(n,)`` per-example Δ of a 0/1 metric: +1 with p_b, −1 with p_c, else 0."""
    u = rng.random(n)
    return np.where(u < p_b, 1.0, np.where(u < p_b + p_c, -1.0, 0.0))


def test_bets_match_the_formulas():
    x = (paired(300, 0.1, 0.05, np.random.default_rng(1)) + 1) / 2
    assert np.allclose(sequences.bets(x, ALPHA), reference_bets(x, ALPHA), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n, p_b, p_c", [(40, 0.3, 0.05), (200, 0.05, 0.02), (200, 0.0, 0.0), (120, 0.0, 0.4)])
def test_sequence_ends_match_a_grid_scan(n, p_b, p_c):
    values = paired(n, p_b, p_c, np.random.default_rng(n))
    low, high = sequences.confidence_sequence(values, ALPHA)
    grid = np.linspace(-1, 1, 2001)  # spacing 0.001
    kept = grid[reference_set(values, ALPHA, grid)]
    assert len(kept), "the sequence is empty on the grid"
    assert low <= kept.min() <= low + 0.001 + 1e-9 and high - 0.001 - 1e-9 <= kept.max() <= high
    assert sequences.rejects(values, kept.min() - 0.002, ALPHA, above=True)
    assert not sequences.rejects(values, kept.min() + 0.001, ALPHA, above=True)
    assert sequences.rejects(values, kept.max() + 0.002, ALPHA, above=False)


def test_sequence_known_values():
    assert sequences.confidence_sequence(np.array([]), ALPHA) == (-1.0, 1.0)
    values = paired(500, 0.2, 0.05, np.random.default_rng(3))
    low, high = sequences.confidence_sequence(values, ALPHA)
    mirrored = sequences.confidence_sequence(-values, ALPHA)
    assert mirrored == pytest.approx((-high, -low), abs=1e-12)
    assert low < values.mean() < high
    narrower = sequences.confidence_sequence(np.tile(values, 4), ALPHA)
    assert narrower[1] - narrower[0] < high - low
    with pytest.raises(ValueError, match="outside the stated bounds"):
        sequences.confidence_sequence(np.array([2.0]), ALPHA)


def test_schedule_and_order():
    ends = schedule(10_000)
    assert ends[0] == adaptive.FIRST_CHUNK and ends[-1] == 10_000 and ends == sorted(set(ends))
    assert all(b >= math.ceil(a * adaptive.GROWTH) or b == 10_000 for a, b in zip(ends, ends[1:], strict=False))
    assert schedule(100) == [100]
    assert np.array_equal(adaptive.order(50, 7), adaptive.order(50, 7))
    assert sorted(adaptive.order(50, 7)) == list(range(50))


def _first_verdicts(deltas: np.ndarray, ends: list[int], judge: Judge) -> list[str | None]:
    """The stopping rule on each row of ``deltas (R, n)``: the first decision at a look, or None."""
    out = []
    for d in deltas:
        out.append(next((v for e in ends if (v := decide(d[:e], judge)) is not None), None))
    return out


def _peeking_verdicts(deltas: np.ndarray, ends: list[int], threshold: float) -> list[str | None]:
    """The fixed-n score interval checked at every look (what a confidence sequence replaces)."""
    decided = [None] * len(deltas)
    for e in ends:
        b, c = (deltas[:, :e] == 1).sum(1), (deltas[:, :e] == -1).sum(1)
        for r, (lo, hi) in enumerate(statistics.score_intervals(b, c, e)):
            if decided[r] is None and (v := statistics.verdict(lo, hi, threshold)) != "inconclusive":
                decided[r] = v
    return decided


@pytest.mark.parametrize("p_b, p_c", [(0.03, 0.01), (0.02, 0.0)])  # true Δ = the threshold: "critical" is wrong
def test_adaptive_error_rate_at_most_alpha(p_b, p_c):
    threshold, n, reps = 0.02, 2000, 300
    rng = np.random.default_rng(int(p_b * 1000))
    deltas = np.stack([paired(n, p_b, p_c, rng) for _ in range(reps)])  # (R, n)
    ends = schedule(n)
    judge = Judge("error", threshold, cells=1, alpha=ALPHA)
    wrong = np.mean([v == "critical" for v in _first_verdicts(deltas, ends, judge)])
    peeking = np.mean([v == "critical" for v in _peeking_verdicts(deltas, ends, threshold)])
    assert wrong <= ALPHA
    assert peeking > ALPHA, "the simulation should show what looking after every chunk does to a fixed-n interval"


def test_adaptive_decides_clear_cases_early():
    rng = np.random.default_rng(5)
    judge = Judge("error", 0.02, cells=60)
    assert decide(paired(500, 0.3, 0.0, rng), judge) == "critical"
    assert decide(paired(3000, 0.002, 0.002, rng), judge) == "robust"
    assert decide(paired(500, 0.02, 0.0, rng), judge) is None


# ----------------------------------------------------------------------------- end to end


def _trained(n: int = 2000):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=gen)
    y = (x @ torch.randn(12, 4, generator=gen) + 0.7 * torch.randn(n, 4, generator=gen)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    states = {0: {k: v.clone() for k, v in model.state_dict().items()}}
    params = list(model.parameters())
    for epoch in (1, 2):
        for i in range(0, n, 100):
            loss = nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100])
            with torch.no_grad():
                for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
                    p -= 0.1 * g
        states[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    return model, states, (x, y)


@pytest.fixture(scope="module")
def runs():
    model, states, data = _trained()
    kw = dict(seeds=2, init="torch", progress=False)
    return data, {"plain": criticality.analyze(model, states, data, **kw),
                  "off": criticality.analyze(model, states, data, adaptive=False, **kw),
                  "on": criticality.analyze(model, states, data, adaptive=True, **kw)}


def test_adaptive_off_changes_nothing(runs):
    _, r = runs
    assert r["off"].table.equals(r["plain"].table)
    assert r["off"].verdicts.equals(r["plain"].verdicts)
    assert "adaptive" not in r["off"].summary and "adaptive_low" not in r["off"].table
    assert r["off"].summary.keys() == r["plain"].summary.keys()


def test_adaptive_verdicts_agree_with_the_full_evaluation(runs):
    (x, _), r = runs
    full, on = r["plain"].table, r["on"].table
    judged = full.op != "final"
    f = [statistics.verdict(lo, hi, 0.02) for lo, hi in zip(full.delta_error_low[judged], full.delta_error_high[judged],
                                                            strict=True)]
    a = [statistics.verdict(lo, hi, 0.02) for lo, hi in zip(on.delta_error_low[judged], on.delta_error_high[judged],
                                                            strict=True)]
    conclusive = [i for i, v in enumerate(f) if v != "inconclusive"]
    assert conclusive and all(a[i] == f[i] for i in conclusive)
    assert (on.n[judged] < len(x)).sum() >= len(conclusive) // 2, "most decided cells should stop early"
    assert int(on.n[~judged].iloc[0]) == len(x)
    summary = r["on"].summary
    assert summary["adaptive"] is True
    assert summary["adaptive_evaluation"]["example_forwards"] == int(on.n.sum()) < len(on) * len(x)
    assert summary["adaptive_evaluation"]["per_cell_alpha"] == pytest.approx(ALPHA / judged.sum())


def test_stopped_cells_are_paired_on_their_own_examples(runs):
    (x, _), r = runs
    on = r["on"]
    final = on.examples()  # the final model, in the evaluation order
    stopped = on.table[(on.table.n < len(x)) & (on.table.op != "final")]
    assert len(stopped)
    judge = Judge("error", 0.02, cells=len(on.table) - 1)
    for _, row in stopped.iterrows():
        where = {f: row[f] for f in ("group", "checkpoint", "seed") if not pd.isna(row[f])}
        cell = on.examples(op=row.op, **where)
        k = int(row.n)
        assert len(cell) == k
        delta = cell.error.to_numpy() - final.error.to_numpy()[:k]
        assert row.delta_error == pytest.approx(delta.mean(), abs=1e-12)
        assert (row.delta_error_low, row.delta_error_high) == pytest.approx(
            sequences.confidence_sequence(delta, judge.level), abs=1e-12)
        assert decide(delta, judge) == statistics.verdict(row.delta_error_low, row.delta_error_high, 0.02)
        assert np.isnan(row.p_value)
    targets = on.examples().target.to_numpy()
    assert np.array_equal(targets, runs[0][1].numpy()[adaptive.order(len(x), 0)])


def test_adaptive_fast_equals_the_plain_reference():
    model, states, data = _trained(1200)
    kw = dict(seeds=1, init="torch", progress=False, adaptive=True)
    fast, naive = (criticality.analyze(model, states, data, engine=e, **kw) for e in ("fast", "naive"))
    assert fast.table.n.tolist() == naive.table.n.tolist() and (fast.table.n < 1200).any()
    assert np.array_equal(fast.table.error.to_numpy(), naive.table.error.to_numpy())
    assert np.allclose(fast.table.loss.to_numpy(), naive.table.loss.to_numpy(), rtol=0, atol=1e-6)
    assert np.array_equal(fast.table.delta_error_low.to_numpy(), naive.table.delta_error_low.to_numpy(),
                          equal_nan=True)


def test_label_free_verdicts_judge_disagreement():
    model, states, (x, _) = _trained(2000)
    kw = dict(seeds=1, init="torch", progress=False, metrics=("agreement",), threshold=0.05)
    full, on = (criticality.analyze(model, states, x, adaptive=a, **kw) for a in (False, True))
    assert on.summary["verdict_metric"] == "disagreement" and (on.table.n < len(x)).any()
    f, a = full.verdicts.set_index("group").verdict, on.verdicts.set_index("group").verdict
    conclusive = f[f != "inconclusive"].index
    assert len(conclusive) and (a[conclusive] == f[conclusive]).all()
    stopped = on.table[(on.table.n < len(x)) & (on.table.op != "final")]
    # the sequence was on disagreement = −Δ agreement: its ends, flipped back, clear the threshold
    assert all(statistics.verdict(-hi, -lo, 0.05) != "inconclusive"
               for lo, hi in zip(stopped.delta_agreement_low, stopped.delta_agreement_high, strict=True))


def test_adaptive_store_resumes(tmp_path):
    model, states, data = _trained(1500)
    store = str(tmp_path / "cells.jsonl")
    kw = dict(seeds=1, init="torch", progress=False, adaptive=True, store=store)
    first = criticality.analyze(model, states, data, **kw)
    lines = (tmp_path / "cells.jsonl").read_text().splitlines()
    again = criticality.analyze(model, states, data, **kw)
    assert (tmp_path / "cells.jsonl").read_text().splitlines() == lines  # nothing recomputed
    assert again.table.equals(first.table)


def test_adaptive_refusals():
    model, states, (x, y) = _trained(400)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100)
    with pytest.raises(CriticalityError, match="in memory"):
        criticality.analyze(model, states, loader, seeds=0, init="torch", progress=False, adaptive=True)
    with pytest.raises(CriticalityError, match="0/1 value per example"):
        criticality.analyze(model, states, (x, y), seeds=0, init="torch", progress=False, adaptive=True,
                            verdict_metric="loss")


def test_heatmap_marks_and_report_sentence(runs):
    (x, _), r = runs
    on = r["on"]
    fig = heatmaps.robustness_heatmap(on.table, threshold=0.02)
    texts = [t.get_text() for t in fig.axes[0].texts]
    stopped = on.table[(on.table.n < len(x)) & (on.table.op == "reinit")]
    assert sum(t.endswith("†") for t in texts) >= len(stopped) > 0
    assert "adaptive evaluation stopped the cell early" in fig._supxlabel.get_text()
    plain = heatmaps.robustness_heatmap(r["plain"].table, threshold=0.02)
    assert not any("†" in t.get_text() for t in plain.axes[0].texts)
    sentence = report._adaptive(on.summary)
    assert "Adaptive evaluation" in sentence and f"{on.summary['adaptive_evaluation']['stopped_early']:,}" in sentence
    assert report._adaptive(r["plain"].summary) == ""


def test_cli_analyze_adaptive(tmp_path, capsys):
    run = train(TrainConfig(model="fcn-2x16", data="digits", epochs=2, batch_size=64, device="cpu"),
                tmp_path / "run", progress=False)
    code = cli.main(["--no-progress", "analyze", str(run), "--device", "cpu", "--seeds", "1", "--adaptive"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert summary["adaptive"] is True and summary["adaptive_evaluation"]["judged_cells"] == 9
    cells = pd.read_csv(run / "analysis" / "cells.csv")
    assert cells.n.iloc[0] == summary["adaptive_evaluation"]["examples"] and "verdict" in out
