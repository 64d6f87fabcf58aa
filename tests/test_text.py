"""Numbers and metric names as the outputs print them (criticality.output.text): the terminal's verdict
table (format_verdicts) from summary.json verdict rows, the one number format and the metric labels.

Run: ``pytest tests/test_text.py -q`` (a second).

Columns follow the verdict metric; the interval, p and Holm's p are shown; a missing value (JSON null,
NaN) reads ``n/a``, never ``None`` or ``nan``; the verdict stays the third word of each row.
"""

from __future__ import annotations

from criticality.output.text import format_verdicts, metric_label, number, p_value


def _summary(metric="error", **extra):
    row = {"group": "fc1", "joint": False, f"delta_{metric}": 0.0421, f"delta_{metric}_low": 0.0213,
           f"delta_{metric}_high": 0.0644, "p_value": 0.00002, "p_holm": 0.00006, "threshold": 0.02,
           "verdict": "critical", "point_verdict": "critical", "examples_to_settle": None,
           "rerandomize_error_mean": 0.9, "rerandomize_error_std": 0.01, "rerandomize_error_low": 0.85,
           "rerandomize_error_high": 0.95}
    missing = {**row, "group": "fc2", f"delta_{metric}_low": None, f"delta_{metric}_high": None,
               "p_value": None, "p_holm": None, "verdict": "robust", "rerandomize_error_low": None,
               "rerandomize_error_high": None}
    return {"verdicts": [row, missing], "threshold": 0.02, "verdict_metric": metric, "final_error": 0.1, **extra}


def test_the_table_shows_interval_p_and_holm_and_n_a_for_missing_values():
    text = format_verdicts(_summary())
    head, first, second, note = text.splitlines()
    assert head.split()[:2] == ["group", "Δ"] and "p (Holm)" in head and "95% interval" in head
    assert first.split()[:3] == ["fc1", "+0.042", "critical"]
    assert "[+0.021, +0.064]" in first and first.count("<0.001") == 2 and "0.900 [0.850, 0.950]" in first
    assert second.split()[:3] == ["fc2", "+0.042", "robust"] and second.count("n/a") == 4
    assert "None" not in text and "nan" not in text
    assert "Δ error" in note and "≤ 0.020 is robust" in note and "final error 0.100" in note


def test_other_verdict_metrics_name_their_columns():
    text = format_verdicts(_summary("token_error"))
    assert text.splitlines()[0].startswith("group  Δ token error @0  verdict")
    disagreement = format_verdicts({**_summary("disagreement"), "final_agreement": 1.0})
    assert "Δ disagreement @0" in disagreement and "1 − agreement" in disagreement
    assert "final disagreement 0.000" in disagreement
    assert format_verdicts({"verdicts": []}) == "no verdicts"


def test_one_number_format():
    assert [number(v) for v in (0.1234, 1, None, float("nan"), float("inf"), -float("inf"), "x")] == [
        "0.123", "1.000", "n/a", "nan", "inf", "-inf", "x"]
    assert number(0.05, signed=True) == "+0.050" and number(0.125, digits=2) == "0.12"
    assert [p_value(v) for v in (0.0001, 0.25, None, float("nan"))] == ["<0.001", "0.250", "n/a", "n/a"]


def test_metric_labels_by_style():
    assert metric_label("error") == "error" and metric_label("error", "axis") == "test error"
    assert metric_label("nll", "sentence") == "nll (nats per token)" and metric_label("perplexity") == "perplexity"

