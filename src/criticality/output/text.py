"""Numbers and metric names as the terminal and the report print them."""

from __future__ import annotations

import math
from typing import Any

# How each metric reads: (short: a table header; axis: an axis or colour bar; sentence: the report's prose).
# A metric not listed reads as its name.
_WORDS = {
    "error": ("error", "test error", "test error"),
    "loss": ("loss", "test loss (cross-entropy)", "test loss"),
    "token_error": ("token error", "token error", "token error"),
    "token_accuracy": ("token accuracy", "token accuracy", "token accuracy"),
    "nll": ("nll", "nll (nats per token)", "nll (nats per token)"),
    "kl": ("kl", "KL(final ‖ variant)", "KL(final ‖ variant)"),
    "disagreement": ("disagreement", "disagreement",
                     "disagreement (1 − agreement with the final model's top-1 prediction)"),
}
_STYLES = ("short", "axis", "sentence")


def metric_label(metric: str, style: str = "short") -> str:
    """``metric`` (a cells.csv column) in words: ``style`` is short (a table header), axis or sentence."""
    return _WORDS[metric][_STYLES.index(style)] if metric in _WORDS else metric


def format_verdicts(summary: dict[str, Any]) -> str:
    """The verdicts as a plain-text table: group, Δ of the verdict metric when reset to checkpoint 0, the
    verdict, the Δ's 95 % interval, p and Holm's p, and the mean re-randomized value with its interval;
    missing values read ``n/a``."""
    rows = [r for r in summary.get("verdicts", []) if isinstance(r, dict)]
    if not rows:
        return "no verdicts"
    metric = summary.get("verdict_metric") or "error"
    label = metric_label(metric)
    rand = next((k[len("rerandomize_"):-len("_mean")] for k in rows[0]
                 if k.startswith("rerandomize_") and k.endswith("_mean")), None)
    columns = [("group", lambda r: str(r.get("group"))),
               (f"Δ {label} @0", lambda r: _cell(r.get(f"delta_{metric}"), signed=True)),
               ("verdict", lambda r: str(r.get("verdict") or "n/a")),
               ("95% interval", lambda r: _interval(r, f"delta_{metric}", signed=True)),
               ("p", lambda r: p_value(r.get("p_value"))), ("p (Holm)", lambda r: p_value(r.get("p_holm")))]
    if metric != "error" and "delta_error" in rows[0]:
        columns.insert(3, ("Δ error @0", lambda r: _cell(r.get("delta_error"), signed=True)))
    if rand:
        columns.append((f"re-randomized {metric_label(rand)} [95%]", lambda r: (
            f"{_cell(r.get(f'rerandomize_{rand}_mean'))} {_interval(r, f'rerandomize_{rand}')}")))
    head = [name for name, _ in columns]
    body = [[fmt(r) for _, fmt in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in [head, *body]]
    final = summary.get(f"final_{metric}")
    if metric == "disagreement" and _finite(summary.get("final_agreement")):
        final = 1 - summary["final_agreement"]  # 0: the final model agrees with itself
    final_note = f"; final {label} {_cell(final)}" if final is not None else ""
    judged = " (1 − agreement with the final model's top-1)" if metric == "disagreement" else ""
    rule = "95% paired interval" if summary.get("verdict_rule", "interval") == "interval" else "point estimate"
    note = (f"(verdicts on Δ {label}{judged} after re-initializing to checkpoint 0, {rule}: "
            f"≤ {_cell(summary.get('threshold'))} is robust{final_note})")
    return "\n".join([*lines, note])


def number(v: Any, signed: bool = False, digits: int = 3) -> str:
    """A number as every output prints it: ``digits`` decimals (``+`` forced when ``signed``); ``nan``,
    ``inf``, ``-inf`` when not finite; ``n/a`` for None; anything that is not a number as its text."""
    if v is None:
        return "n/a"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def p_value(v: Any) -> str:
    """A p-value: ``<0.001``, three decimals, or ``n/a`` when missing or not finite."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not math.isfinite(x) else ("<0.001" if x < 0.001 else f"{x:.3f}")


def _interval(row: dict[str, Any], name: str, signed: bool = False) -> str:
    low, high = row.get(f"{name}_low"), row.get(f"{name}_high")
    if not _finite(low) or not _finite(high):
        return "n/a"
    return f"[{_cell(low, signed)}, {_cell(high, signed)}]"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _cell(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and v != v):  # in the terminal's table NaN reads as missing
        return "n/a"
    if isinstance(v, float):
        return number(v, signed)
    if isinstance(v, list):
        return "[" + ", ".join(_cell(x, signed) for x in v) + "]"
    return str(v)
