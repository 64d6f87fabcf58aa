"""Mini-batches of in-memory tensors and the CIFAR augmentation (random crop + flip), on any device."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def minibatches(x: Tensor, y: Tensor, batch_size: int, *, shuffle: bool = False,
            generator: torch.Generator | None = None, augment: Callable[[Tensor], Tensor] | None = None,
            drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches ``(x[b], y[b])`` of in-memory tensors, each example once per pass (last one short
    unless ``drop_last``); ``shuffle`` needs an explicit generator; ``augment`` maps each x batch."""
    if shuffle and generator is None:
        raise ValueError("minibatches(shuffle=True) needs an explicit torch.Generator")
    order = torch.randperm(len(x), generator=generator, device=generator.device).to(x.device) if shuffle else None
    stop = len(x) - len(x) % batch_size if drop_last else len(x)
    for start in range(0, stop, batch_size):
        if order is None:
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            xb, yb = x[idx], y[idx]
        yield (augment(xb) if augment is not None else xb), yb


def crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Random crop after zero padding (0 = the data-set mean, x being normalized) and a horizontal flip
    with probability 1/2, independently per image: (N, C, H, W) → (N, C, H, W), two gathers."""
    n, c, h, w = x.shape
    shifts = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=generator.device).to(x.device)
    flip = (torch.rand(n, generator=generator, device=generator.device) < 0.5).to(x.device)  # (N,)
    padded = F.pad(x, (padding,) * 4)  # (N, C, H + 2p, W + 2p)
    rows = shifts[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = shifts[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))  # (N, C, H, W + 2p)
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))  # (N, C, H, W)
