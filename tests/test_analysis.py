"""The analysis core against its plain reference, on architectures chosen to break it.

Run: ``.venv/bin/pytest tests/test_analysis.py -q`` (about 20 s on 2 cores).

Every cell of the grid computed by the fast engine is compared with the reference (deepcopy the model,
``load_state_dict`` the variant, evaluate): errors exactly, losses to 1e-5, on a plain chain, a bias-free
layer with LayerNorm, a conv net with BatchNorm, a residual net that declares its stages, and a model with
tied weights. Then the invariants that prove the bookkeeping (buffers travel, seeds are honoured).
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import criticality
from criticality.core import engine, groups, surgery
from criticality.core.analysis import analyze, distances, tabulate, verdicts
from criticality.errors import CriticalityError
from toy import ARCHS, TRICKY

BATCH = 64


def make_data(n: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    teacher = torch.randn(36, 5, generator=g)
    y = (x.flatten(1) @ teacher).argmax(1)
    return x, y


def trajectory(arch: str, epochs=(0, 1, 3), seed: int = 0):
    """A short real training run: the state dict at each epoch of a few SGD steps per epoch."""
    torch.manual_seed(seed)
    model = ARCHS[arch]()
    x, y = make_data(seed=seed + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    states = {0: copy.deepcopy(model.state_dict())}
    for epoch in range(1, max(epochs) + 1):
        model.train()
        for i in range(0, len(x), 50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 50]), y[i:i + 50]).backward()
            opt.step()
        if epoch in epochs:
            states[epoch] = copy.deepcopy(model.state_dict())
    return model, states


@pytest.fixture(scope="module", params=list(ARCHS))
def run(request):
    model, states = trajectory(request.param)
    return request.param, model, states, make_data(seed=7)


def test_every_cell_matches_the_reference(run):
    arch, model, states, data = run
    kw = dict(groups="auto", seeds=2, batch_size=BATCH, progress=False, reinit_to=[0, 1, 3])
    fast = analyze(model, states, data, engine="fast", **kw).table
    naive = analyze(model, states, data, engine="naive", **kw).table
    assert len(fast) == len(naive) > 8
    assert fast[["op", "group", "checkpoint", "seed"]].equals(naive[["op", "group", "checkpoint", "seed"]])
    np.testing.assert_array_equal(fast.error.to_numpy(), naive.error.to_numpy())
    np.testing.assert_allclose(fast.loss.to_numpy(), naive.loss.to_numpy(), rtol=0, atol=1e-5)
    # And the reference itself against an independent evaluation of one hand-built variant.
    final = states[3]
    first = groups.resolve(model, "auto").names[0]
    by_hand = copy.deepcopy(model)
    by_hand.load_state_dict({**final, **{k: states[0][k] for k in groups.resolve(model, "auto").members[first]}})
    with torch.no_grad():
        logits = by_hand.eval()(data[0])
    want = (logits.argmax(1) != data[1]).double().mean().item()
    row = fast[(fast.op == "reinit") & (fast.group == first) & (fast.checkpoint == 0)].iloc[0]
    assert row.error == pytest.approx(want, abs=1e-12)


def test_invariants(run):
    arch, model, states, data = run
    names = groups.resolve(model, "auto").names
    kw = dict(groups="auto", reinit_to=[0, 3], batch_size=BATCH, progress=False)
    t = analyze(model, states, data, seeds=[5, 6], joint=[names] if len(names) > 1 else None, **kw).table
    final_error = t[t.op == "final"].error.iloc[0]
    # Re-init to the final checkpoint reproduces the final model.
    assert (t[(t.op == "reinit") & (t.checkpoint == 3)].error == final_error).all()
    # Re-init of all groups at once to epoch 0 reproduces the initial model: buffers travel too.
    initial = engine.evaluate_naive(model, states[0], data, batch_size=BATCH)
    if len(names) > 1:
        everything = t[(t.op == "reinit") & t.joint & (t.checkpoint == 0)]
        assert everything.error.iloc[0] == initial["error"]
        assert everything.loss.iloc[0] == pytest.approx(initial["loss"], abs=1e-5)
    # Same seed in a separate run: bit-identical; another seed: different.
    again = analyze(model, states, data, seeds=[5], **kw).table
    rand, rand_again = t[(t.op == "rerandomize") & ~t.joint], again[again.op == "rerandomize"]
    five = rand[rand.seed == 5].reset_index(drop=True)
    assert five[["group", "error", "loss"]].equals(rand_again[["group", "error", "loss"]].reset_index(drop=True))
    six = rand[rand.seed == 6].reset_index(drop=True)
    assert (six.loss != five.loss).all()


def test_fresh_draws_are_reproducible_and_honour_the_scheme():
    model, _ = trajectory("fcn")
    a = surgery.fresh_state(model, "glorot", 3)
    b = surgery.fresh_state(model, "glorot", 3)
    c = surgery.fresh_state(model, "glorot", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["1.weight"], c["1.weight"])
    assert torch.count_nonzero(a["1.bias"]) == 0  # glorot: zero biases
    bound = (6 / (36 + 24)) ** 0.5
    assert a["1.weight"].abs().max() <= bound
    before = torch.random.get_rng_state()
    surgery.fresh_state(model, "torch", 3)
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is untouched


def test_surgery_is_pure_and_strict():
    _, states = trajectory("convbn")
    final, start = states[3], states[0]
    snapshot = {k: v.clone() for k, v in final.items()}
    keys = [k for k in final if k.startswith("1.")]  # BatchNorm: weight, bias, running stats, counter
    out = surgery.reinit(final, start, keys)
    assert all(torch.equal(final[k], snapshot[k]) for k in final)
    assert all(torch.equal(out[k], start[k]) for k in keys)
    kept = surgery.reinit(final, start, keys, buffers="keep", buffer_keys={"1.running_mean", "1.running_var",
                                                                            "1.num_batches_tracked"})
    assert torch.equal(kept["1.running_mean"], final["1.running_mean"])
    assert torch.equal(kept["1.weight"], start["1.weight"])
    with pytest.raises(CriticalityError, match="keys not in"):
        surgery.reinit(final, start, ["nope.weight"])
    with pytest.raises(CriticalityError, match="empty"):
        surgery.reinit(final, start, [])
    half = surgery.interpolate(final, start, ["0.weight"], 0.5)
    assert torch.allclose(half["0.weight"], (final["0.weight"] + start["0.weight"]) / 2)


def test_groups_auto_blocks_patterns_and_ties():
    conv = ARCHS["convbn"]()
    auto = groups.resolve(conv, "auto")
    assert auto.names == ["0", "4", "9"]
    assert "1.running_var" in auto.members["0"] and "1.num_batches_tracked" in auto.members["0"]
    assert auto.unassigned == ()
    tied = groups.resolve(ARCHS["tied"](), "auto")
    owner = [g for g, ks in tied.members.items() if "mid1.weight" in ks]
    assert "mid2.weight" in tied.members[owner[0]]
    with pytest.raises(CriticalityError, match="must be in one group"):
        groups.resolve(ARCHS["tied"](), {"a": ["mid1"], "b": ["mid2"]})
    with pytest.raises(CriticalityError, match="matches no state-dict key"):
        groups.resolve(conv, {"x": ["conv99.*"]})
    explicit = groups.resolve(conv, {"first": ["0", "1"], "last": ["9.*"]})
    assert set(explicit.unassigned) == set(auto.members["4"])
    assert groups.resolve(ARCHS["residual"](), "blocks").names == ["stem", "block1", "block2", "head"]
    with pytest.raises(CriticalityError, match="declares no layer_groups"):
        groups.resolve(conv, "model")


def test_engine_paths_agree_chunks_loaders_and_restore():
    model, states = trajectory("residual")
    data = make_data(seed=9)
    cells = [engine.Variant(("b1", s), {k: v for k, v in states[s].items() if k.startswith("block1.")})
             for s in (0, 1)] + [engine.Variant("final")]
    one = dict(engine.Engine(model, states[3], data, batch_size=BATCH).evaluate(cells))
    tiny = engine.Engine(model, states[3], data, batch_size=BATCH, max_cache_bytes=1)  # one batch per chunk
    many = dict(tiny.evaluate(cells))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=BATCH)
    streamed = dict(engine.Engine(model, states[3], loader, batch_size=BATCH).evaluate(cells))
    for k in one:
        assert one[k]["error"] == many[k]["error"] == streamed[k]["error"]
        assert one[k]["loss"] == pytest.approx(many[k]["loss"], abs=1e-9)
    limited = dict(engine.Engine(model, states[3], data, batch_size=BATCH, limit=100).evaluate(cells))
    assert limited["final"]["n"] == 100
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with pytest.raises(RuntimeError), engine.swapped(tiny.model, cells[0].entries):
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())


def test_non_finite_weights_are_recorded_not_fatal():
    model, states = trajectory("fcn")
    broken = {**states[0], "1.weight": torch.full_like(states[0]["1.weight"], float("inf"))}
    t = analyze(model, {0: broken, 3: states[3]}, make_data(), groups="auto", seeds=1, progress=False).table
    bad = t[(t.op == "reinit") & (t.group == "1")]
    assert not bad.finite.iloc[0] and t[t.op == "final"].finite.iloc[0]


def test_distances_match_a_hand_computation():
    _, states = trajectory("fcn")
    d = distances(states, {"first": ["1.weight", "1.bias"]})
    theta = lambda e: torch.cat([states[e]["1.weight"].flatten(), states[e]["1.bias"].flatten()]).double()  # noqa: E731
    want = ((theta(3) - theta(0)).norm() / theta(0).norm()).item()
    assert d[d.checkpoint == 3].l2_rel.iloc[0] == pytest.approx(want)  # l2 is the paper's: tests/test_distances.py
    at0 = d[d.checkpoint == 0][["l2", "linf", "l2_rel", "linf_rel", "cosine"]]
    assert at0.abs().max().max() == pytest.approx(0, abs=1e-12)


def test_verdicts_and_summary():
    model, states = trajectory("fcn")
    r = criticality.analyze(model, states, make_data(), groups="auto", seeds=2, threshold=0.5, progress=False)
    assert set(r.verdicts.verdict) <= {"robust", "critical", "inconclusive"}
    assert (r.verdicts.point_verdict == np.where(r.verdicts.delta_error <= 0.5, "robust", "critical")).all()
    json.dumps(r.summary, default=str)
    with pytest.raises(CriticalityError, match="no epoch 0"):
        criticality.analyze(model, {1: states[1], 3: states[3]}, make_data(), groups="auto", seeds=1,
                            progress=False)


def test_resume_computes_only_missing_cells(tmp_path, monkeypatch):
    model, states = trajectory("fcn")
    store = tmp_path / "cells.jsonl"
    kw = dict(groups="auto", seeds=2, batch_size=BATCH, progress=False, store=str(store))
    full = analyze(model, states, make_data(), **kw).table
    lines = store.read_text().splitlines()
    store.write_text("\n".join(lines[:5]) + "\n" + lines[5][:10])  # 4 cells kept, a torn fifth
    seen = []
    real = engine.Engine.evaluate
    monkeypatch.setattr(engine.Engine, "evaluate",
                        lambda self, vs: (seen.extend(v.id for v in vs), real(self, vs))[1])
    again = analyze(model, states, make_data(), **kw).table
    assert len(seen) == len(full) - 4
    assert again.drop(columns=[]).equals(full)
    with pytest.raises(CriticalityError, match="other settings"):
        analyze(model, states, make_data(), **{**kw, "groups": {"a": ["1"], "b": ["3", "5", "7"]}})


def test_recalibrated_buffers_match_an_independent_average():
    """buffers="recalibrate": the group's BatchNorm statistics are the exact mean/var of its input."""
    model, states = trajectory("convbn")
    x, y = make_data(n=200, seed=3)
    final = states[3]
    keys = groups.resolve(model, "auto").members["0"]  # conv 0 + BatchNorm 1
    variant = surgery.reinit(final, states[0], keys)
    out = surgery.recalibrate(model, variant, keys, [x[:100], x[100:]])
    conv = nn.Conv2d(1, 6, 3, padding=1)
    conv.load_state_dict({"weight": variant["0.weight"], "bias": variant["0.bias"]})
    with torch.no_grad():
        h = conv(x)  # (200, 6, 6, 6): the BatchNorm's input
    per_batch = [h[:100], h[100:]]
    want_mean = torch.stack([b.mean((0, 2, 3)) for b in per_batch]).mean(0)
    want_var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in per_batch]).mean(0)
    assert torch.allclose(out["1.running_mean"], want_mean, atol=1e-5)
    assert torch.allclose(out["1.running_var"], want_var, atol=1e-5)
    assert torch.equal(out["5.running_mean"], final["5.running_mean"])  # other groups untouched
    t = analyze(model, states, (x, y), groups="auto", seeds=1, buffers="recalibrate", calibration=(x, y),
                batch_size=BATCH, progress=False).table
    naive = analyze(model, states, (x, y), groups="auto", seeds=1, buffers="recalibrate", calibration=(x, y),
                    batch_size=BATCH, progress=False, engine="naive").table
    np.testing.assert_array_equal(t.error.to_numpy(), naive.error.to_numpy())
    with pytest.raises(CriticalityError, match="calibration"):
        analyze(model, states, (x, y), groups="auto", buffers="recalibrate", progress=False)


@pytest.mark.parametrize("arch", list(TRICKY))
def test_engine_is_never_fooled_by_a_chain_that_is_not_the_forward(arch):
    """Each model here breaks an assumption of prefix caching; the engine must still equal the reference."""
    torch.manual_seed(0)
    model = TRICKY[arch]()
    x, y = make_data(seed=2)
    states = {0: copy.deepcopy(model.state_dict())}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    states[1] = copy.deepcopy(model.state_dict())
    kw = dict(groups="auto", seeds=1, batch_size=BATCH, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the engine warns when it falls back to the full forward
        fast = analyze(model, states, (x, y), **kw).table
    naive = analyze(model, states, (x, y), engine="naive", **kw).table
    np.testing.assert_array_equal(fast.error.to_numpy(), naive.error.to_numpy())
    np.testing.assert_allclose(fast.loss.to_numpy(), naive.loss.to_numpy(), rtol=0, atol=1e-5)


def test_a_parameter_the_init_scheme_does_not_draw_is_an_error():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(36, 5)
            self.scale = nn.Parameter(torch.ones(5))  # no reset_parameters draws it

        def forward(self, x):
            return self.fc(x.flatten(1)) * self.scale

    with pytest.raises(CriticalityError, match="does not draw scale"):
        surgery.fresh_state(Scaled(), "torch", 0)
    attention = nn.MultiheadAttention(8, 2)  # initialized by _reset_parameters only
    fresh = surgery.fresh_state(attention, "torch", 0)
    assert not torch.equal(fresh["in_proj_weight"], attention.in_proj_weight)


def test_a_delta_equal_to_the_threshold_is_robust():
    table = pd.DataFrame([
        {"op": "final", "group": "", "joint": False, "checkpoint": 3, "seed": None, "error": 0.1001,
         "loss": 1.0, "n": 10000},
        {"op": "reinit", "group": "a", "joint": False, "checkpoint": 0, "seed": None, "error": 0.1201,
         "loss": 1.0, "n": 10000}])
    assert tabulate(table.to_dict("records"), ["error", "loss"]).delta_error.iloc[1] > 0.02  # float noise
    v = verdicts(tabulate(table.to_dict("records"), ["error", "loss"]), 0.02, rule="point")
    assert v.verdict.iloc[0] == "robust"


def test_stored_cells_are_not_reused_for_other_data(tmp_path):
    model, states = trajectory("fcn")
    store = str(tmp_path / "cells.jsonl")
    analyze(model, states, make_data(seed=1), groups="auto", seeds=1, progress=False, store=store)
    with pytest.raises(CriticalityError, match=r"other settings \(differs: data\)"):
        analyze(model, states, make_data(seed=2), groups="auto", seeds=1, progress=False, store=store)


def test_warns_when_the_init_scheme_is_a_guess():
    model, states = trajectory("fcn")
    with pytest.warns(UserWarning, match="records no init_scheme"):
        analyze(model, states, make_data(), groups="auto", seeds=1, progress=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": float("nan")}, "threshold must be a finite number"),
    ({"threshold": "0.1"}, "threshold must be a finite number"),
    ({"threshold": float("inf")}, "threshold must be a finite number"),
    ({"stats_seed": -1}, "stats_seed must be a non-negative integer"),
    ({"stats_seed": 1.5}, "stats_seed must be a non-negative integer"),
    ({"init": 123}, "init must be a scheme name"),
    ({"verdict": "vote"}, "unknown verdict rule"),
])
def test_bad_judging_arguments_are_one_line_errors_before_any_cell(kwargs, message, monkeypatch):
    model, states = trajectory("fcn")
    monkeypatch.setattr("criticality.core.run._evaluate", lambda *a, **k: pytest.fail("a cell ran"))
    with pytest.raises(CriticalityError, match=message):
        analyze(model, states, make_data(), groups="auto", seeds=1, progress=False, **kwargs)


def test_a_store_that_is_a_directory_is_a_one_line_error(tmp_path):
    model, states = trajectory("fcn")
    with pytest.raises(CriticalityError, match="is a directory"):
        analyze(model, states, make_data(), groups="auto", seeds=1, progress=False, store=str(tmp_path))
    result = analyze(model, states, make_data(), groups="auto", seeds=1, progress=False, threshold=np.float32(0.02),
                     stats_seed=np.int64(3))  # numpy scalars are numbers too
    assert result.summary["threshold"] == pytest.approx(0.02) and result.summary["bootstrap"]["seed"] == 3
