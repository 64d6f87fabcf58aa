"""The merged pieces end to end: any metric set carries the verdicts, with the fast engine's records.

Run: ``pytest tests/test_integration.py -q`` (about 15 s on 2 cores; the HF cases need transformers).

A Hugging Face causal LM analysed with ``token_error``/``nll`` alone gets verdicts on Δ token error with
intervals; unlabelled data with ``agreement``/``kl`` alone gets verdicts on disagreement (1 − agreement,
judged like error); the verdict metric is refused before any cell runs when it was not measured; the
fast engine's records give the same statistics as the naive reference's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from criticality.core import statistics
from criticality.core.analysis import analyze
from criticality.core.verdicts import verdict_metric
from criticality.errors import CriticalityError
from toy import fcn

transformers = pytest.importorskip("transformers")

from test_engine import BATCH, _perturbed, llama, token_batches  # noqa: E402


def test_the_verdict_metric_is_chosen_from_what_was_measured():
    assert verdict_metric(["loss", "error", "agreement"]) == "error"
    assert verdict_metric(["nll", "token_error", "kl"]) == "token_error"
    assert verdict_metric(["kl", "agreement"]) == "agreement"  # judged as disagreement
    assert verdict_metric(["kl"]) == "kl"
    assert verdict_metric(["error", "agreement"], "disagreement") == "agreement"
    assert verdict_metric(["error", "nll"], "nll") == "nll"
    with pytest.raises(CriticalityError, match="verdict metric 'error' is not among the metrics"):
        verdict_metric(["token_error", "nll"], "error")


def test_a_causal_lm_with_token_metrics_alone_gets_verdicts():
    model = llama()
    states = _perturbed(model)
    result = analyze(model, states, token_batches(), groups="blocks", seeds=1, init="shuffle",
                     metrics=("token_error", "nll"), batch_size=BATCH, progress=False)
    assert result.summary["verdict_metric"] == "token_error" and "final_error" not in result.summary
    v = result.verdicts
    assert {"model.layers.0", "model.layers.1", "model.layers.2"} <= set(v.group)
    assert set(v.verdict) <= {"critical", "robust", "inconclusive"}
    assert (v.delta_token_error_low <= v.delta_token_error + 1e-12).all()
    assert (v.delta_token_error <= v.delta_token_error_high + 1e-12).all()
    assert v.p_value.between(0, 1).all()  # a paired sign-flip test over sequences (no McNemar for token counts)
    assert (v.rerandomize_token_error_low <= v.rerandomize_token_error_high).all()
    naive = analyze(model, states, token_batches(), groups="blocks", seeds=1, init="shuffle",
                    metrics=("token_error", "nll"), batch_size=BATCH, progress=False, engine="naive")
    pd.testing.assert_frame_equal(v[["group", "verdict", "delta_token_error_low", "delta_token_error_high"]],
                                  naive.verdicts[["group", "verdict", "delta_token_error_low",
                                                  "delta_token_error_high"]])


def test_unlabelled_data_is_judged_on_disagreement():
    model = fcn()
    g = torch.Generator().manual_seed(0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    end = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    x = torch.randn(300, 1, 6, 6, generator=g)
    result = analyze(model, {0: start, 2: end}, x, groups="auto", seeds=2, init="torch",
                     metrics=("agreement", "kl"), batch_size=100, progress=False)
    assert result.summary["verdict_metric"] == "disagreement"
    t, v = result.table, result.verdicts.set_index("group")
    assert t[t.op == "final"].agreement.iloc[0] == 1.0 and t[t.op == "final"].kl.iloc[0] == pytest.approx(0)
    for group, row in v.iterrows():
        cell = t[(t.op == "reinit") & (t.group == group) & (t.checkpoint == 0)].iloc[0]
        assert row.delta_disagreement == pytest.approx(-cell.delta_agreement)
        assert row.delta_disagreement_low == pytest.approx(-cell.delta_agreement_high)
        assert row.delta_disagreement_high == pytest.approx(-cell.delta_agreement_low)
        assert row.delta_disagreement >= 0  # the final model agrees with itself: any change is disagreement
        # McNemar on the examples that changed: all of them went from agreeing to disagreeing
        changed = int(round(row.delta_disagreement * 300))
        assert row.p_value == pytest.approx(statistics.mcnemar(changed, 0) if changed else 1.0)
        assert row.verdict == statistics.verdict(row.delta_disagreement_low, row.delta_disagreement_high, 0.02)
    assert np.isfinite(v.rerandomize_disagreement_low).all()


def test_an_unmeasured_verdict_metric_is_refused_before_any_cell_runs(monkeypatch):
    import criticality.core.analysis as analysis

    model = fcn()
    sd = {0: model.state_dict(), 1: model.state_dict()}
    monkeypatch.setattr(analysis, "run_cells", lambda *a, **k: pytest.fail("cells ran"))
    with pytest.raises(CriticalityError, match="verdict metric 'nll' is not among"):
        analyze(model, sd, torch.randn(4, 1, 6, 6), groups="auto", seeds=0, init="torch", metrics=("agreement",),
                verdict_metric="nll", progress=False)


def test_label_free_metrics_beside_error_cost_no_bootstrap():
    model = fcn()
    g = torch.Generator().manual_seed(1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    end = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    x, y = torch.randn(200, 1, 6, 6, generator=g), torch.randint(0, 5, (200,), generator=g)
    r = analyze(model, {0: start, 2: end}, (x, y), groups="auto", seeds=1, init="torch",
                metrics=("error", "loss", "agreement", "kl"), batch_size=100, progress=False)
    assert r.summary["verdict_metric"] == "error"
    assert {"delta_error_low", "delta_loss_high", "delta_agreement", "delta_kl"} <= set(r.table.columns)
    assert not {"delta_agreement_low", "delta_kl_high"} & set(r.table.columns)
    assert r.table.kl.min() >= -1e-9 and r.table.agreement.max() == 1.0  # the final row: 1 and 0
