"""The fast engine against its plain reference on real transformers classes (tiny random configs).

Run: ``pytest tests/test_engine.py -q`` (about 30 s on 2 cores).

Every variant (a block re-initialized, a block skipped, the final model) evaluated by the engine with
prefix reuse equals :func:`engine.evaluate_naive` (deepcopy, load_state_dict, plain loop): errors exactly,
losses/nll to 1e-5, per-example records included. Then: the prefix really is skipped, a skipped Llama
layer equals a Llama built without it, the caller's model comes back bit for bit, bf16 models, batches
and outputs of every accepted form, and clear errors.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from criticality.core import batches, engine, metrics  # noqa: E402
from criticality.core.analysis import analyze  # noqa: E402
from criticality.core.plan import PlanSpec, make_plan  # noqa: E402
from criticality.core.run import run_cells  # noqa: E402
from criticality.core.stacks import find_stack  # noqa: E402
from criticality.errors import CriticalityError  # noqa: E402

N, T, VOCAB, BATCH = 12, 10, 40, 4


def _perturbed(model: nn.Module, scale: float = 0.5, seed: int = 1) -> dict[int, dict[str, torch.Tensor]]:
    """Checkpoint 0 = the model's init; checkpoint 1 = init plus noise, loaded into the model (trained)."""
    g = torch.Generator().manual_seed(seed)
    start = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std().nan_to_num(0.02).clamp(min=0.02) * torch.randn(p.shape, generator=g))
    return {0: start, 1: copy.deepcopy(model.state_dict())}


def llama(layers: int = 3):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, num_labels=3, max_position_embeddings=64)
    return transformers.BertForSequenceClassification(cfg).eval()


def vit():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=3,
                                 num_attention_heads=4, intermediate_size=48, num_labels=5)
    return transformers.ViTForImageClassification(cfg).eval()


def resnet():
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    num_labels=5, layer_type="basic")
    return transformers.ResNetForImageClassification(cfg).eval()


def token_batches(with_labels: bool = True, pad: bool = True):
    """Dict batches of token ids, the later sequences of each batch right-padded."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    if pad:
        for i in range(N):
            mask[i, T - i % 4:] = 0
    out = []
    for i in range(0, N, BATCH):
        b = {"input_ids": ids[i:i + BATCH], "attention_mask": mask[i:i + BATCH]}
        if with_labels:
            b["labels"] = ids[i:i + BATCH].clone()
        out.append(b)
    return out


def image_data(n: int = N):
    g = torch.Generator().manual_seed(4)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def variants(model: nn.Module, states, stack: list[tuple[str, nn.Module]], skip: bool = True) -> list[engine.Variant]:
    """Per block: re-initialized to checkpoint 0, and skipped; the head re-initialized; the final model."""
    out = [engine.Variant("final")]
    for path, _ in stack:
        keys = [k for k in states[1] if k.startswith(path + ".")]
        out.append(engine.Variant(("reinit", path), {k: states[0][k] for k in keys}))
        if skip:
            out.append(engine.Variant(("skip", path), skip=(path,)))
    head = [k for k in states[1] if k.startswith(("lm_head.", "classifier."))]
    out.append(engine.Variant(("reinit", "head"), {k: states[0][k] for k in head}))
    return out


def assert_same(fast: engine.CellResult, naive: engine.CellResult):
    assert fast["n"] == naive["n"]
    for name, (values, counts) in naive.records.items():
        assert torch.equal(fast.records[name][1], counts)
        if "error" in name or name == "agreement":
            assert torch.equal(fast.records[name][0], values), name
            assert fast[name] == naive[name]
        else:
            torch.testing.assert_close(fast.records[name][0], values, rtol=0, atol=1e-5)
            assert fast[name] == pytest.approx(naive[name], abs=1e-5)


CASES = {
    "llama": (llama, token_batches, ("token_error", "nll", "agreement", "kl")),
    "gpt2": (gpt2, token_batches, ("token_error", "nll", "agreement", "kl")),
    "bert": (bert, lambda: [{**b, "labels": b["input_ids"][:, 0] % 3} for b in token_batches()],
             ("error", "loss", "agreement", "kl")),
    "vit": (vit, image_data, ("error", "loss", "agreement", "kl")),
    "resnet": (resnet, image_data, ("error", "loss", "agreement")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_variant_equals_the_naive_reference(name):
    make, data_of, names = CASES[name]
    model = make()
    states = _perturbed(model)
    data = data_of()
    stack = find_stack(model)
    assert len(stack) >= 2, f"no block stack found in {name}"
    fast = engine.Engine(model, states[1], data, metrics=names, batch_size=BATCH, blocks=stack)
    cells = variants(model, states, stack, skip=name != "resnet")  # ResNet stages change the width
    got = dict(fast.evaluate(cells))
    assert fast._settle().valid == list(range(len(fast.blocks) + 1)), "every position should reuse its prefix"
    assert len(fast.blocks) >= len(stack)  # the stack, and the embeddings or stem when they can lead it
    for v in cells:
        state = {**states[1], **v.materialize()}
        want = engine.evaluate_naive(model, state, data, metrics=names, batch_size=BATCH, skip=v.skip,
                                     reference_state=states[1])
        assert_same(got[v.id], want)
    assert got["final"]["agreement"] == 1.0


def test_the_prefix_is_really_skipped():
    model = llama(layers=3)
    states = _perturbed(model)
    data = token_batches()
    fast = engine.Engine(model, states[1], data, metrics=("nll",), batch_size=BATCH)
    late = [engine.Variant(i, {k: v for k, v in states[0].items() if k.startswith("model.layers.2.")})
            for i in range(3)]
    fast.position(late[0])  # settle (probe forwards) before counting
    calls = {i: 0 for i in range(3)}
    hooks = [model.model.layers[i].self_attn.register_forward_hook(
        lambda *a, i=i: calls.__setitem__(i, calls[i] + 1)) for i in range(3)]
    list(fast.evaluate(late))
    for h in hooks:
        h.remove()
    batches_ = len(data)
    assert calls[2] == 3 * batches_  # the modified layer runs for every variant
    assert calls[0] == calls[1] == batches_  # its predecessors once, to fill the cache


def test_skipping_a_llama_layer_equals_a_llama_without_it():
    model = llama(layers=3)
    states = _perturbed(model)
    smaller = llama(layers=2)
    own = {k: v for k, v in states[1].items() if not k.startswith("model.layers.")}
    own.update({k.replace("model.layers.2.", "model.layers.1."): v for k, v in states[1].items()
                if k.startswith("model.layers.2.")})
    own.update({k: v for k, v in states[1].items() if k.startswith("model.layers.0.")})
    smaller.load_state_dict(own)
    data = token_batches()
    fast = dict(engine.Engine(model, states[1], data, metrics=("nll", "token_error"), batch_size=BATCH)
                .evaluate([engine.Variant("skip1", skip=("model.layers.1",))]))["skip1"]
    want = engine.evaluate(smaller, data, metrics=("nll", "token_error"), batch_size=BATCH)
    assert fast["token_error"] == want["token_error"]
    torch.testing.assert_close(fast.records["nll"][0], want.records["nll"][0], rtol=0, atol=1e-6)


def _snapshot(model: nn.Module):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _same_snapshot(model: nn.Module, snap) -> bool:
    state, modes = snap
    now = model.state_dict()
    return all(torch.equal(now[k], v) for k, v in state.items()) and modes == [m.training for m in model.modules()]


def test_the_callers_model_comes_back_bit_for_bit_also_after_an_error():
    model = vit()
    states = _perturbed(model)
    model.load_state_dict(states[0])  # the caller holds another state than the final one
    model.train()
    snap = _snapshot(model)
    data = image_data()
    groups = {"emb": ["vit.embeddings"], "l0": ["vit.layers.0"], "l2": ["vit.layers.2"],
              "head": ["classifier"]}
    fast = analyze(model, states, data, groups=groups, seeds=0, batch_size=BATCH, progress=False).table
    assert _same_snapshot(model, snap)
    naive = analyze(model, states, data, groups=groups, seeds=0, batch_size=BATCH, progress=False,
                    engine="naive").table
    np.testing.assert_array_equal(fast.error.to_numpy(), naive.error.to_numpy())
    np.testing.assert_allclose(fast.loss.to_numpy(), naive.loss.to_numpy(), rtol=0, atol=1e-5)

    seen = []

    def failing(logits, targets):
        seen.append(1)
        if len(seen) > 4:
            raise RuntimeError("boom mid-grid")
        return (logits.argmax(1) != targets).double()

    with pytest.raises(RuntimeError, match="boom"):
        analyze(model, states, data, groups=groups, seeds=0, batch_size=BATCH, progress=False,
                metrics={"error": failing})
    assert _same_snapshot(model, snap)


def test_a_bf16_model_is_evaluated_in_bf16_close_to_a_float32_reference():
    model = vit()
    states = _perturbed(model)
    data = image_data(n=48)
    half = copy.deepcopy(model).to(torch.bfloat16)
    cells = [engine.Variant("final"), engine.Variant("l1", {k: v for k, v in states[0].items()
                                                            if k.startswith("vit.layers.1.")})]
    fast = dict(engine.Engine(half, states[1], data, batch_size=16).evaluate(cells))
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())  # evaluated in its own dtype
    for v in cells:
        want = engine.evaluate_naive(model, {**states[1], **v.materialize()}, data, batch_size=16)
        # bf16 keeps 8 bits of mantissa: losses agree to about 1 %, a few of 48 top-1 predictions may flip
        assert fast[v.id]["loss"] == pytest.approx(want["loss"], rel=0.03)
        assert abs(fast[v.id]["error"] - want["error"]) <= 3 / 48
        assert fast[v.id].records["loss"][0].dtype == torch.float64


def test_unlabelled_data_and_label_free_metrics():
    model = llama(layers=2)
    states = _perturbed(model)
    ids = torch.cat([b["input_ids"] for b in token_batches(with_labels=False)])
    cells = [engine.Variant("final"), engine.Variant("l0", {k: v for k, v in states[0].items()
                                                            if k.startswith("model.layers.0.")})]
    got = dict(engine.Engine(model, states[1], ids, metrics=("agreement", "kl"), batch_size=BATCH).evaluate(cells))
    assert got["final"]["agreement"] == 1.0 and got["final"]["kl"] == pytest.approx(0, abs=1e-6)
    assert got["l0"]["agreement"] < 1.0 and got["l0"]["kl"] > 0
    assert got["l0"].records["kl"][1].tolist() == [T] * N  # every token of every sequence counts
    with pytest.raises(CriticalityError, match="needs labels"):
        dict(engine.Engine(model, states[1], (ids,), metrics=("nll",), batch_size=BATCH).evaluate(cells))


def test_sequence_metrics_by_hand():
    logits = torch.tensor([[[0.0, 2.0], [3.0, 0.0], [0.0, 1.0]]])  # (1, 3, 2): predicts 1, 0, 1
    labels = torch.tensor([[9, 0, 0]])  # shifted: positions 0, 1 predict labels 0, 0
    v, c = metrics.TokenError()(logits, labels, None)
    assert v.tolist() == [1.0] and c.tolist() == [2]
    v, c = metrics.TokenError(shift=False)(logits, torch.tensor([[1, -100, 0]]), None)
    assert v.tolist() == [1.0] and c.tolist() == [2]
    v, c = metrics.NLL()(logits, torch.tensor([[0, 1, -100]]), None)
    want = -torch.log_softmax(logits[0, 0], 0)[1]
    assert c.tolist() == [1] and v.item() == pytest.approx(want.item())
    padded = batches.split({"input_ids": torch.zeros(1, 3), "attention_mask": torch.tensor([[1, 1, 0]]),
                            "labels": torch.tensor([[4, 5, 6]])})
    assert padded[1].tolist() == [[4, 5, -100]]


def test_outputs_of_every_form_and_clear_errors():
    x = torch.randn(3, 4)
    logits = torch.randn(3, 2)

    class Returns(nn.Module):
        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, x):
            return self.out

    out = transformers.modeling_outputs.SequenceClassifierOutput(logits=logits)
    for raw in (logits, (logits, None), [logits], {"logits": logits}, out):
        assert batches.call(Returns(raw), x) is logits
    assert batches.call(Returns({"scores": logits}), x, output="scores") is logits
    assert batches.call(Returns({"a": [logits]}), x, output=lambda o: o["a"][0]) is logits
    with pytest.raises(CriticalityError, match="set"):
        batches.call(Returns({1, 2}), x)
    with pytest.raises(CriticalityError, match="without 'logits'"):
        batches.call(Returns({"scores": logits}), x)
    got = list(batches.iter_batches({"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(5)}, 2,
                                    limit=3))
    assert [batches.batch_len(b[0]) for b in got] == [2, 1] and got[1][1].tolist() == [2]
    assert list(batches.iter_batches([(x,)], 2))[0][1] is None


def test_run_cells_on_a_language_model_gives_records_and_perplexity():

    model = gpt2()
    states = _perturbed(model)
    data = token_batches()
    groups = {"emb": ["transformer.wte", "transformer.wpe", "lm_head"], "h1": ["transformer.h.1"]}
    plan = make_plan(model, states, PlanSpec(groups, 0, metrics=("token_error", "nll", "agreement", "kl"),
                                              batch_size=BATCH))
    rows = run_cells(plan, data, progress=False)
    plan.engine = "naive"
    naive = run_cells(plan, data, progress=False)
    for row, want in zip(rows, naive, strict=True):
        assert row["token_error"] == want["token_error"]
        assert row["nll"] == pytest.approx(want["nll"], abs=1e-5)
        assert row["perplexity"] == pytest.approx(np.exp(row["nll"]))
    assert all(r["records"] is not None for r in rows)
    values, counts = (np.asarray(a) for a in rows[0]["records"]["nll"])
    assert counts.shape == (N,)
    assert rows[0]["nll"] == pytest.approx(float(values.sum() / counts.sum()))
    assert int(counts.sum()) == int((torch.cat([b["attention_mask"] for b in data])[:, 1:]).sum())


def test_user_named_blocks():
    model = bert()
    states = _perturbed(model)
    data = CASES["bert"][1]()
    groups = {"l0": ["bert.encoder.layer.0"], "l1": ["bert.encoder.layer.1"], "head": ["classifier"]}
    kw = dict(groups=groups, seeds=0, batch_size=BATCH, progress=False)
    named = analyze(model, states, data, blocks=["bert.encoder.layer.0", "bert.encoder.layer.1"], **kw).table
    naive = analyze(model, states, data, engine="naive", **kw).table
    np.testing.assert_array_equal(named.error.to_numpy(), naive.error.to_numpy())
    np.testing.assert_allclose(named.loss.to_numpy(), naive.loss.to_numpy(), rtol=0, atol=1e-5)
    with pytest.raises(CriticalityError, match="blocks"):
        analyze(model, states, data, blocks=["bert.nope"], **kw)


def test_chunks_of_one_batch_give_the_same_records():
    model = llama(layers=2)
    states = _perturbed(model)
    data = token_batches()
    names = ("nll", "agreement", "kl")
    cells = [engine.Variant("final"), engine.Variant("l1", {k: v for k, v in states[0].items()
                                                            if k.startswith("model.layers.1.")})]
    one = dict(engine.Engine(model, states[1], data, metrics=names, batch_size=BATCH).evaluate(cells))
    tiny = engine.Engine(model, states[1], data, metrics=names, batch_size=BATCH, max_cache_bytes=1)
    many = dict(tiny.evaluate(cells))
    assert tiny._batches_per_chunk() == 1
    for k in one:
        for name in names:
            assert torch.equal(one[k].records[name][0], many[k].records[name][0])


def test_placement_uses_the_callers_instance_and_never_moves_a_dispatched_model():
    model = nn.Linear(3, 2)
    assert engine.placed(model, torch.device("cpu")) is model
    model.hf_device_map = {"": 0}  # as accelerate's dispatch marks a model spread over devices
    assert engine.placed(model, torch.device("cuda")) is model  # left where its layers are: no copy, no move


def test_tied_keys_with_different_values_load_as_the_reference_and_restore_exactly():
    model = gpt2()
    states = _perturbed(model)
    final = {**states[1], "lm_head.weight": states[1]["lm_head.weight"] + 1.0}  # one tensor, two values
    model.load_state_dict(states[0])
    snap = _snapshot(model)
    data = token_batches()
    got = dict(engine.Engine(model, final, data, metrics=("nll",), batch_size=BATCH).evaluate([engine.Variant("f")]))
    want = engine.evaluate_naive(model, final, data, metrics=("nll",), batch_size=BATCH)
    assert got["f"]["nll"] == pytest.approx(want["nll"], abs=1e-5)
    assert _same_snapshot(model, snap)


def test_hooks_and_eval_mode_always_come_undone():
    from criticality.core.hooks import eval_mode, hooks

    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 2))
    net.train()
    net[1].eval()  # a module already in eval stays so
    seen = []
    with pytest.raises(RuntimeError, match="boom"), eval_mode(net), \
            hooks([(net[0], lambda m, a: seen.append("pre"))], pre=True), \
            hooks([(net[2], lambda m, a, out: seen.append("post"))]):
        assert not any(m.training for m in net.modules())
        net(torch.zeros(1, 2))
        raise RuntimeError("boom")
    assert seen == ["pre", "post"]
    assert [m.training for m in net.modules()] == [True, True, False, True]
    assert not net[0]._forward_pre_hooks and not net[2]._forward_hooks
    net(torch.zeros(1, 2))
    assert seen == ["pre", "post"]


def test_the_default_metric_sets_are_built_in_metrics():
    for names in (metrics.DEFAULT_METRICS, metrics.CLASSIFIER_METRICS, metrics.SEQUENCE_METRICS):
        assert set(metrics.resolve(names)) == set(names) <= set(metrics.METRICS)
    assert engine.DEFAULT_METRICS is metrics.DEFAULT_METRICS
