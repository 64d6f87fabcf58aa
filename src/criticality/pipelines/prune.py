"""Depth pruning: which blocks can go, one at a time, with a paired interval at every step.

::

    curve = prune_curve(model, state, (x, y), remove=3)            # SLEB-style greedy, re-scored each step
    curve = prune_curve(model, state, data, remove=3, by="bi")     # one shot: the lowest Block Influence first
    curve.table      # pruning.csv: one row per step (0 = the full model)
    curve.removed    # module paths of the removed blocks, in removal order
    curve.statement  # "2 of 4 blocks can go with Δ nll ≤ 0.05 at 95 % confidence …"

``by="skip"`` (SLEB, Song et al. 2024): at step s every block still in the model is skipped in turn together
with the s − 1 already removed (a joint skip cell of :mod:`criticality.interventions.skip`, evaluated by the
fast engine, which re-runs only the suffix after the first skipped block) and the one whose removal raises the
``metric`` least goes (ties: the earliest block). ``by="bi"`` / ``"angular"`` (ShortGPT; Gromov et al.'s
per-block score): the blocks are ranked once on the full model by :mod:`criticality.interventions.proxies`,
lowest first, and step s removes the first s of them. Either way each step's removed set is evaluated as one
skip cell against the full model on the same examples, so Δ gets a paired 95 % interval
(:func:`criticality.core.analysis.tabulate`).

``pruning.csv`` columns: ``step``, ``removed`` / ``removed_index`` (the block removed at this step: module
path and 0-based index in the original stack), ``removed_paths`` / ``removed_indices`` (all removed so far,
``;``-separated, in removal order), ``blocks_left``, ``candidates`` (cells evaluated to choose this step), every
metric's value, ``delta`` / ``delta_low`` / ``delta_high`` / ``p_value`` of the judged metric, and the removed
block's ``bi`` / ``angular`` on the full model. ``pruning_scores.csv`` (greedy only): every candidate of every
step, ``step``, ``block``, ``index``, ``delta`` with its interval: what each choice was made from.

The statement reads the curve against ``threshold`` (in the judged metric's units): the number of steps whose
interval lies entirely at or below it (every step up to there), and the first step whose interval lies
entirely above it. The intervals are pointwise (one per step, not simultaneous) and, for ``by="skip"``, the
data that chose a block also measures it, so its curve is optimistic: re-evaluate the removed sets on other
data for an unbiased one.

The CLI (``criticality prune``) runs :func:`prune_folder` on a Hugging Face checkpoint folder; the pruned model
is written by :mod:`criticality.adapters.export`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from criticality.adapters import export
from criticality.core.analysis import DEFAULT_THRESHOLD, tabulate
from criticality.core.checkpoints import load_checkpoints
from criticality.core.groups import Groups, resolve
from criticality.core.groups import joint as joint_group
from criticality.core.metrics import CLASSIFIER_METRICS, DEFAULT_METRICS, SEQUENCE_METRICS
from criticality.core.ops import Cell
from criticality.core.plan import PlanSpec, make_plan
from criticality.core.run import run_cells
from criticality.core.stacks import holds_state
from criticality.core.trajectory import alias_tied, checkpoint_at, discover
from criticality.core.verdicts import judged, verdict_metric
from criticality.errors import CriticalityError
from criticality.infra import distributed
from criticality.infra.files import atomic_path, write_json
from criticality.interventions import proxies
from criticality.interventions.skip import module_of
from criticality.output.pruning_figure import draw_pruning
from criticality.paper import data as datasets
from criticality.paper import models
from criticality.paper.training.config import TrainConfig
from criticality.pipelines.analyze_hf import build_model, config_folder, lm_data, read_tokens, tokenizer
from criticality.pipelines.analyze_run import read_run

BY = ("skip", *proxies.PROXIES)  # greedy by the measured metric, or one shot by a proxy
UNITS = ("block",)  # sub-layers (attention / MLP alone) are not pruned yet
StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class PruneConfig:
    """What ``criticality prune`` is asked (each field is one ``--option``)."""

    remove: int = field(default=1, metadata={"help": "blocks to remove, one step each"})
    by: str = field(default="skip", metadata={"help": "skip: greedy, re-scored by the metric after each removal "
                                                      "(SLEB); bi | angular: one shot, lowest proxy first"})
    unit: str = field(default="block", metadata={"help": "what is removed: block (sub-layers are not supported yet)"})
    metric: str | None = field(default=None, metadata={
        "help": "the metric that chooses and is judged: token_error, nll, agreement, kl (HF); error, loss, … (run "
                "directory); None: token_error / error"})
    threshold: float = field(default=DEFAULT_THRESHOLD, metadata={"help": "tolerated Δ metric, in its units"})
    seq_len: int | None = field(default=None, metadata={"help": "tokens per sequence (None: 128, at most the "
                                                                "model's max_position_embeddings)"})
    batch_size: int = field(default=16, metadata={"help": "evaluation batch (sequences, or examples)"})
    max_examples: int | None = field(default=None, metadata={"help": "evaluate on the first N sequences only"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    out: str | None = field(default=None, metadata={"help": "output directory (None: MODEL_OR_RUN/pruning)"})
    save: str | None = field(default=None, metadata={
        "help": "write the pruned model here (HF: from_pretrained loads it; else a state dict and the removed "
                "paths)"})


@dataclass
class Curve:
    table: pd.DataFrame  # pruning.csv
    removed: list[str]  # module paths, in removal order
    blocks: list[str]  # the original stack's module paths
    metric: str  # the judged metric (agreement is judged as disagreement)
    threshold: float
    statement: str
    summary: dict[str, Any]
    scores: pd.DataFrame = field(default_factory=pd.DataFrame)  # greedy: every candidate's Δ at every step

    def lines(self) -> list[str]:
        """One line per step: the block removed and Δ with its interval (what the CLI prints)."""
        out = []
        for row in self.table.itertuples():
            what = f"removed {row.removed} (index {row.removed_index})" if row.step else "full model"
            out.append(f"step {row.step}: {what}: {self.metric} {getattr(row, self.metric):.4g}, Δ {row.delta:+.4g} "
                       f"[{row.delta_low:+.4g}, {row.delta_high:+.4g}]")
        return out


def prune_curve(model: nn.Module, state: StateDict, data: Any, *, remove: int, by: str = "skip",
                metric: str | None = None, metrics: Sequence[str] = DEFAULT_METRICS,
                threshold: float = DEFAULT_THRESHOLD, blocks: Sequence[str] | None = None, batch_size: int = 1000,
                max_examples: int | None = None, device: str | torch.device = "cpu", output: Any = None,
                engine: str = "fast", stats_seed: int = 0, progress: bool = False) -> Curve:
    """Remove ``remove`` blocks of ``model`` (with the weights ``state``) one step at a time (see the module
    docstring); ``metric`` (one of ``metrics``) chooses the greedy steps and is judged against ``threshold``.
    ``engine="naive"`` evaluates every cell with the plain reference instead of the prefix-reusing engine."""
    stack = list(blocks) if blocks is not None else [p for p, _ in proxies.blocks(model)]
    units = [p for p in stack if holds_state(model.get_submodule(p))]  # a Flatten between blocks is no unit
    _check(by, remove, len(units), threshold)
    metric = verdict_metric(list(metrics), metric)
    groups = _block_groups(model, units)
    final = copy_with(model, state, device)
    proxy = proxies.block_proxies(final, data, stack=[(p, final.get_submodule(p)) for p in stack],
                                  batch_size=batch_size, device=device, max_examples=max_examples)
    del final
    ctx = _Context(model, {0: state, 1: state}, groups, data, list(metrics), metric, batch_size, max_examples,
                   device, output, stack, units, blocks, engine, stats_seed, progress)
    if by == "skip":
        steps = _greedy(ctx, remove)
    else:
        ranked = [p for p in proxy.dropna(subset=[by]).sort_values([by, "index"]).block if p in groups.names]
        if len(ranked) < remove:
            raise CriticalityError(f"only {len(ranked)} blocks have a {by} score (a block that changes the shape "
                                   f"of its input has none); cannot remove {remove} by it")
        steps = _one_shot(ctx, ranked[:remove])
    table = _table(steps, stack, units, proxy, list(metrics), ctx.judged)
    statement, counts = state_curve(table, ctx.judged, threshold, len(units))
    removed = [r for r in table.removed if r]
    summary = {"by": by, "metric": ctx.judged, "threshold": float(threshold), "blocks": stack, "removed": removed,
               "statement": statement, **counts,
               "proxies": proxy[["block", "index", "bi", "angular"]].to_dict(orient="records")}
    scores = pd.DataFrame([row for s in steps for row in s.get("scores", [])])
    return Curve(table, removed, stack, ctx.judged, float(threshold), statement, summary, scores)


def _check(by: str, remove: Any, n_blocks: int, threshold: float) -> None:
    if by not in BY:
        raise CriticalityError(f"unknown pruning order {by!r}; choose one of {', '.join(BY)}")
    if isinstance(remove, bool) or not isinstance(remove, int) or not 1 <= remove < n_blocks:
        raise CriticalityError(f"remove must be a number of blocks from 1 to {n_blocks - 1} (the stack has "
                               f"{n_blocks}; at least one stays), got {remove!r}")
    if not math.isfinite(threshold):
        raise CriticalityError(f"threshold must be a finite number, got {threshold!r}")


def copy_with(model: nn.Module, state: StateDict, device: str | torch.device) -> nn.Module:
    """A copy of ``model`` holding ``state`` on ``device`` (the caller's model is left as it is)."""
    final = copy.deepcopy(model)
    final.load_state_dict(dict(state))
    return final.to(device).eval()


def _block_groups(model: nn.Module, stack: Sequence[str]) -> Groups:
    """One group per block, named by its module path (the stack's blocks that hold state)."""
    groups = resolve(model, {p: [p] for p in stack})
    for path in stack:
        if path not in groups.names or module_of(model, groups.members[path], path) != path:
            raise CriticalityError(f"block {path!r}: its parameters are not the state of that one module "
                                   "(tied to another module?), so it cannot be removed as a unit")
    return groups


@dataclass
class _Context:
    """What every step's evaluation shares."""

    model: nn.Module
    checkpoints: dict[int, StateDict]
    groups: Groups
    data: Any
    metrics: list[str]
    metric: str
    batch_size: int
    max_examples: int | None
    device: Any
    output: Any
    stack: list[str]  # the block stack, for indices
    units: list[str]  # its blocks that hold state: what can be removed
    blocks: Sequence[str] | None  # the caller's stack for the engine's prefix reuse (None: found)
    engine: str  # fast or naive
    stats_seed: int
    progress: bool

    @property
    def judged(self) -> str:
        return "disagreement" if self.metric == "agreement" else self.metric

    def evaluate(self, sets: Sequence[Sequence[str]]) -> tuple[pd.DataFrame, dict[tuple[str, ...], str]]:
        """The full model and one skip cell per set of blocks removed together: (table, refusals by set)."""
        joint = [list(s) for s in sets if len(s) > 1]
        spec = PlanSpec(self.groups, seeds=0, joint=joint or None, metrics=self.metrics, batch_size=self.batch_size,
                        max_examples=self.max_examples, output=self.output, blocks=self.blocks, ops=("skip",),
                        engine=self.engine)
        plan = make_plan(self.model, self.checkpoints, spec, probe=self.data)
        found = plan.ops["skip"].found
        cells, refused = [Cell("final", checkpoint=plan.final_epoch)], {}
        for s in sets:
            name = s[0] if len(s) == 1 else joint_group(self.groups, list(s))[0]
            if found.modules(name):
                cells.append(Cell("skip", name, joint=len(s) > 1))
            else:
                refused[tuple(s)] = found.refused.get(name, "cannot be skipped")
        plan.cells = cells
        rows = run_cells(plan, self.data, device=self.device, progress=self.progress)
        records = [r.get("records") for r in rows]
        table = tabulate(rows, list(plan.metrics), records, seed=self.stats_seed, p_metric=self.metric,
                         interval_metrics=[self.metric])
        view, _, _ = judged(table, records, self.metric)
        return view.reset_index(drop=True), refused


def _greedy(ctx: _Context, remove: int) -> list[dict[str, Any]]:
    """SLEB: at each step, skip every remaining block with those already removed; remove the least harmful."""
    removed: list[str] = []
    steps = []
    for step in range(1, remove + 1):
        left = [b for b in ctx.units if b not in removed]
        table, refused = ctx.evaluate([[*removed, b] for b in left])
        if step == 1:
            steps.append({"step": 0, "cell": table.iloc[0], "candidates": 0})
        cells = table.iloc[1:]
        if cells.empty:
            raise CriticalityError(f"step {step}: no remaining block can be skipped together with {removed or 'none'}"
                                   f" ({'; '.join(sorted(set(refused.values())))})")
        deltas = cells[f"delta_{ctx.judged}"].to_numpy(dtype=float)
        best = cells.iloc[int(np.argmin(np.where(np.isnan(deltas), np.inf, deltas)))]  # first of equals: earliest
        names = [_name(ctx, [*removed, b]) for b in left]
        chosen = left[names.index(best.group)]
        scores = []  # every candidate of this step: what the choice was made from
        for _, c in cells.iterrows():
            block = left[names.index(c.group)]
            m = ctx.judged
            scores.append({"step": step, "block": block, "index": ctx.stack.index(block), "delta": c[f"delta_{m}"],
                           "delta_low": c[f"delta_{m}_low"], "delta_high": c[f"delta_{m}_high"]})
        removed.append(chosen)
        steps.append({"step": step, "cell": best, "candidates": len(cells), "removed": list(removed),
                      "scores": scores})
    return steps


def _one_shot(ctx: _Context, ranked: Sequence[str]) -> list[dict[str, Any]]:
    """The first 1, 2, … of ``ranked`` removed together, all in one grid."""
    sets = [list(ranked[:k]) for k in range(1, len(ranked) + 1)]
    table, refused = ctx.evaluate(sets)
    if refused:
        blocks, why = next(iter(refused.items()))
        raise CriticalityError(f"blocks {', '.join(blocks)} cannot be skipped together: {why}")
    steps = [{"step": 0, "cell": table.iloc[0], "candidates": 0}]
    for k, s in enumerate(sets, 1):
        steps.append({"step": k, "cell": table.iloc[k], "candidates": 1, "removed": s})
    return steps


def _name(ctx: _Context, members: Sequence[str]) -> str:
    return members[0] if len(members) == 1 else joint_group(ctx.groups, list(members))[0]


def _table(steps: list[dict[str, Any]], stack: list[str], units: list[str], proxy: pd.DataFrame,
           metrics: list[str], judged_metric: str) -> pd.DataFrame:
    by_block = proxy.set_index("block")
    rows = []
    for s in steps:
        cell, removed = s["cell"], s.get("removed", [])
        last = removed[-1] if removed else ""
        rows.append({
            "step": s["step"], "removed": last, "removed_index": stack.index(last) if last else -1,
            "removed_paths": ";".join(removed), "removed_indices": ";".join(str(stack.index(p)) for p in removed),
            "blocks_left": len(units) - len(removed), "candidates": s["candidates"],
            **{m: float(cell[m]) for m in [*metrics, judged_metric] if m in cell},
            "delta": float(cell[f"delta_{judged_metric}"]), "delta_low": float(cell[f"delta_{judged_metric}_low"]),
            "delta_high": float(cell[f"delta_{judged_metric}_high"]), "p_value": float(cell["p_value"]),
            "bi": float(by_block.bi[last]) if last else math.nan,
            "angular": float(by_block.angular[last]) if last else math.nan})
    return pd.DataFrame(rows)


def state_curve(table: pd.DataFrame, metric: str, threshold: float, n_blocks: int) -> tuple[str, dict[str, Any]]:
    """How many blocks go before Δ leaves ``threshold`` with 95 % confidence, in words and numbers."""
    steps = table[table.step > 0].sort_values("step")
    below = (steps.delta_high <= threshold).to_numpy()
    robust = int(np.argmin(below)) if not below.all() else len(below)  # leading steps whose interval is ≤ t
    above = steps[steps.delta_low > threshold]
    exceeds = int(above.step.iloc[0]) if len(above) else None
    words = (f"{robust} of {n_blocks} blocks can go with Δ {metric} ≤ {threshold:g} at 95 % confidence "
             f"(every step up to there has its paired interval at or below it)")
    if exceeds is not None:
        words += f"; at step {exceeds} Δ is above {threshold:g} with 95 % confidence"
    else:
        words += f"; no step of the {len(steps)} measured has Δ above {threshold:g} with 95 % confidence"
    return words + " (pointwise intervals)", {"robust_steps": robust, "exceeds_at": exceeds}


def write_curve(curve: Curve, out: str | Path, config: Mapping[str, Any] | None = None) -> Path:
    """``out/pruning.csv``, ``out/pruning_scores.csv`` (greedy: every candidate's Δ at every step),
    ``out/pruning.json`` (summary) and ``out/figures/pruning.{png,svg}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "pruning.csv") as tmp:
        curve.table.to_csv(tmp, index=False)
    if not curve.scores.empty:
        with atomic_path(out / "pruning_scores.csv") as tmp:
            curve.scores.to_csv(tmp, index=False)
    write_json(out / "pruning.json", {**curve.summary, "config": dict(config or {})})
    draw_pruning(curve.table, out / "figures" / "pruning", metric=curve.metric, threshold=curve.threshold)
    return out


def prune_folder(model_dir: str | Path, data: str | Path | None = None, config: PruneConfig = PruneConfig(), *,
                 progress: bool = True) -> tuple[Path, Curve]:
    """``criticality prune``: the final checkpoint of an HF folder (one checkpoint, or a Trainer output) on a
    local ``data`` file (as ``analyze-hf`` reads it), or of a training run directory on its own test split;
    writes the curve to ``config.out`` (default ``MODEL/pruning``) and, with ``config.save``, the pruned model.
    Returns (the output folder, the curve)."""
    if config.unit not in UNITS:
        raise CriticalityError(f"--unit {config.unit!r}: only whole blocks are pruned ({', '.join(UNITS)})")
    device = distributed.auto_device(config.device)
    path = Path(model_dir)
    if (path / "checkpoints").is_dir() and (path / "config.json").is_file():
        model, state, evaluation, metrics, source = _from_run(path, config, data)
    else:
        model, state, evaluation, metrics, source = _from_hf(path, config, data)
    curve = prune_curve(model, state, evaluation, remove=config.remove, by=config.by, metric=config.metric,
                        metrics=metrics, threshold=config.threshold, batch_size=config.batch_size,
                        max_examples=config.max_examples, device=device, progress=progress)
    out = Path(config.out) if config.out else path / "pruning"
    write_curve(curve, out, {**asdict(config), "model": str(model_dir), "data": str(data) if data else None})
    if config.save:
        export.save_pruned(model, state, curve.removed, config.save, source=source)
    return out, curve


def _from_hf(path: Path, config: PruneConfig, data: str | Path | None) -> tuple:
    if data is None:
        raise CriticalityError(f"{path} is a Hugging Face model: pass --data FILE (token ids or text) to evaluate on")
    folder, checkpoint = _final_checkpoint(path)
    model = build_model(folder)
    state = alias_tied(checkpoint, model)
    limit = getattr(model.config, "max_position_embeddings", None) or 128
    seq_len = config.seq_len or min(128, limit)
    if seq_len > limit:
        raise CriticalityError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({limit})")
    tensors = read_tokens(Path(data), seq_len, tok=tokenizer(folder), vocab_size=model.config.vocab_size)
    return model, state, lm_data(tensors, config.batch_size), SEQUENCE_METRICS, folder


def _from_run(path: Path, config: PruneConfig, data: str | Path | None) -> tuple:
    """A run directory of ``criticality train``: its model, final checkpoint and test split."""
    if data is not None:
        raise CriticalityError(f"{path} is a run directory: it is evaluated on its own test split; drop --data")
    run = read_run(path)
    try:
        cfg, build = TrainConfig(**run["config"]), run["model"]["build"]
    except (KeyError, TypeError) as e:
        raise CriticalityError(f"{path / 'config.json'} is incomplete or has unknown fields ({e})") from e
    dataset = datasets.load(cfg.data, cfg.data_root, max_train=cfg.max_train, max_test=cfg.max_test,
                            image_size=cfg.image_size)
    test = dataset.test if isinstance(dataset.test, tuple) else torch.utils.data.DataLoader(
        dataset.test, batch_size=config.batch_size, num_workers=cfg.workers)
    checkpoints = load_checkpoints(path)
    return models.build(**build, init=cfg.init), checkpoints[max(checkpoints)], test, CLASSIFIER_METRICS, None


def _final_checkpoint(path: Path) -> tuple[Path, Mapping[str, torch.Tensor]]:
    """(the folder of its config.json, the weights): ``path`` itself when it is one saved model (config.json and
    weights), else the last checkpoint of the trajectory under it (HF Trainer output, step_N files)."""
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        return path, checkpoint_at(path)
    found = discover(path)
    return config_folder(found), found[max(found)]
