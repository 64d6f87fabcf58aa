"""State derived from weights: caches are dropped when a variant is loaded, and the canary catches the rest
(issue 22, items 1 and 5).

Run: ``PYTHONPATH=src pytest tests/test_canary.py -q`` (about 10 s on 2 cores).

``Biased`` keeps an attention-bias-like cache as timm's LeViT does (a dict of tensors computed from a parameter
in eval mode, dropped by its ``train()`` override): the fast engine's cells must equal those of freshly built
models loaded with each variant. ``Fused`` keeps a tensor it recomputes only in a ``load_state_dict`` hook
(which swapping tensors in place never runs): the canary must see the difference, warn naming the group and
give the reference's numbers.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from criticality.core import caches, canary
from criticality.core.analysis import analyze
from criticality.core.engine import Engine
from criticality.core.plan import PlanSpec, make_plan


class Biased(nn.Module):
    """A layer whose eval-mode bias comes from a per-device cache of a function of its parameter."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn(dim) * 0.5)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    def reset_parameters(self):
        nn.init.normal_(self.table, std=0.5)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.attention_bias_cache:
            self.attention_bias_cache = {}
        return self

    def bias(self, device) -> torch.Tensor:
        if self.training:
            return torch.tanh(self.table)
        return self.attention_bias_cache.setdefault(str(device), torch.tanh(self.table))

    def forward(self, x):
        return x + torch.relu(self.fc(x)) + self.bias(x.device)


class Fused(nn.Module):
    """A layer that folds its weight into a plain attribute for inference, refreshed when a state dict is loaded
    (and when built)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.fused = self.fc.weight.detach().clone()
        self.register_load_state_dict_post_hook(lambda module, keys: module.refuse())

    def refuse(self):
        self.fused = self.fc.weight.detach().clone()

    def forward(self, x):
        weight = self.fc.weight if self.training else self.fused  # the folded copy serves inference
        return x + torch.relu(x @ weight.T + self.fc.bias)


def net(layer) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), layer(16), layer(16), nn.Linear(16, 5))


def trajectory(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 1, 6, 6, generator=g)
    y = (x.flatten(1) @ torch.randn(36, 5, generator=g)).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    states = {0: copy.deepcopy(model.state_dict())}
    for step in range(1, 31):
        model.train()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if hasattr(model[2], "refuse"):
            for m in (model[2], model[3]):
                m.refuse()
        if step % 15 == 0:
            states[step] = copy.deepcopy(model.state_dict())
    model.eval()
    with torch.no_grad():
        model(x)  # the caches now hold the trained weights' values
    return states, (x, y)


def by_hand(layer, state, data) -> float:
    """The loss of a freshly built model loaded with ``state``: the reference neither path may differ from."""
    fresh = net(layer).eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        return nn.functional.cross_entropy(fresh(data[0]), data[1]).item()


def engine_of(plan, data) -> Engine:
    return Engine(plan.model, plan.final_state, data, metrics=plan.metrics, batch_size=plan.batch_size)


KW = dict(groups={"first": ["1"], "a": ["2"], "b": ["3"], "head": ["4"]}, seeds=1, batch_size=64, progress=False,
          metrics=("error", "loss"), init="torch")


def test_invalidate_empties_weight_derived_caches_and_keeps_modes():
    model = net(Biased).eval()
    model[2].train()
    with torch.no_grad():
        model(torch.randn(2, 1, 6, 6))
    assert model[3].attention_bias_cache and not model[2].attention_bias_cache
    emptied = caches.invalidate(model)
    assert not model[3].attention_bias_cache
    assert [m.training for m in model] == [False, False, True, False, False]
    model[3].other_cache = {"x": torch.zeros(1)}
    model[3].names_cache = {"x": "not a tensor"}
    assert caches.invalidate(model) == ["3.other_cache"] and model[3].names_cache
    assert emptied == []  # timm's pattern: train() itself dropped it


def test_a_cache_of_weight_derived_tensors_does_not_survive_a_swap():
    model = net(Biased)
    states, data = trajectory(model)
    fast = analyze(model, states, data, **KW)
    naive = analyze(model, states, data, engine="naive", **KW)
    t = fast.table
    for group, keys in {"a": "2.", "b": "3."}.items():
        state = {k: (states[0] if k.startswith(keys) else states[30])[k] for k in states[30]}
        want = by_hand(Biased, state, data)
        got = t[(t.op == "reinit") & (t.group == group) & (t.checkpoint == 0)].loss.item()
        assert got == pytest.approx(want, abs=1e-6)
    assert ((fast.table.loss - naive.table.loss).abs() < 1e-6).all()
    assert fast.table.error.equals(naive.table.error)


def test_the_canary_falls_back_to_the_reference_with_a_warning():
    model = net(Fused)
    states, data = trajectory(model)
    plan = make_plan(model, states, PlanSpec(**{k: v for k, v in KW.items() if k != "progress"}), probe=data)
    assert canary.mismatches(plan, plan.cells, data, "cpu", engine_of(plan, data)) == ["a", "b"]
    assert canary.variants(plan, plan.cells)["a"].checkpoint == 0  # reinit to the earliest checkpoint
    with pytest.warns(UserWarning, match=r"differ from the plain reference's for group\(s\) a, b"):
        fast = analyze(model, states, data, **KW)
    naive = analyze(model, states, data, engine="naive", **KW)
    assert ((fast.table.loss - naive.table.loss).abs() < 1e-9).all()
    state = {k: (states[0] if k.startswith("2.") else states[30])[k] for k in states[30]}
    t = fast.table
    got = t[(t.op == "reinit") & (t.group == "a") & (t.checkpoint == 0)].loss.item()
    assert got == pytest.approx(by_hand(Fused, state, data), abs=1e-6)


def test_no_warning_and_no_fallback_for_a_plain_model():
    model = net(lambda d: nn.Sequential(nn.Linear(d, d), nn.ReLU()))
    states, data = trajectory(model)
    plan = make_plan(model, states, PlanSpec(**{k: v for k, v in KW.items() if k != "progress"}), probe=data)
    assert canary.mismatches(plan, plan.cells, data, "cpu", engine_of(plan, data)) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analyze(model, states, data, **KW)
