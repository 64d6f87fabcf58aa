"""Metrics chosen from the model's logits when ``analyze`` is given none (issue 22, item 2).

Run: ``PYTHONPATH=src pytest tests/test_defaults.py -q`` (about 20 s on 2 cores).

Classification logits (N, C) with class targets → error, loss; sequence logits (N, T, V) with labels →
token_error, nll (real GPT-2 and Llama, which failed with "metric 'error' is for classifiers" before); no
labels → agreement, kl. The choice is logged and recorded in ``summary["metrics_spec"]``, and the chosen run
equals the run with the same metrics spelled out.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from criticality.core import metrics
from criticality.core.analysis import analyze
from criticality.errors import CriticalityError
from toy import fcn, hf_models

transformers = pytest.importorskip("transformers")
KW = dict(seeds=1, batch_size=4, progress=False)


def perturbed(model, scale=0.5, seed=1):
    """Checkpoint 0 = the model's init; checkpoint 1 = init plus noise, loaded into the model (its 'trained')."""
    g = torch.Generator().manual_seed(seed)
    start = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std().nan_to_num(0.02).clamp(min=0.02) * torch.randn(p.shape, generator=g))
    return {0: start, 1: copy.deepcopy(model.state_dict())}


def token_data(labels=True, n=8, t=6):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1::2, t - 2:] = 0
    batches = []
    for i in range(0, n, 4):
        b = {"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4]}
        if labels:
            b["labels"] = ids[i:i + 4].clone()
        batches.append(b)
    return batches


def test_choose_by_the_logits_shape():
    assert metrics.choose(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]))[0] == ("error", "loss")
    assert metrics.choose(torch.zeros(4, 6, 9), torch.zeros(4, 6, dtype=torch.long))[0] == ("token_error", "nll")
    for logits in (torch.zeros(4, 3), torch.zeros(4, 6, 9)):
        assert metrics.choose(logits, None)[0] == ("agreement", "kl")
    for logits, targets in [(torch.zeros(4, 3), torch.zeros(4, 3)),  # regression / soft targets
                            (torch.zeros(4, 6, 9), torch.zeros(4, 5, dtype=torch.long)),
                            (torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.long))]:
        with pytest.raises(CriticalityError, match=r"cannot choose metrics for logits .* pass metrics="):
            metrics.choose(logits, targets)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_causal_lm_gets_token_metrics_without_being_told(name, caplog):
    build, _ = hf_models()[name]
    torch.manual_seed(0)
    lm = build().eval()
    states = perturbed(lm)
    with caplog.at_level(logging.INFO, logger="criticality"):
        chosen = analyze(lm, states, token_data(), **KW)
    assert list(chosen.table.columns[chosen.table.columns.isin(["token_error", "nll", "error", "loss"])]) == \
        ["token_error", "nll"]
    spec = chosen.summary["metrics_spec"]
    assert spec["metrics"] == ["token_error", "nll"] and spec["source"] == "chosen"
    assert "sequence logits (2, 6, 64) with labels (2, 6)" in spec["reason"]
    assert any("metrics=token_error, nll" in r.getMessage() for r in caplog.records)
    given = analyze(lm, states, token_data(), metrics=("token_error", "nll"), **KW)
    cols = ["group", "op", "token_error", "nll"]
    assert chosen.table[cols].equals(given.table[cols])
    assert given.summary["metrics_spec"] == {"metrics": ["token_error", "nll"], "source": "given"}


def test_unlabelled_tokens_get_the_label_free_metrics():
    build, _ = hf_models()["gpt2"]
    torch.manual_seed(0)
    lm = build().eval()
    result = analyze(lm, perturbed(lm), token_data(labels=False), **KW)
    assert result.summary["metrics_spec"]["metrics"] == ["agreement", "kl"]
    final = result.table[result.table.op == "final"].iloc[0]
    assert final.agreement == 1.0 and final.kl == pytest.approx(0, abs=1e-6)


def test_classifiers_keep_error_and_loss():
    torch.manual_seed(0)
    net = fcn()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 6, 6, generator=g), torch.randint(0, 5, (40,), generator=g)
    result = analyze(net, perturbed(net), (x, y), groups="auto", init="torch", **{**KW, "batch_size": 16})
    assert result.summary["metrics_spec"] == {"metrics": ["error", "loss"], "source": "chosen",
                                              "reason": "classification logits (2, 5) with class targets (2,)"}
    bert_build, ids = hf_models()["bert"]
    torch.manual_seed(0)
    bert = bert_build().eval()
    data = [{"input_ids": ids(4, g), "labels": torch.randint(0, 3, (4,), generator=g)} for _ in range(2)]
    result = analyze(bert, perturbed(bert), data, **KW)
    assert result.summary["metrics_spec"]["metrics"] == ["error", "loss"]


def test_a_model_that_does_not_run_on_the_data_still_gets_the_data_error():
    net = fcn()
    states = perturbed(net)
    with pytest.raises(CriticalityError, match="cannot be evaluated on the data"):
        analyze(net, states, (torch.randn(8, 1, 5, 5), torch.zeros(8, dtype=torch.long)), groups="auto",
                init="torch", **KW)
