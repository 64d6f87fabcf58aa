"""Block Influence and angular distance against a hand computation, and the rank correlation.

Run: ``PYTHONPATH=src pytest tests/test_proxies.py -q`` (a few seconds).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from criticality.core import groups as groups_mod
from criticality.interventions import proxies
from toy import Residual


def test_chain_blocks_match_hooks_by_hand():
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(50, 1, 6, 6)
    table = proxies.block_proxies(model, (x, torch.zeros(50, dtype=torch.long)), batch_size=16,
                                  groups=groups_mod.resolve(model, "model"))
    assert table.block.tolist() == ["stem", "block1", "block2", "head"] and table.group.tolist() == table.block.tolist()
    seen = {}
    handle = model.block2.register_forward_hook(lambda m, i, o: seen.update(h=i[0], out=o))
    with torch.no_grad():
        model(x)
    handle.remove()
    cos = F.cosine_similarity(seen["h"].flatten(1).double(), seen["out"].flatten(1).double(), dim=1)
    row = table.set_index("block").loc["block2"]
    assert row.bi == pytest.approx(1 - cos.mean().item(), abs=1e-6)
    assert row.angular == pytest.approx((torch.arccos(cos) / math.pi).mean().item(), abs=1e-6)
    assert math.isnan(table.bi[0]) and "maps shape" in table.note[0]  # the stem changes shape


class Layer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mlp = nn.Linear(d, d)

    def forward(self, hidden_states, attention_mask=None):
        return (hidden_states + torch.tanh(self.mlp(hidden_states)),)  # an HF-style tuple


class TinyLM(nn.Module):
    """input_ids → embedding → layers → final norm → logits; the last hidden state is post-norm."""

    def __init__(self, vocab: int = 11, d: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Layer(d), Layer(d)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.model.layers:
            h = layer(h, attention_mask=attention_mask)[0]
        return self.head(self.norm(h))


def test_token_models_mask_padding_and_use_the_last_real_token():
    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 11, (4, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]])
    data = [({"input_ids": ids[:2], "attention_mask": mask[:2]}, ids[:2]),
            ({"input_ids": ids[2:], "attention_mask": mask[2:]}, ids[2:])]
    table = proxies.block_proxies(model, data)
    assert table.block.tolist() == ["model.layers.0", "model.layers.1"]
    with torch.no_grad():
        h0 = model.embed(ids)
        h1 = model.model.layers[0](h0)[0]
        h2 = model.model.layers[1](h1)[0]
    for row, (a, b) in zip(table.itertuples(), [(h0, h1), (h1, h2)], strict=True):
        cos = F.cosine_similarity(a.double(), b.double(), dim=-1)  # (4, 6)
        assert row.bi == pytest.approx(1 - cos[mask.bool()].mean().item(), abs=1e-6)
        last = cos[torch.arange(4), mask.sum(1) - 1]
        assert row.angular == pytest.approx((torch.arccos(last) / math.pi).mean().item(), abs=1e-6)
        assert row.tokens == int(mask.sum())


def test_spearman_and_correlations():
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [0.1, 0.5, 0.5, 0.9, 0.3], [1.0, 3.0, 2.0, 5.0, 2.0]
    assert proxies.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)
    assert math.isnan(proxies.spearman([1, 2], [2, 1]))
    table = pd.DataFrame({"block": list("abcd"), "group": list("abcd"), "bi": [0.1, 0.4, 0.2, 0.3],
                          "angular": [0.2, 0.1, 0.3, 0.4]})
    cells = pd.DataFrame({"op": ["final"] + ["reinit"] * 4 + ["skip"] * 3, "group": ["", *"abcd", *"bcd"],
                          "checkpoint": [3, 0, 0, 0, 0, None, None, None],
                          "delta_error": [0, 0.1, 0.4, 0.2, 0.3, 0.5, 0.1, 0.2]})
    rho = {(r["proxy"], r["target"]): r for r in proxies.correlations(table, cells)}
    assert rho[("bi", "reinit@0")]["spearman"] == pytest.approx(1.0) and rho[("bi", "reinit@0")]["n"] == 4
    assert rho[("bi", "skip")]["n"] == 3 and rho[("bi", "skip")]["spearman"] == pytest.approx(1.0)
