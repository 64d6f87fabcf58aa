"""The journal version's Transformer LM experiment, at a size this CPU trains: per sub-layer, token accuracy.

The paper (JMLR 23(67), 2022) trains a 12-block decoder-only Transformer (T5-Base's decoder) on LM1B with
Adam for 20 epochs and shows, per sub-layer, the per-token accuracy after re-randomizing it or resetting it
to the checkpoints of epochs 0, 1, 2, 5, 10 and 15 (column 20 = the trained model). Here a byte-level
Llama (:mod:`criticality.paper.tiny_lm`; RMSNorm and a gated MLP, as T5 v1.1) trained on the license texts
Debian ships stands in for it. An "epoch" is a fixed number of optimizer steps (``steps_per_epoch``); at
paper scale one epoch is one pass over the training bytes (in expectation: windows are drawn at random).

Groups are the paper's sub-layers (:func:`sublayer_groups`): the embedding; per block its attention norm,
self-attention, MLP norm, first MLP dense layer ``wi`` (Llama's gate and up projections together: T5
v1.1's ``wi_0`` and ``wi_1``) and second MLP dense layer ``wo`` (``down_proj``); the final norm; the
prediction head. :func:`run` trains (reusing a finished folder), analyses (resumable), draws and reports::

    OUT/checkpoint-<step>/             HF folders at the epochs 0, 1, 2, 5, 10, 15, 20 (steps = epoch × steps_per_epoch)
    OUT/eval.txt                       the held-out text scored by every cell
    OUT/analysis/cells.csv, …          the tables of `criticality analyze`, checkpoint numbers in epochs,
                                       plus token_accuracy = 1 − token_error
    OUT/analysis/findings.csv          the paper's five LM findings, each checked on this run
    OUT/analysis_layers/               each decoder layer skipped (identity) and reset to epoch 0, and
                                       proxies.csv (Block Influence, angular distance; one forward pass)
    OUT/figures/robustness_token_accuracy.png, layers_skip.png, layers_proxies.png, …
    OUT/report.html
"""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from criticality.core.analysis import DEFAULT_THRESHOLD, Result
from criticality.core.plan import PlanSpec, make_plan
from criticality.core.trajectory import alias_tied, trajectory
from criticality.errors import CriticalityError
from criticality.infra import distributed
from criticality.infra.files import atomic_path, write_json, write_text
from criticality.output import figures as plots
from criticality.output import intervention_figures, report
from criticality.output.tables import write_tables
from criticality.output.text import number
from criticality.paper.lm_config import LMConfig
from criticality.paper.tiny_lm import train_tiny_lm
from criticality.pipelines import analyze_hf as hf
from criticality.pipelines.grid import analyse_plan, one_process

if TYPE_CHECKING:
    from criticality.paper.experiments import Experiment

# The metric names of the sub-layer grid (names in core.metrics.METRICS): token_error is the verdict metric;
# perplexity = exp(nll) is added by run_cells.
DEFAULT_METRIC_NAMES = ("token_error", "nll")
# The per-layer pass also names token_error "error": proxies.correlations and the skip bars read delta_error.
LAYER_METRIC_NAMES = {"token_error": "token_error", "nll": "nll", "error": "token_error"}
BATCH = 64  # sequences per forward pass


def sublayer_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """The paper's sub-layers of a Llama-style decoder, input to output (module prefixes per group)."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if blocks is None or not hasattr(model, "lm_head"):
        raise CriticalityError(f"{type(model).__name__} is not a Llama-style decoder (model.layers, lm_head)")
    groups = {"embed": ["model.embed_tokens"]}
    for i in range(len(blocks)):
        p = f"model.layers.{i}"
        groups |= {f"block{i}.attn_norm": [f"{p}.input_layernorm"], f"block{i}.attn": [f"{p}.self_attn"],
                   f"block{i}.mlp_norm": [f"{p}.post_attention_layernorm"],
                   f"block{i}.mlp_wi": [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"],
                   f"block{i}.mlp_wo": [f"{p}.mlp.down_proj"]}
    return groups | {"final_norm": ["model.norm"], "head": ["lm_head"]}


def train(cfg: LMConfig, out: Path, progress: bool = True) -> Path:
    """Train (or reuse) the LM with a checkpoint at every column; returns the HF folder (``out``)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # one "Writing model shards" bar per checkpoint
    spe = cfg.epoch_steps()
    return train_tiny_lm(out, steps=cfg.epochs * spe, save_at=[e * spe for e in cfg.columns()], seed=cfg.seed,
                         corpus=cfg.corpus, seq_len=cfg.seq_len, batch_size=cfg.batch_size, lr=cfg.lr,
                         layers=cfg.layers, hidden=cfg.hidden, progress=progress)


def _load(folder: Path, cfg: LMConfig):
    """(model, {epoch: lazy state}, evaluation batches, number of held-out sequences, device)."""
    device = distributed.auto_device(cfg.device)
    found = trajectory(folder)
    model = hf.build_model(hf.config_folder(found))  # drawn from a fixed seed: the store's fingerprint resumes
    spe = cfg.epoch_steps()
    states = {step // spe: alias_tied(found[step], model) for step in found if step % spe == 0}
    if sorted(states) != cfg.columns():
        raise CriticalityError(f"{folder} holds epochs {sorted(states)}, expected {cfg.columns()} "
                               f"({spe} steps an epoch)")
    tensors = hf.read_tokens(folder / "eval.txt", cfg.seq_len, vocab_size=model.config.vocab_size)
    return model, states, hf.lm_data(tensors, BATCH), int(tensors["input_ids"].shape[0]), device


def analyse(folder: Path, cfg: LMConfig, seeds: int, threshold: float = DEFAULT_THRESHOLD, progress: bool = True):
    """Every sub-layer re-randomized (``seeds`` draws) and reset to each column, scored per token on the
    held-out text; returns the analysis :class:`~criticality.core.analysis.Result` with epochs as checkpoints."""
    model, states, data, n_seq, device = _load(folder, cfg)
    spec = PlanSpec(sublayer_groups(model), seeds, metrics=DEFAULT_METRIC_NAMES, batch_size=BATCH,
                    max_examples=cfg.eval_sequences)
    plan = make_plan(model, states, spec)

    def describe(result: Result) -> dict[str, Any]:
        _accuracy(result.table)
        return dict(
            chance_error=1 - 1 / model.config.vocab_size,
            final_token_accuracy=1.0 - result.summary["final_token_error"], steps_per_epoch=cfg.epoch_steps(),
            data={"name": "common-licenses" if cfg.corpus is None else Path(cfg.corpus).name, "split": "held-out",
                  "stands_in_for": "lm1b", "n_test": int(result.table.n.iloc[0]), "max_examples": cfg.eval_sequences,
                  "sequences": min(n_seq, cfg.eval_sequences or n_seq), "seq_len": cfg.seq_len, "tokenizer": "bytes"})

    return analyse_plan(plan, data, folder / "analysis", one_process(device), threshold=threshold,
                        verdict_metric="token_error", describe=describe, write=False, progress=progress)


def _accuracy(table: pd.DataFrame) -> None:
    """token_accuracy = 1 − token_error (the paper's metric) and its Δ (negative: accuracy lost), in place."""
    table["token_accuracy"] = 1.0 - table["token_error"]
    if "delta_token_error" in table:
        table["delta_token_accuracy"] = -table["delta_token_error"]


def _accuracy_only(result: Result) -> dict[str, Any]:
    _accuracy(result.table)
    return {}


def layers(folder: Path, cfg: LMConfig, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Per decoder layer: skipped (identity, :mod:`criticality.interventions`) and reset to epoch 0, and its
    Block Influence / angular distance (:mod:`criticality.interventions.proxies`) on the held-out text. Writes
    ``folder/analysis_layers/`` (cells.csv, proxies.csv, summary.json); returns (cells, proxies, summary)."""
    model, states, data, _, device = _load(folder, cfg)
    out = folder / "analysis_layers"
    groups = {f"block{i}": [f"model.layers.{i}"] for i in range(len(model.model.layers))}
    spec = PlanSpec(groups, 0, reinit_to=[0], metrics=LAYER_METRIC_NAMES, batch_size=BATCH,
                    max_examples=cfg.eval_sequences, ops=("reinit", "skip"))
    plan = make_plan(model, states, spec, probe=data)
    result = analyse_plan(plan, data, out, one_process(device), verdict_metric="token_error",
                          describe=_accuracy_only, extras=("proxies",), progress=progress)
    return result.table, pd.read_csv(out / "proxies.csv"), result.summary


def findings(table: pd.DataFrame, threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """The paper's LM findings, each checked on ``table``: Δ = token-error increase over the trained model
    (= the accuracy drop) when a sub-layer is reset to a column (``reinit``) or re-randomized (mean of draws).

    1. the re-randomized row looks like the epoch-0 row except at the embedding and the head: every inner
       sub-layer's |Δ rand − Δ@0| is smaller than both ends' Δ rand − Δ@0;
    2-4. robust = Δ@0 ≤ ``threshold``; 5. at least half of the non-robust sub-layers are robust at epoch 1.
    """
    single = table[~table.joint.astype(bool)] if "joint" in table else table
    reinit = single[single.op == "reinit"].pivot_table(index="group", columns="checkpoint", values="delta_token_error")
    at0 = reinit[0]
    rand = single[single.op == "rerandomize"].groupby("group").delta_token_error.mean().reindex(at0.index)
    kind = lambda g: g.split(".")[-1]  # noqa: E731  embed, attn_norm, attn, mlp_norm, mlp_wi, mlp_wo, final_norm, head
    pick = lambda *kinds, block=None: [g for g in at0.index if kind(g) in kinds and (  # noqa: E731
        block is None or g.startswith("block0.") == block)]
    ends, norms, wi = pick("embed", "head"), pick("attn_norm", "mlp_norm", "final_norm"), pick("mlp_wi")
    first, later = pick("attn", "mlp_wo", block=True), pick("attn", "mlp_wo", block=False)
    gap = rand - at0
    inner = gap.drop(ends).abs()
    fragile = [g for g in at0.index if at0[g] > threshold]
    robust_from = {g: next((int(c) for c in reinit.columns if reinit.loc[g, c] <= threshold), None) for g in fragile}
    recovered = [g for g in fragile if robust_from[g] == 1]
    fmt = lambda gs, s: ", ".join(f"{g} {s[g]:+.3f}" for g in gs)  # noqa: E731
    rows = [
        ("re-randomization looks like re-initialization to epoch 0, except embedding and prediction layers",
         bool(ends and len(inner) and inner.max() < gap[ends].min()),
         f"Δ rand − Δ@0: {fmt(ends, gap)}; inner sub-layers: median |·| {inner.median():.3f}, max {inner.max():.3f} "
         f"({inner.idxmax()})"),
        ("layer norms are not robust", bool(norms and all(at0[g] > threshold for g in norms)), fmt(norms, at0)),
        ("the first MLP dense layer is not robust", bool(wi and all(at0[g] > threshold for g in wi)), fmt(wi, at0)),
        ("attention and second MLP dense layer robust except in block 0",
         bool(all(at0[g] <= threshold for g in later) and all(at0[g] > threshold for g in first)),
         f"block 0: {fmt(first, at0)}; later blocks: {fmt(later, at0)}"),
        ("many non-robust sub-layers are robust after one epoch", bool(fragile and len(recovered) >= len(fragile) / 2),
         f"{len(recovered)} of {len(fragile)} non-robust at epoch 0 are robust at epoch 1; first robust column: "
         + ", ".join(f"{g} {'never' if e is None else e}" for g, e in robust_from.items())),
    ]
    return pd.DataFrame(rows, columns=["finding", "holds", "evidence"]).assign(threshold=threshold)


def draw(out: Path, title: str, layer_cells: pd.DataFrame | None = None,
         layer_proxies: pd.DataFrame | None = None, correlations: list | None = None) -> list[Path]:
    """Every figure of ``out/analysis`` (token accuracy, the paper's metric, token error, nll, distances) into
    ``out/figures``; with the per-layer tables, the skip bars and the Block Influence scatter too."""
    paths = plots.draw_run(out)
    if layer_cells is not None:
        paths += plots.save(intervention_figures.skip_bars(layer_cells, f"Skipping one decoder layer — {title}"),
                            out / "figures" / "layers_skip")
        paths += plots.save(intervention_figures.proxies_scatter(layer_proxies, layer_cells, correlations or []),
                            out / "figures" / "layers_proxies")
    return paths


def run(exp: Experiment, *, scale: str = "quick", out: str | Path | None = None, progress: bool = True,
        data: str | None = None, **overrides: Any) -> list[Path]:
    """Train, analyse, draw and report the LM experiment ``exp``; returns ``[OUT/report.html]``."""

    out = Path(out) if out else Path("runs") / exp.key / scale
    cfg = exp.configs(scale, data, **overrides)["run"]
    train(cfg, out, progress=progress)
    result = analyse(out, cfg, exp.seeds, progress=progress)
    found = findings(result.table, result.summary["threshold"])
    result.summary["findings"] = found.to_dict(orient="records")
    write_tables(out / "analysis", result.table, result.distances, result.summary)
    with atomic_path(out / "analysis" / "findings.csv") as tmp:
        found.to_csv(tmp, index=False)
    layer_cells, layer_proxies, layer_summary = layers(out, cfg, progress=progress)
    config_ = {"model": {"name": f"tiny byte Llama ({cfg.layers} blocks, width {cfg.hidden})"},
               "data": {"name": result.summary["data"]["name"]}, "lm": dataclasses.asdict(cfg),
               "steps_per_epoch": result.summary["steps_per_epoch"],
               "experiment": {"key": exp.key, "figure": exp.figure, "scale": scale, "paper_data": exp.data,
                              "columns": cfg.columns(), "assumptions": list(exp.assumptions),
                              "stands_in": exp.stands_in}}
    write_json(out / "analysis" / "config.json", config_)
    correlations = layer_summary.get("proxies", {}).get("spearman", [])
    draw(out, f"tiny byte Llama, {scale} scale", layer_cells, layer_proxies, correlations)
    sections = [_findings_html(found), _figures_html(out / "figures"),
                _layers_html(layer_cells, layer_proxies, correlations)]
    page = report.render(config_, result.summary, out / "figures")
    page = page.replace("<h2>Configuration</h2>", "\n".join(sections) + "\n<h2>Configuration</h2>", 1)
    write_text(out / "report.html", page)
    return [out / "report.html"]


def _findings_html(found: pd.DataFrame) -> str:
    items = "".join(f"<li><b>{'holds' if r.holds else 'does not hold'}</b>: {html.escape(r.finding)} "
                    f"<span class=\"muted\">({html.escape(r.evidence)})</span></li>" for r in found.itertuples())
    return (f"<h2>The paper's LM findings on this run</h2>\n<p>Δ = token-error increase over the trained model "
            f"(= accuracy drop); robust = Δ ≤ {found.threshold.iloc[0]:g} (ours; the paper sets no threshold)."
            f"</p>\n<ul>{items}</ul>")


_FIGURES = (("robustness_token_accuracy", "Per-token accuracy after re-randomizing each sub-layer (rand) or "
             "resetting it to the checkpoint of an epoch (the journal version's LM figure)."),
            ("robustness_nll", "The same grid in nll (nats per byte)."),
            ("layers_skip", "Δ token error when one decoder layer is skipped (its output = its input)."),
            ("layers_proxies", "Block Influence of each decoder layer against its Δ token error (reset to "
             "epoch 0, and skipped)."))


def _figures_html(folder: Path) -> str:
    parts = ["<h2>Token accuracy, nll, skip and Block Influence</h2>", *report.embedded_figures(folder, _FIGURES)]
    return "\n".join(parts)


def _layers_html(cells: pd.DataFrame, proxies: pd.DataFrame, correlations: list) -> str:
    """Per decoder layer: Δ token error when skipped and when reset to epoch 0, Block Influence, angle."""
    delta = lambda op: cells[cells.op == op].set_index("group").delta_token_error  # noqa: E731
    skip, at0 = delta("skip"), delta("reinit")
    rows = "".join(f"<tr><td>{html.escape(str(r.group))}</td><td>{number(skip.get(r.group), signed=True)}</td>"
                   f"<td>{number(at0.get(r.group), signed=True)}</td><td>{number(r.bi)}</td>"
                   f"<td>{number(r.angular)}</td></tr>" for r in proxies.itertuples())
    rho = "; ".join(f"{c['proxy']} vs {c['target']}: ρ = {number(c['spearman'], digits=2)}"
                    if c.get("spearman") is not None else f"{c['proxy']} vs {c['target']}: ρ undefined"
                    for c in correlations)
    return ("<h2>Per decoder layer: skip and Block Influence</h2>\n<table><tr><th>layer</th><th>Δ skip</th>"
            f"<th>Δ reset to 0</th><th>Block Influence</th><th>angular</th></tr>{rows}</table>\n"
            f"<p class=\"muted\">Spearman over {len(proxies)} layers: {html.escape(rho)}.</p>")
