"""``criticality analyze RUN``: analyse a training run directory.

``analyze_run(RUN)`` rebuilds the model from ``RUN/config.json``, loads the checkpoints and the data,
runs :func:`criticality.analyze` (resumable through ``RUN/analysis/cells.jsonl``) and writes::

    RUN/analysis/cells.csv        one row per cell (also cells.parquet when pyarrow is installed)
    RUN/analysis/distances.csv    normalized ℓ2 / ℓ∞ / cosine distance to epoch 0, per group and checkpoint
    RUN/analysis/summary.json     verdicts, threshold, chance error, group coverage, data set, provenance
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from criticality.core import engine
from criticality.core.analysis import DEFAULT_THRESHOLD, Result
from criticality.core.checkpoints import load_checkpoints
from criticality.core.metrics import CLASSIFIER_METRICS
from criticality.core.ops import PAPER_OPS
from criticality.core.plan import PlanSpec, make_plan
from criticality.errors import CriticalityError
from criticality.infra import distributed, lock
from criticality.paper import data as datasets
from criticality.paper import models
from criticality.paper.training.config import TrainConfig
from criticality.paper.training.rundir import RUN_FORMAT, read_config
from criticality.pipelines import extras as extras_ops
from criticality.pipelines.grid import analyse_plan

# The metric names `criticality analyze` and `run` measure per cell (names in core.metrics.METRICS): test
# error (the verdicts) and loss, and the label-free agreement with the final model's top-1 and
# KL(final ‖ variant). The last two need the final model's logits on each batch: one more forward per
# chunk of batches, not per cell.
DEFAULT_METRIC_NAMES = CLASSIFIER_METRICS

log = logging.getLogger(__name__)


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
                eps: float | None = None, skip_runs: int | None = None, adaptive: bool = False) -> Path:
    """Analyse a training run directory and write ``RUN/analysis`` (``RUN/analysis_train`` for the training
    split); returns that directory. Holds the run directory's lock (:mod:`criticality.infra.lock`) meanwhile.
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
    with lock.held(run_dir, "criticality analyze", wait=wait):
        return _analyze(run_dir, config, cfg, build, ctx, groups=groups, seeds=seeds, joint=joint, split=split,
                        engine=engine, batch_size=batch_size, max_examples=max_examples, threshold=threshold,
                        buffers=buffers, verdict=verdict, verdict_metric=verdict_metric, progress=progress,
                        ops=dict(grid_ops=grid_ops, extras=extras, alphas=alphas, sigmas=sigmas, eps=eps,
                                 skip_runs=skip_runs, adaptive=adaptive))


def _analyze(run_dir: Path, config: dict, cfg: TrainConfig, build: dict, ctx: distributed.Context, *, groups,
             seeds, joint, split, engine, batch_size, max_examples, threshold, buffers, verdict="interval",
             verdict_metric=None, progress, ops) -> Path:
    grid_ops, extras, alphas, sigmas, eps = (ops[k] for k in ("grid_ops", "extras", "alphas", "sigmas", "eps"))
    skip_runs, adaptive = ops.get("skip_runs"), bool(ops.get("adaptive"))
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
    spec = PlanSpec(groups, seeds, joint, reinit_to=_reinit_to(config, checkpoints), metrics=DEFAULT_METRIC_NAMES,
                    engine=engine, batch_size=batch_size, max_examples=max_examples, buffers=buffers,
                    calibration=calibration, ops=grid_ops, alphas=alphas or None, sigmas=sigmas or None,
                    skip_runs=skip_runs, adaptive=adaptive)
    plan = make_plan(model, checkpoints, spec, probe=data)
    _hold(model, checkpoints[plan.final_epoch])  # then the engine saves and swaps only each cell's group
    out = run_dir / ("analysis" if split == "test" else f"analysis_{split}")  # the report reads analysis/
    if ctx.is_main:
        n = min(x for x in (max_examples, _size(split_data)) if x)
        cost = _estimate(model, data, n, batch_size, ctx.device, len(plan.cells) // ctx.world + 1)
        log.info("analysis: %d cells, each one pass over %d %s examples%s", len(plan.cells), n, split, cost)
    paper_data = config.get("experiment", {}).get("paper_data")

    def describe(result: Result) -> dict[str, Any]:
        return dict(chance_error=1 - 1 / dataset.num_classes,
                    data={"name": dataset.name, "split": split, "n_test": int(result.table.n.iloc[0]),
                          "max_examples": max_examples,
                          "stands_in_for": paper_data if paper_data and paper_data != dataset.name else None,
                          "source": dataset.source})

    analyse_plan(plan, data, out, ctx, threshold=threshold, verdict=verdict, verdict_metric=verdict_metric,
                 describe=describe, extras=extras,
                 extras_options=dict(draws=seeds, alphas=alphas, sigmas=sigmas, eps=eps), progress=progress)
    return out


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


def _estimate(model: torch.nn.Module, data, n: int, batch_size: int, device: torch.device, cells: int) -> str:
    """", at most about T" for ``cells`` full forward passes over ``n`` examples, timed on one batch of
    tensor data ("" for a loader: fetching a batch to time it would cost a worker start-up). An upper
    bound: the fast engine re-runs only each cell's suffix, and stored cells are not run again."""
    if not (isinstance(data, tuple) and isinstance(data[0], torch.Tensor)):
        return ""
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


