"""Stratified subsets: ``n`` examples whose class proportions match the whole set's."""

from __future__ import annotations

import torch
from torch import Tensor

from criticality.errors import CriticalityError
from criticality.paper.data.common import Split


def stratified_indices(y: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Sorted indices of ``n`` examples whose class proportions match ``y``'s (all if n >= len(y))."""
    if n < 1:
        raise CriticalityError(f"a subset needs at least 1 example, got {n}")
    if n >= len(y):
        return torch.arange(len(y))
    perm = torch.randperm(len(y), generator=generator or torch.Generator().manual_seed(0))
    y_perm = y.cpu()[perm]
    # Each example's rank within its class, as a fraction of the class size: taking the n smallest
    # takes about n * (class share) from every class.
    rank = torch.empty(len(y), dtype=torch.float64)
    for c in y_perm.unique():
        mask = y_perm == c
        k = int(mask.sum())
        rank[mask] = torch.arange(k, dtype=torch.float64) / k
    return perm[torch.argsort(rank, stable=True)[:n]].sort().values


def stratified_subset(x: Tensor, y: Tensor, n: int, generator: torch.Generator | None = None
                      ) -> tuple[Tensor, Tensor]:
    idx = stratified_indices(y, n, generator).to(y.device)
    return x[idx], y[idx]


def subset(split: Split, n: int | None, generator: torch.Generator | None) -> Split:
    if n is None:
        return split
    if hasattr(split, "subset"):  # an ImageFolder (criticality.paper.data.imagenet)
        return split.subset(stratified_indices(split.targets, n, generator))
    return stratified_subset(*split, n, generator)

