"""``Trainer``: model, optimizer, schedule and the one generator every random draw of training uses; one
epoch at a time, and the resume state that makes an interrupted run continue exactly.

    RUN/state/resume.pt          model, optimizer, scheduler and RNG state after the last epoch
    RUN/state/last.safetensors   the same model weights, for other tools

resume.pt is one atomically replaced file read with ``torch.load(weights_only=True)``. Under ``torchrun``
the model is wrapped in DistributedDataParallel; ``batch_size`` stays the global batch (each of W processes
takes batch_size / W examples of it, a short last batch split as evenly).
"""

from __future__ import annotations

import fnmatch
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from criticality.core import engine
from criticality.core.checkpoints import check_compatible, list_epochs, load_checkpoint
from criticality.errors import CriticalityError
from criticality.infra import distributed
from criticality.infra.files import atomic_path
from criticality.paper.data import Dataset, crop_flip, minibatches, split_size
from criticality.paper.training.config import TrainConfig
from criticality.paper.training.precision import autocast, autocast_dtype, grad_scaler, use_channels_last
from criticality.paper.training.schedules import scheduler


def frozen_modules(model: nn.Module, patterns: tuple[str, ...]) -> list[nn.Module]:
    """The modules of the layer groups matching ``patterns`` (globs over ``model.layer_groups()`` names,
    e.g. ``stage*.block2``); a pattern that matches nothing is an error."""
    if not patterns:
        return []
    groups = model.layer_groups()
    named = dict(model.named_modules())
    out = []
    for pattern in patterns:
        hits = [g for g in groups if fnmatch.fnmatchcase(g, pattern)]
        if not hits:
            raise CriticalityError(f"--freeze {pattern!r} matches no layer group (groups: {', '.join(groups)})")
        out += [named[prefix] for g in hits for prefix in groups[g] if named[prefix] not in out]
    return out


class Trainer:
    """Model, optimizer, schedule and the one generator that every random draw of training uses."""

    def __init__(self, config: TrainConfig, model: nn.Module, dataset: Dataset, ctx: distributed.Context):
        self.config, self.dataset, self.ctx, self.module = config, dataset, ctx, model
        self.model = model  # the bare module; `self.net` may wrap it in DDP and/or torch.compile
        self.frozen = frozen_modules(model, config.freeze_patterns)
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
        self.sched = scheduler(self.opt, config.lr_schedule)
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
            augment = (lambda x: crop_flip(x, self.generator)) if c.augment else None
            for x, y in minibatches(*train, c.batch_size, shuffle=True, generator=self.generator,
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
        return -(-split_size(self.dataset.train) // self.config.batch_size)

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
