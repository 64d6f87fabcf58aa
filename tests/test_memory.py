"""Memory discipline (issue 16): a cell's surgery reads the final checkpoint for its group's keys only,
never gathers a whole checkpoint (``dict(final)``), and the CLI's loading copies key by key."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
import torch

from criticality.core import surgery
from criticality.core.analysis import analyze
from criticality.core.plan import PlanSpec, make_plan
from criticality.paper import data as datasets
from criticality.pipelines.analyze_run import _hold
from test_trajectory import toy_data, toy_states


class Counted(Mapping):
    """A read-only state dict that counts reads per key and whole-mapping iterations (``dict(sd)``)."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state, self.reads, self.iterations = dict(state), [], 0

    def __getitem__(self, key: str) -> torch.Tensor:
        self.reads.append(key)
        return self.state[key]

    def __iter__(self) -> Iterator[str]:
        self.iterations += 1
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)

    def __contains__(self, key: object) -> bool:
        return key in self.state


def counted_trajectory(seed: int = 0):
    model, states = toy_states(seed)
    return model, {e: Counted(sd) for e, sd in states.items()}, states


def test_a_cell_reads_the_final_checkpoint_for_its_group_only():
    model, checkpoints, _ = counted_trajectory()
    plan = make_plan(model, checkpoints, PlanSpec("auto", 2, metrics=("error",), batch_size=50))
    final = checkpoints[plan.final_epoch]
    for cell in plan.cells:
        final.reads.clear()
        final.iterations = 0
        entries = plan.entries(cell)
        assert set(entries) == set(plan.moved_keys(cell)), cell
        assert final.iterations == 0, f"{cell}: the whole final checkpoint was iterated (dict(final)?)"
        group = set(plan.keys(cell.group)) if cell.group else set()
        assert set(final.reads) <= group, f"{cell}: read {sorted(set(final.reads) - group)} beyond its group"
        assert len(final.reads) <= len(group), cell


def test_analyze_reads_each_checkpoint_a_few_times_not_once_per_cell():
    model, checkpoints, states = counted_trajectory()
    result = analyze(model, checkpoints, toy_data(), groups="auto", seeds=2, progress=False, batch_size=50)
    n_keys, cells = len(states[3]), len(result.table)
    group_reads = sum(len(result.groups.members.get(g, ())) for g in result.table.group)
    # key by key, whole passes only outside the cells: check_compatible (2), the settings' fingerprint, the
    # engine's load (probe and grid) and distances, and the canary (at most two states per group);
    # dict(final) per cell would be 17 passes more
    passes = 6 + 2 * len(result.groups.names)  # the canary: its variant's state and the reference
    assert len(checkpoints[3].reads) <= passes * n_keys + group_reads, (len(checkpoints[3].reads), n_keys, cells)
    assert passes < cells
    assert checkpoints[3].iterations <= 6 + len(result.groups.names)
    plain = analyze(model, states, toy_data(), groups="auto", seeds=2, progress=False, batch_size=50)
    assert result.table.equals(plain.table)


def test_surgery_overlay_reads_the_base_only_for_asked_keys():
    _, checkpoints, states = counted_trajectory()
    final, start = checkpoints[3], states[0]
    keys = [k for k in states[3] if k.startswith("1.")]
    out = surgery.reinit(final, start, keys)
    assert final.iterations == 0 and set(final.reads) <= set(keys)
    assert set(out.changed) == set(keys) and len(out) == len(states[3])
    other = next(k for k in states[3] if k not in keys)
    assert out[other] is states[3][other]  # untouched entries are the caller's own tensors
    plain = dict(out)
    assert all(torch.equal(plain[k], states[0][k] if k in keys else states[3][k]) for k in states[3])
    twice = surgery.replace(out, start, keys[:1])  # an overlay over an overlay keeps one base
    assert twice.base is final and set(twice.changed) == set(keys)


def test_cli_loading_copies_the_final_checkpoint_key_by_key():
    model, checkpoints, states = counted_trajectory()
    _hold(model, checkpoints[1])
    assert checkpoints[1].iterations == 0
    assert sorted(checkpoints[1].reads) == sorted(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], states[1][k]) for k in states[1])


def test_subsets_are_drawn_before_standardizing():
    """``load(max_train=…)`` draws its subset from the raw bytes: the same tensors as subsetting afterwards."""
    if (name := datasets.default_data()) == "digits":
        pytest.skip("Fashion-MNIST is not installed")
    whole = datasets.load(name)
    small = datasets.load(name, max_train=300, max_test=200)
    for got, split, n in ((small.train, whole.train, 300), (small.test, whole.test, 200)):
        want = datasets.stratified_subset(*split, n)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
