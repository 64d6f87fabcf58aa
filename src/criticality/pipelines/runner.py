"""The steps the CLI composes: analyse a run directory, and run a registered experiment end to end.

``analyze_run(RUN)`` rebuilds the model from ``RUN/config.json``, loads the checkpoints and the data,
runs :func:`criticality.analyze` (resumable through ``RUN/analysis/cells.jsonl``) and writes::

    RUN/analysis/cells.csv        one row per cell (also cells.parquet when pyarrow is installed)
    RUN/analysis/distances.csv    normalized ℓ2 / ℓ∞ / cosine distance to epoch 0, per group and checkpoint
    RUN/analysis/summary.json     verdicts, threshold, chance error, group coverage, data set, provenance

``run_experiment(exp)`` trains each of the experiment's runs (reusing finished ones), analyses them,
draws the figures (``RUN/figures``) and writes ``RUN/report.html``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fnmatch
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from criticality.core import engine
from criticality.core.analysis import DEFAULT_THRESHOLD, finish
from criticality.core.checkpoints import load_checkpoints
from criticality.core.ops import PAPER_OPS
from criticality.core.plan import PlanSpec, make_plan
from criticality.core.run import run_cells
from criticality.core.stores import cell_key
from criticality.errors import CriticalityError
from criticality.infra import distributed, lock
from criticality.infra.files import atomic_path, write_json
from criticality.infra.provenance import provenance
from criticality.output import figures as plots
from criticality.output import report
from criticality.output.tables import write_tables
from criticality.paper import data as datasets
from criticality.paper import models
from criticality.paper.experiments import Experiment, run_configs
from criticality.paper.train import train
from criticality.paper.training.config import TrainConfig
from criticality.paper.training.rundir import RUN_FORMAT, read_config
from criticality.pipelines import extras as extras_ops

# What `criticality analyze` and `run` measure per cell: test error (the verdicts) and loss, and the
# label-free agreement with the final model's top-1 and KL(final ‖ variant) (issue 12.5). The last two
# need the final model's logits on each batch: one more forward per chunk of batches, not per cell.
METRICS = ("error", "loss", "agreement", "kl")


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """``RUN/config.json``, checked for a format this version reads."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CriticalityError(f"{run_dir} is not a run directory (no config.json); train one with `criticality train`")
    config = read_config(path)
    if config.get("format") != RUN_FORMAT:
        raise CriticalityError(f"{run_dir} was written by an incompatible version of criticality "
                               f"(run format {config.get('format')!r}, this version reads {RUN_FORMAT})")
    return config


def analyze_run(run_dir: str | Path, *, groups: str | dict = "model", seeds: int = 3,
                joint: Sequence[Sequence[str]] | None = None, split: str = "test", engine: str = "fast",
                batch_size: int = 1000, device: str = "auto", max_examples: int | None = None,
                threshold: float = DEFAULT_THRESHOLD, buffers: str = "reset", verdict: str = "interval",
                verdict_metric: str | None = None, progress: bool = True, wait: bool = False,
                ops: Sequence[str] | str = PAPER_OPS,
                alphas: Sequence[float] | None = None, sigmas: Sequence[float] | None = None,
                eps: float | None = None) -> Path:
    """Analyse a training run directory and write ``RUN/analysis`` (``RUN/analysis_train`` for the training
    split); returns that directory. Holds the run directory's lock (:mod:`criticality.lock`) meanwhile.
    ``ops`` adds interventions (:mod:`criticality.interventions`) and ``criticality`` / ``proxies``, whose
    tables land beside cells.csv (rank 0 only under torchrun)."""
    run_dir = Path(run_dir)
    config = read_run(run_dir)
    try:
        cfg, build = TrainConfig(**config["config"]), config["model"]["build"]
    except (KeyError, TypeError) as e:
        raise CriticalityError(f"{run_dir / 'config.json'} is incomplete or has unknown fields ({e})") from e
    if split not in ("test", "train"):
        raise CriticalityError(f"--split must be test or train, got {split!r}")
    grid_ops, extras = extras_ops.split_ops(ops)
    ctx = distributed.setup(device)
    _large_blocks_to_the_system()
    with lock.held(run_dir, "criticality analyze", wait=wait):
        return _analyze(run_dir, config, cfg, build, ctx, groups=groups, seeds=seeds, joint=joint, split=split,
                        engine=engine, batch_size=batch_size, max_examples=max_examples, threshold=threshold,
                        buffers=buffers, verdict=verdict, verdict_metric=verdict_metric, progress=progress,
                        ops=dict(grid_ops=grid_ops, extras=extras, alphas=alphas, sigmas=sigmas, eps=eps))


def _analyze(run_dir: Path, config: dict, cfg: TrainConfig, build: dict, ctx: distributed.Context, *, groups,
             seeds, joint, split, engine, batch_size, max_examples, threshold, buffers, verdict="interval",
             verdict_metric=None, progress, ops) -> Path:
    grid_ops, extras, alphas, sigmas, eps = (ops[k] for k in ("grid_ops", "extras", "alphas", "sigmas", "eps"))
    dataset = datasets.load(cfg.data, cfg.data_root, max_train=cfg.max_train, max_test=cfg.max_test,
                            image_size=cfg.image_size)
    if split == "test" and max_examples and isinstance(dataset.test, tuple):  # only these are evaluated:
        dataset = dataclasses.replace(dataset, test=tuple(t[:max_examples].clone() for t in dataset.test))
    split_data = dataset.test if split == "test" else dataset.train
    data = split_data if isinstance(split_data, tuple) else torch.utils.data.DataLoader(
        split_data, batch_size=batch_size, num_workers=cfg.workers)
    model = models.build(**build, init=cfg.init)
    checkpoints = load_checkpoints(run_dir)
    calibration = _calibration(dataset, cfg) if buffers == "recalibrate" else None
    spec = PlanSpec(groups, seeds, joint, reinit_to=_reinit_to(config, checkpoints), metrics=METRICS, engine=engine,
                    batch_size=batch_size, max_examples=max_examples, buffers=buffers, calibration=calibration,
                    ops=grid_ops, alphas=alphas or None, sigmas=sigmas or None)
    plan = make_plan(model, checkpoints, spec, probe=data)
    _hold(model, checkpoints[plan.final_epoch])  # then the engine saves and swaps only each cell's group
    out = run_dir / ("analysis" if split == "test" else f"analysis_{split}")  # the report reads analysis/
    if ctx.is_main:
        n = min(x for x in (max_examples, _size(split_data)) if x)
        cost = _estimate(model, data, n, batch_size, ctx.device, len(plan.cells) // ctx.world + 1)
        print(f"analysis: {len(plan.cells)} cells, each one pass over {n} {split} examples{cost}", file=sys.stderr)
    store = out / ("cells.jsonl" if ctx.world == 1 else f"cells.rank{ctx.rank}-of-{ctx.world}.jsonl")
    rows = run_cells(plan, data, device=ctx.device, store=str(store),
                     shard=(ctx.rank, ctx.world) if ctx.world > 1 else None, progress=progress and ctx.is_main)
    rows = _merge_shards(distributed.gather(rows), plan)
    if not ctx.is_main:
        distributed.barrier()  # return once rank 0 has written the tables
        return out
    result = finish(plan, rows, threshold=threshold, verdict=verdict, verdict_metric=verdict_metric,
                    provenance={**provenance(), "world_size": ctx.world, "device": str(ctx.device)})
    n = int(result.table.n.iloc[0])
    paper_data = config.get("experiment", {}).get("paper_data")
    result.summary.update(
        chance_error=1 - 1 / dataset.num_classes,
        data={"name": dataset.name, "split": split, "n_test": n, "max_examples": max_examples,
              "stands_in_for": paper_data if paper_data and paper_data != dataset.name else None,
              "source": dataset.source})
    if extras:
        result.summary.update(extras_ops.run_extras(
            plan, data, out, result.table, extras, draws=seeds, alphas=alphas, sigmas=sigmas, eps=eps,
            device=ctx.device, store=str(store), progress=progress))
    write_tables(out, result.table, result.distances, result.summary)
    distributed.barrier()
    return out


LARGE_BLOCK = 4 << 20  # bytes: allocations this large get their own mapping (glibc's M_MMAP_THRESHOLD)


def _large_blocks_to_the_system() -> None:
    """Let freed tensors of LARGE_BLOCK bytes and more go back to the system at once (glibc only).

    By default glibc raises its mmap threshold to the size of the first large block freed, after which
    freed layers, draws and activations stay in the heap, fragmented: the peak RSS of an fcn-5x2048 analysis
    was 6 model sizes instead of 3.5 (benchmarks/bench_memory.py). A fixed threshold keeps the peak at
    what is alive. Left alone when MALLOC_MMAP_THRESHOLD_ is set or where there is no glibc ``mallopt``.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, LARGE_BLOCK)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        pass


def _hold(model: torch.nn.Module, checkpoint) -> None:
    """Copy ``checkpoint`` (checked against ``model`` by make_plan) into the model's own tensors, one key at
    a time: ``load_state_dict`` would first gather a lazy checkpoint whole (a second model in memory)."""
    own = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(checkpoint[key])


def _reinit_to(config: dict, checkpoints) -> list[int] | None:
    """The experiment's paper columns that the run kept (before the final epoch); None = every checkpoint."""
    columns = (config.get("experiment") or {}).get("columns")
    if not columns:
        return None
    final = max(checkpoints)
    return [e for e in columns if e in checkpoints and e < final] or None


CALIBRATION_EXAMPLES = 2048  # training images that re-estimate BatchNorm statistics (buffers="recalibrate")


def _calibration(dataset: datasets.Dataset, cfg: TrainConfig):
    """The first CALIBRATION_EXAMPLES training examples, unaugmented, for buffers="recalibrate"."""
    train = dataset.train
    if isinstance(train, tuple):
        return train[0][:CALIBRATION_EXAMPLES], train[1][:CALIBRATION_EXAMPLES]
    subset = torch.utils.data.Subset(train, range(min(CALIBRATION_EXAMPLES, len(train))))
    return torch.utils.data.DataLoader(subset, batch_size=256, num_workers=cfg.workers)


def _merge_shards(shards: list[list[dict]], plan) -> list[dict]:
    """The shards' rows back in grid order, matched by cell key (rank r evaluated cells r, r + W, …; a rank
    beyond the number of cells evaluated none). Every cell must come back exactly once."""
    world = len(shards)
    if [len(s) for s in shards] != [len(plan.cells[r::world]) for r in range(world)]:
        raise CriticalityError(f"shards of {[len(s) for s in shards]} rows do not split {len(plan.cells)} cells "
                               f"over {world} processes")
    by_key = {cell_key(row): row for shard in shards for row in shard}
    merged = []
    for r, cell in enumerate(plan.cells):
        key = cell_key(cell.as_dict())
        if key not in by_key or cell_key(shards[r % world][r // world]) != key:
            raise CriticalityError(f"shard row {cell_key(shards[r % world][r // world])} is out of place "
                                   f"(expected {key})")
        merged.append(by_key[key])
    return merged


def _estimate(model: torch.nn.Module, data, n: int, batch_size: int, device: torch.device, cells: int) -> str:
    """", at most about T" for ``cells`` full forward passes over ``n`` examples, timed on one batch of
    tensor data ("" for a loader: fetching a batch to time it would cost a worker start-up). An upper
    bound: the fast engine re-runs only each cell's suffix, and stored cells are not run again."""
    if not (isinstance(data, tuple) and isinstance(data[0], torch.Tensor)):
        return ""
    import time

    x = data[0][:min(batch_size, n)]
    modes = [(m, m.training) for m in model.modules()]
    try:
        probe = engine.placed(model, device).eval()  # the model itself unless it must move: no copy
        with torch.inference_mode():
            probe(x.to(device))  # warm-up (allocations, kernels)
            start = time.perf_counter()
            probe(x.to(device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = (time.perf_counter() - start) * cells * -(-n // len(x))
    except Exception:  # noqa: BLE001 - an estimate only: the analysis itself reports any real problem
        return ""
    finally:
        for m, training in modes:
            m.training = training
    minutes = seconds / 60
    return f", at most about {max(seconds, 1):.0f} s" if minutes < 2 else f", at most about {minutes:.0f} min" \
        if minutes < 120 else f", at most about {minutes / 60:.1f} h"


def _size(split) -> int:
    return len(split[1]) if isinstance(split, tuple) else len(split)


def run_experiment(exp: Experiment, *, scale: str = "quick", data: str | None = None, out: str | Path | None = None,
                   progress: bool = True, wait: bool = False, **overrides: Any) -> list[Path]:
    """Train (or resume), analyse, draw and report every run of ``exp``; returns the report paths."""
    if exp.sweep == "lm":  # the journal's decoder LM: an HF folder and a text corpus (lm_experiment)
        from criticality.pipelines import lm_experiment

        return lm_experiment.run(exp, scale=scale, out=out, progress=progress, data=data, **overrides)
    out = Path(out) if out else Path("runs") / exp.key / scale
    configs = run_configs(exp, scale, data, **overrides)
    reports, widths, is_main = [], [], True
    for name, cfg in configs.items():
        run_dir = out if len(configs) == 1 else out / name
        train(cfg, run_dir, progress=progress, wait=wait)
        is_main = distributed.setup(cfg.device).is_main
        if is_main:
            _note_experiment(run_dir, exp, scale)
        distributed.barrier()
        analyze_run(run_dir, seeds=exp.seeds, joint=[list(j) for j in exp.joint] or None, device=cfg.device,
                    progress=progress, wait=wait, ops=exp.ops, alphas=exp.alphas, sigmas=exp.sigmas)
        if not is_main:
            continue
        plots.draw_run(run_dir)
        reports.append(report.write_report(run_dir))
        if exp.sweep == "width":
            widths.append(_width_rows(run_dir, cfg))
    if exp.sweep == "frozen" and is_main:
        _frozen_table(out, configs)
    if widths:
        table = pd.concat(widths, ignore_index=True)
        with atomic_path(out / "widths.csv") as tmp:
            table.to_csv(tmp, index=False)
        title = f"Fig 3, {scale} scale: layers 2..L reset to epoch 0"
        plots.save(plots.width_bars(table, title=title), out / "figures" / "width_bars")
    return reports


def _frozen_table(out: Path, configs: dict[str, TrainConfig]) -> pd.DataFrame:
    """Table 1 (journal): test error of the full model, mean ± std of single-block re-inits to epoch 0 over
    the frozen blocks, the full model with those blocks jointly re-initialized, removed (identity), and
    the model trained with them frozen. Written to ``out/table1.csv``."""
    full, frozen = out / "full", out / "frozen"
    cells = plots.read_cells(full / "analysis" / "cells.csv")
    patterns = [p.strip() for p in configs["frozen"].freeze.split(",") if p.strip()]
    at0 = cells[(cells.op == "reinit") & (cells.checkpoint == 0)]
    single = at0[~at0.joint & at0.group.map(lambda g: any(fnmatch.fnmatchcase(g, p) for p in patterns))]
    joint = at0[at0.joint]
    final = lambda run: float(plots.read_cells(run / "analysis" / "cells.csv").query("op == 'final'").error.iloc[0])  # noqa: E731
    table = pd.DataFrame([
        {"model": "full", "error": final(full)},
        {"model": "single block re-initialized (mean ± std)", "error": single.error.mean(), "std": single.error.std()},
        {"model": "re-initialized jointly", "error": float(joint.error.iloc[0]) if len(joint) else float("nan")},
        {"model": "removed jointly (identity)", "error": _removed_error(full, patterns)},
        {"model": "frozen jointly (trained so)", "error": final(frozen)},
    ])
    with atomic_path(out / "table1.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table


def _removed_error(run_dir: Path, patterns: list[str]) -> float:
    """Test error of the final model with the stages matching ``patterns`` replaced by the identity (the
    skip intervention, done here by hand until the interventions module's ``skip`` op is used)."""
    config = read_run(run_dir)
    cfg, build = TrainConfig(**config["config"]), config["model"]["build"]
    model = models.build(**build, init=cfg.init)
    checkpoints = load_checkpoints(run_dir)
    model.load_state_dict(dict(checkpoints[max(checkpoints)]))
    for prefix, _ in model.stages():
        if any(fnmatch.fnmatchcase(prefix, p) for p in patterns):
            parent, _, child = prefix.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, torch.nn.Identity())
    dataset = datasets.load(cfg.data, cfg.data_root, max_train=cfg.max_train, max_test=cfg.max_test,
                            image_size=cfg.image_size)
    return engine.evaluate(model, dataset.test)["error"]


def _note_experiment(run_dir: Path, exp: Experiment, scale: str) -> None:
    config = read_run(run_dir)
    config["experiment"] = {"key": exp.key, "figure": exp.figure, "scale": scale, "paper_data": exp.data,
                            "columns": list(exp.columns) if scale == "paper" else None,
                            "assumptions": list(exp.assumptions), "stands_in": exp.stands_in or None}
    write_json(run_dir / "config.json", config)


def _width_rows(run_dir: Path, cfg: TrainConfig) -> pd.DataFrame:
    """Fig 3 rows, one per layer 2..L: Δ test error when that layer alone is reset to epoch 0."""
    cells = plots.read_cells(run_dir / "analysis" / "cells.csv")
    at0 = cells[(cells.op == "reinit") & (cells.checkpoint == 0) & ~cells.joint]
    at0 = at0[at0.group != at0.group.iloc[0]]
    depth, width = (int(v) for v in cfg.model.removeprefix("fcn-").split("x"))
    return pd.DataFrame({"depth": depth, "width": width, "group": at0.group.to_numpy(), "seed": cfg.seed,
                         "delta_error": at0.delta_error.to_numpy(), "error": at0.error.to_numpy()})
