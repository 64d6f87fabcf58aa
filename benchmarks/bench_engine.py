"""The fast engine against the naive loop: same grid, same numbers, how much faster.

Run::

    .venv/bin/python benchmarks/bench_engine.py                 # full size: about 15 min on 2 cores
    .venv/bin/python benchmarks/bench_engine.py --quick         # smoke run, under 30 s (1 thread)
    .venv/bin/python benchmarks/bench_engine.py --device cuda --json /tmp/bench.json
    .venv/bin/python benchmarks/bench_engine.py --cases fcn --repeats 5 --threads 1
    .venv/bin/python benchmarks/bench_engine.py --cases llama vit resnet-timm --small   # foreign models, small

Foreign-model cases (``llama``: transformers Llama-style LM, 8 layers, d = 256, 256 sequences x 128 tokens;
``vit``: transformers ViT, 12 layers; ``resnet-timm``: a timm-like ResNet-18 with ``layer1..layer4`` and no
``stages()``; 8 checkpoints and 2 seeds per block each) are described in ``foreign_cases.py``; they run with
the zoo cases unless ``--quick``, and ``--small`` shrinks their data for a shared machine.

For each case, in one process: build the zoo model, make a checkpoint trajectory (``steps`` SGD steps of
batch 128 on the Fashion-MNIST training set between checkpoints, so that weights and BatchNorm running
statistics move), then evaluate the whole grid (the final model; per layer group, re-init to every earlier
checkpoint and re-randomize with each seed) on a stratified subset of the test set with both engines:

- naive: ``analyze(..., engine="naive", batch_size=1000)``: per cell deepcopy, ``load_state_dict``, evaluate;
- fast:  ``analyze(..., engine="fast", batch_size=1000)``: in-place swap and prefix caching.

Both timings are of the whole ``analyze`` call (planning, surgery and distances included, the same for both).
The engines alternate ``repeats`` times and the best wall time of each counts: other processes may share the
machine, and on 2 busy cores two OpenMP threads stall at every barrier, which is why ``--quick`` runs on one
thread unless ``--threads`` says otherwise. The tables must agree (errors exactly, losses to 1e-5), else the
script exits with status 1; a missed speed-up target is reported, not fatal.

Printed per case, then as a table: wall seconds of each engine (each run in brackets), the seconds of the fast
run spent in the statistics (intervals, p-values, verdicts: ``statistics_timer``) and their share, the ratio naive/fast
against its target, the FLOP ratio (naive FLOPs / engine FLOPs: the speed-up from skipped work alone), and
the GFLOP/s each achieved against a measured peak (best square float32 matmul on the same device, measured
before and after). FLOPs are those of convolutions and matmuls (``FlopCounterMode``, one probe forward per
stage). The naive loop runs the full forward for every cell; the engine runs the prefix once, up to the
deepest position, and per cell the suffix from the first stage the cell modifies: its GFLOP/s count the
work it actually ran, not the work it saved. ``--json PATH`` also writes the rows and the machine as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import foreign_cases
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from criticality.core import analysis
from criticality.core.analysis import analyze
from criticality.core.engine import Engine, Variant
from criticality.core.groups import resolve
from criticality.paper import data, models

BATCH = 1000  # examples per evaluation batch, shared by both engines
TRAIN_BATCH = 128  # examples per SGD step
LR, MOMENTUM = 0.05, 0.9  # SGD for the trajectory
LOSS_TOL = 1e-5  # nats, largest allowed |loss difference| of a cell


@dataclass(frozen=True)
class Case:
    key: str
    model: str  # registry name
    width: int | None  # base channels of a VGG / ResNet; None for an FCN (its width is in the name)
    examples: int  # test images evaluated per cell
    pad: bool  # zero-pad 28x28 to 32x32 (0 is the data-set mean after standardizing)
    epochs: int  # checkpoints 0..epochs; the last is the final model, the others are re-init targets
    seeds: int  # fresh draws per group
    steps: int  # SGD steps between consecutive checkpoints
    repeats: int  # timed runs of each engine, alternating; the best counts
    target: float  # naive/fast wall-time ratio the engine should reach


CASES = (
    Case("fcn", "fcn-5x256", None, 10_000, False, epochs=8, seeds=3, steps=30, repeats=3, target=2.0),
    Case("vgg", "vgg11-bn", 16, 2_000, True, epochs=3, seeds=2, steps=15, repeats=2, target=1.5),
    Case("resnet", "resnet18", 16, 1_000, True, epochs=2, seeds=1, steps=8, repeats=2, target=1.5),
)
QUICK = (  # timings at this size are mostly per-cell overhead: a smoke run, not a measurement
    Case("fcn", "fcn-5x256", None, 500, False, epochs=1, seeds=1, steps=2, repeats=1, target=2.0),
    Case("vgg", "vgg11-bn", 4, 100, True, epochs=1, seeds=1, steps=2, repeats=1, target=1.5),
    Case("resnet", "resnet18", 4, 50, True, epochs=1, seeds=1, steps=2, repeats=1, target=1.5),
)


def trajectory(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, case: Case, device: torch.device,
               generator: torch.Generator) -> dict[int, dict[str, torch.Tensor]]:
    """State dicts (on the CPU) at checkpoints 0..epochs, ``case.steps`` SGD steps apart.

    Plain SGD with momentum, written out: ``torch.optim`` would import torch._dynamo (seconds) on first use.
    """
    model = model.to(device).train()
    params = list(model.parameters())
    velocity = [torch.zeros_like(p) for p in params]
    snapshot = lambda: {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # noqa: E731
    states = {0: snapshot()}
    for epoch in range(1, case.epochs + 1):
        for _ in range(case.steps):
            idx = torch.randint(len(x), (TRAIN_BATCH,), generator=generator)
            xb, yb = _pad(x[idx], case).to(device), y[idx].to(device)  # (128, C, H, W), (128,)
            grads = torch.autograd.grad(F.cross_entropy(model(xb), yb), params)
            with torch.no_grad():
                for p, v, g in zip(params, velocity, grads, strict=True):
                    p.sub_(v.mul_(MOMENTUM).add_(g), alpha=LR)
        states[epoch] = snapshot()
    model.cpu().eval()
    return states


def _pad(x: torch.Tensor, case: Case) -> torch.Tensor:
    return F.pad(x, (2, 2, 2, 2)) if case.pad else x  # (N, 1, 28, 28) -> (N, 1, 32, 32)


def stage_flops(model: torch.nn.Module, x: torch.Tensor) -> list[float]:
    """FLOPs per example of each stage of ``model.stages()`` (convolutions and matmuls), from one probe."""
    out, h = [], x
    with torch.no_grad():
        for _, stage in model.eval().stages():
            counter = FlopCounterMode(display=False)
            with counter:
                h = stage(h)
            out.append(counter.get_total_flops() / len(x))
    return out


def engine_flops(model: torch.nn.Module, final: dict[str, torch.Tensor], cells: list[list[str]],
                 per_stage: list[float], probe_data: tuple[torch.Tensor, torch.Tensor], n: int) -> float:
    """FLOPs the engine runs for ``cells`` (each a list of modified keys) over ``n`` examples.

    Assumes the engine makes one pass (its cached activations fit ``max_cache_bytes``, 1 GiB: true for every
    case here, at most 131 MB); with several chunks it re-runs the prefix once per position.
    """
    probe = Engine(model, final, probe_data)  # only for the positions it assigns to keys
    positions = [probe.position(Variant(i, dict.fromkeys(keys))) for i, keys in enumerate(cells)]
    prefix = sum(per_stage[:max(positions)])  # activations advanced once, stage by stage
    suffixes = sum(sum(per_stage[p:]) for p in positions)
    return n * (prefix + suffixes)


def matmul_peak(device: torch.device, size: int, repeats: int = 3) -> float:
    """Best GFLOP/s of a ``size`` x ``size`` float32 matmul on ``device``."""
    a = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        _sync(device)
        start = time.perf_counter()
        a @ a
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(case: Case, ds: data.Dataset, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    x_test, y_test = data.stratified_subset(*ds.test, case.examples, generator)
    x_test = _pad(x_test, case)  # (N, 1, 28, 28) or (N, 1, 32, 32)
    model = models.build(case.model, tuple(x_test.shape[1:]), ds.num_classes, width=case.width)
    start = time.perf_counter()
    states = trajectory(model, *ds.train, case, device, generator)
    trajectory_s = time.perf_counter() - start
    final = states[case.epochs]
    bn_moved = [k for k in final if k.endswith("running_var") and not torch.allclose(final[k], states[0][k])]
    times, tables = time_engines(model, states, (x_test, y_test), case, device)
    naive = tables["naive"][0]
    check = compare(naive, tables["fast"])

    groups = resolve(model)
    cells = [list(groups.members[g]) if op != "final" else [] for op, g in zip(naive.op, naive.group, strict=True)]
    per_stage = stage_flops(model, x_test[:8])
    fast_flops = engine_flops(model, final, cells, per_stage, (x_test[:2], y_test[:2]), len(x_test))
    naive_flops = len(cells) * sum(per_stage) * len(x_test)
    naive_t, fast_t = min(times["naive"]), min(times["fast"])
    stats_t = times["statistics"][times["fast"].index(fast_t)]  # of the fast run that counts
    return {"case": case.key, "model": case.model, "width": case.width, "cells": len(cells), "examples": len(x_test),
            "groups": len(groups.names), "reinit_to": case.epochs, "seeds": case.seeds,
            "bn_stats_moved": len(bn_moved), "trajectory_s": trajectory_s, "final_error": float(naive.error.iloc[0]),
            "naive_s": naive_t, "fast_s": fast_t, "ratio": naive_t / fast_t, "target": case.target,
            "met": naive_t / fast_t >= case.target, "flop_ratio": naive_flops / fast_flops,
            "naive_runs_s": times["naive"], "fast_runs_s": times["fast"],
            "statistics_s": stats_t, "statistics_share": stats_t / fast_t,
            "naive_gflop": naive_flops / 1e9, "fast_gflop": fast_flops / 1e9,
            "naive_gflops": naive_flops / naive_t / 1e9, "fast_gflops": fast_flops / fast_t / 1e9, **check}


STATISTICS = ("table_resamples", "intervals", "p_values", "verdicts")  # analysis.py's calls into the statistics


@contextlib.contextmanager
def statistics_timer() -> Iterator[list[float]]:
    """Seconds spent in the statistics of ``analyze`` (intervals, p-values, verdicts with the two-level
    interval), accumulated into the yielded one-element list while the block runs."""
    spent = [0.0]
    saved = {name: getattr(analysis, name) for name in STATISTICS}

    def timed(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return run

    for name, fn in saved.items():
        setattr(analysis, name, timed(fn))
    try:
        yield spent
    finally:
        for name, fn in saved.items():
            setattr(analysis, name, fn)


def time_engines(model: torch.nn.Module, states: dict, test: tuple[torch.Tensor, torch.Tensor], case: Case,
                 device: torch.device) -> tuple[dict[str, list[float]], dict[str, list]]:
    """Wall seconds and tables of ``case.repeats`` runs of each engine, alternating, so that a burst of
    load from other processes hits both; ``times["statistics"]``: the seconds of each fast run spent in the
    statistics (part of its wall time)."""
    times: dict[str, list[float]] = {"naive": [], "fast": [], "statistics": []}
    tables: dict[str, list] = {"naive": [], "fast": []}
    for _ in range(case.repeats):
        for name in ("naive", "fast"):
            _sync(device)
            start = time.perf_counter()
            with statistics_timer() as spent:
                result = analyze(model, states, test, seeds=case.seeds, engine=name, batch_size=BATCH, device=device,
                                 progress=False)
            _sync(device)
            times[name].append(time.perf_counter() - start)
            tables[name].append(result.table)
            if name == "fast":
                times["statistics"].append(spent[0])
    return times, tables


def compare(naive, fasts: list) -> dict:
    """Every fast table against the naive one: same cells, errors exactly, losses to ``LOSS_TOL``."""
    cols = ["op", "group", "checkpoint", "seed"]
    errors_equal = all(t[cols].equals(naive[cols]) and np.array_equal(t.error.to_numpy(), naive.error.to_numpy())
                       for t in fasts)
    loss_diff = max(float(np.abs(t.loss.to_numpy() - naive.loss.to_numpy()).max()) for t in fasts)
    return {"errors_equal": bool(errors_equal), "max_loss_diff": loss_diff,
            "equal": bool(errors_equal and loss_diff <= LOSS_TOL)}


def describe(row: dict) -> str:
    runs = lambda ts: " ".join(f"{t:.2f}" for t in ts)  # noqa: E731
    return (f"{row['case']}: {row['cells']} cells x {row['examples']} examples (trajectory "
            f"{row['trajectory_s']:.1f} s, final error {row['final_error']:.3f}, {row['bn_stats_moved']} BN "
            f"running_var moved); naive {row['naive_s']:.2f} s [{runs(row['naive_runs_s'])}], fast "
            f"{row['fast_s']:.2f} s [{runs(row['fast_runs_s'])}], {row['ratio']:.2f}x (target {row['target']}x, "
            f"FLOP ratio {row['flop_ratio']:.2f}x); statistics {row['statistics_s']:.2f} s = "
            f"{100 * row['statistics_share']:.1f} % of the fast run; equal: {row['equal']} "
            f"(max |dloss| {row['max_loss_diff']:.1e})")


def summary(rows: list[dict], peak: float) -> str:
    head = (f"{'case':<7} {'cells':>5} {'n':>6} {'naive s':>8} {'fast s':>7} {'ratio':>6} {'target':>6} "
            f"{'FLOP ratio':>10} {'naive GF/s':>10} {'fast GF/s':>9} {'fast %peak':>10} {'equal':>5} {'max dloss':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        equal = "yes" if r["equal"] else "NO"
        lines.append(f"{r['case']:<7} {r['cells']:>5} {r['examples']:>6} {r['naive_s']:>8.2f} {r['fast_s']:>7.2f} "
                     f"{r['ratio']:>5.2f}x {r['target']:>5.1f}x {r['flop_ratio']:>9.2f}x {r['naive_gflops']:>10.1f} "
                     f"{r['fast_gflops']:>9.1f} {100 * r['fast_gflops'] / peak:>9.1f}% {equal:>5} "
                     f"{r['max_loss_diff']:>9.1e}" + ("" if r["met"] else "  (target missed)"))
    lines.append(f"peak: {peak:.1f} GFLOP/s (float32 matmul); FLOP ratio: naive FLOPs / engine FLOPs, the speed-up "
                 "from skipped work alone")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in well under 30 s")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", type=Path, help="also write the summary table here")
    parser.add_argument("--cases", nargs="+", choices=[c.key for c in CASES] + [c.key for c in foreign_cases.FULL],
                        help="run only these cases")
    parser.add_argument("--small", action="store_true", help="foreign-model cases on a few examples only")
    parser.add_argument("--data-root", type=Path, help="folder of the Fashion-MNIST IDX files (default: data.load's)")
    parser.add_argument("--repeats", type=int, help="timed runs of each engine per case (default: the case's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 with --quick, else torch's)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    cases = [c for c in (QUICK if args.quick else CASES) if not args.cases or c.key in args.cases]
    foreign = [c for c in (foreign_cases.SMALL if args.small else foreign_cases.FULL)
               if (c.key in args.cases if args.cases else not args.quick)]
    if args.repeats:
        cases = [replace(c, repeats=args.repeats) for c in cases]

    peak = matmul_peak(device, 512 if args.quick else 4096)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; "
          f"matmul peak {peak:.1f} GFLOP/s", flush=True)
    ds = data.load("fashion-mnist", args.data_root) if cases else None
    rows = []
    for case in cases:
        row = run_case(case, ds, device)
        rows.append(row)
        print(describe(row), flush=True)
    for case in foreign:
        row = foreign_cases.run(case, repeats=args.repeats or 1, device=device)
        rows.append(row)
        print(f"{row['case']}: {row['model']}, {row['cells']} cells x {row['examples']} examples, "
              f"{row['valid_positions']}/{row['blocks']} block positions reused; naive {row['naive_s']:.2f} s, "
              f"fast {row['fast_s']:.2f} s, {row['ratio']:.2f}x (target {row['target']}x, FLOP ratio "
              f"{row['flop_ratio']:.2f}x); equal: {row['equal']} (max |dloss| {row['max_loss_diff']:.1e})", flush=True)
    peak = max(peak, matmul_peak(device, 512 if args.quick else 4096))  # again: load elsewhere comes and goes
    print(summary(rows, peak))
    if args.json:
        machine = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
                   "cpu": platform.processor() or platform.machine(), "peak_gflops": peak, "quick": args.quick,
                   "cases": [asdict(c) for c in cases]}
        if device.type == "cuda":
            machine["gpu"] = torch.cuda.get_device_name(device)
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
