"""The robustness grid: operations × groups × sources → one tidy table (verdicts: verdicts.py, distances:
distances.py).

::

    result = criticality.analyze(model, checkpoints={0: sd0, 1: sd1, 10: sd10, 40: sd40},
                                 data=(x_test, y_test), groups="auto", seeds=3, joint=None)
    result.table      # one row per cell: op, group, joint, checkpoint, seed, error, loss, n, delta_*, finite
    result.distances  # group, checkpoint, n, l2, linf (the paper's), l2_rel, linf_rel, cosine (distances.py)
    result.verdicts   # group, Δ error at checkpoint 0 with its interval and p, verdict (critical / robust /
                      # inconclusive), examples that would settle it, re-randomized error with its interval
    result.examples(op="reinit", group="fc1", checkpoint=0)  # one row per test example
    result.per_class(op="reinit", group="fc1", checkpoint=0)  # error per true class vs the final model

The grid is general: a cell is ``(op, group, checkpoint, seed, alpha, sigma)``; ``op`` names a registered
operation (:mod:`criticality.core.ops`): ``final`` (the trained model), ``reinit`` (group back to ``checkpoint``),
``rerandomize`` (group from a fresh draw with ``seed``), or one of the interventions of
:mod:`criticality.interventions`: ``interpolate`` (``alpha``), ``noise`` (``sigma``, ``seed``) and ``skip``.
The steps are :func:`~criticality.core.plan.make_plan` (check and lay out), :func:`~criticality.core.run.run_cells`
(evaluate, resumably) and :func:`finish` (the tables and the summary).
Joint groups (``joint=[["fc2", "fc3"]]``) get the same cells under the name ``fc2+fc3``. Every cell keeps
per-example records (:mod:`criticality.core.records`), from which :mod:`criticality.core.statistics` gives each
cell's paired interval of Δ against the final model. This module knows nothing of the model zoo, the data
sets or the CLI.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from criticality.core import adaptive as adaptive_mod
from criticality.core import batches, resampling, statistics
from criticality.core.distances import distances
from criticality.core.engine import Data, Metric
from criticality.core.groups import Groups, GroupSpec
from criticality.core.initializers import InitScheme, draws_summary, scheme_name
from criticality.core.ops import PAPER_OPS, Cell, Operation
from criticality.core.plan import Plan, PlanSpec, make_plan
from criticality.core.records import Examples, Record, per_class
from criticality.core.run import run_cells
from criticality.core.stores import cell_key
from criticality.core.verdicts import DEFAULT_THRESHOLD, intervals, judged, p_values, table_resamples, units, verdicts
from criticality.core.verdicts import verdict_metric as choose_metric
from criticality.errors import CriticalityError

StateDict = Mapping[str, torch.Tensor]
VERDICT_RULES = ("interval", "point")  # three outcomes from the paired interval, or the paper's point rule
LABEL_FREE = ("agreement", "kl")  # built-in metrics that compare with the final model, not with labels


@dataclass
class Result:
    table: pd.DataFrame
    distances: pd.DataFrame
    verdicts: pd.DataFrame
    groups: Groups
    joint: dict[str, tuple[str, ...]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    records: Examples = field(default_factory=Examples)

    def examples(self, op: str = "final", **where: Any) -> pd.DataFrame:
        """One cell's per-example records, one row per example in data order (see
        :meth:`criticality.core.records.Examples.frame`); ``where`` picks the cell: ``group=``, ``checkpoint=``,
        ``seed=`` (and any other cell field). ``result.examples()`` is the final model."""
        return self.records.frame(self.records.find(op=op, **where))

    def per_class(self, op: str = "final", metric: str = "error", **where: Any) -> pd.DataFrame:
        """Error (or another 0/1 metric) per true class of one cell, beside the final model's."""
        return per_class(self.records, metric, op=op, **where)


def analyze(model: nn.Module, checkpoints: Mapping[int, StateDict], data: Data, *,
            groups: GroupSpec | Groups | None = None, seeds: int | Sequence[int] = 3,
            joint: Sequence[Sequence[str]] | None = None, final: int | None = None,
            reinit_to: Sequence[int] | None = None, init: InitScheme | None = None,
            metrics: Sequence[str] | Mapping[str, Metric] | None = None, engine: str = "fast",
            batch_size: int = 1000, device: str | torch.device = "cpu", max_examples: int | None = None,
            threshold: float = DEFAULT_THRESHOLD, buffers: str = "reset", store: str | None = None,
            shard: tuple[int, int] | None = None, progress: bool = True,
            provenance: Mapping[str, Any] | None = None, calibration: Data | None = None,
            output: batches.Output = None, blocks: Sequence[str] | None = None, verdict: str = "interval",
            verdict_metric: str | None = None, stats_seed: int = 0,
            ops: Sequence[str | Operation] = PAPER_OPS, alphas: Sequence[float] | None = None,
            sigmas: Sequence[float] | None = None, source: int = 0, skip_runs: int | None = None,
            adaptive: bool = False) -> Result:
    """Measure re-initialization and re-randomization robustness of every group of ``model``.

    ``checkpoints`` maps epoch → state dict; the final model is the largest epoch unless ``final`` names
    one. ``groups`` defaults to the model's own ``layer_groups()`` when it declares them, else one group
    per block of its stack (``"blocks"``), else ``"auto"`` (see :mod:`criticality.groups`); the spec used
    is logged (INFO) and recorded as ``summary["groups_spec"]``. ``reinit_to`` defaults to every epoch
    before the final one. ``seeds`` is a count or a list of seeds for the fresh draws, which use ``init``
    (default: chosen by :func:`criticality.core.initializers.choose`: ``hf`` for Hugging Face models, ``timm``
    for timm models, ``model.init_scheme``, else the modules' own ``reset_parameters``; ``"shuffle"``
    works for any model). ``engine="naive"`` evaluates every cell with the plain
    reference. ``store`` names a cells.jsonl file that makes the run resumable. ``shard=(rank, world)``
    evaluates only this rank's share of the cells (see :mod:`criticality.infra.distributed`).
    ``buffers``: a group's norm-layer running statistics move with it (``reset``, default), stay as
    trained (``keep``), or are recomputed for each variant on the ``calibration`` batches (``recalibrate``).
    ``data``: tensors ``(x, y)``, ``x`` alone (unlabelled), or a loader of tuples or of dict batches (HF style);
    ``metrics``: names (``error``, ``loss``, ``token_error``, ``nll``, ``agreement``, ``kl``) or functions, see
    :mod:`criticality.core.metrics`; by default chosen from the model's logits on the first batch
    (:func:`criticality.core.metrics.choose`: a classifier's ``error``, ``loss``; a sequence model's
    ``token_error``, ``nll``; ``agreement``, ``kl`` for data without labels), logged (INFO) and recorded as
    ``summary["metrics_spec"]``; ``output``: where the logits are in the model's output (a key or a function).
    ``blocks``: module paths of the model's repeated block stack, in execution order, for the fast engine's
    prefix reuse (default: found, see :func:`criticality.core.stacks.find_stack`).
    ``verdict="interval"`` calls a group critical / robust only when the 95 % paired interval of its Δ
    ``verdict_metric`` (at re-initialization to epoch 0) clears ``threshold`` (in that metric's units;
    default ``error``, else ``token_error``, else ``agreement`` judged as ``disagreement`` = 1 − agreement,
    the fraction of examples whose top-1 prediction changed; else the first metric), inconclusive otherwise;
    ``"point"`` is the paper's rule on Δ alone. ``stats_seed`` seeds the bootstrap and the permutation test.
    ``ops`` picks the operations (default the paper's two; see :mod:`criticality.interventions` for
    ``interpolate`` over ``alphas`` from checkpoint ``source``, ``noise`` over ``sigmas`` × ``seeds`` and
    ``skip``; ``alphas`` and ``sigmas`` default to those operations' own). An operation may also be given
    as an object with its own parameters: ``ops=["reinit", Interpolate(alphas=(0, 0.5), source=1)]``.
    ``skip_runs=k`` gives ``skip`` one more cell per run of k consecutive blocks (named ``a+b`` as joint groups).
    ``adaptive=True`` takes the examples in a random order seeded by ``stats_seed`` and stops each cell once an
    anytime-valid confidence sequence of its Δ ``verdict_metric`` (a 0/1 metric) clears ``threshold``
    (:mod:`criticality.core.adaptive`); the table's ``n`` says how many examples each cell used.
    """
    _check_judging(threshold, stats_seed, verdict)  # refused before any work, not after every cell
    spec = PlanSpec(groups, seeds, joint, final, reinit_to, init, metrics, engine, batch_size, max_examples, buffers,
                    calibration, output, blocks, ops, alphas, sigmas, source, skip_runs, adaptive=bool(adaptive))
    plan = make_plan(model, checkpoints, spec, probe=data)
    verdict_metric = choose_metric(list(plan.metrics), verdict_metric)  # refused now, not after every cell
    judge = adaptive_mod.judge_for(plan, verdict_metric, threshold, stats_seed)
    rows = run_cells(plan, data, device=device, store=store, shard=shard, progress=progress, judge=judge)
    return finish(plan, rows, threshold=threshold, provenance=provenance, verdict=verdict,
                  verdict_metric=verdict_metric, stats_seed=stats_seed)


def _check_judging(threshold: Any, stats_seed: Any, verdict: Any) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
        raise CriticalityError(f"threshold must be a finite number (in the verdict metric's units), got {threshold!r}")
    if isinstance(stats_seed, bool) or not isinstance(stats_seed, numbers.Integral) or stats_seed < 0:
        raise CriticalityError(f"stats_seed must be a non-negative integer, got {stats_seed!r}")
    if verdict not in VERDICT_RULES:
        raise CriticalityError(f"unknown verdict rule {verdict!r}; choose one of {', '.join(VERDICT_RULES)}")


def finish(plan: Plan, rows: list[dict[str, Any]], *, threshold: float = DEFAULT_THRESHOLD,
           provenance: Mapping[str, Any] | None = None, verdict: str = "interval",
           verdict_metric: str | None = None, stats_seed: int = 0) -> Result:
    """Turn evaluated rows into the :class:`Result`: deltas with intervals, distances, verdicts, summary."""
    _check_judging(threshold, stats_seed, verdict)
    # error when measured, else token_error, else agreement (judged as disagreement), else the first metric
    measured = choose_metric(list(plan.metrics), verdict_metric)
    records = [r.get("records") for r in rows]
    targets = next((r["targets"] for r in rows if r.get("targets") is not None), None)
    # Intervals for every metric but the label-free ones beside a labelled verdict metric (they cost a
    # bootstrap each and judge nothing there: agreement and kl are on by default in the CLI).
    spread = [m for m in plan.metrics if m == measured or m not in LABEL_FREE]
    own = [m for m, fn in plan.metrics.items() if not fn.needs_reference] or list(plan.metrics)
    table = tabulate(rows, list(plan.metrics), records, seed=stats_seed, p_metric=measured, interval_metrics=spread,
                     finite_metrics=own)
    if plan.adaptive:  # stopped cells: Δ on their own examples, the verdict metric's interval from its sequence
        table = adaptive_mod.restate(table, records, list(plan.metrics), measured)
    dist = distances(plan.checkpoints, {**plan.groups.members, **plan.joint}, plan.model)
    # Verdicts compare re-initialization to epoch 0: none when the ops left reinit out.
    view, view_records, verdict_metric = judged(table, records, measured)
    verdict_table = verdicts(view, threshold, view_records, rule=verdict, metric=verdict_metric, seed=stats_seed) \
        if (table.op == "reinit").any() else pd.DataFrame()
    final = table[table.op == "final"].iloc[0]
    summary = {
        "final_epoch": plan.final_epoch,
        **{f"final_{m}": float(final[m]) for m in plan.metrics},
        "threshold": float(threshold),
        "verdict_rule": verdict,
        "verdict_metric": verdict_metric,
        "bootstrap": {"resamples": statistics.RESAMPLES, "level": statistics.LEVEL, "seed": int(stats_seed),
                      "sign_flips": resampling.FLIPS, "exact_up_to_units": resampling.EXACT_UNITS},
        "intervals": "0/1 metrics (error; agreement of a classifier): Tango's score interval for paired proportions; "
                     "other metrics: paired bootstrap-t over units (examples, or sequences), one set of resamples "
                     "per table, widened to the Student-t interval (alone from 2,000 units on); re-randomized: t "
                     "interval over draws and units",
        "p_values": "0/1 metrics: exact McNemar; other metrics: paired sign-flip permutation test over units "
                    "(exact up to 16 differing units, else Monte Carlo)",
        "units": units(view_records, verdict_metric),
        # NaN (no interval, settled verdict) becomes null: JSON without NaN, and summaries compare equal.
        "verdicts": verdict_table.astype(object).where(verdict_table.notna(), None).to_dict(orient="records"),
        "groups_spec": plan.groups.spec,
        "metrics_spec": dict(plan.metrics_spec),
        "coverage": plan.groups.coverage(),
        "joint": {g: list(k) for g, k in plan.joint.items()},
        "settings": {"init": scheme_name(plan.init), "engine": plan.engine, "batch_size": plan.batch_size,
                     "max_examples": plan.max_examples, "buffers": plan.buffers,
                     "seeds": sorted({c.seed for c in plan.cells if c.seed is not None})},
        "draws": draws_summary(plan.model, scheme_name(plan.init), {**plan.groups.members, **plan.joint}),
        "non_finite_cells": int((~table.finite).sum()),
        "provenance": dict(provenance or {}),
        **plan.summary(),
        **(_adaptive_summary(plan, table, measured, threshold, stats_seed) if plan.adaptive else {}),
    }
    kept = {cell_key(r): rec for r, rec in zip(rows, records, strict=True) if rec is not None}
    cells = {cell_key(r): {k: r[k] for k in Cell("final").as_dict()} for r in rows if cell_key(r) in kept}
    return Result(table, dist, verdict_table, plan.groups, plan.joint, summary, Examples(kept, cells, targets))


def _adaptive_summary(plan: Plan, table: pd.DataFrame, metric: str, threshold: float, seed: int) -> dict[str, Any]:
    judge = adaptive_mod.judge_for(plan, metric, threshold, seed)
    full = int(table.loc[table.op == "final", "n"].iloc[0])
    return {"adaptive": True, "adaptive_evaluation": {
        "order_seed": judge.seed, "alpha": judge.alpha, "judged_cells": judge.cells, "per_cell_alpha": judge.level,
        "correction": "Bonferroni over the judged cells", "sequence": "betting (Waudby-Smith & Ramdas 2024)",
        "first_chunk": adaptive_mod.FIRST_CHUNK, "growth": adaptive_mod.GROWTH,
        "examples": full, "example_forwards": int(table["n"].sum()), "full_forwards": full * len(table),
        "stopped_early": int((table["n"] < full).sum())}}


def tabulate(rows: Sequence[Mapping[str, Any]], metric_names: Sequence[str],
             records: Sequence[Record | None] | None = None, *, seed: int = 0,
             p_metric: str = "error", interval_metrics: Sequence[str] | None = None,
             finite_metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Rows → the tidy table, with ``delta_<metric>`` against the final model and a ``finite`` flag.

    With ``records`` (one per row, None where missing) every cell also gets ``delta_<metric>_low/high``
    (95 % paired interval: Tango's score interval for 0/1 records such as error, the bootstrap-t over units with
    one set of resamples for every cell and metric, seeded by ``seed``, for the others; see
    :mod:`criticality.core.verdicts`) and ``p_value`` of ``p_metric`` (exact McNemar when its records are 0/1,
    else the paired sign-flip permutation test over units, seeded by ``seed``).
    ``interval_metrics`` limits the intervals to those metrics (default: all). ``finite`` checks
    ``finite_metrics`` (default: all): metrics measured against the final model's own predictions
    (agreement, kl) are non-finite in every cell when the final model is, so they do not say which cells are.
    """
    table = pd.DataFrame([{k: v for k, v in r.items() if k not in ("records", "targets")} for r in rows])
    finals = table[table.op == "final"]
    if finals.empty:
        raise CriticalityError("the grid has no final-model cell to compare against")
    for m in metric_names:
        table[f"delta_{m}"] = table[m] - float(finals.iloc[0][m])
    records = list(records) if records is not None else [None] * len(table)
    spread = metric_names if interval_metrics is None else [m for m in metric_names if m in interval_metrics]
    shared = table_resamples(records, finals.index[0], spread, seed)  # drawn once, used by every cell and metric
    for m in spread:
        table[[f"delta_{m}_low", f"delta_{m}_high"]] = intervals(records, finals.index[0], m,
                                                                  seed if shared is None else shared)
    table["p_value"] = p_values(records, finals.index[0], p_metric, seed)
    checked = list(metric_names if finite_metrics is None else finite_metrics)
    table["finite"] = np.isfinite(table[checked].to_numpy(dtype=float)).all(axis=1)
    for col in ("checkpoint", "seed"):
        table[col] = table[col].astype("Int64")
    for col in ("alpha", "sigma"):  # absent from rows stored before these ops existed
        table[col] = table[col].astype(float) if col in table else np.nan
    table["n"] = table["n"].astype(int)
    return table
