"""Integrity of a checkpoint trajectory, checked before the grid: published suites ship broken checkpoints.

Known defects (reported by the suites' maintainers): Pythia's ``step0`` is byte-identical to ``step1`` and
``step2``; 86 of pythia-2.8b's 154 branches serve final-era weights; three OLMo-2-7B branches are identical.
A reset to an "earlier" checkpoint that is really the final one reads as "robust", so :func:`check`

- refuses, in one error naming every revision, checkpoints that miss keys of the model (or hold others);
- collapses byte-identical checkpoints (the same content-addressed files — a hub blob, a sidecar sha256 —
  or the same bytes of every tensor), keeping one and naming the rest: the initialization when it is among
  them, else the final checkpoint, else the earliest;
- flags checkpoints whose distance from the initialization, ‖θ_t − θ_0‖₂ over all floating tensors, breaks
  its neighbours' trend: outside the longest chain of checkpoints (in step order) along which the distance
  never falls by more than a factor ``tolerance`` (nor by more than 1 % of the largest distance). Flagged
  checkpoints stay in the grid; the summary and the report say which and why.

Reads each checkpoint once, one tensor at a time (the initialization's tensor beside it).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from criticality.core.trajectory import LazyCheckpoint
from criticality.errors import CriticalityError

DEFAULT_TOLERANCE = 1.25  # a checkpoint may sit at most 25 % closer to the initialization than an earlier one


@dataclass
class Integrity:
    """What :func:`check` found. ``kept``: the checkpoints the grid should use (duplicates collapsed)."""

    kept: dict[int, Mapping[str, torch.Tensor]]
    labels: dict[int, str]
    distances: dict[int, float]  # number → ‖θ_n − θ_0‖₂
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    flagged: list[dict[str, Any]] = field(default_factory=list)
    tolerance: float = DEFAULT_TOLERANCE

    def summary(self) -> dict[str, Any]:
        """The ``integrity`` section of summary.json."""
        return {"checked": len(self.distances), "kept": [self.labels[n] for n in self.kept],
                "duplicates": self.duplicates, "flagged": self.flagged, "tolerance": self.tolerance,
                "distance_from_init": {self.labels[n]: d for n, d in self.distances.items()}}

    def warnings(self) -> list[str]:
        lines = [f"{d['kept']} is byte-identical to {', '.join(d['same'])} ({d['by']}): analysed once"
                 for d in self.duplicates]
        lines += [f"{f['revision']}: {f['reason']}" for f in self.flagged]
        return lines


def check(states: Mapping[int, Mapping[str, torch.Tensor]], model_keys: Iterable[str],
          labels: Mapping[int, str] | None = None, *, tolerance: float = DEFAULT_TOLERANCE) -> Integrity:
    """Check ``states`` (number → state dict, 0 the initialization) against the model's keys; see the module."""
    if 0 not in states:
        raise CriticalityError("integrity check: no checkpoint 0 (the initialization)")
    if not tolerance >= 1:
        raise CriticalityError(f"integrity tolerance must be a number ≥ 1, got {tolerance!r}")
    numbers = sorted(states)
    labels = {n: (labels or {}).get(n, str(n)) for n in numbers}
    _check_keys(states, set(model_keys), labels)
    digests: dict[int, str] = {}
    distances: dict[int, float] = {}
    by_files: dict[tuple, int] = {}
    for n in numbers:
        files = _content_ids(states[n])
        if files is not None and files in by_files:  # the same content-addressed files: no need to read
            twin = by_files[files]
            digests[n], distances[n] = digests[twin], distances[twin]
            continue
        digests[n], distances[n] = _digest_and_distance(states[n], states[0], labels[n])
        if files is not None:
            by_files[files] = n
    duplicates, kept = _collapse(numbers, digests, labels, states)
    flagged = _off_trend([n for n in numbers if n in kept], distances, labels, tolerance)
    return Integrity({n: states[n] for n in numbers if n in kept}, labels, distances, duplicates, flagged, tolerance)


def _check_keys(states: Mapping[int, Mapping[str, torch.Tensor]], own: set[str], labels: dict[int, str]) -> None:
    problems = []
    for n, state in states.items():
        held = set(state)
        missing, extra = sorted(own - held), sorted(held - own)
        if missing or extra:
            what = [f"{verb} {len(keys)} key(s) ({', '.join(keys[:4])}{', …' if len(keys) > 4 else ''})"
                    for verb, keys in (("misses", missing), ("holds unknown", extra)) if keys]
            problems.append(f"{labels[n]} " + " and ".join(what))
    if problems:
        raise CriticalityError(f"{len(problems)} of {len(states)} checkpoints do not fit the model (a missing shard, "
                               "another architecture?): " + "; ".join(problems))


def _content_ids(state: Mapping[str, torch.Tensor]) -> tuple | None:
    """The checkpoint's files by content address (hub blob, sidecar sha256), None when any is not so named."""
    if not isinstance(state, LazyCheckpoint):
        return None
    ids = [f.identity() for f in state.files]
    if not ids or not all(i.startswith(("blob:", "sha256:")) for i in ids):
        return None
    return tuple(sorted(ids)) + (state.fingerprint(),)  # the key mapping and aliases count too


def _digest_and_distance(state: Mapping[str, torch.Tensor], init: Mapping[str, torch.Tensor],
                         label: str) -> tuple[str, float]:
    h = hashlib.sha256()
    total = 0.0
    try:
        for key in sorted(state):
            shape = _shape(state, key)
            if shape != _shape(init, key):
                raise CriticalityError(f"{key} has shape {shape}, the initialization's {_shape(init, key)}")
            h.update(f"{key}:{shape}\n".encode())
            for a, b in zip(_chunks(state, key, shape), _chunks(init, key, shape), strict=True):
                h.update(str(a.dtype).encode())
                if a.numel():
                    h.update(a.contiguous().reshape(-1).view(torch.uint8).numpy())  # the bytes, not copied
                if a.is_floating_point():
                    total += float((a.double() - b.double()).pow(2).sum())
    except CriticalityError as e:
        raise CriticalityError(f"checkpoint {label}: {e}") from e
    return h.hexdigest(), math.sqrt(total)


CHUNK = 1 << 20  # elements read at a time: a 50k-token embedding whole, in double, costs a model size


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    return state.shape_of(key) if isinstance(state, LazyCheckpoint) else tuple(state[key].shape)


def _chunks(state: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...]):
    """The tensor in runs of rows of about CHUNK elements, read from the file run by run where it can be."""
    if not shape:
        yield state[key].detach().cpu()
        return
    per_row = max(math.prod(shape[1:]), 1)
    step = max(CHUNK // per_row, 1)
    held = state.file_key(key) if isinstance(state, LazyCheckpoint) else None
    tensor = None if held is not None else state[key].detach().cpu()
    for start in range(0, shape[0], step):
        yield held[0].rows(held[1], start, start + step) if held is not None else tensor[start:start + step]


def _collapse(numbers: list[int], digests: dict[int, str], labels: dict[int, str],
              states: Mapping) -> tuple[list[dict[str, Any]], set[int]]:
    groups: dict[str, list[int]] = {}
    for n in numbers:
        groups.setdefault(digests[n], []).append(n)
    final = numbers[-1]
    duplicates, kept = [], set()
    for members in groups.values():
        if 0 in members and final in members and final != 0:
            raise CriticalityError(f"the final checkpoint {labels[final]} is identical to the initialization "
                                   f"{labels[0]}: there is no training to measure")
        keep = 0 if 0 in members else final if final in members else members[0]
        kept.add(keep)
        if len(members) > 1:
            same_files = len({_content_ids(states[n]) for n in members} - {None}) == 1 and \
                all(_content_ids(states[n]) is not None for n in members)
            duplicates.append({"kept": labels[keep], "same": [labels[n] for n in members if n != keep],
                               "by": "same files" if same_files else "same tensor bytes"})
    return duplicates, kept


def _off_trend(numbers: list[int], distances: dict[int, float], labels: dict[int, str],
               tolerance: float) -> list[dict[str, Any]]:
    """Checkpoints outside the longest chain along which the distance from init never falls by much."""
    after = [n for n in numbers if n != 0]
    if len(after) < 3:
        return []
    d = [distances[n] for n in after]
    slack = 0.01 * max(d)
    best, prev = [1] * len(d), [-1] * len(d)
    for j in range(len(d)):
        for i in range(j):
            if (d[j] * tolerance >= d[i] or d[i] - d[j] <= slack) and best[i] + 1 > best[j]:
                best[j], prev[j] = best[i] + 1, i
    j = max(range(len(d)), key=lambda k: (best[k], k))
    chain = set()
    while j >= 0:
        chain.add(j)
        j = prev[j]
    flagged = []
    for k, n in enumerate(after):
        if k not in chain:
            neighbours = [after[i] for i in (k - 1, k + 1) if 0 <= i < len(after)]
            shown = ", ".join(f"{labels[m]} {distances[m]:.4g}" for m in neighbours)
            flagged.append({"revision": labels[n], "step": n, "distance": d[k],
                            "reason": f"distance from the initialization {d[k]:.4g} breaks the trend of its "
                                      f"neighbours ({shown}); it may serve another step's weights"})
    return flagged
