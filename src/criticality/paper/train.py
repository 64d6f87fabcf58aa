"""Training that keeps the checkpoint trajectory: θ at epoch 0 (the initialization), 1, 2, 3, 5, 10, …, final.

A run directory after ``train(config, run_dir)``::

    RUN/config.json                          resolved TrainConfig + provenance + data set + effective batch/lr
    RUN/checkpoints/epoch_0000.safetensors   epoch 0 = initialization, always (plus a .json sidecar each)
    RUN/log.jsonl                            one line per epoch: train/test error and loss, seconds, images/s
    RUN/state/resume.pt                      model, optimizer, scheduler and RNG state after the last epoch
    RUN/state/last.safetensors               the same model weights, for other tools

The pieces live in :mod:`criticality.paper.training`: ``config`` (TrainConfig), ``schedules``, ``precision``,
``trainer`` (the epoch loop and the resume state), ``rundir`` (config.json and log.jsonl).

Rerunning on an existing run directory resumes after the last finished epoch; on CPU the continued run
ends with the same weights as an uninterrupted one, because every random draw (shuffling, augmentation)
comes from one explicit generator whose state is saved with the optimizer's. Each epoch writes its
checkpoint, then its log line, then resume.pt (one atomic rename), so a kill at any moment (SIGKILL
included) at worst repeats the unfinished epoch. resume.pt is read with ``torch.load(weights_only=True)``.
Under ``torchrun`` the model is wrapped in DistributedDataParallel; ``batch_size`` stays the global
batch (each of W processes takes batch_size / W examples of it, a short last batch split as evenly), so the
learning rate needs no rescaling; only rank 0 evaluates and writes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from criticality.core.checkpoints import save_checkpoint
from criticality.errors import CriticalityError
from criticality.infra import distributed, lock
from criticality.infra.files import write_json
from criticality.paper import models
from criticality.paper.data import Dataset
from criticality.paper.data import load as load_data_set
from criticality.paper.training.config import TrainConfig
from criticality.paper.training.rundir import (
    append_log,
    check_same_run,
    logged_metrics,
    read_config,
    record_extension,
    resolved_config,
)
from criticality.paper.training.trainer import Trainer

log = logging.getLogger(__name__)


def build_model(config: TrainConfig, dataset: Dataset) -> nn.Module:
    generator = torch.Generator().manual_seed(config.seed)
    return models.build(
        config.model,
        dataset.input_shape,
        dataset.num_classes,
        init=config.init,
        generator=generator,
        width=config.width,
    )


def load_data(config: TrainConfig) -> Dataset:
    return load_data_set(
        config.data, config.data_root, download=config.download, max_train=config.max_train, max_test=config.max_test,
        image_size=config.image_size,
    )


def train(config: TrainConfig, run_dir: str | Path, *, progress: bool = True, wait: bool = False) -> Path:
    """Train ``config`` into ``run_dir`` (resuming if it holds an unfinished run); returns ``run_dir``.

    Holds ``run_dir``'s lock (:mod:`criticality.infra.lock`; ``wait``: wait for another holder instead of
    refusing). A non-finite training loss stops training with a :class:`CriticalityError` after the last
    finite epoch was saved, unless ``config.allow_divergence``."""
    config.validate()
    run_dir = Path(run_dir)
    ctx = distributed.setup(config.device)
    dataset = load_data(config)
    model = build_model(config, dataset).to(ctx.device)
    state = Trainer(config, model, dataset, ctx)
    # Locked once the data and model are known good: a refused command leaves no run directory behind.
    with lock.held(run_dir, "criticality train", wait=wait):
        return _train(config, run_dir, state, ctx, progress)


def _train(config: TrainConfig, run_dir: Path, state: Trainer, ctx: distributed.Context, progress: bool) -> Path:
    start = _begin(config, run_dir, state, ctx)
    keep = config.kept_epochs
    warned = False
    for epoch in range(start + 1, config.epochs + 1):
        record = state.epoch(epoch, progress=progress and ctx.is_main)
        _check_finite(record, config, run_dir, ctx.is_main)
        warned = warned or _warn_exploding(record, config, state.dataset.num_classes, ctx.is_main)
        if ctx.is_main:
            if epoch in keep:
                save_checkpoint(run_dir, epoch, state.model.state_dict(), **logged_metrics(record))
            append_log(run_dir, record)  # before the resume state: a crash in between reruns this epoch
            state.save_resume(run_dir, epoch)
        distributed.barrier()
    return run_dir


def _begin(config: TrainConfig, run_dir: Path, state: Trainer, ctx: distributed.Context) -> int:
    """Write config and epoch 0 for a new run, or load the resume state of an existing one."""
    resolved = resolved_config(config, state.dataset, state.module, ctx)
    existing = run_dir / "config.json"
    done = None
    # Rank 0's view, taken before it writes: a rank looking later would see the new config.json and resume.
    if distributed.broadcast(existing.is_file()):
        check_same_run(read_config(existing), resolved, run_dir)
        done = state.load_resume(run_dir)  # None: killed before epoch 0 was saved, so start afresh
    if done is not None:
        if done > config.epochs:
            raise CriticalityError(f"{run_dir} already holds {done} epochs, more than --epochs {config.epochs}")
        if ctx.is_main:
            record_extension(existing, resolved)
            if done < config.epochs:
                log.info(f"resuming {run_dir} after epoch {done}")
        return done
    if ctx.is_main:
        write_json(existing, resolved)
        record = {"epoch": 0, **state.evaluate(), "seconds": 0.0}
        save_checkpoint(run_dir, 0, state.model.state_dict(), **logged_metrics(record))
        append_log(run_dir, record)
        state.save_resume(run_dir, 0)
    distributed.barrier()
    return 0


def _check_finite(record: dict[str, Any], config: TrainConfig, run_dir: Path, say: bool) -> None:
    """Divergence is loud: stop (default) or go on with a warning (``allow_divergence``)."""
    loss, epoch = record["train_loss"], record["epoch"]
    if math.isfinite(loss):
        return
    if not config.allow_divergence:
        raise CriticalityError(f"training diverged in epoch {epoch}: the training loss is {loss} (--lr {config.lr} "
                               f"too large?); epochs up to {epoch - 1} are kept in {run_dir}. Lower --lr and use a "
                               "new --out, or pass --allow-divergence to keep training anyway")
    if say:
        log.warning(f"epoch {epoch}: the training loss is {loss} (diverged); going on because of --allow-divergence")


EXPLODED = 100  # × the chance-level loss ln(classes): a finite loss this large means the run is diverging


def _warn_exploding(record: dict[str, Any], config: TrainConfig, classes: int, say: bool) -> bool:
    """One warning line the first time the training loss is finite but far above chance level."""
    loss = record["train_loss"]
    if not math.isfinite(loss) or loss <= EXPLODED * math.log(max(classes, 2)):
        return False
    if say:
        log.warning(f"epoch {record['epoch']}: the training loss is {loss:.3g}, over {EXPLODED}× the chance level "
                    f"ln({classes}); training is diverging (--lr {config.lr} too large?)")
    return True

