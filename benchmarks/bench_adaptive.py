"""Adaptive evaluation against the full grid: example-forwards, wall time, and whether the verdicts agree.

Run::

    .venv/bin/python benchmarks/bench_adaptive.py               # FCN 5x256, all 10,000 test images: ~1-2 min
    .venv/bin/python benchmarks/bench_adaptive.py --quick       # smoke run, under 30 s
    .venv/bin/python benchmarks/bench_adaptive.py --json /tmp/adaptive.json --repeats 3

The grid is ``bench_engine.py``'s FCN case (the paper's Fig 2 model, ``fcn-5x256``): a trajectory of 8
checkpoints, 30 SGD steps of batch 128 apart on the Fashion-MNIST training set, then per layer group re-init to
every earlier checkpoint and 3 re-randomizations, evaluated on the whole 10,000-image test split with the fast
engine, once in full (``analyze(...)``) and once adaptively (``analyze(..., adaptive=True)``). The two alternate
``repeats`` times and the best wall time of each counts (other processes share the machine).

Printed: example-forwards (Σ over cells of the examples each was evaluated on; the full grid's is cells × N)
and their ratio, the wall times of the whole ``analyze`` and their ratio, against the targets (≥ 3× fewer
example-forwards, ≥ 2× less wall time), and the evaluation alone (``run_cells``, without the tables' statistics,
one run each); then the verdicts. Every cell gets a verdict from its interval against the threshold (the adaptive
run's stopped cells from their confidence sequence); a *flip* is a cell that one run calls critical and the
other robust. The script exits 1 on any flip against the full evaluation's conclusive verdicts; a missed speed
target is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import bench_engine
import pandas as pd
import torch

from criticality.core import statistics
from criticality.core.adaptive import judge_for
from criticality.core.analysis import analyze
from criticality.core.plan import PlanSpec, make_plan
from criticality.core.run import run_cells
from criticality.paper import data, models

FORWARDS_TARGET, WALL_TARGET = 3.0, 2.0  # full / adaptive


def cell_verdicts(table: pd.DataFrame, threshold: float, metric: str = "error") -> pd.Series:
    """Each non-final cell's verdict from its Δ interval (critical / robust / inconclusive)."""
    cells = table[table.op != "final"]
    return pd.Series([statistics.verdict(lo, hi, threshold) for lo, hi in
                      zip(cells[f"delta_{metric}_low"], cells[f"delta_{metric}_high"], strict=True)], index=cells.index)


def compare(full: pd.DataFrame, adaptive: pd.DataFrame, threshold: float) -> dict:
    """Per-cell and per-group agreement of the adaptive run's verdicts with the full run's."""
    f, a = cell_verdicts(full, threshold), cell_verdicts(adaptive, threshold)
    conclusive = f != "inconclusive"
    flips = int(((f == "critical") & (a == "robust")).sum() + ((f == "robust") & (a == "critical")).sum())
    return {"cells_judged": len(f), "full_conclusive": int(conclusive.sum()),
            "agree_where_full_conclusive": int((f[conclusive] == a[conclusive]).sum()),
            "adaptive_inconclusive_where_full_conclusive": int((a[conclusive] == "inconclusive").sum()),
            "adaptive_conclusive_where_full_inconclusive": int((a[~conclusive] != "inconclusive").sum()),
            "flips": flips}


def run(case: bench_engine.Case, ds: data.Dataset, repeats: int, threshold: float) -> dict:
    generator = torch.Generator().manual_seed(0)
    x_test, y_test = ds.test if case.examples >= len(ds.test[1]) else \
        data.stratified_subset(*ds.test, case.examples, generator)
    model = models.build(case.model, tuple(x_test.shape[1:]), ds.num_classes, width=case.width)
    states = bench_engine.trajectory(model, *ds.train, case, torch.device("cpu"), generator)
    times: dict[str, list[float]] = {"full": [], "adaptive": []}
    results = {}
    for _ in range(repeats):
        for name in ("full", "adaptive"):
            start = time.perf_counter()
            results[name] = analyze(model, states, (x_test, y_test), seeds=case.seeds, batch_size=bench_engine.BATCH,
                                    threshold=threshold, adaptive=name == "adaptive", progress=False)
            times[name].append(time.perf_counter() - start)
    evaluation = {name: _evaluation_s(model, states, (x_test, y_test), case, threshold, name == "adaptive")
                  for name in ("full", "adaptive")}
    full, adaptive = results["full"], results["adaptive"]
    forwards_full, forwards_adaptive = int(full.table.n.sum()), int(adaptive.table.n.sum())
    group_full = full.verdicts.set_index("group").verdict
    group_adaptive = adaptive.verdicts.set_index("group").verdict
    return {"model": case.model, "examples": len(y_test), "cells": len(full.table), "threshold": threshold,
            "forwards_full": forwards_full, "forwards_adaptive": forwards_adaptive,
            "forwards_ratio": forwards_full / forwards_adaptive, "full_s": min(times["full"]),
            "adaptive_s": min(times["adaptive"]), "wall_ratio": min(times["full"]) / min(times["adaptive"]),
            "full_runs_s": times["full"], "adaptive_runs_s": times["adaptive"],
            "full_evaluation_s": evaluation["full"], "adaptive_evaluation_s": evaluation["adaptive"],
            "stopped_early": adaptive.summary["adaptive_evaluation"]["stopped_early"],
            "group_verdicts_full": group_full.to_dict(), "group_verdicts_adaptive": group_adaptive.to_dict(),
            **compare(full.table, adaptive.table, threshold)}


def _evaluation_s(model, states, test, case: bench_engine.Case, threshold: float, adaptive: bool) -> float:
    """Wall seconds of the evaluation alone (``run_cells``: no tables, intervals or verdicts)."""
    plan = make_plan(model, states, PlanSpec(seeds=case.seeds, batch_size=bench_engine.BATCH, adaptive=adaptive),
                     probe=test)
    start = time.perf_counter()
    run_cells(plan, test, progress=False, judge=judge_for(plan, None, threshold))
    return time.perf_counter() - start


def describe(row: dict) -> str:
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    return "\n".join([
        f"{row['model']}: {row['cells']} cells x {row['examples']:,} examples, threshold {row['threshold']}",
        f"  example-forwards: full {row['forwards_full']:,}, adaptive {row['forwards_adaptive']:,} -> "
        f"{row['forwards_ratio']:.2f}x fewer "
        f"(target {FORWARDS_TARGET}x: {met(row['forwards_ratio'] >= FORWARDS_TARGET)})",
        f"  wall: full {row['full_s']:.2f} s, adaptive {row['adaptive_s']:.2f} s -> {row['wall_ratio']:.2f}x "
        f"(target {WALL_TARGET}x: {met(row['wall_ratio'] >= WALL_TARGET)}); runs {row['full_runs_s']} / "
        f"{row['adaptive_runs_s']}",
        f"  evaluation alone (run_cells, one run each): full {row['full_evaluation_s']:.2f} s, adaptive "
        f"{row['adaptive_evaluation_s']:.2f} s -> {row['full_evaluation_s'] / row['adaptive_evaluation_s']:.2f}x",
        f"  cells stopped early: {row['stopped_early']} of {row['cells'] - 1}",
        f"  cell verdicts: full conclusive {row['full_conclusive']} of {row['cells_judged']}, adaptive agrees on "
        f"{row['agree_where_full_conclusive']}, inconclusive on {row['adaptive_inconclusive_where_full_conclusive']}; "
        f"adaptive conclusive where full is not: {row['adaptive_conclusive_where_full_inconclusive']}; "
        f"critical<->robust flips: {row['flips']}",
        "  group verdicts (full -> adaptive): " + ", ".join(
            f"{g}: {v} -> {row['group_verdicts_adaptive'].get(g)}" for g, v in row["group_verdicts_full"].items())])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2,000 examples, 2 checkpoints, 1 seed")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each mode, alternating; the best counts")
    parser.add_argument("--threshold", type=float, default=0.02, help="Δ test error threshold of the verdicts")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 with --quick, else torch's)")
    parser.add_argument("--data-root", type=Path, help="folder of the Fashion-MNIST IDX files (default: data.load's)")
    parser.add_argument("--json", type=Path, help="also write the row and the machine as JSON")
    args = parser.parse_args(argv)
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    case = bench_engine.CASES[0]  # fcn-5x256, 10,000 examples, 8 checkpoints, 3 seeds
    if args.quick:
        case = replace(case, examples=2_000, epochs=2, seeds=1, steps=10)
    ds = data.load("fashion-mnist", args.data_root)
    row = run(case, ds, 1 if args.quick else args.repeats, args.threshold)
    print(describe(row))
    machine = {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
               "torch": torch.__version__}
    print(f"machine: {machine}")
    if args.json:
        args.json.write_text(json.dumps({"row": row, "machine": machine}, indent=2))
    return 1 if row["flips"] else 0


if __name__ == "__main__":
    sys.exit(main())
