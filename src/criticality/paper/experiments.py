"""The paper's experiments as named data: a registry with path-like keys, listable and runnable.

Keys read ``fig<N>/<model>/<paper data set>``; ``criticality list`` prints them and
``criticality run KEY`` (or any unique path component of a key, like ``fcn-3x256``) runs one.
Each experiment has two scales: ``paper`` (the paper's sizes, epochs and recipe, docs/paper.md) and ``quick``
(a 2-core CPU finishes it in minutes on Fashion-MNIST or digits; it is what the tests run).
An experiment may hold several training runs (Fig 3: widths × seeds), each analysed on its own.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
from dataclasses import dataclass, field
from typing import Any

from criticality.errors import CriticalityError, unknown_name
from criticality.paper import lm_config
from criticality.paper.training.config import TrainConfig

SCALES = ("quick", "paper")


class Sweep(enum.StrEnum):
    """What an experiment's several runs are, beyond one training run analysed on its own."""

    WIDTH = "width"  # FCN widths × seeds (Fig 3 bars)
    FROZEN = "frozen"  # full vs frozen training (Table 1)
    LM = "lm"  # the journal's Transformer LM (lm_config.LMConfig fields in runs/paper/quick, not TrainConfig's)

# The paper's recipe (JMLR 23(67) Appendix A): SGD + momentum 0.9, batch 128, 100 epochs, lr x0.2 after
# epochs 30, 60, 90, no weight decay, every epoch saved.
_RECIPE = dict(momentum=0.9, batch_size=128, epochs=100, schedule="piecewise", milestones="30,60,90", gamma=0.2,
               weight_decay=0.0)
_FCN = dict(lr=0.01, momentum=0.9, batch_size=128, init="glorot")
_PAPER_FCN = {**_RECIPE, **_FCN, "checkpoints": "every"}
# Conv checkpoints: auto's doubling epochs plus the paper's columns (every epoch of a width-64 VGG/ResNet is
# 4-5 GB; `--checkpoints every` keeps them all).
_PAPER_CONV = {**_RECIPE, "lr": 0.1, "init": "kaiming", "augment": True, "checkpoints": "auto,1,10,90,100"}
_CONV = dict(lr=0.1, momentum=0.9, batch_size=128, weight_decay=5e-4, schedule="cosine", augment=True,
             init="kaiming")
_QUICK = dict(epochs=5, max_train=10000, max_test=2000)
_BEYOND = dict(ops=("reinit", "rerandomize", "interpolate", "noise", "skip", "criticality", "proxies"), seeds=2,
               alphas=(0.0, 0.25, 0.5, 0.75, 1.0), sigmas=(0.1, 0.25, 0.5, 1.0))
_QUICK_CONV = dict(epochs=8, max_train=2000, max_test=500, width=16, lr=0.02, batch_size=64, augment=False)
FCN_COLUMNS = (0, 1, 2, 3, 8, 40, 90, 100)  # the paper's heatmap columns (epochs)
CONV_COLUMNS = (0, 1, 10, 100)
THRESHOLD_NOTE = "robust = Δ test error ≤ 0.02 at checkpoint 0 (the paper sets no threshold)"
FCN_ASSUMPTIONS = ("initial lr 0.01 (not stated in the paper)",
                   "initializer glorot, TensorFlow's dense default (the paper: 'default schemes of open-source "
                   "libraries')", THRESHOLD_NOTE)
CONV_ASSUMPTIONS = ("initial lr 0.1 (not stated in the paper)", "initializer kaiming (He), not stated in the paper",
                    "quick scale trains with weight decay 5e-4 and a cosine schedule (ours)", THRESHOLD_NOTE)
RESNET_NOTE = ("ResNet V2 blocks with BatchNorm, as the arXiv figures draw them (the journal's ResNets have none)")
VGG_NOTE = ("paper scale: plain VGG (no BN) at lr 0.02 with 2 warm-up epochs, because at the literal lr 0.1 from "
            "He init it stayed at chance on the stand-in data (docs/results.md); --lr 0.1 --warmup 0 is the literal "
            "recipe; quick scale trains the BN variant")


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
    sweep: Sweep | None = None  # None: each run analysed on its own
    quick_runs: dict[str, dict[str, Any]] | None = None  # replaces ``runs`` at quick scale (smaller sweeps, BN VGG)
    columns: tuple[int, ...] = ()  # re-init checkpoints analysed and drawn at paper scale (the paper's columns)
    stands_in: str = ""  # what stands in for the paper's model/data at the scales this machine runs
    assumptions: tuple[str, ...] = ()  # values the paper does not state: ours, named in the report
    ops: tuple[str, ...] = ("reinit", "rerandomize")  # analysis ops (criticality.interventions; + criticality, proxies)
    alphas: tuple[float, ...] | None = None  # interpolate / criticality α grid (None: their defaults)
    sigmas: tuple[float, ...] | None = None  # noise / criticality σ grid (None: their defaults)

    def configs(self, scale: str = "quick", data: str | None = None, **overrides: Any) -> dict[str, TrainConfig]:
        """One TrainConfig per run at ``scale``; ``data`` replaces the paper's data set."""
        if scale not in SCALES:
            raise CriticalityError(f"unknown scale {scale!r}; use {' or '.join(SCALES)}")
        if self.sweep == Sweep.LM:  # a text corpus (``corpus``, the CLI's --data-root), not an image data set
            if data is not None:
                raise CriticalityError(f"{self.key} trains on a text corpus, not on {data!r}: leave out --data "
                                       "(--data-root FILE_OR_FOLDER picks the corpus)")
            base = self.paper if scale == "paper" else self.quick
            return {name: lm_config.config({**base, **fields}, overrides) for name, fields in self.runs.items()}
        out = {}
        for name, fields in self.runs.items():
            merged = {**(self.paper if scale == "paper" else self.quick), **fields, **overrides}
            merged["data"] = data or (self.data if scale == "paper" else merged.get("data", "fashion-mnist"))
            out[name] = TrainConfig(**merged)
        return out


def _fcn(key: str, fig: str, model: str, description: str, **kw: Any) -> Experiment:
    return Experiment(key, fig, description, "mnist", {"run": {"model": model}}, paper=_PAPER_FCN,
                      quick={**_FCN, **_QUICK}, columns=FCN_COLUMNS, assumptions=FCN_ASSUMPTIONS, **kw)


def _conv(key: str, fig: str, model: str, data: str, description: str, **kw: Any) -> Experiment:
    paper = dict(_PAPER_CONV)
    if data == "imagenet":  # crops come from the ImageNet loader
        paper.update(augment=False)
    notes = (*CONV_ASSUMPTIONS, RESNET_NOTE) if model.startswith("resnet") else CONV_ASSUMPTIONS
    return Experiment(key, fig, description, data, {"run": {"model": model}}, paper=paper,
                      quick={**_CONV, **_QUICK_CONV}, columns=CONV_COLUMNS, assumptions=notes, **kw)


_VGG_STAGE_CONVS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


def _vgg(depth: int) -> Experiment:
    convs = _VGG_STAGE_CONVS[depth]
    upper = tuple(f"conv{i}" for i in range(sum(convs[:3]) + 1, sum(convs) + 1))  # stages 4-5
    exp = _conv(f"fig4/vgg{depth}/cifar10", "4", f"vgg{depth}", "cifar10",
                f"VGG-{depth} on CIFAR-10 (layers as columns); stages 4-5 and fc1-fc2 also jointly",
                joint=(upper, ("fc1", "fc2"), (*upper, "fc1", "fc2")))
    # Quick scale trains the BatchNorm variant: a plain VGG at toy size and a few epochs does not leave chance.
    return dataclasses.replace(exp, paper={**exp.paper, "lr": 0.02, "warmup": 2},
                               quick_runs={"run": {"model": f"vgg{depth}-bn"}},
                               assumptions=(VGG_NOTE, *exp.assumptions[1:]))


PAPER_WIDTHS = (16, 32, 64, 128, 256, 512)


def _width_sweep() -> Experiment:
    runs = {f"fcn-{d}x{w}-s{s}": {"model": f"fcn-{d}x{w}", "seed": s}
            for d in (3, 5) for w in PAPER_WIDTHS for s in range(5)}
    quick_runs = {f"w{w}-s{s}": {"model": f"fcn-3x{w}", "seed": s} for w in (16, 64, 256) for s in range(2)}
    return Experiment("fig3/fcn-width-sweep/mnist", "3", "FCN 3×H and 5×H, H = 16 … 512, 5 seeds: Δ test error "
                      "when each layer but the first is reset to epoch 0, averaged over those layers", "mnist", runs,
                      paper={**_PAPER_FCN, "checkpoints": "0"}, quick={**_FCN, **_QUICK}, quick_runs=quick_runs,
                      seeds=1, sweep=Sweep.WIDTH, columns=(0,), assumptions=FCN_ASSUMPTIONS)


# The journal version's additions (JMLR 2022), at sizes this CPU trains: keys journal-*/<model>/<paper data>.
_QUICK_PATCH = dict(epochs=10, max_train=5000, max_test=1000, width=32, lr=0.05, batch_size=64, augment=False,
                    init="torch")
PATCH_NOTE = ("an in-house {name} (4 blocks, width 32 at quick scale) trained from scratch with SGD on the "
              "stand-in data stands in for the paper's ImageNet-21k {paper}")


def _patch(model: str, name: str, paper: str) -> Experiment:
    return Experiment(f"journal-{model.split('-')[0]}/{model}/imagenet", "journal", f"{name}: re-randomization and "
                      "re-initialization per sub-layer (embedding, norms, attention/token mixing, MLP, head)",
                      "imagenet", {"run": {"model": model}}, paper={**_PAPER_CONV, "init": "torch"},
                      quick=_QUICK_PATCH, columns=CONV_COLUMNS, stands_in=PATCH_NOTE.format(name=name, paper=paper),
                      assumptions=("SGD (momentum 0.9) at lr 0.05, the modules' own initialization (ours)",
                                   THRESHOLD_NOTE))


def _frozen_vs_removed() -> Experiment:
    """Table 1: the full net; the same net trained with its non-first blocks frozen at initialization; the
    full net evaluated with those blocks removed (identity), next to the mean single-block reset."""
    exp = _conv("journal-table1/resnet18-frozen/cifar10", "table1", "resnet18", "cifar10",
                "Frozen vs removed: every non-first block of each stage frozen at init while training, or removed "
                "(identity) at evaluation, next to the average single-block re-initialization",
                joint=(("stage*.block2",),))
    runs = {"full": {"model": "resnet18"}, "frozen": {"model": "resnet18", "freeze": "stage*.block2"}}
    return dataclasses.replace(exp, runs=runs, sweep=Sweep.FROZEN,
                               stands_in="ResNet-18 V2 on the stand-in data for the paper's ResNet-50 on CIFAR-10")


LM_NOTE = ("a byte-level Llama (4 blocks, width 64, 0.2 M parameters; RMSNorm and a gated MLP as T5 v1.1) trained "
           "with AdamW on the license texts Debian ships (/usr/share/common-licenses, 237 kB to train on, the last "
           "10 % of every file held out) stands in for the paper's T5-Base decoder (12 blocks) trained with Adam on "
           "LM1B; an epoch is 30 steps of 32 × 64 bytes at quick scale (about 1/4 of the training text), one pass "
           "over it at paper scale")


def _journal_lm() -> Experiment:
    """The journal's decoder LM per sub-layer, token accuracy, columns 0, 1, 2, 5, 10, 15, 20 (lm_experiment)."""
    return Experiment("journal-lm/tiny-llama/lm1b", "journal", "Decoder LM per sub-layer (embedding, attention, MLP "
                      "dense layers, norms, head): per-token accuracy after re-randomization and re-initialization",
                      "lm1b", {"run": {}}, paper={"steps_per_epoch": None, "layers": 12, "hidden": 128, "lr": 2e-3,
                                                   "eval_sequences": None},
                      quick={"steps_per_epoch": 30}, seeds=2, sweep=Sweep.LM, columns=(0, 1, 2, 5, 10, 15, 20),
                      stands_in=LM_NOTE,
                      assumptions=("AdamW (β 0.9, 0.95), peak lr 3e-3 (2e-3 at paper scale), 5 % warm-up then cosine "
                                   "to 10 %, gradient clipping at 1 (ours; the paper states Adam only)",
                                   "re-randomization draws from transformers' own Llama initializer (normal, std "
                                   "0.02; norms at 1)",
                                   "scored on 128 held-out sequences of 64 bytes at quick scale (all at paper scale)",
                                   THRESHOLD_NOTE.replace("test error", "token error")))


_FIG9_JOINT = (("stage*.block[2-9]", "stage*.block[1-9][0-9]"),)  # every block but each stage's first
_FIG10_JOINT = (("stage1.*",), ("stage2.*",), ("stage3.*",), ("stage4.*",), ("stage[34].block[2-9]",))


def _registry() -> dict[str, Experiment]:
    exps = [
        _fcn("fig1/fcn-3x256/mnist", "1", "fcn-3x256", "FCN 3×256: robustness heatmap and weight distances"),
        _fcn("fig2/fcn-5x256/mnist", "2", "fcn-5x256", "FCN 5×256: heatmaps of test error and test loss"),
        _width_sweep(),
        *[_vgg(d) for d in (11, 13, 16, 19)],
        *[_conv(f"fig5/resnet{d}/cifar10", "5", f"resnet{d}", "cifar10", f"ResNet-{d} V2 by residual block, "
                "with the joint groups of Figs 9-10", joint=(*_FIG9_JOINT, *_FIG10_JOINT)) for d in (18, 34, 50)],
        *[_conv(f"fig6/resnet{d}/imagenet", "6", f"resnet{d}", "imagenet", f"ResNet-{d} V2 on ImageNet by block")
          for d in (18, 50)],
        _fcn("fig8/fcn-5x256-joint/mnist", "8", "fcn-5x256", "FCN 5×256, layers in two joint groups",
             joint=(("fc1", "fc2", "fc3"), ("fc4", "fc5", "fc6"))),
        _conv("fig9/resnet18-joint/cifar10", "9", "resnet18", "cifar10",
              "ResNet-18: all residual blocks but the first of each stage, jointly",
              joint=_FIG9_JOINT),
        _conv("fig10/resnet18-joint-stages/cifar10", "10", "resnet18", "cifar10",
              "ResNet-18: each stage's blocks jointly, and all non-first blocks of the later stages",
              joint=_FIG10_JOINT),
        _patch("vit-tiny", "ViT", "ViT-B/16 and L/16"),
        _patch("mixer-tiny", "MLP-Mixer", "Mixer"),
        _frozen_vs_removed(),
        _journal_lm(),
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
    if scale == "quick" and exp.quick_runs:
        exp = dataclasses.replace(exp, runs=exp.quick_runs)
    return exp.configs(scale, data, **overrides)
