"""distances.py against hand computations at non-zero checkpoints, and its streaming over lazy mappings.

Run: ``.venv/bin/pytest tests/test_distances.py -q`` (a second).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch

from criticality.core.distances import COLUMNS, distances

W0 = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
B0 = torch.tensor([3.0, -1.0])
STATES = {
    0: {"w": W0, "b": B0},
    1: {"w": W0 + torch.tensor([[0.5, 0.0], [0.0, -1.5]]), "b": B0 + torch.tensor([0.0, 1.0])},
    7: {"w": 2 * W0, "b": -B0},
}


def test_the_papers_definitions_by_hand():
    d = distances(STATES, {"layer": ["w", "b"]}).set_index("checkpoint")
    assert set(d.reset_index().columns) == set(COLUMNS) and (d.n == 6).all()
    # epoch 1: differences 0.5, 0, 0, -1.5, 0, 1 (n = 6); θ0 = 1, -2, 0.5, 0, 3, -1
    assert d.l2[1] == pytest.approx(math.sqrt((0.25 + 2.25 + 1) / 6))  # ‖Δ‖₂ / √n
    assert d.linf[1] == pytest.approx(1.5)  # ‖Δ‖∞
    assert d.l2_rel[1] == pytest.approx(math.sqrt(3.5) / math.sqrt(1 + 4 + 0.25 + 9 + 1))
    assert d.linf_rel[1] == pytest.approx(1.5 / 3)
    # epoch 7: Δ = θ0 for w, -2·θ0 for b
    diff = torch.cat([W0.flatten(), -2 * B0])
    assert d.l2[7] == pytest.approx(float(diff.norm()) / math.sqrt(6))
    assert d.linf[7] == pytest.approx(6.0)
    theta7, theta0 = torch.cat([2 * W0.flatten(), -B0]), torch.cat([W0.flatten(), B0])
    assert d.cosine[7] == pytest.approx(1 - float(theta7 @ theta0 / theta7.norm() / theta0.norm()))
    assert d.loc[0, ["l2", "linf", "l2_rel", "linf_rel", "cosine"]].abs().max() == pytest.approx(0, abs=1e-12)


class Lazy(Mapping):
    """A checkpoint mapping that records every key read (contract 6: read per key, never whole)."""

    def __init__(self, state, log):
        self.state, self.log = state, log

    def __getitem__(self, key):
        self.log.append(key)
        return self.state[key]

    def __iter__(self):
        raise AssertionError("distances must not iterate a whole checkpoint")

    def __len__(self):
        return len(self.state)


def test_streams_only_the_groups_keys():
    log: list[str] = []
    lazy = {e: Lazy({**s, "unused": torch.zeros(3)}, log) for e, s in STATES.items()}
    d = distances(lazy, {"b only": ["b"]})
    assert set(log) == {"b"} and len(d) == 3
    assert d.set_index("checkpoint").linf[7] == pytest.approx(6.0)
