"""How far each group's parameters moved from initialization, per checkpoint (paper Fig 1b, c).

    distances(checkpoints, {"fc1": ["fc1.linear.weight", "fc1.linear.bias"], ...}, model)
    # group, checkpoint, n, l2, linf, l2_rel, linf_rel, cosine

Over a group's floating-point parameters flattened together (θ, n numbers; buffers excluded when
``model`` is given):

- ``l2   = ‖θτ − θ0‖₂ / √n``  — the paper's ℓ2 (root mean square change per parameter)
- ``linf = ‖θτ − θ0‖∞``       — the paper's ℓ∞ (largest change of any one parameter)
- ``l2_rel = ‖θτ − θ0‖₂ / ‖θ0‖₂``, ``linf_rel = ‖θτ − θ0‖∞ / ‖θ0‖∞``, ``cosine = 1 − cos(θτ, θ0)`` — ours.

The sums stream over the group's keys one tensor at a time (float64 accumulators), reading
``checkpoints[epoch][key]`` per key, so lazy checkpoint mappings never load a whole state dict and a
group never exists as one concatenated vector.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from criticality.core.state import buffer_keys

StateDict = Mapping[str, torch.Tensor]
CHUNK = 1 << 18  # numbers per slice: 2 MB per float64 temporary
COLUMNS = ["group", "checkpoint", "n", "l2", "linf", "l2_rel", "linf_rel", "cosine"]
LABELS = {  # what each column is, for figure colour bars and reports
    "l2": "‖θτ − θ0‖₂ / √n (paper)",
    "linf": "‖θτ − θ0‖∞ (paper)",
    "l2_rel": "‖θτ − θ0‖₂ / ‖θ0‖₂",
    "linf_rel": "‖θτ − θ0‖∞ / ‖θ0‖∞",
    "cosine": "cosine distance(θτ, θ0)",
}


def distances(checkpoints: Mapping[int, StateDict], groups: Mapping[str, Sequence[str]],
              model: nn.Module | None = None) -> pd.DataFrame:
    """One row per (group, checkpoint): the distances of the module docstring; epoch 0 = the earliest."""
    epochs = sorted(checkpoints)
    start = checkpoints[epochs[0]]
    skip = buffer_keys(model) if model is not None else set()
    out = []
    for group, keys in groups.items():
        params = [k for k in keys if k not in skip and start[k].is_floating_point()]
        if not params:
            continue
        for epoch in epochs:
            out.append({"group": group, "checkpoint": epoch, **group_distance(checkpoints[epoch], start, params)})
    return pd.DataFrame(out, columns=COLUMNS)


def group_distance(state: StateDict, start: StateDict, keys: Sequence[str]) -> dict[str, float]:
    """The distances of ``keys`` in ``state`` from their values in ``start``, one slice of CHUNK numbers of
    one tensor at a time (float64 temporaries of a few MB, whatever the layer's size)."""
    n, diff2, diffmax, norm2, normmax, dot, state2 = 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    for k in keys:
        whole0, whole = start[k].detach().flatten(), state[k].detach().flatten()  # (n_k,) each, as stored
        n += whole0.numel()
        for i in range(0, whole0.numel(), CHUNK):
            theta0, theta = whole0[i:i + CHUNK].double(), whole[i:i + CHUNK].double()  # (≤ CHUNK,)
            diff = theta - theta0
            diff2 += float(diff.square().sum())
            diffmax = max(diffmax, float(diff.abs().max()))
            norm2 += float(theta0.square().sum())
            normmax = max(normmax, float(theta0.abs().max()))
            dot += float(theta @ theta0)
            state2 += float(theta.square().sum())
    nan = float("nan")
    denominator = math.sqrt(norm2 * state2)
    return {
        "n": n,
        "l2": math.sqrt(diff2 / n) if n else nan,
        "linf": diffmax if n else nan,
        "l2_rel": math.sqrt(diff2 / norm2) if norm2 > 0 else nan,
        "linf_rel": diffmax / normmax if normmax > 0 else nan,
        "cosine": 1.0 - dot / denominator if denominator > 0 else nan,
    }
