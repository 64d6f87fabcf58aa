"""Fresh draws for models from other packages: per-group draws equal whole-model draws, the hf / timm /
shuffle schemes draw from the right distributions, and re-randomization cells through ``analyze`` equal
an independent reference. Run: ``pytest -q tests/test_foreign.py`` (about half a minute on 2 CPU cores)."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from criticality.core import groups, surgery
from criticality.core.analysis import analyze
from criticality.core.initializers import choose
from criticality.core.ops import RERANDOMIZE_SALT
from criticality.errors import CriticalityError
from criticality.paper.models import build
from toy import ARCHS, TIMM_LIKE, Logits, hf_models

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    return {name: make() for name, (make, _) in hf_models().items()}


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def pooled_std(state, keys):
    return torch.cat([state[k].flatten() for k in keys]).std().item()


@pytest.mark.parametrize("spec", ["blocks", "sublayers", "auto"])
def test_fresh_group_equals_fresh_state_restricted(hf, spec):
    cases = [(m, "hf") for m in hf.values()] + [(TIMM_LIKE[n](), "timm") for n in TIMM_LIKE]
    cases += [(build("fcn-3x256", (1, 6, 6), 5, init="glorot"), "glorot"), (ARCHS["convbn"](), "kaiming"),
              (nn.MultiheadAttention(8, 2), "torch")]
    for model, init in cases:
        before = snapshot(model)
        whole = surgery.fresh_state(model, init, 11)
        for name, keys in groups.resolve(model, spec).members.items():
            part = surgery.fresh_group(model, init, 11, keys)
            assert set(part) == set(keys)
            bad = [k for k in keys if not torch.equal(part[k], whole[k])]
            assert not bad, f"{type(model).__name__} {init} {name}: {bad}"
        assert same_state(before, snapshot(model))  # the caller's model is untouched
    other = surgery.fresh_group(hf["llama"], "hf", 12, ["lm_head.weight"])["lm_head.weight"]
    assert not torch.equal(other, surgery.fresh_state(hf["llama"], "hf", 11)["lm_head.weight"])


def test_a_callable_init_draws_the_whole_model_and_restricts():
    model = ARCHS["fcn"]()

    def init(m):
        for p in m.parameters():
            nn.init.normal_(p, std=0.5)
    whole = surgery.fresh_state(model, init, 3)
    part = surgery.fresh_group(model, init, 3, ["3.weight"])
    assert torch.equal(part["3.weight"], whole["3.weight"])
    assert abs(whole["1.weight"].std().item() - 0.5) < 0.05


def test_hf_draws_have_the_model_s_own_statistics(hf):
    gpt2, llama = hf["gpt2"], hf["llama"]
    std = gpt2.config.initializer_range
    fresh = surgery.fresh_state(gpt2, "hf", 5)
    c_proj = [k for k in fresh if k.endswith("c_proj.weight")]
    others = [k for k in fresh if k.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight"))]
    assert pooled_std(fresh, c_proj) == pytest.approx(std / math.sqrt(2 * gpt2.config.n_layer), rel=0.1)
    assert pooled_std(fresh, others) == pytest.approx(std, rel=0.1)
    assert all(torch.all(fresh[k] == 1) for k in fresh if ".ln_" in k and k.endswith("weight"))
    assert all(torch.all(fresh[k] == 0) for k in fresh if k.endswith("bias"))
    assert fresh["lm_head.weight"] is fresh["transformer.wte.weight"] or torch.equal(
        fresh["lm_head.weight"], fresh["transformer.wte.weight"])  # tied: one draw
    fresh = surgery.fresh_state(llama, "hf", 5)
    norms = [k for k in fresh if "norm" in k]
    assert norms and all(torch.all(fresh[k] == 1) for k in norms)  # RMSNorm weights back to 1
    # Against a freshly constructed model's statistics: each large tensor's std within 10 %.
    torch.manual_seed(5)
    made = type(llama)(llama.config).state_dict()
    for k, v in fresh.items():
        if v.is_floating_point() and v.numel() >= 1000:
            assert v.std().item() == pytest.approx(made[k].std().item(), rel=0.1), k


def test_hf_draw_ignores_already_initialized_flags(hf):
    model = copy.deepcopy(hf["bert"])
    for p in model.parameters():
        p._is_hf_initialized = True  # as after from_pretrained
    for m in model.modules():
        m._is_hf_initialized = True
    fresh = surgery.fresh_group(model, "hf", 1, ["classifier.weight", "classifier.bias"])
    assert not torch.equal(fresh["classifier.weight"], model.classifier.weight)
    assert fresh["classifier.weight"].std().item() == pytest.approx(0.02, rel=0.35)  # 96 values


def test_timm_draws_follow_timm_patterns():
    vit = TIMM_LIKE["timm_vit"](dim=64)
    fresh = surgery.fresh_state(vit, "timm", 2)
    assert 0 < fresh["cls_token"].abs().max().item() < 1e-5  # normal, std 1e-6
    assert fresh["pos_embed"].std().item() == pytest.approx(0.02, rel=0.1)
    linear = [k for k, m in vit.named_modules() if isinstance(m, nn.Linear)]
    assert pooled_std(fresh, [f"{k}.weight" for k in linear]) == pytest.approx(0.02, rel=0.1)
    assert all(torch.all(fresh[f"{k}.bias"] == 0) for k in linear)
    assert torch.all(fresh["blocks.0.ls1.gamma"] == 1e-5)  # LayerScale's own reset
    resnet = TIMM_LIKE["timm_resnet"](width=8)
    fresh = surgery.fresh_state(resnet, "timm", 2)
    for name, m in resnet.named_modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() >= 500:
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            assert fresh[f"{name}.weight"].std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1), name
    assert all(torch.all(fresh[f"layer{i}.{b}.bn2.weight"] == 0) for i in range(1, 5) for b in (0, 1))
    bound = 1 / math.sqrt(resnet.fc.in_features)  # timm leaves a CNN's classifier at torch's default
    assert fresh["fc.weight"].abs().max() <= bound and fresh["fc.weight"].std() > 0.5 * bound / math.sqrt(3)


def test_shuffle_permutes_the_initial_values():
    model = ARCHS["tied"]()
    start = snapshot(model)
    with torch.no_grad():
        model.cls.bias.fill_(0.25)  # a constant tensor
    start["cls.bias"] = model.cls.bias.detach().clone()
    fresh = surgery.fresh_state(model, "shuffle", 4, start=start)
    for k, v in fresh.items():
        assert torch.equal(v.flatten().sort().values, start[k].flatten().sort().values)  # a permutation
    assert not torch.equal(fresh["inp.weight"], start["inp.weight"])
    assert torch.equal(fresh["cls.bias"], start["cls.bias"])  # constants stay constant
    assert torch.equal(fresh["mid1.weight"], fresh["mid2.weight"])  # tied names: one permutation
    part = surgery.fresh_group(model, "shuffle", 4, ["inp.weight"], start=start)
    assert torch.equal(part["inp.weight"], fresh["inp.weight"])
    with pytest.raises(CriticalityError, match="needs the initial"):
        surgery.fresh_state(model, "shuffle", 4)


def test_an_undrawable_parameter_suggests_shuffle(hf):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.scale = nn.Linear(4, 2), nn.Parameter(torch.ones(2))
    with pytest.raises(CriticalityError, match="init='shuffle'"):
        surgery.fresh_state(Scaled(), "torch", 0)
    with pytest.raises(CriticalityError, match="does not draw model.layers.0.input_layernorm"):
        surgery.fresh_state(hf["llama"], "torch", 0)  # RMSNorm has no reset_parameters


def test_the_scheme_is_chosen_from_the_model(hf):
    assert choose(hf["llama"]) == ("hf", False)
    assert choose(TIMM_LIKE["timm_vit"]()) == ("timm", False)
    assert choose(build("fcn-3x256", (1, 6, 6), 5, init="glorot")) == ("glorot", False)
    assert choose(ARCHS["fcn"]()) == ("torch", True)
    assert choose(hf["llama"], "shuffle") == ("shuffle", False)


def test_a_registered_scheme_is_detected_drawn_and_noted(monkeypatch):
    """The registry: core/initializers knows hf and timm only through what criticality.adapters
    registered, and a user's package can register its own scheme the same way."""
    import ast
    import inspect

    from criticality.core import initializers

    source = ast.parse(inspect.getsource(initializers))
    imported = [n.module for n in ast.walk(source) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(source) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("criticality.")]
    assert initializers.draw_schemes() == ("torch", "glorot", "kaiming", "hf", "timm", "shuffle")
    assert initializers.DRAW_SCHEMES == initializers.draw_schemes()

    monkeypatch.setattr(initializers, "_REGISTERED", dict(initializers._REGISTERED))
    drawn = []
    mine = initializers.DrawScheme("mine", lambda module, path, root: drawn.append(path),
                                   lambda model: getattr(model, "mine", False),
                                   lambda model, groups: {"groups_seen": sorted(groups)})
    initializers.register(mine)
    model = ARCHS["fcn"]()
    model.mine = True
    assert choose(model) == ("mine", False)
    assert choose(nn.Sequential(model)) == ("mine", False)  # a wrapper around one
    initializers.module_scheme("mine")(model, "", model)
    assert drawn == [""]
    assert initializers.draws_summary(model, "mine", {"b": ("x",), "a": ("y",)}) == \
        {"init": "mine", "groups_seen": ["a", "b"]}
    assert initializers.draws_summary(model, "torch", {}) == {"init": "torch"}
    assert "mine" in initializers.draw_schemes()
    with pytest.raises(ValueError, match="built in"):
        initializers.register(initializers.DrawScheme("shuffle", mine.init, mine.detect))


def reference_rerandomize(model, states, x, y, keys, init, seed):
    """Independent reference: a whole-model draw, the group's keys copied in by hand, a plain forward."""
    fresh = surgery.fresh_state(model, init, RERANDOMIZE_SALT + seed, start=states[0])
    variant = copy.deepcopy(model)
    variant.load_state_dict({**states[max(states)], **{k: fresh[k] for k in keys}})
    with torch.no_grad():
        logits = variant.eval()(x)
    return (logits.argmax(1) != y).double().mean().item(), F.cross_entropy(logits, y).item()


def trained(model, seed=0):
    """Epoch 0 = the model as built; epoch 1 = it moved a little (stands in for a few training steps)."""
    g = torch.Generator().manual_seed(seed)
    start = snapshot(model)
    later = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in start.items()}
    return {0: start, 1: later}


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "vit", "resnet", "timm_vit", "timm_resnet", "shuffle"])
def test_rerandomize_cells_equal_the_reference(hf, name):
    if name in hf:
        model, init = Logits(copy.deepcopy(hf[name])).eval(), "hf"
        inputs = hf_models()[name][1]
    else:
        model, init = (TIMM_LIKE["timm_vit"]() if name != "timm_resnet" else TIMM_LIKE["timm_resnet"]()).eval(), \
            ("shuffle" if name == "shuffle" else "timm")
        inputs = lambda n, g: torch.randn(n, 36, generator=g)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    x = inputs(24, g)
    states = trained(model)
    model.load_state_dict(states[1])
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % model(x[:1]).shape[1]  # some wrong answers
    result = analyze(model, states, (x, y), groups="blocks", seeds=[0], init=init, batch_size=10, progress=False)
    cells = result.table[result.table.op == "rerandomize"]
    assert len(cells) == len(result.groups.names)
    for _, cell in cells.iterrows():
        err, loss = reference_rerandomize(model, states, x, y, result.groups.members[cell.group], init, 0)
        assert cell.error == pytest.approx(err, abs=1e-12), cell.group
        assert cell.loss == pytest.approx(loss, abs=1e-5), cell.group
    assert result.summary["draws"]["init"] == init
    if name == "timm_resnet":
        assert result.summary["draws"]["identity_blocks"] == [f"layer{i}.{b}" for i in range(1, 5) for b in (0, 1)]
        assert "identity" in result.summary["draws"]["note"]


def test_a_group_draw_holds_only_the_group_s_tensors(hf, monkeypatch):
    copies = []
    real_copy = surgery._copy
    monkeypatch.setattr(surgery, "_copy", lambda model, real: copies.append(real_copy(model, real)) or copies[-1])
    llama = hf["llama"]
    keys = groups.resolve(llama, "blocks").members["model.layers.1"]
    surgery.fresh_group(llama, "hf", 0, keys)
    held = {k for k, v in copies[-1].state_dict(keep_vars=True).items() if v.device.type != "meta"}
    assert held == set(keys)  # the rest of the model is on the meta device: no memory


def test_analyze_with_default_arguments_on_a_wrapped_hf_model(hf, caplog):
    caplog.set_level(logging.INFO, logger="criticality")
    model = Logits(copy.deepcopy(hf["llama"])).eval()
    assert choose(model) == ("hf", False)  # a wrapper around an HF model draws with HF's init
    x = hf_models()["llama"][1](12, torch.Generator().manual_seed(0))
    states = trained(model)
    result = analyze(model, states, (x, torch.arange(12) % 64), seeds=1, progress=False)
    assert result.summary["groups_spec"] == "blocks" and result.summary["draws"]["init"] == "hf"
    assert result.groups.names == ["m.model.embed_tokens", "m.model.layers.0", "m.model.layers.1", "m.model.norm",
                                   "m.lm_head"]
    assert "groups='blocks'" in caplog.text  # the library logs the spec it chose (the CLI shows it)


def test_a_draw_of_unknown_keys_is_an_error():
    with pytest.raises(CriticalityError, match="does not have: nope"):
        surgery.fresh_group(ARCHS["fcn"](), "torch", 0, ["nope"])
