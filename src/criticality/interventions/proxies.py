"""Cheap representation proxies of block importance, from one forward pass of the trained model.

::

    table = criticality.proxies.block_proxies(model, (x_test, y_test), groups=result.groups)
    rho = criticality.proxies.correlations(table, result.table)  # does the cheap score rank like reinit/skip?

Per block of the model's repeated stack (:func:`blocks`), with ``h`` its input and ``h'`` its output:

- **Block Influence** (ShortGPT): ``BI = 1 − mean cos(h, h')`` over every token of every sequence
  (padding left out through ``attention_mask``), or over examples for non-sequence activations;
- **angular distance** (Gromov et al.): ``mean arccos(cos(h, h')) / π`` at the *last* (non-padding)
  token of each sequence, or over examples.

The cosine is taken over the hidden dimension for ``(B, T, D)`` activations (sequences of tokens) and
over all features of an example otherwise (``(B, D)``, or ``(B, C, H, W)`` flattened). Inputs and
outputs are caught by forward hooks on the blocks themselves: HF's ``output_hidden_states`` would give
the last block's output *after* the final norm, which is not what the block computed. A block whose
output shape differs from its input shape gets NaN and a ``note``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from criticality.core.batches import attention_mask, call, iter_batches, to_device
from criticality.core.hooks import eval_mode, hooks
from criticality.core.stacks import find_stack
from criticality.core.stubs import first_input
from criticality.errors import CriticalityError
from criticality.infra.files import atomic_path
from criticality.interventions.skip import module_of

PROXIES = ("bi", "angular")
TARGETS = ("reinit@0", "skip")  # the cells' Δ error the proxies are ranked against


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's repeated block stack (:func:`criticality.core.stacks.find_stack`); an error when it has none."""
    stack = find_stack(model)
    if not stack:
        raise CriticalityError(f"{type(model).__name__}: no block stack found (no stages(), not an nn.Sequential, "
                               "no known HF/timm layout, no container of repeated blocks)")
    return list(stack)


class _Tally:
    """Running float64 sums of one block's cosines, over all tokens and over last tokens."""

    def __init__(self):
        self.cos = self.tokens = self.angle = self.sequences = 0.0
        self.note = ""

    def add(self, h: torch.Tensor, out: torch.Tensor, mask: torch.Tensor | None) -> None:
        if h.shape != out.shape:
            self.note = f"maps shape {tuple(h.shape[1:])} to {tuple(out.shape[1:])}"
            return
        if h.dim() == 3:  # (B, T, D): tokens
            cos = F.cosine_similarity(h.float(), out.float(), dim=-1, eps=1e-8).double()  # (B, T)
            keep = torch.ones_like(cos, dtype=torch.bool) if mask is None else mask.to(cos.device).bool()
            positions = torch.arange(cos.shape[1], device=cos.device).expand_as(cos)
            last = torch.where(keep, positions, -1).amax(dim=1)  # (B,) index of the last real token
            has = last >= 0
            last_cos = cos[has, last[has]]  # (B',)
            self.cos += float(cos[keep].sum())
            self.tokens += float(keep.sum())
        else:  # (B, …): one vector per example
            cos = F.cosine_similarity(h.flatten(1).float(), out.flatten(1).float(), dim=1, eps=1e-8).double()
            last_cos = cos
            self.cos += float(cos.sum())
            self.tokens += cos.numel()
        self.angle += float(torch.arccos(last_cos.clamp(-1, 1)).sum() / math.pi)
        self.sequences += last_cos.numel()

    def row(self) -> dict[str, Any]:
        if self.note or not self.tokens:
            return {"bi": math.nan, "angular": math.nan, "tokens": int(self.tokens),
                    "note": self.note or "not called in the forward"}
        return {"bi": 1 - self.cos / self.tokens, "angular": self.angle / self.sequences, "tokens": int(self.tokens),
                "note": ""}


def block_proxies(model: nn.Module, data: Any, *, groups: Any = None,
                  stack: Sequence[tuple[str, nn.Module]] | None = None, batch_size: int = 1000,
                  device: str | torch.device = "cpu", max_examples: int | None = None) -> pd.DataFrame:
    """One row per block: ``block`` (module path), ``group`` (the analysis group holding exactly that
    block's state, when ``groups`` — a :class:`~criticality.groups.Groups` or a mapping of keys — is given),
    ``bi``, ``angular``, ``tokens`` (vectors averaged), ``note``. One pass over ``data`` in eval mode."""
    stack = list(stack) if stack is not None else blocks(model)
    tallies = {path: _Tally() for path, _ in stack}
    state = {"mask": None}

    def hook(path):
        def record(module, args, kwargs, output):
            h = first_input(args, kwargs)
            out = output[0] if isinstance(output, tuple) and output else output
            if isinstance(h, torch.Tensor) and isinstance(out, torch.Tensor):
                mask = state["mask"] if h.dim() == 3 and state["mask"] is not None \
                    and state["mask"].shape == h.shape[:2] else None
                tallies[path].add(h, out, mask)
            else:
                tallies[path].note = "no tensor input or output"
        return record

    with hooks([(m, hook(p)) for p, m in stack], with_kwargs=True), eval_mode(model), torch.inference_mode():
        for batch in iter_batches(data, batch_size, max_examples):
            inputs, _ = to_device(batch, device)
            state["mask"] = attention_mask(inputs)
            call(model, inputs)
    rows = [{"block": path, "index": i, **tallies[path].row()} for i, (path, _) in enumerate(stack)]
    table = pd.DataFrame(rows)
    table.insert(1, "group", _groups_of(model, [p for p, _ in stack], groups))
    return table


def _groups_of(model: nn.Module, paths: Sequence[str], groups: Any) -> list[str | None]:
    if groups is None:
        return [None] * len(paths)
    members = getattr(groups, "members", groups)
    by_path = {module_of(model, keys, name): name for name, keys in members.items()}
    return [by_path.get(p) for p in paths]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN with fewer than 3 pairs or a constant side."""
    x, y = pd.Series(np.asarray(a, dtype=float)), pd.Series(np.asarray(b, dtype=float))  # positional, not by index
    ok = x.notna() & y.notna()
    x, y = x[ok].rank(method="average"), y[ok].rank(method="average")
    if len(x) < 3 or x.nunique() < 2 or y.nunique() < 2:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def correlations(proxies: pd.DataFrame, cells: pd.DataFrame) -> list[dict[str, Any]]:
    """Spearman ρ of each proxy with each target's Δ error, over the blocks that are analysis groups."""
    targets = {
        "reinit@0": cells[(cells.op == "reinit") & (cells.checkpoint == 0)],
        "skip": cells[cells.op == "skip"],
    }
    out = []
    for target, rows in targets.items():
        if rows.empty:
            continue
        delta = rows.drop_duplicates("group").set_index("group")["delta_error"]
        matched = proxies[proxies.group.isin(delta.index)]
        for proxy in PROXIES:
            out.append({"proxy": proxy, "target": target, "n": int(matched[proxy].notna().sum()),
                        "spearman": spearman(matched[proxy], delta.reindex(matched.group).to_numpy())})
    return out


def write(table: pd.DataFrame, out: str | Path) -> Path:
    path = Path(out) / "proxies.csv"
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path
