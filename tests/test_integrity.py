"""The trajectory integrity check (criticality.core.integrity) on in-memory state dicts.

Run: ``PYTHONPATH=src .venv/bin/pytest tests/test_integrity.py -q`` (a few seconds).

Identical checkpoints (by tensor bytes) are collapsed with the documented keep rule; a checkpoint that
serves another step's weights (a spike or a dip in the distance from the initialization) is flagged and
its neighbours are not; key misfits are one error naming every revision; distances equal a plain
reference (the norm of the concatenated differences).
"""

from __future__ import annotations

import pytest
import torch

from criticality.core import integrity
from criticality.errors import CriticalityError

KEYS = ("a.weight", "a.bias", "b.weight", "steps")


def state(scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    init = {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g),
            "b.weight": torch.randn(2, 4, generator=g)}
    g2 = torch.Generator().manual_seed(99)
    out = {k: v + scale * torch.randn(v.shape, generator=g2) for k, v in init.items()}
    out["steps"] = torch.tensor([int(scale * 100)])  # an integer buffer: hashed, not in the distance
    return out


def trajectory(scales: dict[int, float]) -> dict[int, dict[str, torch.Tensor]]:
    return {n: state(s) for n, s in scales.items()}


def test_distances_equal_the_plain_norm():
    states = trajectory({0: 0.0, 1: 0.1, 5: 0.3})
    found = integrity.check(states, KEYS)
    for n, st in states.items():
        diff = torch.cat([(st[k].double() - states[0][k].double()).flatten()
                          for k in KEYS if st[k].is_floating_point()])
        assert found.distances[n] == pytest.approx(float(torch.linalg.norm(diff)), rel=1e-12)
    assert found.flagged == [] and found.duplicates == [] and list(found.kept) == [0, 1, 5]


def test_identical_checkpoints_collapse_keeping_init_then_final():
    states = trajectory({0: 0.0, 1: 0.0, 2: 0.0, 10: 0.2, 20: 0.5, 30: 0.5})
    found = integrity.check(states, KEYS, {n: f"step{n}" for n in states})
    assert found.duplicates == [{"kept": "step0", "same": ["step1", "step2"], "by": "same tensor bytes"},
                                {"kept": "step30", "same": ["step20"], "by": "same tensor bytes"}]
    assert list(found.kept) == [0, 10, 30]
    assert found.summary()["kept"] == ["step0", "step10", "step30"]
    middle = trajectory({0: 0.0, 1: 0.2, 2: 0.2, 3: 0.5})  # neither init nor final: the earliest stays
    assert list(integrity.check(middle, KEYS).kept) == [0, 1, 3]


def test_a_final_identical_to_the_init_is_refused():
    with pytest.raises(CriticalityError, match="final checkpoint 9 is identical to the initialization 0"):
        integrity.check(trajectory({0: 0.0, 4: 0.3, 9: 0.0}), KEYS)


def test_a_revision_serving_other_weights_is_flagged_alone():
    # distance grows with the step; step 3 serves final-era weights (a spike), step 6 the init's (a dip)
    scales = {0: 0.0, 1: 0.1, 2: 0.2, 3: 0.9, 4: 0.3, 5: 0.4, 6: 0.001, 7: 0.5, 8: 0.6}
    found = integrity.check(trajectory(scales), KEYS, {n: f"step{n}" for n in scales})
    assert [f["revision"] for f in found.flagged] == ["step3", "step6"]
    assert "breaks the trend of its neighbours (step2" in found.flagged[0]["reason"]
    assert any("step3" in line for line in found.warnings())
    assert list(found.kept) == list(scales)  # flagged ones stay in the grid


def test_small_wobbles_within_tolerance_are_not_flagged():
    scales = {0: 0.0, 1: 0.1, 2: 0.2, 3: 0.19, 4: 0.3, 5: 0.28, 6: 0.4}
    assert integrity.check(trajectory(scales), KEYS).flagged == []
    strict = integrity.check(trajectory(scales), KEYS, tolerance=1.0)
    assert [f["step"] for f in strict.flagged]  # with no tolerance a fall is flagged
    with pytest.raises(CriticalityError, match="tolerance must be a number ≥ 1"):
        integrity.check(trajectory(scales), KEYS, tolerance=0.5)


def test_key_misfits_are_one_error_naming_each_revision():
    states = trajectory({0: 0.0, 1: 0.1, 2: 0.2})
    del states[1]["b.weight"]
    states[2]["extra.weight"] = torch.zeros(1)
    with pytest.raises(CriticalityError, match=r"2 of 3 checkpoints do not fit the model.*step1 misses 1 key\(s\) "
                                               r"\(b.weight\); step2 holds unknown 1 key\(s\) \(extra.weight\)"):
        integrity.check(states, KEYS, {0: "step0", 1: "step1", 2: "step2"})
    with pytest.raises(CriticalityError, match="no checkpoint 0"):
        integrity.check({1: state(0.1)}, KEYS)
