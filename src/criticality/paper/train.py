"""Training that keeps the checkpoint trajectory: θ at epoch 0 (the initialization), 1, 2, 3, 5, 10, …, final.

A run directory after ``train(config, run_dir)``::

    RUN/config.json                          resolved TrainConfig + provenance + data set + effective batch/lr
    RUN/checkpoints/epoch_0000.safetensors   epoch 0 = initialization, always (plus a .json sidecar each)
    RUN/log.jsonl                            one line per epoch: train/test error and loss, seconds, images/s
    RUN/state/resume.pt                      model, optimizer, scheduler and RNG state after the last epoch
    RUN/state/last.safetensors               the same model weights, for other tools

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

import dataclasses
import fnmatch
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from criticality.core import engine
from criticality.core.checkpoints import check_compatible, list_epochs, load_checkpoint, save_checkpoint
from criticality.core.initializers import SCHEMES
from criticality.errors import CriticalityError, unknown_name
from criticality.infra import distributed, lock
from criticality.infra.files import atomic_path, atomic_write, dumps, loads, write_json
from criticality.infra.provenance import provenance
from criticality.paper import data as datasets
from criticality.paper import models
from criticality.paper.precision import AMP_MODES, autocast, autocast_dtype, grad_scaler, use_channels_last
from criticality.paper.schedules import SCHEDULES, parse_epochs, scheduler

RUN_FORMAT = 1  # bump when the run-directory layout changes incompatibly
_SYNONYMS = {"xavier": "glorot", "he": "kaiming", "default": "torch", "fashion_mnist": "fashion-mnist",
             "fmnist": "fashion-mnist", "cifar": "cifar10", "cifar-10": "cifar10"}  # names users try


@dataclass
class TrainConfig:
    """One training run. Every field is a CLI option of ``criticality train`` (``--lr`` etc.)."""

    model: str = field(default="fcn-3x256", metadata={"help": "registry name, see `criticality list --models`"})
    data: str = field(default="fashion-mnist", metadata={"help": "digits | fashion-mnist | mnist | cifar10 | imagenet"})
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
        "help": "mixed precision: auto (bf16 on CUDA if supported, else fp16 + GradScaler; off on CPU) | "
                "off | bf16 | fp16"})
    channels_last: str = field(default="auto", metadata={"help": "auto (conv nets on CUDA) | on | off"})
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
        for name, known in (("schedule", SCHEDULES), ("init", SCHEMES), ("data", datasets.NAMES),
                            ("amp", AMP_MODES), ("channels_last", ("auto", "on", "off"))):
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
        parse_epochs(self.milestones, "--milestones")
        checkpoint_epochs(self.epochs, self.checkpoints)


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


def frozen_modules(model: nn.Module, patterns: str) -> list[nn.Module]:
    """The modules of the layer groups matching ``patterns`` (comma-separated globs over
    ``model.layer_groups()`` names, e.g. ``stage*.block2``); a pattern that matches nothing is an error."""
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    if not globs:
        return []
    groups = model.layer_groups()
    named = dict(model.named_modules())
    out = []
    for pattern in globs:
        hits = [g for g in groups if fnmatch.fnmatchcase(g, pattern)]
        if not hits:
            raise CriticalityError(f"--freeze {pattern!r} matches no layer group (groups: {', '.join(groups)})")
        out += [named[prefix] for g in hits for prefix in groups[g] if named[prefix] not in out]
    return out


def build_model(config: TrainConfig, dataset: datasets.Dataset) -> nn.Module:
    generator = torch.Generator().manual_seed(config.seed)
    return models.build(
        config.model,
        dataset.input_shape,
        dataset.num_classes,
        init=config.init,
        generator=generator,
        width=config.width,
    )


def load_data(config: TrainConfig) -> datasets.Dataset:
    return datasets.load(
        config.data, config.data_root, download=config.download, max_train=config.max_train, max_test=config.max_test,
        image_size=config.image_size,
    )


def train(config: TrainConfig, run_dir: str | Path, *, progress: bool = True, wait: bool = False) -> Path:
    """Train ``config`` into ``run_dir`` (resuming if it holds an unfinished run); returns ``run_dir``.

    Holds ``run_dir``'s lock (:mod:`criticality.lock`; ``wait``: wait for another holder instead of
    refusing). A non-finite training loss stops training with a :class:`CriticalityError` after the last
    finite epoch was saved, unless ``config.allow_divergence``."""
    config.validate()
    run_dir = Path(run_dir)
    ctx = distributed.setup(config.device)
    dataset = load_data(config)
    model = build_model(config, dataset).to(ctx.device)
    state = _Trainer(config, model, dataset, ctx)
    # Locked once the data and model are known good: a refused command leaves no run directory behind.
    with lock.held(run_dir, "criticality train", wait=wait):
        return _train(config, run_dir, state, ctx, progress)


def _train(config: TrainConfig, run_dir: Path, state: _Trainer, ctx: distributed.Context, progress: bool) -> Path:
    start = _begin(config, run_dir, state, ctx)
    keep = checkpoint_epochs(config.epochs, config.checkpoints)
    warned = False
    for epoch in range(start + 1, config.epochs + 1):
        record = state.epoch(epoch, progress=progress and ctx.is_main)
        _check_finite(record, config, run_dir, ctx.is_main)
        warned = warned or _warn_exploding(record, config, state.dataset.num_classes, ctx.is_main)
        if ctx.is_main:
            if epoch in keep:
                save_checkpoint(run_dir, epoch, state.model.state_dict(), **_metrics(record))
            _append_log(run_dir, record)  # before the resume state: a crash in between reruns this epoch
            state.save_resume(run_dir, epoch)
        distributed.barrier()
    return run_dir


def _begin(config: TrainConfig, run_dir: Path, state: _Trainer, ctx: distributed.Context) -> int:
    """Write config and epoch 0 for a new run, or load the resume state of an existing one."""
    resolved = _resolved(config, state, ctx)
    existing = run_dir / "config.json"
    done = None
    # Rank 0's view, taken before it writes: a rank looking later would see the new config.json and resume.
    if distributed.broadcast(existing.is_file()):
        _check_same_run(read_config(existing), resolved, run_dir)
        done = state.load_resume(run_dir)  # None: killed before epoch 0 was saved, so start afresh
    if done is not None:
        if done > config.epochs:
            raise CriticalityError(f"{run_dir} already holds {done} epochs, more than --epochs {config.epochs}")
        if ctx.is_main:
            _record_extension(existing, resolved)
            if done < config.epochs:
                print(f"resuming {run_dir} after epoch {done}")
        return done
    if ctx.is_main:
        write_json(existing, resolved)
        record = {"epoch": 0, **state.evaluate(), "seconds": 0.0}
        save_checkpoint(run_dir, 0, state.model.state_dict(), **_metrics(record))
        _append_log(run_dir, record)
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
        print(f"criticality: warning: epoch {epoch}: the training loss is {loss} (diverged); going on because of "
              "--allow-divergence", file=sys.stderr)


EXPLODED = 100  # × the chance-level loss ln(classes): a finite loss this large means the run is diverging


def _warn_exploding(record: dict[str, Any], config: TrainConfig, classes: int, say: bool) -> bool:
    """One warning line the first time the training loss is finite but far above chance level."""
    loss = record["train_loss"]
    if not math.isfinite(loss) or loss <= EXPLODED * math.log(max(classes, 2)):
        return False
    if say:
        print(f"criticality: warning: epoch {record['epoch']}: the training loss is {loss:.3g}, over {EXPLODED}× the "
              f"chance level ln({classes}); training is diverging (--lr {config.lr} too large?)", file=sys.stderr)
    return True


def _record_extension(path: Path, resolved: dict[str, Any]) -> None:
    """Keep config.json true when a resumed run trains for more epochs or keeps other checkpoints."""
    old = read_config(path)
    new_epochs, new_spec = resolved["config"]["epochs"], resolved["config"]["checkpoints"]
    if (old["config"]["epochs"], old["config"]["checkpoints"]) == (new_epochs, new_spec):
        return
    old.setdefault("extended", []).append({"from_epochs": old["config"]["epochs"], "to_epochs": new_epochs,
                                           "provenance": resolved["provenance"]})
    old["config"].update(epochs=new_epochs, checkpoints=new_spec)
    old["checkpoint_epochs"] = sorted(set(old.get("checkpoint_epochs", [])) | set(resolved["checkpoint_epochs"]))
    write_json(path, old)


def _resolved(config: TrainConfig, state: _Trainer, ctx: distributed.Context) -> dict[str, Any]:
    d = state.dataset
    return {
        "format": RUN_FORMAT,
        "config": dataclasses.asdict(config),
        "data": {
            "name": d.name,
            "source": d.source,
            "normalization": d.normalization,
            "n_train": _size(d.train),
            "n_test": _size(d.test),
            "num_classes": d.num_classes,
            "input_shape": list(d.input_shape),
        },
        "model": {
            "name": getattr(state.module, "name", config.model),
            "build": getattr(state.module, "build_kwargs", {}),
            "parameters": sum(p.numel() for p in state.module.parameters()),
        },
        "checkpoint_epochs": checkpoint_epochs(config.epochs, config.checkpoints),
        "distributed": {
            "world_size": ctx.world,
            "per_process_batch": -(-config.batch_size // ctx.world),  # at most; shares differ by ≤ 1 example
            "effective_batch_size": config.batch_size,
            "effective_lr": config.lr,
            "device": str(ctx.device),
        },
        "provenance": provenance(),
    }


def read_config(path: Path) -> dict:
    """A run's ``config.json`` as a dict; anything else is a one-line error naming the file."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CriticalityError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CriticalityError(f"{path} is not a run configuration (a JSON object)")
    return config


def _check_same_run(old: dict, new: dict, run_dir: Path) -> None:
    if old.get("format") != RUN_FORMAT:
        raise CriticalityError(
            f"{run_dir} was written by an incompatible version of criticality "
            f"(run format {old.get('format')!r}, this version reads {RUN_FORMAT}); use a new --out"
        )
    ignore = {"epochs", "checkpoints", "device", "download", "data_root", "workers", "allow_divergence", "compile",
              "channels_last"}
    # A run written before a field existed ran with that field's default.
    a, b = {**dataclasses.asdict(TrainConfig()), **old.get("config", {})}, new["config"]
    if a.get("epochs") != b["epochs"] and b["schedule"] in ("step", "cosine"):
        raise CriticalityError(
            f"{run_dir} was trained with a {b['schedule']} schedule over {a.get('epochs')} epochs; "
            f"--epochs {b['epochs']} would change that schedule midway. Use a new --out"
        )
    differs = sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))
    if differs:
        raise CriticalityError(
            f"{run_dir} holds a run with other settings ({', '.join(differs)} differ); "
            "use another --out or the same settings to resume"
        )


def _size(split) -> int:
    return len(split[1]) if isinstance(split, tuple) else len(split)


def _metrics(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k.startswith(("train_", "test_"))}


def _append_log(run_dir: Path, record: dict[str, Any]) -> None:
    """Rewrite log.jsonl atomically with ``record`` replacing any earlier line for its epoch."""
    path = run_dir / "log.jsonl"
    lines = [loads(s) for s in path.read_text().splitlines() if s.strip()] if path.exists() else []
    lines = [r for r in lines if r["epoch"] < record["epoch"]] + [record]
    with atomic_write(path) as f:  # strict JSON: a NaN loss is the string "NaN" (see criticality.files)
        f.writelines(dumps(r) + "\n" for r in lines)


class _Trainer:
    """Model, optimizer, schedule and the one generator that every random draw of training uses."""

    def __init__(self, config: TrainConfig, model: nn.Module, dataset: datasets.Dataset, ctx):
        self.config, self.dataset, self.ctx, self.module = config, dataset, ctx, model
        self.model = model  # the bare module; `self.net` may wrap it in DDP and/or torch.compile
        self.frozen = frozen_modules(model, config.freeze)
        for module in self.frozen:
            module.requires_grad_(False)
        self.channels_last = use_channels_last(config.channels_last, model, ctx.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        gpu = [ctx.device] if ctx.device.type == "cuda" else None
        self.net = nn.parallel.DistributedDataParallel(model, device_ids=gpu) if distributed.active() else model
        if config.compile:
            self.net = torch.compile(self.net)
        trained = [p for p in model.parameters() if p.requires_grad]  # frozen groups never reach the optimizer
        self.opt = torch.optim.SGD(trained, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        self.sched = scheduler(self.opt, config)
        self.amp = autocast_dtype(config.amp, ctx.device)
        self.scaler = grad_scaler(self.amp, ctx.device)
        self.generator = torch.Generator().manual_seed(config.seed + 1)  # data order + augmentation
        train = dataset.train
        # In-memory data moves to the GPU once; batches, crops and flips are then indexing on the device.
        on_device = isinstance(train, tuple) and ctx.device.type == "cuda"
        self.train_data = tuple(t.to(ctx.device) for t in train) if on_device else train

    def epoch(self, epoch: int, progress: bool) -> dict[str, Any]:
        self.net.train()
        for module in self.frozen:
            module.eval()  # a frozen group's BatchNorm statistics stay at their initial values too
        start, seen = time.perf_counter(), 0
        # Running sums stay on the device: reading them every step would stall a GPU once per step.
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        wrong_acc = torch.zeros((), dtype=torch.int64, device=self.ctx.device)
        bar = tqdm(
            self._batches(),
            total=self._steps(),
            desc=f"epoch {epoch}/{self.config.epochs}",
            unit="step",
            disable=not progress,
            leave=False,
        )
        for step, (x, y, n) in enumerate(bar):  # this process's share of a global batch of n examples
            x, y = x.to(self.ctx.device, non_blocking=True), y.to(self.ctx.device, non_blocking=True)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.amp, self.ctx.device):
                logits = self.net(x)  # (B / W, classes)
            summed = F.cross_entropy(logits.float(), y, reduction="sum")
            # DDP averages gradients over the W processes, so (Σ over this share) · W / n becomes the mean
            # over the global batch, exactly, also when a short last batch splits unevenly.
            loss = summed * self.ctx.world / n
            self.opt.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
                self.opt.step()
            else:  # fp16: scale the loss so small gradients survive, unscale before the step
                self.scaler.scale(loss).backward()
                self.scaler.step(self.opt)
                self.scaler.update()
            seen += len(y)
            loss_acc += summed.detach().double()
            wrong_acc += (logits.argmax(1) != y).sum()
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{loss_acc.item() / seen:.3f}", err=f"{wrong_acc.item() / seen:.3f}",
                                refresh=False)
        lr = self.opt.param_groups[0]["lr"]  # the rate this epoch ran at (the step below sets the next one's)
        self.sched.step()
        seen, loss_sum, wrong = distributed.sum_over_ranks([seen, loss_acc.item(), wrong_acc.item()],
                                                           self.ctx.device)
        seconds = time.perf_counter() - start
        return {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_error": wrong / seen,
            **(self.evaluate() if self.ctx.is_main else {}),  # only rank 0 logs it
            "lr": lr,
            "seconds": round(seconds, 3),
            "images_per_s": round(seen / seconds, 1),
        }

    def evaluate(self) -> dict[str, float]:
        test = self.dataset.test
        data = test if isinstance(test, tuple) else torch.utils.data.DataLoader(
            test, batch_size=256, num_workers=self.config.workers)
        r = engine.evaluate(self.model, data, batch_size=1000, device=self.ctx.device)
        return {"test_error": r["error"], "test_loss": r["loss"]}

    def _batches(self):
        """``(x, y, n)``: this process's share of each global batch of ``n`` examples, in an order drawn
        from ``self.generator`` (the same on every rank). Rank r takes the r-th of W nearly equal slices
        (``tensor_split``); a last global batch with fewer examples than processes is dropped, so that no
        process steps on an empty batch."""
        train, c, ctx = self.train_data, self.config, self.ctx
        if isinstance(train, tuple):
            augment = (lambda x: datasets.crop_flip(x, self.generator)) if c.augment else None
            for x, y in datasets.minibatches(*train, c.batch_size, shuffle=True, generator=self.generator,
                                             augment=augment):
                if len(y) >= ctx.world:
                    yield x.tensor_split(ctx.world)[ctx.rank], y.tensor_split(ctx.world)[ctx.rank], len(y)
            return
        if hasattr(train, "set_epoch"):  # ImageNet: new random crops each epoch, drawn from our generator
            train.set_epoch(int(torch.randint(0, 2**31, (), generator=self.generator)))
        order = torch.randperm(len(train), generator=self.generator)
        steps = [order[i : i + c.batch_size] for i in range(0, len(order), c.batch_size)]
        steps = [s for s in steps if len(s) >= ctx.world]
        shares = [s.tensor_split(ctx.world)[ctx.rank].tolist() for s in steps]
        loader = torch.utils.data.DataLoader(train, batch_sampler=shares, num_workers=c.workers)
        for (x, y), s in zip(loader, steps, strict=True):
            yield x, y, len(s)

    def _steps(self) -> int:
        return -(-_size(self.dataset.train) // self.config.batch_size)

    def save_resume(self, run_dir: Path, epoch: int) -> None:
        """resume.pt holds everything a resume needs in one atomically replaced file (so a crash can never
        pair one epoch's weights with another's optimizer state); last.safetensors is the same weights
        for other tools."""
        weights = {k: v.detach().cpu().clone().contiguous() for k, v in self.model.state_dict().items()}
        with atomic_path(run_dir / "state" / "last.safetensors") as tmp:
            save_file(weights, str(tmp), metadata={"epoch": str(epoch)})
        extra = {
            "epoch": epoch,
            "model": weights,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "generator": self.generator.get_state(),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }
        with atomic_path(run_dir / "state" / "resume.pt") as tmp:
            torch.save(extra, tmp)

    def load_resume(self, run_dir: Path) -> int | None:
        """Restore the state after the last finished epoch and return that epoch; None if nothing was saved."""
        path = run_dir / "state" / "resume.pt"
        if not path.is_file():
            epochs = list_epochs(run_dir)
            if epochs in ([], [0]):
                return None  # killed before epoch 0's resume state was saved: starting afresh redoes it exactly
            # No resume state (e.g. copied without state/): the last checkpoint, a fresh optimizer and data order.
            weights = load_checkpoint(run_dir, epochs[-1])
            check_compatible(self.model, weights, where=f"checkpoint of epoch {epochs[-1]}")
            self.model.load_state_dict(weights)
            return epochs[-1]
        fix = f"delete {path.parent} to resume from the last checkpoint instead (with a fresh optimizer)"
        try:  # tensors and plain containers only: a pickle that names any other global is refused, never run
            extra = torch.load(path, map_location="cpu", weights_only=True)
            epoch, weights = int(extra["epoch"]), extra.get("model")
            if weights is None:  # written before resume.pt held the weights
                weights = load_file(str(path.parent / "last.safetensors"))
        except Exception as e:  # noqa: BLE001 - an untrusted file can fail in many ways; all mean "unusable"
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CriticalityError(f"{path} is not a resume state this version can load "
                                   f"({type(e).__name__}: {first}); {fix}") from e
        check_compatible(self.model, weights, where=str(path))
        self.model.load_state_dict(weights)
        try:
            self.opt.load_state_dict(extra["optimizer"])
            self.sched.load_state_dict(extra["scheduler"])
            self.generator.set_state(extra["generator"])
            if self.scaler is not None and "scaler" in extra:
                self.scaler.load_state_dict(extra["scaler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CriticalityError(f"{path}: optimizer or data-order state does not fit this run ({e}); "
                                   f"{fix}") from e
        return epoch
