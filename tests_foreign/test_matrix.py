"""The architecture matrix: every case of cases.CASES through matrix.run_case (see matrix.py for the checks).

Run: ``make test-foreign`` (builds .venv-foreign, runs this directory, writes build/architectures.md), or in an
environment that has timm and transformers: ``PYTHONPATH=src python -m pytest -q tests_foreign``. About 5.5 minutes
(88 cases, one torch thread; measured through make test-foreign on a shared 2-core machine). Cases in
known.KNOWN are expected to fail (strict: a fixed one turns the run red). ``run_matrix.py`` runs the same
cases in parallel processes.
"""

from __future__ import annotations

import pytest

pytest.importorskip("timm")
pytest.importorskip("transformers")

from cases import CASES  # noqa: E402  (after the skips: cases builds timm / transformers models)
from known import KNOWN  # noqa: E402
from matrix import order_problems, run_case, trajectory  # noqa: E402


def test_every_known_failure_names_a_case():
    assert set(KNOWN) <= set(CASES), sorted(set(KNOWN) - set(CASES))


def test_the_matrix_covers_enough_families():
    assert sum(c.package == "timm" for c in CASES.values()) >= 30
    assert sum(c.package == "transformers" for c in CASES.values()) >= 30


def test_the_trajectory_moves_every_parameter_and_keeps_ties():
    model, _ = CASES["hf/gpt2"].build()
    checkpoints = trajectory(model)
    assert sorted(checkpoints) == [0, 1, 2]
    for name, _ in model.named_parameters():
        assert not checkpoints[0][name].equal(checkpoints[2][name]), name
    assert checkpoints[2]["lm_head.weight"].equal(checkpoints[2]["transformer.wte.weight"])  # tied stays tied
    assert all(v.equal(checkpoints[2][k]) for k, v in model.state_dict().items())  # the model sits at the final


def test_the_order_check_catches_a_group_out_of_forward_order():
    order = {"": 0, "embed": 1, "layers.0": 2, "layers.1": 3, "norm": 4}
    members = {"embed": ("embed.weight",), "norm": ("norm.weight",), "layers.0": ("layers.0.w",)}
    assert order_problems(members, order) == ["group 'layers.0' is listed after 'norm' but the forward pass "
                                              "reaches it first"]
    assert order_problems({"a": ("embed.weight",), "b": ("layers.1.w", "norm.weight")}, order) == []


@pytest.mark.parametrize("key", [pytest.param(k, marks=pytest.mark.xfail(strict=True, reason=KNOWN[k]))
                                 if k in KNOWN else k for k in CASES])
def test_architecture(key, record):
    outcome = run_case(key, CASES[key])
    record(outcome)
    assert not outcome.problems, "\n".join(outcome.problems)
