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


# ---- models whose declared chain is NOT their forward: the engine must notice and not cache prefixes ----

class ReluBetweenStages(nn.Module):
    """forward applies F.relu between two declared stages."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(36, 16), nn.Linear(16, 16), nn.Linear(16, 5)

    def stages(self):
        return [("flat", nn.Flatten()), ("fc1", self.fc1), ("fc2", self.fc2), ("fc3", self.fc3)]

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


class SkipAcrossStages(ReluBetweenStages):
    """A skip connection from fc1's output to fc3's input, across declared stages."""

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(h + torch.relu(self.fc2(h)))


class ResidualSequential(nn.Sequential):
    """An nn.Sequential subclass with its own (residual) forward."""

    def __init__(self):
        super().__init__(nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        h = self[1](self[0](x.flatten(1)))
        return self[4](h + self[3](self[2](h)))


class Mislabelled(nn.Module):
    """A chain that is right but names its stages wrongly: positions must come from the tensors."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(36, 16), nn.Linear(16, 16), nn.Linear(16, 5)
        self.act = nn.ReLU()

    def stages(self):
        return [("flat", nn.Flatten()), ("fc2", nn.Sequential(self.fc1, self.act)),
                ("fc1", nn.Sequential(self.fc2, self.act)), ("fc3", self.fc3)]

    def forward(self, x):
        for _, stage in self.stages():
            x = stage(x)
        return x


def shared_twice() -> nn.Module:
    """One Linear registered twice in a Sequential (named_children would drop the second use)."""
    shared = nn.Linear(16, 16)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(),
                         nn.Linear(16, 5))


def inplace_first() -> nn.Module:
    """A stage that starts with an in-place op on its input (LeakyReLU inplace is not idempotent)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16),
                         nn.Sequential(nn.LeakyReLU(0.5, inplace=True), nn.Linear(16, 16)),
                         nn.Sequential(nn.LeakyReLU(0.5, inplace=True), nn.Linear(16, 5)))


class StagesAttribute(nn.Module):
    """`stages` is a submodule, not the chain method (as in some timm models)."""

    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.stages(x))


TRICKY = {"relu_between": ReluBetweenStages, "skip_across": SkipAcrossStages, "residual_seq": ResidualSequential,
          "mislabelled": Mislabelled, "shared_twice": shared_twice, "inplace_first": inplace_first,
          "stages_attribute": StagesAttribute}
