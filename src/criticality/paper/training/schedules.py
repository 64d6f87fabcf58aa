"""Learning-rate schedules, one factor per finished epoch, so the rate of any epoch is known in advance.

    Schedule(lr=0.1, kind="piecewise", epochs=100, milestones=(30, 60, 90), gamma=0.2).lr_at(31)  # 0.02

``piecewise`` is the paper's (stage-wise constant, ×0.2 after epochs 30, 60 and 90); ``step`` (×0.1 at
50 % and 75 % of the epochs), ``cosine`` and ``constant`` are ours. ``warmup`` epochs ramp the rate
linearly from lr/10 (plain VGG at lr 0.1 needs it). The training loop steps one LambdaLR per epoch
whose factor is :meth:`Schedule.factor`, so :meth:`Schedule.lr_at` is what the optimizer uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("constant", "piecewise", "step", "cosine")


@dataclass(frozen=True)
class Schedule:
    lr: float  # the base rate
    kind: str = "constant"  # one of SCHEDULES
    epochs: int = 1  # the run's length (step and cosine depend on it)
    milestones: tuple[int, ...] = ()  # piecewise: epochs after which lr *= gamma
    gamma: float = 0.2  # piecewise: the factor at each milestone
    warmup: int = 0  # epochs of linear warm-up from lr/10

    def lr_at(self, epoch: int) -> float:
        """The learning rate used during ``epoch`` (1-based): piecewise 30,60,90 runs epochs 1-30 at lr,
        31-60 at gamma·lr, 61-90 at gamma²·lr, 91-100 at gamma³·lr."""
        return self.lr * self.factor(epoch - 1)

    def factor(self, done: int) -> float:
        """lr multiplier after ``done`` finished epochs (the scheduler's ``last_epoch``)."""
        if self.kind == "piecewise":
            f = self.gamma ** sum(m <= done for m in self.milestones)
        elif self.kind == "step":
            f = 0.1 ** sum(m <= done for m in (max(1, self.epochs // 2), max(1, self.epochs * 3 // 4)))
        elif self.kind == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * min(done, self.epochs) / self.epochs))
        else:
            f = 1.0
        if done < self.warmup:
            f *= 0.1 + 0.9 * done / self.warmup
        return f


def scheduler(opt: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LRScheduler:
    """One LambdaLR stepped once per epoch, its factor :meth:`Schedule.factor` (the optimizer holds the lr)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, schedule.factor)
