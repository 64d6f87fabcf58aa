"""One self-contained HTML page per run: ``RUN/report.html``.

Figures are embedded as base64 PNG data URIs and the CSS is inline, so the file opens anywhere, offline,
with no JavaScript. It reads ``RUN/config.json``, ``RUN/analysis/summary.json`` and ``RUN/figures/*.png``
(drawn first with :func:`criticality.output.figures.draw_run` when missing); every value is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from criticality._version import __version__
from criticality.infra.files import read_json, write_text
from criticality.output import figures as plots
from criticality.output.tables import read_summary
from criticality.output.text import metric_label, number, p_value

DATA_NAMES = {
    "fashion-mnist": "Fashion-MNIST",
    "mnist": "MNIST",
    "digits": "the scikit-learn digits set (8×8)",
    "cifar10": "CIFAR-10",
    "imagenet": "ImageNet",
}

# (file stem in RUN/figures, caption); missing files are left out (joint_error exists only with joints).
FIGURES = [
    ("robustness_error", "Test error after resetting each group (paper Figs 1a, 2, 4-6)."),
    ("joint_error", "Joint resets next to the single-layer resets of their members (paper Figs 8-10)."),
    (
        "robustness_loss",
        "The same grid with test loss (cross-entropy); the colour scale stops at the largest finite value.",
    ),
    ("robustness_token_error", "Token error (next token wrong) after resetting each group."),
    ("robustness_nll", "The same grid in nats per token; the colour scale stops at the largest finite value."),
    ("distance_l2", "ℓ2 distance of each group's parameters to initialization, ‖θτ − θ0‖₂ / √n "
                    "(the paper's definition, Fig 1b)."),
    ("distance_linf", "ℓ∞ distance to initialization, ‖θτ − θ0‖∞ (the paper's definition, Fig 1c)."),
    ("distance_l2_rel", "Relative ℓ2 distance, ‖θτ − θ0‖₂ / ‖θ0‖₂ (ours)."),
    ("distance_linf_rel", "Relative ℓ∞ distance, ‖θτ − θ0‖∞ / ‖θ0‖∞ (ours)."),
    ("distance_cosine", "Cosine distance to initialization (ours)."),
]

_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; color: #222; background: #fff; max-width: 1150px;
       margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { font-size: 1.25em; margin-top: 1.8em; }
.standin { background: #fff4d6; border-left: 4px solid #d9a400; padding: .5em .8em; }
table { border-collapse: collapse; margin: .5em 0; } th, td { border: 1px solid #ccc; padding: .25em .6em;
  text-align: left; vertical-align: top; } th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.critical { color: #a00018; font-weight: bold; } td.robust { color: #1b5e20; }
td.inconclusive { color: #8a6d00; font-style: italic; }
code { font-size: .88em; background: #f6f6f6; padding: 0 .2em; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .92em; }
.muted { color: #666; }
"""


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's HTML report (default ``RUN/report.html``) and return its path."""
    run = Path(run_dir)
    summary = read_summary(run / "analysis")
    config = read_json(run / "config.json") if (run / "config.json").is_file() else {}
    if not (run / "figures" / "robustness_error.png").is_file():
        plots.draw_run(run)
    out = Path(out) if out is not None else run / "report.html"
    write_text(out, render(config, summary, run / "figures"))
    return out


def render(config: dict, summary: dict, figures_dir: Path) -> str:
    """The report page as a string (no file is written)."""
    data = summary.get("data") or {}
    data_name = _data_name(data.get("name") or _config_name(config.get("data")))
    model = _config_name(config.get("model"))
    title = f"Layer criticality: {model} on {data_name}"
    body = [
        f"<h1>{_e(title)}</h1>",
        _data_note(data, data_name),
        _headline(summary),
        _integrity(summary.get("integrity")),
        _how_to_read(summary),
        _assumptions(config.get("experiment") or {}),
        _verdicts(summary),
        _figures(figures_dir),
        _interventions(summary, figures_dir),
        _coverage(summary.get("coverage") or {}),
        "<h2>Configuration</h2>",
        _kv_table(config, "config"),
        "<h2>Provenance</h2>",
        _kv_table(summary.get("provenance") or {}, "provenance"),
        f'<p class="muted">Report written by criticality {_e(__version__)} from the saved tables; '
        "re-drawing it never re-evaluates a model.</p>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _integrity(integrity: dict | None) -> str:
    """The trajectory check (core.integrity): identical checkpoints collapsed, off-trend ones flagged."""
    if not integrity:
        return ""
    items = [f"<li><code>{_e(d['kept'])}</code> is byte-identical to "
             f"{', '.join(f'<code>{_e(s)}</code>' for s in d['same'])} ({_e(d['by'])}): analysed once</li>"
             for d in integrity.get("duplicates", [])]
    items += [f"<li><b>flagged</b> <code>{_e(f['revision'])}</code>: {_e(f['reason'])}</li>"
              for f in integrity.get("flagged", [])]
    verdict = "problems found" if items else "no identical or off-trend checkpoints"
    return (f"<h2>Integrity of the checkpoints</h2><p>{integrity.get('checked', 0)} checkpoints checked before the "
            f"grid: {verdict}.</p>" + (f"<ul>{''.join(items)}</ul>" if items else ""))


def _data_note(data: dict, data_name: str) -> str:
    parts = []
    if data.get("stands_in_for"):
        standin = DATA_NAMES.get(data["stands_in_for"], data["stands_in_for"])
        parts.append(
            f'<p class="standin">This run used {_e(data_name)} as a stand-in for {_e(standin)}; '
            "numbers are not the paper's.</p>"
        )
    n_test, cap = data.get("n_test"), data.get("max_examples")
    if n_test is not None:
        capped = f" (capped by max_examples = {_e(cap)})" if cap is not None else ""
        what = f"sequences of {_e(data['seq_len'])} tokens" if data.get("seq_len") else "test examples"
        parts.append(f"<p>Evaluated on {_e(n_test)} {what} of {_e(data_name)}{capped}.</p>")
    return "\n".join(parts)


def _assumptions(experiment: dict) -> str:
    """The registry's named assumptions: values the paper does not state, chosen by us."""
    items = experiment.get("assumptions") or []
    if not items:
        return ""
    lis = "".join(f"<li>{_e(a)}</li>" for a in items)
    standin = f'<p class="standin">Stands in: {_e(experiment["stands_in"])}.</p>' if experiment.get("stands_in") else ""
    return f"<h2>Ours, not the paper's</h2>\n{standin}<p>Settings this experiment had to choose:</p>\n<ul>{lis}</ul>"


def _metric(summary: dict) -> tuple[str, str]:
    """The verdict metric and its name in sentences."""
    metric = summary.get("verdict_metric") or "error"
    return metric, metric_label(metric, "sentence")


def _axis(summary: dict) -> str:
    """What the checkpoints count: ``epoch`` (this project's runs) or ``step`` (HF Trainer folders)."""
    return str((summary.get("checkpoints") or {}).get("axis") or "epoch")


def _headline(summary: dict) -> str:
    chance = f"; chance error {_num(summary.get('chance_error'))}" if "chance_error" in summary else ""
    if "final_error" in summary or "final_token_error" not in summary:
        return (f"<p>Final model: test error <b>{_num(summary.get('final_error'))}</b>, "
                f"test loss {_num(summary.get('final_loss'))}{chance}.</p>")
    nll = summary.get("final_nll")
    perplexity = f" (perplexity {_num(math.exp(nll))})" if isinstance(nll, (int, float)) and nll < 700 else ""
    return (f"<p>Final model: token error <b>{_num(summary.get('final_token_error'))}</b>, "
            f"nll {_num(nll)} nats per token{perplexity}{chance}.</p>")


def _how_to_read(summary: dict) -> str:
    threshold, chance = _num(summary.get("threshold")), _num(summary.get("chance_error"))
    _, name = _metric(summary)
    axis = _axis(summary)
    article = "an" if axis[:1] in "aeiou" else "a"
    towards = f": critical groups send the error towards chance ({chance})" if "error" in name else ""
    return f"""<h2>How to read this</h2>
<p>Each row of a heatmap is a group of parameters (a layer, or several layers reset together, their
names marked <code>*</code>). A column labelled with {article} {axis} <i>re-initializes</i> the group: the trained
model gets that group's parameters (and buffers) back from that checkpoint, every other layer stays as
trained, and the model is evaluated with no retraining; {axis} 0 is the initialization. The
<code>rand</code> column <i>re-randomizes</i> the group with a fresh draw from the initializer used at
the start of training (mean ± std over seeds); <code>final</code> is the trained model.</p>
<p>A group is <b>robust</b> when resetting it to checkpoint 0 costs (almost) nothing, here when the
{_e(name)} rises by at most {threshold}, and <b>critical</b> otherwise{towards}. Along a row, the checkpoint
from which the value is back at the final model's shows how early that layer settled. Layers that are
robust one at a time need not be robust when reset jointly.
The distance heatmaps show how far each group's parameters moved from initialization.</p>"""


def _adaptive(summary: dict) -> str:
    """The sentence on an adaptive run's early stops (empty for a full evaluation)."""
    info = summary.get("adaptive_evaluation")
    if not summary.get("adaptive") or not isinstance(info, dict):
        return ""
    stopped, n, judged = (_count(info.get(k)) for k in ("stopped_early", "examples", "judged_cells"))
    return (" <b>Adaptive evaluation:</b> the test examples were taken in a random order and a cell stopped as "
            f"soon as an anytime-valid confidence sequence of its Δ cleared the threshold; {stopped} cells stopped "
            f"early (marked † in the heatmaps: their value and interval rest on fewer than all {n} examples, their p "
            f"is n/a) and the others ran to the end. The chance that any early verdict is wrong is at most "
            f"{_num(info.get('alpha'))} (α split evenly over the {judged} cells); "
            f"{_count(info.get('example_forwards'))} example evaluations instead of "
            f"{_count(info.get('full_forwards'))}.")


def _verdicts(summary: dict) -> str:
    threshold = _num(summary.get("threshold"))
    metric, name = _metric(summary)
    found = summary.get("verdicts") or []
    rand = next((k[len("rerandomize_"):-len("_mean")] for k in (found[0] if found else {})
                 if k.startswith("rerandomize_") and k.endswith("_mean")), "error")
    rand_name = metric_label(rand, "sentence")
    rows = []
    for v in found:
        verdict = str(v.get("verdict", ""))
        css = verdict if verdict in ("critical", "robust", "inconclusive") else ""
        settle = v.get("examples_to_settle")
        units = v.get("units") or "examples"  # sequences for sequence models: the units the intervals resample
        settle = f" (≈{_count(settle)} {units} would settle it)" if verdict == "inconclusive" and settle else ""
        rows.append(
            f"<tr><td><code>{_e(v.get('group'))}</code></td>"
            f'<td class="num">{_num(v.get(f"delta_{metric}"), signed=True)}</td>'
            f'<td class="{css}">{_e(verdict)}{_e(settle)}</td>'
            f'<td class="num">{_num(v.get(f"rerandomize_{rand}_mean"))}</td>'
            f'<td class="num">[{_num(v.get(f"delta_{metric}_low"), signed=True)}, '
            f'{_num(v.get(f"delta_{metric}_high"), signed=True)}]</td>'
            f'<td class="num">{_p(v.get("p_value"))}</td><td class="num">{_p(v.get("p_holm"))}</td></tr>'
        )
    point = summary.get("verdict_rule") == "point"
    name, short = _e(name), _e(name.split(" (")[0])
    rule = (f"Robust when Δ {name} ≤ {threshold} after re-initializing the group to checkpoint 0; critical "
            "otherwise (the paper's rule on the point estimate)." if point else
            f"<b>How to read it:</b> a group is critical when the whole 95 % interval of its Δ {name} lies "
            f"above {threshold}, robust when its upper end is ≤ {threshold}, and inconclusive when it straddles "
            "the threshold: then more test examples, not another threshold, would decide.")
    method = _e(summary.get("intervals") or "a paired interval over test examples")
    tests = _e(summary.get("p_values") or "exact McNemar")
    return f"""<h2>Verdicts</h2>
<p>{rule} Δ is measured against the final model on the same examples (paired). Intervals: {method}.
p: {tests}; Holm-corrected across the groups in the last column.{_adaptive(summary)}</p>
<table id="verdicts"><thead><tr><th>group</th><th>Δ {short} at {_e(_axis(summary))} 0</th><th>verdict</th>
<th>re-randomized {_e(rand_name)} (mean over seeds)</th><th>95 % interval of Δ</th><th>p</th><th>p (Holm)</th>
</tr></thead>
<tbody>{"".join(rows)}</tbody></table>"""


def _p(v: Any) -> str:
    return _e(p_value(v))


def _count(v: Any) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "?"
    return "∞" if math.isinf(x) else f"{int(x):,}"


def embedded_figures(folder: Path, figures, *, svg_note: bool = False) -> list[str]:
    """A ``<figure>`` embedding ``folder/<stem>.png`` (base64) for each ``(stem, caption)`` whose PNG exists."""
    parts = []
    for stem, caption in figures:
        png = folder / f"{stem}.png"
        if png.is_file():
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            note = f" <span class='muted'>({_e(stem)}.svg beside it)</span>" if svg_note else ""
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_e(stem)}">'
                         f"<figcaption>{_e(caption)}{note}</figcaption></figure>")
    return parts


def _figures(figures_dir: Path) -> str:
    parts = ["<h2>Figures</h2>", *embedded_figures(figures_dir, FIGURES, svg_note=True)]
    if len(parts) == 1:
        parts.append('<p class="muted">No figures found.</p>')
    return "\n".join(parts)


# The interventions beyond the paper: (file stem, caption); a section appears only for the ops that ran.
INTERVENTION_FIGURES = [
    ("interpolation_error", "Test error with one group at (1 − α)·θ_source + α·θ_final, every other group trained."),
    ("noise_error", "Test error with Gaussian noise on one group (σ relative to the RMS of its training movement; "
                    "mean ± std over draws)."),
    ("skip_error", "Δ test error when a group's module returns its input (the block is skipped)."),
    ("module_criticality", "Module criticality μ per group (Chatterji et al. 2020); low μ: the group can move far "
                           "back towards its initial values under large noise and still work."),
    ("proxies", "Block Influence (one forward pass) against the Δ test error of the interventions."),
]


def _interventions(summary: dict, figures_dir: Path) -> str:
    parts = embedded_figures(figures_dir, INTERVENTION_FIGURES)
    if summary.get("noise"):
        parts.append(f"<p>Noise scale: {_e(summary['noise'].get('convention'))}.</p>")
    refused = summary.get("skip_refused") or {}
    if refused:
        rows = "".join(f"<tr><td><code>{_e(g)}</code></td><td>{_e(why)}</td></tr>" for g, why in refused.items())
        parts.append('<p>Groups that cannot be skipped:</p><table id="skip_refused"><thead><tr><th>group</th>'
                     f"<th>why</th></tr></thead><tbody>{rows}</tbody></table>")
    mc = summary.get("module_criticality")
    if mc:
        rows = "".join(f'<tr><td><code>{_e(r.get("group"))}</code></td><td class="num">{_num(r.get("mu"))}</td>'
                       f'<td class="num">{_num(r.get("alpha"))}</td><td class="num">{_num(r.get("sigma"))}</td>'
                       f'<td class="num">{_e(r.get("points"))}</td></tr>' for r in mc.get("table") or [])
        parts.append(f"<p>Module criticality with ε = {_num(mc.get('eps'))} over {_e(mc.get('draws'))} noise draws "
                     f"(network criticality Σμ = {_num(mc.get('total'))}; {_e(mc.get('points_evaluated'))} of "
                     f"{_e(mc.get('grid_points'))} α × σ points evaluated by the {_e(mc.get('search'))} search). "
                     f"{_e(mc.get('convention'))}.</p>"
                     '<table id="module_criticality"><thead><tr><th>group</th><th>μ</th><th>α</th><th>σ</th>'
                     f"<th>points</th></tr></thead><tbody>{rows}</tbody></table>")
    rho = (summary.get("proxies") or {}).get("spearman") or []
    if rho:
        rows = "".join(f"<tr><td>{_e(r['proxy'])}</td><td>{_e(r['target'])}</td>"
                       f'<td class="num">{_num(r.get("spearman"), signed=True)}</td><td class="num">{_e(r["n"])}</td>'
                       "</tr>" for r in rho)
        parts.append("<p>Spearman rank correlation of each one-pass proxy (Block Influence <code>bi</code>, "
                     "angular distance) with the Δ test error of an intervention, over the blocks that are groups "
                     '(blocks table: <code>analysis/proxies.csv</code>).</p><table id="proxies"><thead><tr>'
                     f"<th>proxy</th><th>intervention</th><th>ρ</th><th>blocks</th></tr></thead><tbody>{rows}</tbody>"
                     "</table>")
    if not parts:
        return ""
    return "<h2>Interventions beyond the paper</h2>\n" + "\n".join(parts)


def _coverage(coverage: dict[str, list[str]]) -> str:
    rows = "".join(
        f"<tr><td><code>{_e(group)}</code></td><td>{_codes(keys)}</td></tr>"
        for group, keys in coverage.items()
        if group != "_unassigned"
    )
    unassigned = coverage.get("_unassigned") or []
    tail = (
        f"<p>State-dict keys in no group (never reset, always as trained): {_codes(unassigned)}</p>"
        if unassigned
        else "<p>Every state-dict key belongs to a group.</p>"
    )
    return f"""<h2>Group coverage</h2>
<p>Which state-dict entries each group resets (parameters and buffers move together).</p>
<table id="coverage"><thead><tr><th>group</th><th>state-dict keys</th></tr></thead>
<tbody>{rows}</tbody></table>
{tail}"""


def _kv_table(d: dict, table_id: str) -> str:
    if not d:
        return '<p class="muted">Not recorded.</p>'
    rows = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(_plain(v))}</code></td></tr>" for k, v in d.items())
    return f'<table id="{table_id}"><tbody>{rows}</tbody></table>'


def _codes(keys: list[str]) -> str:
    return ", ".join(f"<code>{_e(k)}</code>" for k in keys) or '<span class="muted">none</span>'


def _plain(v: Any) -> str:
    return json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else str(v)


def _num(v: Any, signed: bool = False) -> str:
    return _e(number(v, signed))


def _data_name(name: Any) -> str:
    return DATA_NAMES.get(str(name), str(name))


def _config_name(v: Any) -> str:
    if isinstance(v, dict):
        return str(v.get("name", "?"))
    return "?" if v is None else str(v)


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)
