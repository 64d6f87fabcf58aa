"""``TrainConfig``: one training run as data. Every field is a ``criticality train`` option and is saved, as
given, in ``RUN/config.json``; the comma-separated ones (``milestones``, ``freeze``, ``checkpoints``) are
parsed by one property each, so no other module splits them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from criticality.core.initializers import SCHEMES
from criticality.errors import CriticalityError, unknown_name
from criticality.paper.data import NAMES as DATA_NAMES
from criticality.paper.training.precision import AMP_MODES
from criticality.paper.training.schedules import SCHEDULES, Schedule

CHANNELS_LAST = ("auto", "on", "off")
_SYNONYMS = {"xavier": "glorot", "he": "kaiming", "default": "torch", "fashion_mnist": "fashion-mnist",
             "fmnist": "fashion-mnist", "cifar": "cifar10", "cifar-10": "cifar10"}  # names users try


@dataclass
class TrainConfig:
    """One training run. Every field is a CLI option of ``criticality train`` (``--lr`` etc.)."""

    model: str = field(default="fcn-3x256", metadata={"help": "registry name, see `criticality list --models`"})
    data: str = field(default="fashion-mnist", metadata={"help": " | ".join(DATA_NAMES)})
    data_root: str | None = field(default=None, metadata={"help": "directory holding the data set's files"})
    download: bool = field(default=False, metadata={"help": "fetch mnist/fashion-mnist/cifar10 if missing"})
    epochs: int = field(default=20, metadata={"help": "training epochs (full passes over the train set)"})
    batch_size: int = field(default=128, metadata={"help": "examples per SGD step, across all processes"})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=0.0, metadata={"help": "L2 weight decay (the paper's main results: 0)"})
    schedule: str = field(default="constant", metadata={
        "help": "lr schedule: constant | piecewise (x gamma at --milestones; the paper's) | step (x0.1 at "
                "50%%, 75%%) | cosine"})
    milestones: str = field(default="30,60,90", metadata={"help": "piecewise: epochs after which lr *= gamma"})
    gamma: float = field(default=0.2, metadata={"help": "piecewise: lr factor at each milestone"})
    warmup: int = field(default=0, metadata={
        "help": "epochs of linear lr warm-up from lr/10 (0 = none; plain VGG needs it at lr 0.1)"})
    freeze: str = field(default="", metadata={
        "help": "comma-separated glob patterns of layer groups kept at their initialization (not trained)"})
    amp: str = field(default="auto", metadata={
        "help": f"mixed precision: {' | '.join(AMP_MODES)} (auto: bf16 on CUDA if supported, else fp16 + "
                "GradScaler; off on CPU)"})
    channels_last: str = field(default="auto", metadata={
        "help": f"{' | '.join(CHANNELS_LAST)} (auto: conv nets on CUDA)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the training step's model"})
    augment: bool = field(default=False, metadata={"help": "random crop (pad 4) + flip, for 32x32 images"})
    init: str = field(default="torch", metadata={
        "help": "torch (modules' reset_parameters) | glorot (the paper's TF) | kaiming (He, convs)"})
    width: int | None = field(default=None, metadata={"help": "base channels for vgg/resnet (default 64)"})
    seed: int = field(default=0, metadata={"help": "seed of the init and of every data-order/augmentation draw"})
    checkpoints: str = field(default="auto", metadata={
        "help": "auto (0,1,2,3,5,10,20,40,… + final) | every (each epoch, the paper's) | e.g. 0,1,5,20"})
    max_train: int | None = field(default=None, metadata={"help": "train on a fixed subset of this many examples"})
    max_test: int | None = field(default=None, metadata={"help": "evaluate on a fixed subset of this many examples"})
    image_size: int = field(default=224, metadata={"help": "imagenet: crop side in pixels"})
    workers: int = field(default=4, metadata={"help": "DataLoader worker processes (imagenet only)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    allow_divergence: bool = field(default=False, metadata={
        "help": "keep training when the training loss becomes NaN/inf (default: stop with an error)"})

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise CriticalityError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}"
                )
        for name in ("lr", "momentum", "weight_decay"):
            if not 0 <= getattr(self, name) < math.inf:  # also refuses nan
                raise CriticalityError(f"--{name.replace('_', '-')} must be a finite number >= 0, "
                                       f"got {getattr(self, name)}")
        if self.seed < 0:
            raise CriticalityError(f"--seed must be non-negative, got {self.seed}")
        for name, known in (("schedule", SCHEDULES), ("init", SCHEMES), ("data", DATA_NAMES),
                            ("amp", AMP_MODES), ("channels_last", CHANNELS_LAST)):
            value = getattr(self, name)
            if value in _SYNONYMS:
                raise CriticalityError(f"unknown --{name} {value!r}; did you mean {_SYNONYMS[value]!r}? "
                                       f"(known: {', '.join(known)})")
            if value not in known:
                raise unknown_name(f"--{name.replace('_', '-')}", value, known)
        if not 0 < self.gamma < math.inf:
            raise CriticalityError(f"--gamma must be a finite number > 0, got {self.gamma}")
        if self.warmup < 0:
            raise CriticalityError(f"--warmup must be >= 0 epochs, got {self.warmup}")
        self.milestone_epochs  # noqa: B018 - parsing is the check
        self.kept_epochs  # noqa: B018

    # The comma-separated options, parsed (each one parser, here): what the trainer and the pipelines use.
    @property
    def milestone_epochs(self) -> tuple[int, ...]:
        """``milestones`` as sorted epochs: ``"30,60,90"`` → ``(30, 60, 90)``."""
        return tuple(parse_epochs(self.milestones, "--milestones"))

    @property
    def freeze_patterns(self) -> tuple[str, ...]:
        """``freeze`` as glob patterns over layer-group names: ``"stage1*, fc"`` → ``("stage1*", "fc")``."""
        return tuple(p.strip() for p in self.freeze.split(",") if p.strip())

    @property
    def kept_epochs(self) -> list[int]:
        """The epochs whose weights are saved (see :func:`checkpoint_epochs`)."""
        return checkpoint_epochs(self.epochs, self.checkpoints)

    @property
    def lr_schedule(self) -> Schedule:
        """The learning-rate schedule as numbers (the scheduler never sees the config)."""
        return Schedule(lr=self.lr, kind=self.schedule, epochs=self.epochs, milestones=self.milestone_epochs,
                        gamma=self.gamma, warmup=self.warmup)



def parse_epochs(spec: str, option: str) -> list[int]:
    """``"30,60,90"`` → ``[30, 60, 90]``; anything else is a one-line error naming ``option``."""
    try:
        epochs = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError as err:
        raise CriticalityError(f"{option} must be comma-separated epochs, got {spec!r}") from err
    if any(e < 0 for e in epochs):
        raise CriticalityError(f"{option} epochs must be >= 0, got {spec!r}")
    return epochs


def checkpoint_epochs(epochs: int, spec: str = "auto") -> list[int]:
    """The epochs whose weights are kept: always 0 and the final one. ``spec`` is ``auto``, ``every`` or a
    list of epochs; ``auto,8,40`` adds epochs to auto's (the paper-scale registry keeps its columns so)."""
    words = [s.strip() for s in spec.split(",") if s.strip()]
    keep: set[int] = set()
    if "every" in words:
        keep |= set(range(epochs + 1))
    if "auto" in words:
        keep, e = keep | {0, 1, 2, 3}, 5
        while e < epochs:
            keep.add(e)
            e *= 2
    rest = ",".join(w for w in words if w not in ("auto", "every"))
    try:
        keep |= set(parse_epochs(rest, "--checkpoints"))
    except CriticalityError as err:
        raise CriticalityError(f"--checkpoints must be auto, every or comma-separated epochs, got {spec!r}") from err
    return sorted({e for e in keep if e <= epochs} | {0, epochs})
