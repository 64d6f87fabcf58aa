"""Block stacks and layer groups of deep models: real transformers classes (tiny random configs), toys
that copy timm's layouts, the zoo. Run: ``pytest -q tests/test_groups.py`` (a few seconds)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from criticality.core import groups
from criticality.core.analysis import analyze
from criticality.core.stacks import find_stack, is_norm
from criticality.errors import CriticalityError
from criticality.paper.models import build
from toy import ARCHS, TIMM_LIKE, Logits, hf_models

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    return {name: make() for name, (make, _) in hf_models().items()}


def paths(stack):
    return [p for p, _ in stack]


def covers_every_key(model, g):
    keys = [k for ks in g.coverage().values() for k in ks]
    assert sorted(keys) == sorted(model.state_dict()) and len(keys) == len(set(keys))


def test_find_stack_in_known_layouts(hf):
    assert paths(find_stack(hf["llama"])) == ["model.layers.0", "model.layers.1"]
    assert paths(find_stack(hf["gpt2"])) == ["transformer.h.0", "transformer.h.1"]
    assert paths(find_stack(hf["bert"])) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert paths(find_stack(hf["vit"]))[0] in ("vit.layers.0", "vit.encoder.layer.0")  # transformers 5 / 4
    assert paths(find_stack(hf["resnet"])) == ["resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.1.layers.0"]
    assert paths(find_stack(Logits(hf["llama"]))) == ["m.model.layers.0", "m.model.layers.1"]  # a wrapper
    assert paths(find_stack(TIMM_LIKE["timm_vit"]())) == ["blocks.0", "blocks.1", "blocks.2"]
    assert paths(find_stack(TIMM_LIKE["timm_resnet"]())) == [f"layer{i}.{b}" for i in range(1, 5) for b in (0, 1)]


def test_find_stack_zoo_sequential_fallback_and_none():
    zoo = build("resnet18", (3, 32, 32), 10, width=4)
    assert paths(find_stack(zoo)) == [p for p, _ in zoo.stages()]
    assert paths(find_stack(ARCHS["fcn"]())) == [str(i) for i in range(8)]

    class Towers(nn.Module):  # no known layout: the largest uniform container wins
        def __init__(self):
            super().__init__()
            self.small = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
            self.big = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
    assert paths(find_stack(Towers())) == ["big.0", "big.1"]
    assert find_stack(ARCHS["tied"]()) == []

    class Stage(nn.Module):  # timm Swin / ConvNeXt: stages holding a downsample and a blocks Sequential
        def __init__(self):
            super().__init__()
            self.downsample, self.blocks = nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))

    class Swin(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(Stage(), Stage())
    swin = Swin()
    assert paths(find_stack(swin)) == [f"layers.{s}.blocks.{b}" for s in (0, 1) for b in (0, 1)]
    assert groups.resolve(swin, "blocks").names == ["layers.0.downsample", "layers.0.blocks.0", "layers.0.blocks.1",
                                                    "layers.1.downsample", "layers.1.blocks.0", "layers.1.blocks.1"]


def test_norms_are_recognised_by_class_and_name(hf):
    llama = hf["llama"]
    assert is_norm(llama.model.layers[0].input_layernorm) and is_norm(llama.model.norm)  # LlamaRMSNorm
    assert is_norm(nn.BatchNorm2d(3)) and is_norm(nn.RMSNorm(4)) and not is_norm(nn.Linear(2, 2))

    class FancyNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))
    assert is_norm(FancyNorm())


def test_blocks_llama_gpt2_bert_vit(hf):
    llama = groups.resolve(hf["llama"], "blocks")
    assert llama.names == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    gpt2 = groups.resolve(hf["gpt2"], "blocks")
    assert gpt2.names == ["transformer.wte+lm_head", "transformer.wpe", "transformer.h.0", "transformer.h.1",
                          "transformer.ln_f"]  # tied embedding/head: one group, named by both
    assert set(gpt2.members["transformer.wte+lm_head"]) == {"transformer.wte.weight", "lm_head.weight"}
    bert = groups.resolve(hf["bert"], "blocks")
    assert bert.names == ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler",
                          "classifier"]
    vit = groups.resolve(hf["vit"], "blocks")
    assert vit.names[0] == "vit.embeddings" and "vit.embeddings.cls_token" in vit.members["vit.embeddings"]
    assert vit.names[-2:] == ["vit.layernorm", "classifier"]
    for name in hf:
        covers_every_key(hf[name], groups.resolve(hf[name], "blocks"))
        assert groups.resolve(hf[name], "blocks").unassigned == ()


def test_sublayers_put_each_norm_with_the_part_it_feeds(hf):
    llama = groups.resolve(hf["llama"], "sublayers").members
    assert set(llama["model.layers.0.self_attn"]) == {
        *(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"), "model.layers.0.input_layernorm.weight"}
    assert "model.layers.0.post_attention_layernorm.weight" in llama["model.layers.0.mlp"]
    gpt2 = groups.resolve(hf["gpt2"], "sublayers").members
    assert "transformer.h.1.ln_1.weight" in gpt2["transformer.h.1.attn"]
    assert "transformer.h.1.ln_2.bias" in gpt2["transformer.h.1.mlp"]
    bert = groups.resolve(hf["bert"], "sublayers").members  # post-norm: the norms nested in each part stay
    assert "bert.encoder.layer.0.attention.output.LayerNorm.weight" in bert["bert.encoder.layer.0.attention"]
    assert "bert.encoder.layer.0.output.LayerNorm.weight" in bert["bert.encoder.layer.0.intermediate+output"]
    vit = groups.resolve(hf["vit"], "sublayers").members
    layer = groups.resolve(hf["vit"], "blocks").names[1]
    assert f"{layer}.layernorm_before.weight" in vit[f"{layer}.attention"]
    assert f"{layer}.layernorm_after.weight" in vit[f"{layer}.mlp"]
    timm = groups.resolve(TIMM_LIKE["timm_vit"](), "sublayers")
    assert timm.names[:3] == ["cls_token+pos_embed", "patch_embed", "blocks.0.attn+ls1"]
    assert "blocks.0.norm2.weight" in timm.members["blocks.0.mlp+ls2"]
    # A block without attention stays whole.
    assert "resnet.encoder.stages.0.layers.0" in groups.resolve(hf["resnet"], "sublayers").names
    for name in hf:
        covers_every_key(hf[name], groups.resolve(hf[name], "sublayers"))


def test_auto_merges_pre_norms_into_the_layer_they_feed(hf):
    llama = groups.resolve(hf["llama"], "auto").members
    assert "model.layers.0.input_layernorm.weight" in llama["model.layers.0.self_attn.q_proj"]
    assert "model.layers.0.post_attention_layernorm.weight" in llama["model.layers.0.mlp.gate_proj"]
    assert llama["model.norm"] == ("model.norm.weight",)  # the final norm is not the last block's
    gpt2 = groups.resolve(hf["gpt2"], "auto").members
    assert "transformer.h.0.ln_2.weight" in gpt2["transformer.h.0.mlp.c_fc"]
    assert "transformer.h.0.ln_2.weight" not in gpt2["transformer.h.0.attn.c_proj"]
    conv = groups.resolve(ARCHS["convbn"](), "auto")  # post-norm conv nets: the BN after its conv
    assert "1.running_var" in conv.members["0"]
    for name in hf:
        covers_every_key(hf[name], groups.resolve(hf[name], "auto"))


def test_default_spec_and_its_record(caplog):
    caplog.set_level(logging.INFO, logger="criticality")
    assert groups.default_spec(build("fcn-3x256", (1, 6, 6), 5)) == "model"
    assert groups.default_spec(TIMM_LIKE["timm_vit"]()) == "blocks"
    assert groups.default_spec(ARCHS["tied"]()) == "auto"
    with pytest.raises(CriticalityError, match="declares no layer_groups"):
        groups.resolve(ARCHS["tied"](), "model")
    model = ARCHS["tied"]()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    later = {k: v + 0.1 for k, v in state.items()}
    x, y = torch.randn(20, 36, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 5
    result = analyze(model, {0: state, 1: later}, (x, y), seeds=0, progress=False)
    assert result.summary["groups_spec"] == "auto" and result.groups.spec == "auto"
    assert "groups='auto'" in caplog.text  # the library logs the spec it chose (the CLI shows it)


def test_sublayers_of_an_opt_style_block():
    import transformers as T
    opt = T.OPTForCausalLM(T.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                       num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16))
    members = groups.resolve(opt, "sublayers").members
    layer = "model.decoder.layers.0"
    assert f"{layer}.self_attn_layer_norm.weight" in members[f"{layer}.self_attn"]
    assert f"{layer}.final_layer_norm.weight" in members[f"{layer}.fc1+fc2"]
    assert "model.decoder.embed_tokens+lm_head" in members  # tied
