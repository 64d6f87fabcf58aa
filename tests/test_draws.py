"""Fresh draws of the parameters timm and transformers initialize themselves (issue 22, item 6).

Run: ``PYTHONPATH=src pytest tests/test_draws.py -q`` (about 15 s on 2 cores).

timm itself does not install beside this venv's torch (docs/BEYOND.md), so timm's patterns are mimicked: a
ConvNeXt-like block with a raw layer scale ``gamma = ls_init_value * ones`` (refused by the timm scheme before),
a MetaFormer-like ``Scale``, ViT/DeiT tokens (class token normal std 1e-6, distillation token trunc-normal std
0.02) and another ViT family's (trunc-normal 0.02). A layer scale is drawn as the constant the run started
from (its epoch-0 checkpoint), or the constructor's default without one. Real transformers MoE models
(Mixtral, Qwen2-MoE): routers and fused experts are drawn, each tensor like a freshly built model's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from criticality.core import surgery
from criticality.core.analysis import analyze
from criticality.core.initializers import initial_state
from criticality.core.plan import PlanSpec, make_plan


class Block(nn.Module):
    """ConvNeXt's pattern: a raw layer-scale parameter set from ``ls_init_value`` in the constructor."""

    def __init__(self, dim: int, ls_init_value: float = 1e-6):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(ls_init_value * torch.ones(dim))

    def forward(self, x):
        return x + self.gamma * torch.relu(self.fc(x))


class Scale(nn.Module):
    """MetaFormer's ``Scale``: ``init_value * ones``, the value not kept."""

    def __init__(self, dim: int, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x):
        return x * self.scale


class ConvNeXtLike(nn.Module):
    pretrained_cfg: dict = {}  # what makes criticality take it for a timm model

    def __init__(self, ls: float = 0.1):
        super().__init__()
        self.stem = nn.Linear(36, 16)
        self.blocks = nn.Sequential(Block(16, ls), Block(16, ls))
        self.layer_scale = Scale(16, init_value=1e-5)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.layer_scale(self.blocks(self.stem(x.flatten(1)))))


def trained():
    torch.manual_seed(0)
    model = ConvNeXtLike()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 6, 6, generator=g)
    y = torch.randint(0, 5, (64,), generator=g)
    states = {0: copy.deepcopy(model.state_dict())}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    states[1] = copy.deepcopy(model.state_dict())
    return model, states, (x, y)


def test_layer_scales_are_drawn_as_the_constant_the_run_started_from():
    model, states, data = trained()
    assert not torch.all(states[1]["blocks.0.gamma"] == 0.1)  # training moved them
    plan = make_plan(model, states, PlanSpec(groups={"b0": ["blocks.0"], "ls": ["layer_scale"], "head": ["head"]},
                                             seeds=[0], ops=("rerandomize",)), probe=data)
    assert plan.init == "timm"
    cells = {c.group: c for c in plan.cells if c.op == "rerandomize"}
    drawn = plan.state(cells["b0"])
    torch.testing.assert_close(drawn["blocks.0.gamma"], torch.full((16,), 0.1), rtol=0, atol=0)
    assert drawn["blocks.0.fc.weight"].std() > 0.05  # the linear drawn anew
    torch.testing.assert_close(plan.state(cells["ls"])["layer_scale.scale"], torch.full((16,), 1e-5), rtol=0, atol=0)
    # outside an analysis no checkpoint tells the constant: the constructor's default
    fresh = surgery.fresh_state(model, "timm", 0)
    torch.testing.assert_close(fresh["blocks.1.gamma"], torch.full((16,), 1e-6), rtol=0, atol=0)
    with initial_state(states[0]):
        torch.testing.assert_close(surgery.fresh_state(model, "timm", 0)["blocks.1.gamma"], torch.full((16,), 0.1))


def test_analyze_re_randomizes_a_layer_scale_model_with_the_timm_scheme():
    model, states, data = trained()
    result = analyze(model, states, data, groups={"b0": ["blocks.0"], "b1": ["blocks.1"], "head": ["head"]},
                     seeds=1, batch_size=64, progress=False)
    assert result.summary["settings"]["init"] == "timm"
    assert set(result.table[result.table.op == "rerandomize"].group) == {"b0", "b1", "head"}


class VisionTransformer(nn.Module):
    """timm's ViT (and DeiT's distilled subclass) tokens and position embedding."""

    pretrained_cfg: dict = {}

    def __init__(self, dim: int = 4096):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 2, dim))
        self.head = nn.Linear(dim, 2)


class Eva(nn.Module):  # another ViT family: its tokens are trunc-normal std 0.02
    pretrained_cfg: dict = {}

    def __init__(self, dim: int = 4096):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.head = nn.Linear(dim, 2)


def test_tokens_and_position_embeddings_follow_their_family():
    vit = surgery.fresh_state(VisionTransformer(), "timm", 0)
    assert vit["cls_token"].std().item() == pytest.approx(1e-6, rel=0.1)
    assert vit["dist_token"].std().item() == pytest.approx(0.0188, rel=0.1)  # trunc-normal(0.02) at ±2
    assert vit["dist_token"].abs().max() <= 2 and vit["pos_embed"].std().item() == pytest.approx(0.0188, rel=0.1)
    assert vit["head.weight"].std().item() == pytest.approx(0.0188, rel=0.1)  # ViT linears trunc-normal 0.02
    eva = surgery.fresh_state(Eva(), "timm", 0)
    assert eva["cls_token"].std().item() == pytest.approx(0.0188, rel=0.1)


transformers = pytest.importorskip("transformers")


def moe_models():
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {"mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
                **small, num_local_experts=4, num_experts_per_tok=2)),
            "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
                **small, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                shared_expert_intermediate_size=32))}


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_routers_and_fused_experts_are_drawn_like_a_fresh_model(name):
    build = moe_models()[name]
    torch.manual_seed(0)
    model, reference = build(), build()
    with torch.no_grad():  # "trained": nothing of the model's own values may survive a draw
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p) + 0.1)
    fresh = surgery.fresh_state(model, "hf", 0)
    moe = [k for k in fresh if "experts" in k or ".gate." in k or k.endswith("mlp.gate.weight")]
    assert any("experts" in k for k in moe) and any("gate.weight" in k for k in moe)
    for key, want in reference.state_dict().items():
        got = fresh[key]
        if not want.is_floating_point():
            continue
        if torch.all(want == want.flatten()[0]):
            torch.testing.assert_close(got, want, msg=key)  # norms' 1, biases' 0
        else:
            assert got.std().item() == pytest.approx(want.std().item(), rel=0.3), key
            assert abs(got.mean().item()) < 4 * want.std().item() / want.numel() ** 0.5 + 1e-6, key
            assert not torch.equal(got, model.state_dict()[key]), key
