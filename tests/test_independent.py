"""Checks that cannot be fooled: every expected value is computed here, without the code under test.

Run: ``.venv/bin/pytest tests/test_independent.py -q`` (about 30 s on 2 cores; synthetic data, CPU).

- every cell of a grid (final, re-init to each epoch, re-randomization, joint) against a variant whose
  state dict is built here key by key (outside the group: the final model's tensors; inside: the source's)
  and evaluated by a plain loop; the fresh draws equal ``fresh_state`` for the same seed and differ from
  epoch 0; ``init=`` as a callable; ``final=``; ``buffers="keep"`` end to end;
- a "critical" and a "robust" verdict from a model built by hand (no optional data needed);
- Glorot and Kaiming standard deviations against their formulas (±10 %), far from PyTorch's default;
- the whole lr sequence of the step and cosine schedules; resuming with them equals an uninterrupted run;
- ``max_examples=N`` gives exactly the values of the first N examples; distances at a non-zero checkpoint
  and interpolation at α = 0.3 against hand computation; the guard against a draw that reproduces the
  initialization; prefix caching really used (fewer first-layer calls than the naive loop);
- the paper's training settings (Appendix A, docs/paper.md) at paper scale; LOCAL_RANK selecting the GPU;
  the joint groups of Figs 9 and 10 by their members.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from criticality.core import initializers, ops, surgery
from criticality.core.analysis import analyze
from criticality.errors import CriticalityError
from criticality.infra import distributed
from criticality.paper import experiments, models
from criticality.paper.train import train
from criticality.paper.training.config import TrainConfig
from criticality.paper.training.schedules import scheduler as _scheduler

N = 200


def data(seed: int = 0, n: int = N):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x.flatten(1) @ torch.randn(36, 5, generator=g)).argmax(1)
    return x, y


def fcn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5))


GROUPS = {"fc1": ["1.weight", "1.bias"], "fc2": ["3.weight", "3.bias"], "fc3": ["5.weight", "5.bias"]}


def states(model: nn.Module) -> dict[int, dict[str, torch.Tensor]]:
    """Epochs 0, 1, 3 of a few SGD steps on the synthetic data."""
    x, y = data(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    out = {0: copy.deepcopy(model.state_dict())}
    for epoch in (1, 2, 3):
        for i in range(0, len(x), 50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 50]), y[i:i + 50]).backward()
            opt.step()
        if epoch != 2:
            out[epoch] = copy.deepcopy(model.state_dict())
    return out


def plain_eval(model: nn.Module, state: dict, x, y) -> tuple[float, float]:
    """Error and mean cross-entropy of ``model`` loaded with ``state``: one forward of the whole set."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    with torch.no_grad():
        logits = m.eval()(x).double()
    return (logits.argmax(1) != y).double().mean().item(), nn.functional.cross_entropy(logits, y).item()


def small_normal(model: nn.Module) -> None:
    """A user's own init scheme (a callable), drawing from the global RNG as initialize() arranges."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.2)
            nn.init.normal_(module.bias, std=0.1)


@pytest.mark.parametrize("init", ["glorot", small_normal], ids=["glorot", "callable"])
def test_every_cell_against_a_variant_built_here(init):
    model = fcn()
    sd = states(model)
    x, y = data(7)
    result = analyze(model, sd, (x, y), groups=GROUPS, seeds=[0, 4], joint=[["fc2", "fc3"]], init=init,
                     batch_size=64, progress=False)
    final = sd[3]
    for row in result.table.itertuples():
        keys = [k for g in row.group.split("+") for k in GROUPS[g]] if row.group else []
        if row.op == "final":
            source = final
        elif row.op == "reinit":
            source = sd[int(row.checkpoint)]
        else:
            seed = int(row.seed)
            fresh = surgery.fresh_state(model, init, ops.RERANDOMIZE_SALT + seed)  # contract 5: whole model
            assert all(not torch.equal(fresh[k], sd[0][k]) for k in keys if fresh[k].numel() > 1)
            source = fresh
        variant = {k: (source[k] if k in keys else final[k]).clone() for k in final}  # built key by key
        assert set(variant) == set(final) and all(torch.equal(variant[k], final[k]) for k in final if k not in keys)
        error, loss = plain_eval(model, variant, x, y)
        assert row.error == pytest.approx(error, abs=1e-12), row
        assert row.loss == pytest.approx(loss, abs=1e-5), row
    assert len(result.table) == 1 + 4 * (2 + 2)


def test_final_names_the_model_and_limits_reinit():
    model = fcn()
    sd = states(model)
    x, y = data(7)
    t = analyze(model, sd, (x, y), groups=GROUPS, seeds=0, final=1, init="torch", progress=False).table
    assert t[t.op == "final"].error.iloc[0] == pytest.approx(plain_eval(model, sd[1], x, y)[0], abs=1e-12)
    assert sorted(t[t.op == "reinit"].checkpoint.unique()) == [0]  # only epochs before the final one


def convbn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(144, 5))


def test_buffers_keep_end_to_end():
    """keep: the group's weights move to epoch 0, its BatchNorm running statistics stay as trained."""
    model = convbn()
    sd = states(model)
    x, y = data(7)
    groups = {"conv": ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                       "1.num_batches_tracked"], "fc": ["4.weight", "4.bias"]}
    t = analyze(model, sd, (x, y), groups=groups, seeds=0, buffers="keep", init="torch", progress=False).table
    row = t[(t.op == "reinit") & (t.group == "conv") & (t.checkpoint == 0)].iloc[0]
    buffers = {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    variant = {k: (sd[0][k] if k in groups["conv"] and k not in buffers else sd[3][k]) for k in sd[3]}
    assert not torch.equal(sd[0]["1.running_mean"], sd[3]["1.running_mean"])  # keep is not reset here
    assert row.error == pytest.approx(plain_eval(model, variant, x, y)[0], abs=1e-12)
    assert row.loss == pytest.approx(plain_eval(model, variant, x, y)[1], abs=1e-5)


def test_critical_and_robust_verdicts_from_a_model_built_by_hand():
    """fc1 carries the teacher (resetting it is chance: critical); fc2 is a scaled identity (resetting the
    scale changes no argmax: robust)."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(5, 36, generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.Linear(5, 5))
    final = {"1.weight": teacher, "1.bias": torch.zeros(5), "2.weight": 10 * torch.eye(5), "2.bias": torch.zeros(5)}
    start = {"1.weight": torch.randn(5, 36, generator=g), "1.bias": torch.zeros(5), "2.weight": torch.eye(5),
             "2.bias": torch.zeros(5)}
    x = torch.randn(400, 1, 6, 6, generator=g)
    y = (x.flatten(1) @ teacher.T).argmax(1)
    r = analyze(model, {0: start, 5: final}, (x, y), groups={"fc1": ["1.*"], "fc2": ["2.*"]}, seeds=0, init="torch",
                progress=False)
    v = r.verdicts.set_index("group")
    assert r.table[r.table.op == "final"].error.iloc[0] == 0
    assert v.loc["fc1", "verdict"] == "critical" and v.loc["fc1", "delta_error"] > 0.5
    assert v.loc["fc2", "verdict"] == "robust" and v.loc["fc2", "delta_error"] == 0


def _std(model: nn.Module, scheme, key: str) -> float:
    initializers.initialize(model, scheme, torch.Generator().manual_seed(0))
    return model.state_dict()[key].std().item()


def test_glorot_and_kaiming_match_their_formulas_not_the_default():
    linear = nn.Sequential(nn.Linear(400, 100))
    glorot = math.sqrt(2 / (400 + 100))
    assert _std(linear, "glorot", "0.weight") == pytest.approx(glorot, rel=0.10)
    assert abs(_std(linear, "torch", "0.weight") - glorot) > 0.3 * glorot  # the default is far from it
    conv = nn.Sequential(nn.Conv2d(64, 128, 3))
    kaiming = math.sqrt(2 / (128 * 9))  # fan_out mode, ReLU gain
    assert _std(conv, "kaiming", "0.weight") == pytest.approx(kaiming, rel=0.10)
    assert abs(_std(conv, "torch", "0.weight") - kaiming) > 0.3 * kaiming


def test_step_and_cosine_schedules_whole_sequence():
    def lrs(schedule: str, epochs: int) -> list[float]:
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = _scheduler(opt, TrainConfig(epochs=epochs, lr=0.1, schedule=schedule).lr_schedule)
        out = []
        for _ in range(epochs):
            out.append(opt.param_groups[0]["lr"])  # the lr epoch e trains with
            opt.step()
            sched.step()
        return out

    assert lrs("step", 8) == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)  # ×0.1 at 50 % and 75 %
    assert lrs("constant", 5) == [0.1] * 5
    assert lrs("cosine", 4) == pytest.approx([0.05 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_resuming_with_a_schedule_equals_an_uninterrupted_run(tmp_path, monkeypatch, schedule):
    config = dict(model="fcn-2x16", data="digits", epochs=4, batch_size=128, max_train=400, device="cpu",
                  schedule=schedule, checkpoints="0,2,4")
    whole = train(TrainConfig(**config), tmp_path / "whole", progress=False)
    from criticality.paper import train as train_mod

    original = train_mod._check_finite

    def killed_in_epoch_3(record, *args):
        if record["epoch"] == 3:
            raise KeyboardInterrupt
        original(record, *args)

    monkeypatch.setattr(train_mod, "_check_finite", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**config), tmp_path / "split", progress=False)
    monkeypatch.undo()
    split = train(TrainConfig(**config), tmp_path / "split", progress=False)
    from criticality.core.checkpoints import load_checkpoint

    a, b = load_checkpoint(whole, 4), load_checkpoint(split, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [line for line in (split / "log.jsonl").read_text().splitlines()]
    assert len(log) == 5


def test_max_examples_takes_the_first_n():
    model = fcn()
    sd = states(model)
    x, y = data(7)
    kw = dict(groups=GROUPS, seeds=1, init="torch", batch_size=32, progress=False)
    limited = analyze(model, sd, (x, y), max_examples=70, **kw).table
    first = analyze(model, sd, (x[:70], y[:70]), **kw).table
    assert (limited.n == 70).all()
    assert limited.error.tolist() == first.error.tolist()
    assert limited.loss.to_numpy() == pytest.approx(first.loss.to_numpy(), abs=1e-9)


def test_distances_at_a_non_zero_checkpoint_by_hand():
    model = fcn()
    sd = states(model)
    d = analyze(model, sd, data(7), groups=GROUPS, seeds=0, init="torch", progress=False).distances
    row = d[(d.group == "fc2") & (d.checkpoint == 3)].iloc[0]
    t0 = torch.cat([sd[0]["3.weight"].flatten(), sd[0]["3.bias"]]).double()
    t3 = torch.cat([sd[3]["3.weight"].flatten(), sd[3]["3.bias"]]).double()
    # l2 / linf are the paper's (÷ √n, absolute); l2_rel / linf_rel divide by θ0's norms (issue 17)
    assert row.l2 == pytest.approx(((t3 - t0).norm() / t0.numel() ** 0.5).item(), rel=1e-9)
    assert row.linf == pytest.approx((t3 - t0).abs().max().item(), rel=1e-9)
    assert row.l2_rel == pytest.approx(((t3 - t0).norm() / t0.norm()).item(), rel=1e-9)
    assert row.linf_rel == pytest.approx(((t3 - t0).abs().max() / t0.abs().max()).item(), rel=1e-9)
    assert row.cosine == pytest.approx(1 - (t3 @ t0 / (t3.norm() * t0.norm())).item(), abs=1e-9)
    assert row.l2_rel > 0.01


def test_interpolate_off_the_midpoint():
    a = {"w": torch.tensor([0.0, 1.0, -2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 3.0, 2.0]), "n": torch.tensor(7)}
    out = surgery.interpolate(b, a, ["w"], 0.3)  # 0.7 · checkpoint + 0.3 · final
    assert torch.allclose(out["w"], torch.tensor([1.2, 1.6, -0.8]))


def test_a_draw_that_reproduces_the_initialization_is_refused():
    model = fcn()
    sd = states(model)

    def constant(m: nn.Module) -> None:  # deterministic, not constant: the same "draw" for every seed
        for module in m.modules():
            if isinstance(module, nn.Linear):
                for t in (module.weight, module.bias):
                    with torch.no_grad():
                        t.copy_(torch.linspace(-0.1, 0.1, t.numel()).reshape(t.shape))

    start = copy.deepcopy(model)
    constant(start)
    sd[0] = start.state_dict()
    with pytest.raises(CriticalityError, match=r"seed 0 reproduces the initialization of group .fc1. exactly"):
        analyze(model, sd, data(7), groups=GROUPS, seeds=1, init=constant, progress=False)


def test_prefix_caching_is_really_used():
    """The fast engine runs the first layer fewer times than one full forward per cell per batch."""
    model = fcn()
    sd = states(model)
    calls = {"n": 0}
    # Real runs only: the engine's stubs (an instance `forward`) still pass through the module's hooks.
    # The canary (one variant per group, fast and plain, on a probe of 2 examples) is not the grid: not counted.
    model[1].register_forward_hook(lambda m, inp, out: calls.__setitem__(
        "n", calls["n"] + ("forward" not in m.__dict__ and inp[0].shape[0] > 2)))
    kw = dict(groups=GROUPS, seeds=2, init="torch", batch_size=50, progress=False)
    analyze(model, sd, data(7), engine="naive", **kw)
    naive, calls["n"] = calls["n"], 0
    analyze(model, sd, data(7), engine="fast", **kw)
    assert naive >= 4 * 13 and calls["n"] < naive / 2, (calls["n"], naive)


def test_paper_scale_settings_follow_the_paper():
    """The paper (Appendix A; docs/paper.md): SGD, momentum 0.9, batch 128, 100 epochs; lr 0.01 for FCNs (Glorot init on
    MNIST), 0.1 for the conv nets on CIFAR-10."""
    fcn_cfg = experiments.run_configs(experiments.get("fig1/fcn-3x256/mnist"), "paper", None)["run"]
    assert (fcn_cfg.data, fcn_cfg.epochs, fcn_cfg.batch_size, fcn_cfg.lr, fcn_cfg.momentum, fcn_cfg.init) == \
           ("mnist", 100, 128, 0.01, 0.9, "glorot")
    conv = experiments.run_configs(experiments.get("fig5/resnet18/cifar10"), "paper", None)["run"]
    assert (conv.data, conv.epochs, conv.batch_size, conv.lr, conv.momentum) == ("cifar10", 100, 128, 0.1, 0.9)


def test_local_rank_selects_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: chosen.append(backend))
    for k, v in {"WORLD_SIZE": "4", "RANK": "6", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(k, v)
    ctx = distributed.setup("cuda")
    assert ctx.device == torch.device("cuda", 2) and (ctx.rank, ctx.world, ctx.local_rank) == (6, 4, 2)
    assert chosen == [torch.device("cuda", 2), "nccl"]


def test_joint_groups_of_figs_9_and_10_by_their_members():
    from criticality.core.groups import joint, resolve

    model = models.build("resnet18", (3, 32, 32), 10, width=4)
    groups = resolve(model, "model")
    blocks = {g: groups.members[g] for g in groups.names}

    def members(exp_key: str) -> list[list[str]]:
        exp = experiments.get(exp_key)
        out = []
        for patterns in exp.joint:
            name, keys = joint(groups, patterns)
            out.append(sorted(g for g in groups.names if set(blocks[g]) <= set(keys)))
        return out

    assert members("fig9/resnet18-joint/cifar10") == [sorted(f"stage{s}.block2" for s in (1, 2, 3, 4))]
    assert members("fig10/resnet18-joint-stages/cifar10") == [
        ["stage1.block1", "stage1.block2"], ["stage2.block1", "stage2.block2"], ["stage3.block1", "stage3.block2"],
        ["stage4.block1", "stage4.block2"], ["stage3.block2", "stage4.block2"]]


def test_custom_metrics_are_computed_and_judged_when_alone():
    model = fcn()
    sd = states(model)
    x, y = data(7)

    def margin(logits, targets):  # a user's metric: per-example, plain callable
        return logits.gather(1, targets[:, None])[:, 0] - logits.max(1).values

    alone = analyze(model, sd, (x, y), groups=GROUPS, seeds=0, init="torch", metrics={"margin": margin},
                    progress=False)
    assert alone.summary["verdict_metric"] == "margin" and "delta_margin_low" in alone.verdicts
    with pytest.raises(CriticalityError, match=r"verdict metric 'error' is not among the metrics \['margin'\]"):
        analyze(model, sd, (x, y), groups=GROUPS, seeds=0, init="torch", metrics={"margin": margin},
                verdict_metric="error", progress=False)
    from criticality.core.engine import METRICS

    r = analyze(model, sd, (x, y), groups=GROUPS, seeds=0, init="torch", progress=False,
                metrics={"error": METRICS["error"], "margin": margin})
    final = r.table[r.table.op == "final"].iloc[0]
    m = copy.deepcopy(model)
    m.load_state_dict(sd[3])
    with torch.no_grad():
        want = margin(m.eval()(x), y).double().mean().item()
    assert final.margin == pytest.approx(want, abs=1e-6) and "delta_margin" in r.table and len(r.verdicts) == 3
