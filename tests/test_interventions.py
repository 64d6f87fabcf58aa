"""The interventions (interpolate, noise, skip) against their references, on the analysis suite's toy models.

Run: ``PYTHONPATH=src pytest tests/test_interventions.py -q`` (about 1 min on 2 cores).

Every new cell computed by the fast engine equals the naive reference (deepcopy, load the variant, evaluate);
interpolation at α = 0 is re-initialization and at α = 1 the trained model; noise with σ = 0 is the trained
model and its draws follow the stated scale; skipping a residual block equals a hand-built model without it.
Joint skip: two Llama layers skipped together equal the model with both deleted (bit-exact, both engines), and
each run of ``skip_runs`` blocks equals the model rebuilt without the run; refusals carry the member's reason.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from criticality import interventions
from criticality.core import ops, stubs, surgery
from criticality.core.analysis import analyze
from criticality.core.stores import cell_key
from criticality.errors import CriticalityError
from criticality.interventions import Interpolate
from test_analysis import make_data, trajectory

OPS = ("reinit", "interpolate", "noise", "skip")
KW = dict(groups="auto", seeds=2, batch_size=64, progress=False, reinit_to=[0, 3], ops=OPS,
          alphas=(0.0, 0.5, 1.0), sigmas=(0.0, 0.3, 1.0))


@pytest.mark.filterwarnings("ignore:.*records no init_scheme")
@pytest.mark.parametrize("arch", ["fcn", "convbn", "residual", "tied"])
def test_every_new_cell_matches_the_reference(arch):
    model, states = trajectory(arch)
    data = make_data(seed=7)
    # convbn's auto groups are conv + BatchNorm, tied's middle group two tied layers: two modules each, which
    # one identity cannot stand for (and the other groups change shape), so no skip cells there.
    ops = OPS if arch not in ("convbn", "tied") else OPS[:-1]
    kw = {**KW, "groups": "model" if arch == "residual" else "auto", "ops": ops}
    fast = analyze(model, states, data, **kw)
    naive = analyze(model, states, data, engine="naive", **kw)
    t, n = fast.table, naive.table
    assert set(t.op) == {"final", *ops}
    assert t[["op", "group", "checkpoint", "seed", "alpha", "sigma"]].equals(
        n[["op", "group", "checkpoint", "seed", "alpha", "sigma"]])
    np.testing.assert_array_equal(t.error.to_numpy(), n.error.to_numpy())
    np.testing.assert_allclose(t.loss.to_numpy(), n.loss.to_numpy(), rtol=0, atol=1e-5)
    final = t[t.op == "final"].iloc[0]
    for _, cells in t[t.op != "final"].groupby("group"):
        interp = cells[cells.op == "interpolate"].set_index("alpha")
        reinit0 = cells[(cells.op == "reinit") & (cells.checkpoint == 0)].iloc[0]
        assert interp.loc[0.0, "error"] == reinit0.error and interp.loc[0.0, "loss"] == reinit0.loss
        assert interp.loc[1.0, "error"] == final.error and interp.loc[1.0, "loss"] == final.loss
        quiet = cells[(cells.op == "noise") & (cells.sigma == 0.0)]
        assert len(quiet) == 2 and (quiet.error == final.error).all() and (quiet.loss == final.loss).all()
    assert fast.summary["noise"]["convention"] == interventions.NOISE_CONVENTION
    if "skip" in ops:
        assert set(fast.summary["skip_modules"]) | set(fast.summary["skip_refused"]) == set(fast.groups.names)
    assert len(set(map(cell_key, t.to_dict("records")))) == len(t)


def test_noise_is_pure_seeded_and_scaled():
    model, states = trajectory("fcn")
    keys = ["3.weight", "3.bias"]
    final, start = states[3], states[0]
    s = interventions.noise_scale(final, start, keys)
    delta = torch.cat([(final[k].double() - start[k].double()).flatten() for k in keys])  # in float64, as documented
    assert s == pytest.approx(delta.norm().item() / math.sqrt(delta.numel()), rel=1e-12)
    before = {k: v.clone() for k, v in final.items()}
    a = interventions.add_noise(final, keys, 0.5 * s, interventions.noise_generator(1, "3"))
    b = interventions.add_noise(final, keys, 0.5 * s, interventions.noise_generator(1, "3"))
    c = interventions.add_noise(final, keys, 0.5 * s, interventions.noise_generator(2, "3"))
    assert all(torch.equal(final[k], before[k]) for k in final)  # input untouched
    assert all(torch.equal(a[k], b[k]) for k in keys) and not torch.equal(a["3.weight"], c["3.weight"])
    assert all(a[k] is final[k] for k in final if k not in keys)
    u = (a["3.weight"] - final["3.weight"]).double()
    assert u.std().item() == pytest.approx(0.5 * s, rel=0.15)  # 384 entries


def test_skip_of_a_residual_block_equals_the_model_without_it():
    model, states = trajectory("residual")
    x, y = make_data(seed=7)
    t = analyze(model, states, (x, y), groups="model", seeds=0, batch_size=64, progress=False,
                ops=("reinit", "skip")).table
    assert sorted(t[t.op == "skip"].group) == ["block1", "block2"]
    hand = copy.deepcopy(model)
    hand.load_state_dict(states[3])
    without = nn.Sequential(hand.stem, hand.block1, hand.head).eval()  # block2 left out by hand
    with torch.no_grad():
        want = (without(x).argmax(1) != y).double().mean().item()
    got = t[(t.op == "skip") & (t.group == "block2")].error.item()
    assert got == want


def test_skip_keeps_the_return_structure_and_refuses_with_reasons():
    class TupleLayer(nn.Module):  # returns (hidden, extra) as HF layers of older versions do
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.attention_type = "full"

        def forward(self, hidden_states, mask=None):
            return hidden_states + self.fc(hidden_states), None

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.layers, self.out = nn.Linear(36, 8), nn.ModuleList([TupleLayer(), TupleLayer()]), \
                nn.Linear(8, 5)

        def forward(self, x):
            h = self.inp(x.flatten(1))
            for layer in self.layers:
                assert layer.attention_type == "full"  # the parent reads an attribute of its layer
                h = layer(hidden_states=h)[0]
            return self.out(h)

    net = Net()
    groups = {"inp": ["inp"], "layers.0": ["layers.0"], "layers.1": ["layers.1"], "out": ["out"], "mixed":
              ["layers.1.fc.weight"]}
    with pytest.raises(CriticalityError, match="state dict|key"):
        interventions.plan_skips(net, {"mixed": ["layers.1.fc.weight"]}, torch.randn(2, 1, 6, 6))
    plan = interventions.plan_skips(net, {g: [k for k in net.state_dict() if k.startswith(p[0])]
                                          for g, p in groups.items() if g != "mixed"}, torch.randn(2, 1, 6, 6))
    assert plan.paths == {"layers.0": "layers.0", "layers.1": "layers.1"} and plan.outputs["layers.0"] == 2
    assert "maps shape (36,) to (8,)" in plan.refused["inp"]
    x = torch.randn(4, 1, 6, 6)
    with torch.no_grad():
        want = net.out(net.layers[1](net.inp(x.flatten(1)))[0])
        with stubs.skipping(net, ["layers.0"], plan.outputs):
            got = net(x)
        assert "forward" not in net.layers[0].__dict__  # restored
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bad_arguments_are_refused():
    model, states = trajectory("fcn")
    data = make_data()
    with pytest.raises(CriticalityError, match="unknown op"):
        analyze(model, states, data, groups="auto", ops=("reinit", "lesion"), progress=False)
    with pytest.raises(CriticalityError, match="alphas"):
        analyze(model, states, data, groups="auto", ops=("reinit", "interpolate"), alphas=(0.5, 2.0), progress=False)
    with pytest.raises(CriticalityError, match="no group can be skipped"):
        analyze(model, states, data, groups={"first": ["1"], "last": ["7"]}, ops=("reinit", "skip"), progress=False)
    assert surgery.interpolate(states[3], states[0], ["1.weight"], 1.0)["1.weight"].equal(states[3]["1.weight"])


def test_cli_runs_every_op_and_the_report_shows_them(tmp_path):
    """End to end at toy scale on the bundled digits: train, analyze with every op, draw, report."""
    from criticality.cli import main

    run = tmp_path / "run"
    assert main(["--no-progress", "train", "fcn-2x16", "--data", "digits", "--epochs", "2", "--device", "cpu",
                 "--max-train", "400", "--max-test", "200", "--out", str(run)]) == 0
    assert main(["--no-progress", "analyze", str(run), "--ops",
                 "reinit,rerandomize,interpolate,noise,skip,criticality,proxies", "--seeds", "1",
                 "--alphas", "0,0.5,1", "--sigmas", "0.5,1", "--device", "cpu"]) == 0
    analysis = run / "analysis"
    summary = json.loads((analysis / "summary.json").read_text())
    assert summary["ops"] == ["reinit", "rerandomize", "interpolate", "noise", "skip"]
    assert set(summary["skip_refused"]) == {"fc1", "fc3"} and summary["skip_modules"] == {"fc2": "fc2"}
    assert set(summary["module_criticality"]["mu"]) == {"fc1", "fc2", "fc3"}
    assert {r["target"] for r in summary["proxies"]["spearman"]} == {"reinit@0", "skip"}
    for name in ("module_criticality.csv", "module_criticality_points.csv", "proxies.csv"):
        assert (analysis / name).is_file()
    assert main(["--no-progress", "report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "Interventions beyond the paper" in html and 'id="module_criticality"' in html
    for stem in ("interpolation_error", "noise_error", "skip_error", "module_criticality", "proxies"):
        assert (run / "figures" / f"{stem}.png").is_file()
    assert main(["--no-progress", "analyze", str(run), "--ops", "reinit,lesion"]) == 2


def test_skipping_a_llama_layer_equals_the_model_without_it():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    layers = {f"layer{i}": [k for k in lm.state_dict() if k.startswith(f"model.layers.{i}.")] for i in range(3)}
    plan = interventions.plan_skips(lm, {**layers, "head": ["lm_head.weight"]}, inputs)
    assert plan.paths == {f"layer{i}": f"model.layers.{i}" for i in range(3)} and "head" in plan.refused
    without = copy.deepcopy(lm)
    del without.model.layers[1]
    with torch.no_grad():
        with stubs.skipping(lm, ["model.layers.1"], plan.outputs):
            got = lm(**inputs).logits
        want = without(**inputs, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_engine_reuses_the_prefix_in_front_of_a_skipped_block():
    from criticality.core.engine import Engine, Variant

    model, states = trajectory("residual")
    fast = Engine(model, states[3], make_data(seed=7), batch_size=64)
    assert fast.position(Variant("skip block2", {}, keys=(), skip=("block2",))) == 2  # stem, block1 cached


def test_an_operation_object_carries_its_own_parameters_and_a_registered_op_joins_the_grid():
    model, states = trajectory("fcn")
    data = make_data()
    by_name = analyze(model, states, data, groups="auto", seeds=0, ops=("interpolate",), alphas=(0.0, 0.5),
                      source=1, progress=False)
    by_object = analyze(model, states, data, groups="auto", seeds=0, progress=False,
                        ops=[Interpolate(alphas=(0.0, 0.5), source=1)])
    pd.testing.assert_frame_equal(by_object.table, by_name.table)
    assert set(by_object.table.alpha.dropna()) == {0.0, 0.5} and set(by_object.table.checkpoint.dropna()) == {1, 3}

    @ops.register
    @dataclasses.dataclass(frozen=True)
    class Zero(ops.Operation):  # a user's operation: the group's parameters set to zero
        name: ClassVar[str] = "zero"

        def cells(self, group, joint):
            return [ops.Cell("zero", group, joint=joint)]

        def state(self, plan, cell):
            keys = ops.group_keys(plan, cell)
            return surgery.Overlay(plan.final_state, {k: torch.zeros_like(plan.final_state[k]) for k in keys})

        def moved_keys(self, plan, cell):
            return tuple(ops.group_keys(plan, cell))

    try:
        fast = analyze(model, states, data, groups="auto", seeds=0, ops=("reinit", "zero"), progress=False)
        naive = analyze(model, states, data, groups="auto", seeds=0, ops=("reinit", "zero"), engine="naive",
                        progress=False)
    finally:
        del ops.OPERATIONS["zero"]
    zero = fast.table[fast.table.op == "zero"]
    assert list(zero.group) == fast.groups.names
    np.testing.assert_array_equal(zero.error.to_numpy(), naive.table[naive.table.op == "zero"].error.to_numpy())
    # Zeroing any layer of a trained FCN costs accuracy: a check that the zero cells are what they say.
    assert (zero.error > fast.table[fast.table.op == "final"].error.iloc[0]).all()
    with pytest.raises(CriticalityError, match="unknown op 'zero'"):
        analyze(model, states, data, groups="auto", ops=("zero",), progress=False)


# ---- joint skip: several modules return their input at once (issue 27, part 1) ----

def _tiny_llama(layers: int = 4):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_joint_skip_of_two_llama_layers_equals_the_model_without_them(engine):
    lm = _tiny_llama(4)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    data = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    w = torch.randn(7, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def projection(logits, targets):  # (N,): a fixed random projection of each example's logits (N, 7, 50)
        return (logits.double() * w).sum(dim=(1, 2))

    state = lm.state_dict()
    result = analyze(lm, {0: state, 1: state}, data, groups="blocks", seeds=0, ops=("skip",), engine=engine,
                     joint=[["model.layers.1", "model.layers.2"]], metrics={"proj": projection}, batch_size=3,
                     progress=False)
    name = "model.layers.1+model.layers.2"
    assert result.summary["skip_modules"][name] == ["model.layers.1", "model.layers.2"]
    got = result.examples(op="skip", group=name).proj.to_numpy()
    without = copy.deepcopy(lm)
    del without.model.layers[2]  # the original layers 1 and 2, deleted by hand
    del without.model.layers[1]
    assert len(without.model.layers) == 2
    with torch.no_grad():
        want = projection(without(input_ids=ids, attention_mask=mask, use_cache=False).logits, None).numpy()
        full = projection(lm(input_ids=ids, attention_mask=mask, use_cache=False).logits, None).numpy()
    np.testing.assert_array_equal(got, want)  # bit-exact
    assert not np.array_equal(got, full)  # the cell is not the full model
    np.testing.assert_array_equal(result.examples().proj.to_numpy(), full)
    row = result.table[(result.table.op == "skip") & (result.table.group == name)].iloc[0]
    assert bool(row.joint)


class _Stack(nn.Module):
    """stem (36 → 8), four residual blocks, head (8 → 5): the stack is ``blocks.0`` … ``blocks.3``."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return x + torch.relu(self.fc(x))

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.stem, self.head = nn.Linear(36, 8), nn.Linear(8, 5)
        self.blocks = nn.ModuleList([self.Block() for _ in range(4)])
        with torch.no_grad():
            for b in self.blocks:  # blocks that matter: removing two of them changes predictions
                b.fc.weight.mul_(3.0)

    def forward(self, x):
        h = self.stem(x.flatten(1))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _hand_without(model: _Stack, removed: set[int], x: torch.Tensor) -> torch.Tensor:
    """The model rebuilt without the blocks ``removed``: its logits on ``x``."""
    kept = [copy.deepcopy(b) for i, b in enumerate(model.blocks) if i not in removed]
    chain = nn.Sequential(nn.Flatten(), copy.deepcopy(model.stem), *kept, copy.deepcopy(model.head)).eval()
    with torch.no_grad():
        return chain(x)


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_skip_runs_give_one_cell_per_run_equal_to_the_model_without_the_run(engine):
    model = _Stack().eval()
    x = torch.randn(200, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::7] = (y[::7] + 1) % 5  # final error about 1/7, not 0
    state = model.state_dict()
    t = analyze(model, {0: state, 1: state}, (x, y), groups="blocks", seeds=0, ops=("skip",), skip_runs=2,
                batch_size=64, engine=engine, progress=False).table
    runs = {f"blocks.{i}+blocks.{i + 1}": {i, i + 1} for i in range(3)}  # every 2 consecutive of 4 blocks
    skips = t[t.op == "skip"]
    assert list(skips.group) == [f"blocks.{i}" for i in range(4)] + list(runs)
    assert skips.set_index("group").joint.to_dict() == {**{f"blocks.{i}": False for i in range(4)},
                                                       **dict.fromkeys(runs, True)}
    errors = []
    for name, removed in runs.items():
        logits = _hand_without(model, removed, x)
        want = (logits.argmax(1) != y).double().mean().item()
        loss = nn.functional.cross_entropy(logits, y).item()
        row = skips[skips.group == name].iloc[0]
        assert row.error == want
        assert row.loss == pytest.approx(loss, abs=1e-5)
        errors.append(want)
    assert min(errors) > t[t.op == "final"].error.item() and len(set(errors)) == 3  # each run matters, differently


def test_joint_skip_and_runs_are_refused_with_the_members_reasons():
    model = _Stack().eval()
    x = torch.randn(20, 1, 6, 6)
    y = torch.zeros(20, dtype=torch.long)
    state = model.state_dict()
    kw = dict(seeds=0, ops=("skip",), progress=False)
    result = analyze(model, {0: state, 1: state}, (x, y), groups="blocks",
                     joint=[["stem", "blocks.0"], ["blocks.1", "blocks.3"]], **kw)
    refused = result.summary["skip_refused"]
    assert refused["stem+blocks.0"] == "member 'stem': module 'stem' maps shape (36,) to (8,): the identity " \
                                       "cannot replace it"
    assert result.summary["skip_modules"]["blocks.1+blocks.3"] == ["blocks.1", "blocks.3"]
    skips = result.table[result.table.op == "skip"]
    assert "stem+blocks.0" not in set(skips.group) and "blocks.1+blocks.3" in set(skips.group)
    # a run through a block that changes shape: refused with that block's reason
    runs = analyze(model, {0: state, 1: state}, (x, y), groups="blocks", skip_runs=3,
                   blocks=["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3"], **kw)
    assert runs.summary["skip_refused"]["stem+blocks.0+blocks.1"] == \
        "block 'stem' maps shape (36,) to (8,): the identity cannot replace it"
    assert {"blocks.0+blocks.1+blocks.2", "blocks.1+blocks.2+blocks.3"} <= set(runs.summary["skip_modules"])
    for bad in (0, -1, 2.5):
        with pytest.raises(CriticalityError, match="skip_runs must be a positive"):
            analyze(model, {0: state, 1: state}, (x, y), groups="blocks", skip_runs=bad, **kw)
    with pytest.raises(CriticalityError, match="at least 5 blocks"):
        analyze(model, {0: state, 1: state}, (x, y), groups="blocks", skip_runs=5, **kw)


def test_block_runs_are_every_window_of_k():
    blocks = ["a", "b", "c", "d"]
    for k in range(1, 5):
        want = {"+".join(blocks[i:i + k]): tuple(blocks[i:i + k]) for i in range(4 - k + 1)}
        assert interventions.skip.block_runs(blocks, k) == want
    assert interventions.skip.block_runs(blocks, None) == {}


def test_a_joint_group_that_is_one_module_skips_that_module():
    from criticality.core.groups import resolve

    lm = _tiny_llama(3)
    sub = resolve(lm, "sublayers")  # attention (+ its norm) and MLP (+ its norm) of each layer: not one module each
    whole = ("model.layers.1.self_attn", "model.layers.1.mlp")
    split = ("model.layers.1.self_attn", "model.layers.2.mlp")
    plan = interventions.plan_skips(lm, sub.members, {"input_ids": torch.randint(0, 50, (2, 5))},
                                    joint={"+".join(whole): whole, "+".join(split): split})
    assert plan.modules("+".join(whole)) == ("model.layers.1",)  # both sub-layers together are layer 1
    assert plan.refused["+".join(split)] == "; ".join(
        f"member {m!r}: its keys are not the state of one module (several modules, or part of one)" for m in split)


def test_cli_skip_runs_removes_consecutive_blocks_together(tmp_path):
    """`--skip-runs 2` reaches the grid from the CLI; the run fc2+fc3 equals the trained model rebuilt with both
    layers replaced by the identity and evaluated by hand."""
    from safetensors.torch import load_file

    from criticality.cli import main
    from criticality.paper import data as datasets
    from criticality.paper import models

    run = tmp_path / "run"
    assert main(["--no-progress", "train", "fcn-3x16", "--data", "digits", "--epochs", "2", "--device", "cpu",
                 "--max-train", "400", "--max-test", "200", "--out", str(run)]) == 0
    assert main(["--no-progress", "analyze", str(run), "--ops", "reinit,skip", "--skip-runs", "2", "--seeds", "0",
                 "--device", "cpu"]) == 0
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert summary["skip_modules"]["fc2+fc3"] == ["fc2", "fc3"]
    assert "fc1+fc2" in summary["skip_refused"] and "fc2+fc3" not in {v["group"] for v in summary["verdicts"]}
    cells = pd.read_csv(run / "analysis" / "cells.csv")
    got = cells[(cells.op == "skip") & (cells.group == "fc2+fc3")].error
    config = json.loads((run / "config.json").read_text())
    model = models.build(**config["model"]["build"])
    final = max(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("epoch_*.safetensors"))
    model.load_state_dict(load_file(str(run / "checkpoints" / f"epoch_{final:04d}.safetensors")))
    model.fc2, model.fc3 = nn.Identity(), nn.Identity()
    x, y = datasets.load("digits", max_train=400, max_test=200).test
    with torch.no_grad():
        wrong = int((model.eval()(x).argmax(1) != y).sum())
    assert len(got) == 1 and got.iloc[0] == wrong / len(y)  # k/n, exactly as the table stores it
