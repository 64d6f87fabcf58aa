"""Small architectures for the analysis tests: each exercises one thing the core must get right.

Imported by the tests; nothing here runs on its own.
"""

from __future__ import annotations

import torch
from torch import nn


def fcn() -> nn.Module:
    """A plain chain: nn.Sequential, so the engine caches prefixes without being told."""
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))


def bias_free() -> nn.Module:
    """A layer without bias and a LayerNorm after it."""
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 20, bias=False), nn.LayerNorm(20), nn.ReLU(),
                         nn.Linear(20, 5))


def convbn() -> nn.Module:
    """Conv + BatchNorm: running statistics must travel with their layer."""
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.conv(torch.relu(self.bn(x)))


class Residual(nn.Module):
    """A residual net that declares its chain of stages and its layer groups, like the zoo models."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.block1, self.block2 = Block(6), Block(6)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))

    def stages(self):
        return [("stem", self.stem), ("block1", self.block1), ("block2", self.block2), ("head", self.head)]

    def layer_groups(self):
        return {"stem": ["stem"], "block1": ["block1"], "block2": ["block2"], "head": ["head"]}

    def forward(self, x):
        for _, stage in self.stages():
            x = stage(x)
        return x


class Tied(nn.Module):
    """Two layers share one weight tensor; no declared chain (the engine's full-forward fallback)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(36, 12)
        self.mid1 = nn.Linear(12, 12)
        self.mid2 = nn.Linear(12, 12)
        self.mid2.weight = self.mid1.weight  # tied: one tensor, two state-dict keys
        self.cls = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.relu(self.inp(x.flatten(1)))
        h = torch.relu(self.mid2(torch.relu(self.mid1(h))))
        return self.cls(h)


ARCHS = {"fcn": fcn, "bias_free": bias_free, "convbn": convbn, "residual": Residual, "tied": Tied}
