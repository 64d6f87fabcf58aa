"""Module criticality: the bisection search finds the exhaustive α × σ grid's minimum with far fewer points.

Run: ``PYTHONPATH=src pytest tests/test_module_criticality.py -q`` (a few seconds on 2 cores).

The toy is a 3-layer MLP trained to zero error on a linearly separable 4-class problem, so that resetting
a layer hurts and noise of the size of its training movement does too (the μ values are not trivially 0).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from criticality.errors import CriticalityError
from criticality.interventions.module_criticality import module_criticality, write

KW = dict(groups="auto", eps=0.03, alphas=(0, 0.2, 0.4, 0.6, 0.8, 1), sigmas=tuple(i / 10 for i in range(1, 11)),
          draws=2, batch_size=400)


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 10, generator=g)
    y = (x @ torch.randn(10, 4, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))
    states = {0: copy.deepcopy(model.state_dict())}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    states[1] = copy.deepcopy(model.state_dict())
    return model, states, (x, y)


def test_search_equals_the_exhaustive_grid_minimum(toy, tmp_path):
    model, states, data = toy
    grid = module_criticality(model, states, data, search="grid", **KW)
    fast = module_criticality(model, states, data, **KW)
    # The search's assumption holds on this toy: for each α the feasible σ are a prefix of the grid.
    feasible = grid.points.pivot_table(index=["group", "alpha"], columns="sigma", values="feasible").to_numpy()
    assert (np.diff(feasible.astype(int), axis=1) <= 0).all()
    assert fast.table.mu.tolist() == grid.table.mu.tolist() and fast.total == grid.total
    assert 0 < fast.total < math.inf and (fast.table.mu > 0).all()
    assert len(grid.points) == 3 * 6 * 10 and len(fast.points) < len(grid.points) / 3
    # The search's points are the grid's points (same cells, same noise draws).
    both = fast.points.merge(grid.points, on=["group", "alpha", "sigma"], suffixes=("", "_grid"))
    assert len(both) == len(fast.points) and (both.error == both.error_grid).all()
    # μ = n α² / σ² at the argmin, and the argmin is feasible with error ≤ final + eps.
    row = fast.table.iloc[0]
    assert row.mu == pytest.approx(row.n * row.alpha ** 2 / row.sigma ** 2)
    assert fast.summary["final_error"] == 0.0 and fast.summary["eps"] == 0.03
    assert {p.name for p in write(fast, tmp_path)} == {"module_criticality.csv", "module_criticality_points.csv"}


def test_the_reference_engine_agrees_and_the_store_resumes(toy, tmp_path):
    model, states, data = toy
    kw = {**KW, "alphas": (0.5, 1.0), "sigmas": (0.2, 0.6, 1.0)}
    store = str(tmp_path / "cells.jsonl")
    fast = module_criticality(model, states, data, store=store, **kw)
    naive = module_criticality(model, states, data, engine="naive", **kw)
    np.testing.assert_array_equal(fast.points.error.to_numpy(), naive.points.error.to_numpy())
    lines = len(open(store).read().splitlines())
    again = module_criticality(model, states, data, store=store, **kw)
    assert len(open(store).read().splitlines()) == lines and again.total == fast.total


def test_bad_arguments(toy):
    model, states, data = toy
    with pytest.raises(CriticalityError, match="sigmas"):
        module_criticality(model, states, data, **{**KW, "sigmas": (0.0, 0.5)})
    with pytest.raises(CriticalityError, match="draw"):
        module_criticality(model, states, data, **{**KW, "draws": 0})
