"""Depth pruning and export against plain references: the greedy curve equals a brute-force greedy loop, the
one-shot curve follows the proxy ranking, joint skip of two Llama layers equals the model rebuilt without
them, and the exported model reloads with ``from_pretrained``, generates and matches the skip cell.

Also: the swap operation against hand-reordered models, and ``criticality prune`` on an HF folder and on a
run directory. Run: ``PYTHONPATH=src pytest tests/test_prune.py -q`` (about 1 to 2 min on 2 busy cores).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from criticality.adapters import export
from criticality.cli import main
from criticality.core.analysis import analyze
from criticality.core.evaluate import evaluate
from criticality.core.stubs import skipping
from criticality.errors import CriticalityError
from criticality.interventions import proxies
from criticality.paper import data as datasets
from criticality.paper import models
from criticality.paper.train import train
from criticality.paper.training.config import TrainConfig
from criticality.pipelines.prune import prune_curve, state_curve, write_curve

transformers.utils.logging.disable_progress_bar()


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, h):
        return h + torch.tanh(self.fc(h))  # (B, width)


class Toy(nn.Module):
    """A residual MLP whose ``blocks`` stack (a timm-like layout) can lose any block."""

    def __init__(self, width: int = 8, depth: int = 5):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _toy():
    torch.manual_seed(0)
    model = Toy().eval()
    for p in model.parameters():  # large weights: every block matters a different amount
        p.data.mul_(3)
    x = torch.randn(64, 4)
    y = torch.randint(0, 3, (64,))
    return model, x, y


def _loss_without(model, x, y, removed):
    """The plain reference: a copy whose removed blocks are nn.Identity, mean cross-entropy."""
    m = copy.deepcopy(model)
    for path in removed:
        m.blocks[int(path.rsplit(".", 1)[1])] = nn.Identity()
    with torch.no_grad():
        return float(F.cross_entropy(m(x), y))


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_greedy_curve_equals_a_brute_force_greedy_loop(engine):
    model, x, y = _toy()
    curve = prune_curve(model, model.state_dict(), (x, y), remove=3, metric="loss", batch_size=16, engine=engine)
    removed, losses = [], []
    paths = [f"blocks.{i}" for i in range(5)]
    for _ in range(3):
        scores = {p: _loss_without(model, x, y, [*removed, p]) for p in paths if p not in removed}
        best = min(scores, key=lambda p: (scores[p], paths.index(p)))
        removed.append(best)
        losses.append(scores[best])
        full = _loss_without(model, x, y, [])
        step = curve.scores[curve.scores.step == len(removed)].set_index("block")
        np.testing.assert_allclose(step.delta[list(scores)], np.array(list(scores.values())) - full, rtol=1e-4,
                                   atol=1e-6)
    assert curve.removed == removed
    t = curve.table
    assert t.step.tolist() == [0, 1, 2, 3] and t.candidates.tolist() == [0, 5, 4, 3]
    np.testing.assert_allclose(t.loss[1:], losses, rtol=1e-5)
    full = _loss_without(model, x, y, [])
    np.testing.assert_allclose(t.delta, [0, *(np.array(losses) - full)], rtol=1e-4, atol=1e-6)
    assert t.removed_index[1:].tolist() == [paths.index(p) for p in removed]
    assert t.removed_paths.iloc[-1] == ";".join(removed)
    assert (t.delta_low <= t.delta + 1e-9).all() and (t.delta <= t.delta_high + 1e-9).all()
    assert t.bi[1:].notna().all() and np.isnan(t.bi[0])


def test_one_shot_curve_follows_the_proxy_ranking():
    model, x, y = _toy()
    curve = prune_curve(model, model.state_dict(), (x, y), remove=4, by="angular", metric="loss", batch_size=64)
    table = proxies.block_proxies(model, (x, y))
    ranked = table.sort_values(["angular", "index"]).block.tolist()[:4]
    assert curve.removed == ranked
    np.testing.assert_allclose(curve.table.angular[1:], table.set_index("block").angular[ranked])
    expected = [_loss_without(model, x, y, ranked[:k]) for k in range(1, 5)]
    np.testing.assert_allclose(curve.table.loss[1:], expected, rtol=1e-5)


def test_statement_counts_leading_robust_steps_and_the_first_critical_one():
    t = pd.DataFrame({"step": [0, 1, 2, 3, 4], "delta_low": [0, -0.01, 0.0, 0.01, 0.06],
                      "delta_high": [0, 0.01, 0.04, 0.03, 0.09]})
    words, counts = state_curve(t, "nll", 0.05, 6)
    assert counts == {"robust_steps": 3, "exceeds_at": 4} and words.startswith("3 of 6 blocks")
    t.loc[2, "delta_high"] = 0.2  # a wide interval at step 2 ends the robust run, even though step 3 is below
    assert state_curve(t, "nll", 0.05, 6)[1] == {"robust_steps": 1, "exceeds_at": 4}
    t.delta_low = 0.0
    assert state_curve(t, "nll", 0.05, 6)[1]["exceeds_at"] is None


def test_bad_requests_are_refused_with_a_reason():
    model, x, y = _toy()
    sd = model.state_dict()
    with pytest.raises(CriticalityError, match="from 1 to 4"):
        prune_curve(model, sd, (x, y), remove=5)
    with pytest.raises(CriticalityError, match="unknown pruning order"):
        prune_curve(model, sd, (x, y), remove=1, by="magnitude")
    with pytest.raises(CriticalityError, match="not among the metrics"):
        prune_curve(model, sd, (x, y), remove=1, metric="nll")


def _llama(layers: int = 4):
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no stop token
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _rebuilt_without(lm, removed_idx):
    """The reference: a fresh Llama with fewer layers, the kept layers' weights copied by hand."""
    kept = [i for i in range(lm.config.num_hidden_layers) if i not in removed_idx]
    cfg = copy.deepcopy(lm.config)
    cfg.num_hidden_layers = len(kept)
    small = transformers.LlamaForCausalLM(cfg).eval()
    sd = {}
    for k, v in lm.state_dict().items():
        if k.startswith("model.layers."):
            i, rest = k[len("model.layers."):].split(".", 1)
            if int(i) in kept:
                sd[f"model.layers.{kept.index(int(i))}.{rest}"] = v
        else:
            sd[k] = v
    small.load_state_dict(sd)
    return small


def test_joint_skip_of_two_llama_layers_equals_the_model_rebuilt_without_them():
    lm = _llama()
    ids = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(1))
    sd = lm.state_dict()
    result = analyze(lm, {0: sd, 1: sd}, (ids, ids), groups="blocks", seeds=0, ops=("skip",),
                     joint=[["model.layers.1", "model.layers.2"]], metrics=("token_error", "nll"), progress=False)
    t = result.table
    cell = t[(t.op == "skip") & (t.group == "model.layers.1+model.layers.2")]
    ref = evaluate(_rebuilt_without(lm, [1, 2]), (ids, ids), metrics=("token_error", "nll"))
    assert cell.nll.item() == pytest.approx(ref["nll"], rel=1e-6)
    assert cell.token_error.item() == pytest.approx(ref["token_error"])


def test_exported_llama_reloads_generates_and_matches_the_skip_cell(tmp_path):
    lm = _llama()
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(2))
    removed = ["model.layers.2", "model.layers.0"]
    export.save_pruned(lm, lm.state_dict(), removed, tmp_path / "pruned")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert back.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in back.model.layers] == [0, 1]
    info = json.loads((tmp_path / "pruned" / "pruned.json").read_text())
    assert info["removed_indices"] == [0, 2] and info["kept_from"] == [1, 3]
    with torch.no_grad(), skipping(lm, removed, {}):
        want = lm(ids).logits
        with torch.no_grad():
            got = back(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, _rebuilt_without(lm, [0, 2])(ids).logits, rtol=1e-5, atol=1e-5)
    # generation with the (renumbered) KV cache equals a greedy loop on the skip cell without any cache
    prompt = ids[:, :4]
    generated = back.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    seq = prompt
    with torch.no_grad(), skipping(lm, removed, {}):
        for _ in range(5):
            seq = torch.cat([seq, lm(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, seq)


def test_exported_gpt2_renumbers_n_layer_and_refuses_index_scaled_attention(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=3, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 40, (2, 8))
    export.save_pruned(gpt, gpt.state_dict(), ["transformer.h.1"], tmp_path / "g")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "g").eval()
    assert back.config.n_layer == 2 and [b.attn.layer_idx for b in back.transformer.h] == [0, 1]
    with torch.no_grad(), skipping(gpt, ["transformer.h.1"], {}):
        torch.testing.assert_close(back(ids).logits, gpt(ids).logits, rtol=1e-5, atol=1e-5)
    gpt.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(CriticalityError, match="scale_attn_by_inverse_layer_idx"):
        export.save_pruned(gpt, gpt.state_dict(), ["transformer.h.1"], tmp_path / "h")
    export.save_pruned(gpt, gpt.state_dict(), ["transformer.h.2"], tmp_path / "h")  # the last: nothing renumbered
    with pytest.raises(CriticalityError, match="not children of one container"):
        export.without_blocks(gpt, gpt.state_dict(), ["transformer.h.1", "lm_head"])


def test_non_hf_export_is_a_state_dict_and_the_removed_paths(tmp_path):
    model, x, _ = _toy()
    export.save_pruned(model, model.state_dict(), ["blocks.1", "blocks.3"], tmp_path / "toy")
    fresh = export.load_pruned(Toy(), tmp_path / "toy").eval()
    assert isinstance(fresh.blocks[1], export.Removed)
    with torch.no_grad(), skipping(model, ["blocks.1", "blocks.3"], {}):
        torch.testing.assert_close(fresh(x), model(x))


def test_cli_prune_writes_the_curve_and_a_loadable_model(tmp_path, capsys):
    lm = _llama()
    lm.save_pretrained(tmp_path / "ckpt")
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 50, (6, 12)))
    rc = main(["prune", str(tmp_path / "ckpt"), "--data", str(tmp_path / "ids.npy"), "--remove", "2",
               "--metric", "nll", "--threshold", "0.5", "--out", str(tmp_path / "out"), "--save",
               str(tmp_path / "small"), "--no-progress"])
    assert rc == 0
    said = capsys.readouterr().out
    assert "blocks can go with Δ nll ≤ 0.5" in said and "step 2: removed model.layers." in said
    table = pd.read_csv(tmp_path / "out" / "pruning.csv")
    assert table.step.tolist() == [0, 1, 2] and (tmp_path / "out" / "figures" / "pruning.png").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    assert back.config.num_hidden_layers == 2
    summary = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert summary["removed"] == table.removed_paths.iloc[-1].split(";")


def test_write_curve_and_bad_cli_options(tmp_path, capsys):
    model, x, y = _toy()
    curve = prune_curve(model, model.state_dict(), (x, y), remove=1, by="bi")
    write_curve(curve, tmp_path)
    assert pd.read_csv(tmp_path / "pruning.csv").removed.iloc[1] == curve.removed[0]
    assert main(["prune", str(tmp_path), "--data", str(tmp_path / "x.npy"), "--unit", "sublayer"]) == 2
    assert "only whole blocks" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_swap_of_adjacent_blocks_equals_a_hand_built_swapped_model(engine):
    model, x, y = _toy()
    sd = model.state_dict()
    result = analyze(model, {0: sd, 1: sd}, (x, y), seeds=0, ops=("swap",), engine=engine, progress=False)
    t = result.table
    assert t[t.op == "swap"].group.tolist() == [f"blocks.{i}+blocks.{i + 1}" for i in range(4)]
    assert result.summary["swap_pairs"]["blocks.1+blocks.2"] == ["blocks.1", "blocks.2"]
    assert (t[t.op == "swap"].loss != t[t.op == "final"].loss.item()).all()  # the order of blocks matters here
    for i in range(4):
        hand = copy.deepcopy(model)
        hand.blocks[i], hand.blocks[i + 1] = hand.blocks[i + 1], hand.blocks[i]  # the modules themselves, reordered
        want = evaluate(hand, (x, y))
        got = t[(t.op == "swap") & (t.group == f"blocks.{i}+blocks.{i + 1}")]
        assert got.loss.item() == pytest.approx(want["loss"], rel=1e-6) and got.error.item() == want["error"]
    assert torch.equal(model.state_dict()["blocks.1.fc.weight"], sd["blocks.1.fc.weight"])  # input untouched


def test_swap_of_llama_layers_and_refusals():
    lm = _llama(3)
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(3))
    sd = lm.state_dict()
    result = analyze(lm, {0: sd, 1: sd}, (ids, ids), seeds=0, ops=("swap",), metrics=("nll",), progress=False)
    got = result.table.set_index("group").nll["model.layers.1+model.layers.2"]
    hand = copy.deepcopy(lm)
    layers = hand.model.layers
    layers[1], layers[2] = layers[2], layers[1]
    assert got == pytest.approx(evaluate(hand, (ids, ids), metrics=("nll",))["nll"], rel=1e-6)

    class Uneven(Toy):
        def __init__(self):
            super().__init__(depth=3)
            self.blocks[2].fc = nn.Linear(8, 8, bias=False)

    uneven = Uneven().eval()
    usd = uneven.state_dict()
    summary = analyze(uneven, {0: usd, 1: usd}, (x := torch.randn(8, 4), torch.zeros(8, dtype=torch.long)),
                      seeds=0, ops=("swap",), progress=False).summary
    assert list(summary["swap_pairs"]) == ["blocks.0+blocks.1"]
    assert "different entries (fc.bias" in summary["swap_refused"]["blocks.1+blocks.2"]
    with pytest.raises(CriticalityError, match="no adjacent blocks can be swapped"):
        analyze(uneven, {0: usd, 1: usd}, (x, torch.zeros(8, dtype=torch.long)), seeds=0, ops=("swap",),
                blocks=["blocks.1", "blocks.2"], progress=False)


def test_cli_prune_of_a_run_directory_saves_a_state_dict_and_the_removed_paths(tmp_path, capsys):
    run = train(TrainConfig(model="fcn-2x16", data="digits", epochs=1, batch_size=64, device="cpu"),
                tmp_path / "run", progress=False)
    assert main(["prune", str(run), "--remove", "1", "--save", str(tmp_path / "small"), "--no-progress"]) == 0
    assert "step 1: removed" in capsys.readouterr().out
    table = pd.read_csv(run / "pruning" / "pruning.csv")
    assert table.removed.iloc[1] == "fc2"  # the only block that maps a shape to itself
    config = json.loads((run / "config.json").read_text())
    small = export.load_pruned(models.build(**config["model"]["build"]), tmp_path / "small")
    x, y = datasets.load("digits").test
    assert evaluate(small, (x, y))["error"] == pytest.approx(table.error.iloc[1])
    assert main(["prune", str(run), "--data", "x.txt", "--remove", "1"]) == 2
    assert "drop --data" in capsys.readouterr().err


def test_exported_model_keeps_each_layers_attention_type(tmp_path):
    """Qwen3 with alternating sliding-window layers: ``layer_types`` loses the removed layer's entry, so each
    kept layer keeps its own attention (a stale list would give layer 1 the removed layer's type)."""
    cfg = transformers.Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                   max_position_embeddings=32, sliding_window=4, use_sliding_window=True,
                                   layer_types=["sliding_attention", "full_attention"] * 2,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    qwen = transformers.Qwen3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(4))
    export.save_pruned(qwen, qwen.state_dict(), ["model.layers.1"], tmp_path / "q")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert back.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert json.loads((tmp_path / "q" / "pruned.json").read_text())["per_layer_config"] == ["layer_types"]
    with torch.no_grad(), skipping(qwen, ["model.layers.1"], {}):
        torch.testing.assert_close(back(ids).logits, qwen(ids).logits, rtol=1e-5, atol=1e-5)
    prompt = ids[:, :3]  # 3 + 12 tokens: past the sliding window of 4, through the cache
    with_cache = back.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    without = back.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                            use_cache=False)
    assert torch.equal(with_cache, without)
