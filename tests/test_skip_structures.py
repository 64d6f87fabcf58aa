"""Skip and the engine's stubs on blocks that return tuples, dicts and ``ModelOutput``s (issue 22, item 4).

Run: ``PYTHONPATH=src pytest tests/test_skip_structures.py -q`` (about 15 s on 2 cores).

A forward hook that returns a value replaces the module's output: ``stubs.shapes_of`` must leave every output
as it was (a T5 block returned the integer 3). A skipped block passes its first input through in the block's
own return structure, so the model's forward (which unpacks a tuple, reads a key) runs on; a skip cell equals
the model rebuilt without the block, on both engines; a block whose output shape differs from its input's is
refused with its path and both shapes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from criticality import interventions
from criticality.core import stubs
from criticality.core.analysis import analyze
from criticality.errors import CriticalityError

transformers = pytest.importorskip("transformers")
ModelOutput = transformers.utils.ModelOutput
BaseModelOutput = transformers.modeling_outputs.BaseModelOutput


class Layer(nn.Module):
    """A residual block returning its hidden state as ``kind``: tensor, tuple, dict or ModelOutput."""

    def __init__(self, dim: int, kind: str):
        super().__init__()
        self.fc, self.kind = nn.Linear(dim, dim), kind

    def forward(self, x):  # (N, D)
        h = x + torch.tanh(self.fc(x))
        if self.kind == "tuple":
            return (h, h.sum())  # a second element the parent ignores
        if self.kind == "dict":
            return {"hidden": h}
        if self.kind == "output":
            return BaseModelOutput(last_hidden_state=h)
        return h


def unpack(out):
    if isinstance(out, tuple):
        return out[0]
    if isinstance(out, BaseModelOutput):
        return out.last_hidden_state
    if isinstance(out, dict):
        return out["hidden"]
    return out


class Net(nn.Module):
    def __init__(self, kind: str, depth: int = 3, dim: int = 36, classes: int = 5):
        super().__init__()
        self.layers = nn.ModuleList(Layer(dim, kind) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):  # (N, 1, 6, 6)
        h = x.flatten(1)
        for layer in self.layers:
            h = unpack(layer(h))
        return self.head(h)


def trained(kind: str):
    torch.manual_seed(0)
    net = Net(kind)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 1, 6, 6, generator=g)
    y = (x.flatten(1) @ torch.randn(36, 5, generator=g)).argmax(1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    states = {0: copy.deepcopy(net.state_dict())}
    for step in range(1, 21):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if step % 10 == 0:
            states[step] = copy.deepcopy(net.state_dict())
    return net, states, (x, y)


@pytest.mark.parametrize("kind", ["tuple", "dict", "output"])
def test_learning_return_structures_leaves_the_output_alone(kind):
    net, _, (x, _) = trained(kind)
    with torch.no_grad():
        want = net(x)
        layers = {f"layers.{i}": net.layers[i] for i in range(3)}
        shapes = stubs.shapes_of(lambda: torch.testing.assert_close(net(x), want, rtol=0, atol=0), layers)
    assert set(shapes) == set(layers)
    assert all(s == stubs.shape_of(net.layers[0](x.flatten(1))) for s in shapes.values())
    assert shapes["layers.0"] is not None  # the structure was seen, not taken for a tensor


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict", "output"])
def test_skip_cells_equal_the_model_without_the_block_on_both_engines(kind):
    net, states, data = trained(kind)
    before = copy.deepcopy(net.state_dict())
    groups = {f"layer{i}": [f"layers.{i}"] for i in range(3)} | {"head": ["head"]}
    kw = dict(groups=groups, ops=("reinit", "skip"), seeds=1, batch_size=64, progress=False, metrics=("error", "loss"))
    fast = analyze(net, states, data, **kw)
    naive = analyze(net, states, data, engine="naive", **kw)
    assert fast.table[["op", "group", "error"]].equals(naive.table[["op", "group", "error"]])
    assert ((fast.table.loss - naive.table.loss).abs() < 1e-6).all()
    assert fast.summary["skip_modules"] == {f"layer{i}": f"layers.{i}" for i in range(3)}
    assert "maps shape (36,) to (5,)" in fast.summary["skip_refused"]["head"]
    without = copy.deepcopy(net)
    without.load_state_dict(states[20])
    del without.layers[1]
    with torch.no_grad():
        want = nn.functional.cross_entropy(without(data[0]), data[1]).item()
    got = fast.table[(fast.table.op == "skip") & (fast.table.group == "layer1")].loss.item()
    assert got == pytest.approx(want, abs=1e-5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_stubs_keep_the_structure_and_clone_the_cached_hidden_state():
    h = torch.randn(2, 4)
    for out in [h, (h, None, None), {"hidden": h}, BaseModelOutput(last_hidden_state=h)]:
        shape = stubs.shape_of(out)
        made = stubs.as_shape(h, shape)
        assert type(made) is type(out) and stubs.hidden_of(made) is h
        copied = stubs.returning(out)()
        assert type(copied) is type(out) and torch.equal(stubs.hidden_of(copied), h)
        assert stubs.hidden_of(copied) is not h  # the next block may work in place on it
    with pytest.raises(ValueError, match="not a tensor"):
        stubs.shape_of({"n": 3})


def test_a_block_that_changes_the_shape_is_refused_with_its_path_and_shapes():
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.Linear(8, 5))
    with pytest.raises(CriticalityError, match=r"module '1' maps shape \(36,\) to \(8,\)"):
        interventions.plan_skips(net, {"a": ["1.weight", "1.bias"], "b": ["2.weight", "2.bias"]},
                                 torch.randn(2, 1, 6, 6))


def test_t5_blocks_keep_their_tuple_output_and_can_be_skipped():
    cfg = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                                num_heads=2, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(1, 40, (2, 5))
    inputs = {"input_ids": ids, "labels": torch.randint(1, 40, (2, 4))}
    with torch.no_grad():
        want = t5(**inputs).logits
        blocks = {f"encoder.block.{i}": t5.encoder.block[i] for i in range(2)}
        shapes = stubs.shapes_of(lambda: torch.testing.assert_close(t5(**inputs).logits, want, rtol=0, atol=0),
                                 blocks)
        assert set(shapes) == set(blocks)
        groups = {f"enc{i}": [k for k in t5.state_dict() if k.startswith(f"encoder.block.{i}.")] for i in range(2)}
        plan = interventions.plan_skips(t5, groups, inputs)
        assert plan.paths == {"enc0": "encoder.block.0", "enc1": "encoder.block.1"}
        with stubs.skipping(t5, ["encoder.block.1"], plan.outputs):
            skipped = t5(**inputs).logits
        assert skipped.shape == want.shape and not torch.equal(skipped, want)
        encoded = t5.encoder.block[0](t5.encoder.embed_tokens(ids))[0]
        hidden = t5.encoder.dropout(t5.encoder.final_layer_norm(encoded))
        by_hand = t5(encoder_outputs=(hidden,), labels=inputs["labels"]).logits
    torch.testing.assert_close(skipped, by_hand, rtol=1e-5, atol=1e-6)
