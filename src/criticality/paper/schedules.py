"""Learning-rate schedules, one factor per finished epoch, so the rate of any epoch is known in advance.

    lr_at(TrainConfig(lr=0.1, schedule="piecewise", milestones="30,60,90", gamma=0.2), 31)  # 0.02

``piecewise`` is the paper's (stage-wise constant, ×0.2 after epochs 30, 60 and 90); ``step`` (×0.1 at
50 % and 75 % of the epochs), ``cosine`` and ``constant`` are ours. ``warmup`` epochs ramp the rate
linearly from lr/10 (plain VGG at lr 0.1 needs it). The training loop steps one LambdaLR per epoch
whose factor is :func:`factor`, so :func:`lr_at` is what the optimizer uses.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from criticality.errors import CriticalityError

if TYPE_CHECKING:
    from criticality.paper.train import TrainConfig

SCHEDULES = ("constant", "piecewise", "step", "cosine")


def parse_epochs(spec: str, option: str) -> list[int]:
    """``"30,60,90"`` → ``[30, 60, 90]``; anything else is a one-line error naming ``option``."""
    try:
        epochs = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError as err:
        raise CriticalityError(f"{option} must be comma-separated epochs, got {spec!r}") from err
    if any(e < 0 for e in epochs):
        raise CriticalityError(f"{option} epochs must be >= 0, got {spec!r}")
    return epochs


def lr_at(config: TrainConfig, epoch: int) -> float:
    """The learning rate used during ``epoch`` (1-based): piecewise 30,60,90 runs epochs 1-30 at lr,
    31-60 at gamma·lr, 61-90 at gamma²·lr, 91-100 at gamma³·lr."""
    return config.lr * factor(config, epoch - 1)


def factor(config: TrainConfig, done: int) -> float:
    """lr multiplier after ``done`` finished epochs (the scheduler's ``last_epoch``)."""
    if config.schedule == "piecewise":
        f = config.gamma ** sum(m <= done for m in parse_epochs(config.milestones, "--milestones"))
    elif config.schedule == "step":
        milestones = [max(1, config.epochs // 2), max(1, config.epochs * 3 // 4)]
        f = 0.1 ** sum(m <= done for m in milestones)
    elif config.schedule == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * min(done, config.epochs) / config.epochs))
    else:
        f = 1.0
    if done < config.warmup:
        f *= 0.1 + 0.9 * done / config.warmup
    return f


def scheduler(opt: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """One LambdaLR stepped once per epoch, its factor :func:`factor`."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda done: factor(config, done))
