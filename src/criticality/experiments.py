"""The paper's experiments as named data: a registry with path-like keys, listable and runnable.

Keys read ``fig<N>/<model>/<paper data set>``; ``criticality list`` prints them and
``criticality run KEY`` (or any unique path component of a key, like ``fcn-3x256``) runs one.
Each experiment has two scales: ``paper`` (the paper's sizes and epochs, PAPER.md defaults) and ``quick``
(a 2-core CPU finishes it in minutes on Fashion-MNIST or digits; it is what the tests run).
An experiment may hold several training runs (Fig 3: widths × seeds), each analysed on its own.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from criticality.errors import CriticalityError, unknown_name
from criticality.train import TrainConfig

SCALES = ("quick", "paper")
_FCN = dict(lr=0.01, momentum=0.9, batch_size=128, init="glorot")
_CONV = dict(lr=0.1, momentum=0.9, batch_size=128, weight_decay=5e-4, schedule="cosine", augment=True,
             init="kaiming")
_QUICK = dict(epochs=5, max_train=10000, max_test=2000)
_BEYOND = dict(ops=("reinit", "rerandomize", "interpolate", "noise", "skip", "criticality", "proxies"), seeds=2,
               alphas=(0.0, 0.25, 0.5, 0.75, 1.0), sigmas=(0.1, 0.25, 0.5, 1.0))
_QUICK_CONV = dict(epochs=8, max_train=2000, max_test=500, width=16, lr=0.02, batch_size=64, augment=False)


@dataclass(frozen=True)
class Experiment:
    key: str  # fig<N>/<model>/<paper data set>
    figure: str  # the paper's figure number
    description: str
    data: str  # the data set the paper used (mnist, cifar10, imagenet)
    runs: dict[str, dict[str, Any]]  # run name -> TrainConfig fields shared by both scales
    paper: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields at paper scale
    quick: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields at quick scale
    joint: tuple[tuple[str, ...], ...] = ()  # joint groups: member group names or glob patterns
    seeds: int = 3  # re-randomization draws per group
    sweep: str | None = None  # "width": runs differ in FCN width and seed (Fig 3 bars)
    ops: tuple[str, ...] = ("reinit", "rerandomize")  # analysis ops (criticality.interventions; + criticality, proxies)
    alphas: tuple[float, ...] | None = None  # interpolate / criticality α grid (None: their defaults)
    sigmas: tuple[float, ...] | None = None  # noise / criticality σ grid (None: their defaults)

    def configs(self, scale: str = "quick", data: str | None = None, **overrides: Any) -> dict[str, TrainConfig]:
        """One TrainConfig per run at ``scale``; ``data`` replaces the paper's data set."""
        if scale not in SCALES:
            raise CriticalityError(f"unknown scale {scale!r}; use {' or '.join(SCALES)}")
        out = {}
        for name, fields in self.runs.items():
            merged = {**(self.paper if scale == "paper" else self.quick), **fields, **overrides}
            merged["data"] = data or (self.data if scale == "paper" else merged.get("data", "fashion-mnist"))
            out[name] = TrainConfig(**merged)
        return out


def _fcn(key: str, fig: str, model: str, description: str, **kw: Any) -> Experiment:
    return Experiment(key, fig, description, "mnist", {"run": {"model": model}},
                      paper={**_FCN, "epochs": 100}, quick={**_FCN, **_QUICK}, **kw)


def _conv(key: str, fig: str, model: str, data: str, description: str, **kw: Any) -> Experiment:
    paper = {**_CONV, "epochs": 100 if data == "cifar10" else 90}
    if data == "imagenet":
        # Crops come from the ImageNet loader; weight decay 1e-4 is the usual ImageNet ResNet setting.
        paper.update(batch_size=256, augment=False, schedule="step", weight_decay=1e-4)
    return Experiment(key, fig, description, data, {"run": {"model": model}}, paper=paper,
                      quick={**_CONV, **_QUICK_CONV}, **kw)


def _vgg(depth: int) -> Experiment:
    exp = _conv(f"fig4/vgg{depth}/cifar10", "4", f"vgg{depth}", "cifar10",
                f"VGG-{depth} on CIFAR-10 (layers as columns)")
    # Quick scale trains the BatchNorm variant: a plain VGG at toy size and a few epochs does not leave chance.
    return dataclasses.replace(exp, quick={**exp.quick, "quick_runs": {"run": {"model": f"vgg{depth}-bn"}}})


def _width_sweep() -> Experiment:
    runs = {f"w{w}-s{s}": {"model": f"fcn-3x{w}", "seed": s} for w in (32, 128, 512, 2048) for s in range(3)}
    quick_runs = {f"w{w}-s{s}": {"model": f"fcn-3x{w}", "seed": s} for w in (16, 64, 256) for s in range(2)}
    return Experiment("fig3/fcn-width-sweep/mnist", "3", "FCN 3×W for several widths W, several training seeds: "
                      "Δ test error when each layer but the first is reset to epoch 0", "mnist", runs,
                      paper={**_FCN, "epochs": 100}, quick={**_FCN, **_QUICK, "quick_runs": quick_runs},
                      seeds=1, sweep="width")


def _registry() -> dict[str, Experiment]:
    exps = [
        _fcn("fig1/fcn-3x256/mnist", "1", "fcn-3x256", "FCN 3×256: robustness heatmap and weight distances"),
        _fcn("fig2/fcn-5x256/mnist", "2", "fcn-5x256", "FCN 5×256: heatmaps of test error and test loss"),
        _width_sweep(),
        *[_vgg(d) for d in (11, 13, 16, 19)],
        *[_conv(f"fig5/resnet{d}/cifar10", "5", f"resnet{d}", "cifar10", f"ResNet-{d} V2 by residual block")
          for d in (18, 34, 50)],
        *[_conv(f"fig6/resnet{d}/imagenet", "6", f"resnet{d}", "imagenet", f"ResNet-{d} V2 on ImageNet by block")
          for d in (18, 50)],
        _fcn("fig8/fcn-5x256-joint/mnist", "8", "fcn-5x256", "FCN 5×256, layers in two joint groups",
             joint=(("fc1", "fc2", "fc3"), ("fc4", "fc5", "fc6"))),
        _conv("fig9/resnet18-joint/cifar10", "9", "resnet18", "cifar10",
              "ResNet-18: all residual blocks but the first of each stage, jointly",
              joint=(("stage*.block[2-9]", "stage*.block[1-9][0-9]"),)),
        _conv("fig10/resnet18-joint-stages/cifar10", "10", "resnet18", "cifar10",
              "ResNet-18: each stage's blocks jointly, and all non-first blocks of the later stages",
              joint=(("stage1.*",), ("stage2.*",), ("stage3.*",), ("stage4.*",),
                     ("stage[34].block[2-9]",))),
        # Beyond the paper (issue 13): every intervention on the paper's FCN and ResNet.
        _fcn("beyond/fcn-3x256-interventions/mnist", "beyond", "fcn-3x256",
             "FCN 3×256: interpolation, noise, skip, module criticality and block proxies", **_BEYOND),
        _conv("beyond/resnet18-interventions/cifar10", "beyond", "resnet18", "cifar10",
              "ResNet-18 V2: interpolation, noise, skipping each residual block, module criticality, proxies",
              **_BEYOND),
    ]
    return {e.key: e for e in exps}


REGISTRY = _registry()
DEFAULT = "fig1/fcn-3x256/mnist"


def names(pattern: str | None = None) -> list[str]:
    """Registered keys, optionally filtered by a glob or substring."""
    keys = list(REGISTRY)
    if pattern:
        keys = [k for k in keys if fnmatch.fnmatchcase(k, pattern) or pattern in k]
    return keys


def get(name: str) -> Experiment:
    """An experiment by key, or by a path component or any other part of a key that names exactly one key
    (``fcn-3x256``, ``3x256``; a path component wins over a longer key that merely contains it)."""
    if name in REGISTRY:
        return REGISTRY[name]
    hits = [k for k in REGISTRY if name in k.split("/") or fnmatch.fnmatchcase(k, name)]
    if not hits:  # any unique part of a key: "3x256", "fig6/resnet50"
        hits = [k for k in REGISTRY if name in k]
    if len(hits) == 1:
        return REGISTRY[hits[0]]
    if len(hits) > 1:
        raise CriticalityError(f"experiment {name!r} is ambiguous: {', '.join(hits)}")
    raise unknown_name("experiment", name, [*REGISTRY, *{p for k in REGISTRY for p in k.split("/")[1:2]}])


def run_configs(exp: Experiment, scale: str, data: str | None, **overrides: Any) -> dict[str, TrainConfig]:
    """The experiment's runs at ``scale`` (the quick width sweep uses smaller widths)."""
    quick_runs = exp.quick.get("quick_runs")
    if scale == "quick" and quick_runs:
        exp = dataclasses.replace(exp, runs=quick_runs,
                                  quick={k: v for k, v in exp.quick.items() if k != "quick_runs"})
    return exp.configs(scale, data, **overrides)
