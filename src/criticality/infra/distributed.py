"""Running under ``torchrun``: process group, device per process, sharding and gathering.

Without torchrun (no ``WORLD_SIZE`` in the environment, or 1) everything here is a no-op for a single
process, so the same code path serves a laptop, one GPU, a node of 8 GPUs and a SLURM cluster.
Backends: NCCL when the processes use GPUs, gloo on CPU. Every process reads the run directory, so on
several nodes it must live on a file system they all see; only rank 0 writes to it.
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


def auto_device(spec: str = "auto") -> str:
    """The one ``auto`` device rule: ``cuda`` when a CUDA device is available, else ``cpu``; any other
    ``spec`` is returned as it is (checked by :func:`resolve_device`)."""
    if spec != "auto":
        return spec
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(spec: str = "auto", local_rank: int = 0, local_world: int = 1) -> torch.device:
    """``auto`` (a GPU when present), ``cpu``, ``cuda`` (this process's GPU: ``cuda:LOCAL_RANK``) or ``cuda:N``.

    ``local_world`` is the number of processes on this node (torchrun's ``LOCAL_WORLD_SIZE``): each
    needs a GPU of its own, so ``cuda:N`` (one GPU for all) and more processes than GPUs are refused.
    """
    spec = auto_device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    if spec != "cuda" and not spec.startswith("cuda:"):
        raise CriticalityError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise CriticalityError(f"--device {spec}: no CUDA device is available here; use --device cpu")
    count = torch.cuda.device_count()
    gpus = f"{count} GPU" + "s" * (count != 1)
    if spec == "cuda":
        if local_world > count:
            raise CriticalityError(f"--device cuda: {local_world} processes on this node but {gpus}; "
                                   f"start at most --nproc_per_node={count}")
        return torch.device("cuda", local_rank)
    index = spec.split(":", 1)[1]
    if not index.isdigit() or int(index) >= count:
        raise CriticalityError(f"--device {spec}: this machine has {gpus} (cuda:0 … cuda:{count - 1})")
    if local_world > 1:
        raise CriticalityError(f"--device {spec}: all {local_world} processes on this node would share one GPU; "
                               "use --device cuda (one GPU per process)")
    return torch.device("cuda", int(index))


def setup(device: str = "auto") -> Context:
    """Join the process group when launched by torchrun; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world > 1 else 1
    dev = resolve_device(device, local_rank, local_world)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Context(rank, world, local_rank, dev)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True on rank 0, and in a single process: the one that writes and prints."""
    return not active() or dist.get_rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank, so that all take the same branch (``obj`` itself when not distributed)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (a one-element list when not distributed)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Elementwise sum of every rank's ``values`` (float64 on ``device``: NCCL reduces only GPU tensors)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
