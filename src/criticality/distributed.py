"""Running under ``torchrun``: process group, device per process, sharding and gathering.

Without torchrun (no ``WORLD_SIZE`` in the environment, or 1) everything here is a no-op for a single
process, so the same code path serves a laptop, one GPU, a node of 8 GPUs and a SLURM cluster.
Backends: NCCL when the processes use GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from criticality.errors import CriticalityError


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` (a GPU when present), ``cpu``, ``cuda`` (this process's GPU) or ``cuda:N``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CriticalityError(f"--device {spec}: no CUDA device is available here")
        if spec == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        index = spec.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise CriticalityError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif spec != "cpu":
        raise CriticalityError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    return torch.device(spec)


def setup(device: str = "auto") -> Context:
    """Join the process group when launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Context(rank, world, local_rank, dev)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (a one-element list when not distributed)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
