"""State a module derives from its weights and keeps between forwards, dropped when its weights change.

The fast engine copies a variant's tensors into the live model (:func:`criticality.core.engine.swapped`); a
module that computed something from its parameters earlier and kept it would go on using the old values.
timm's LeViT, EfficientFormer(V2) and EfficientViT (MSRA) keep ``attention_bias_cache``: in eval mode the
attention biases gathered from ``attention_biases``, one entry per device, dropped by their ``train()``
override. :func:`invalidate` drops such state the two ways known: it calls ``train()`` on the model (each
module's override runs; every module's mode comes back as it was) and empties every dict attribute whose name
contains ``cache`` and which holds tensors. What it cannot see, the canary (:mod:`criticality.core.canary`)
catches.
"""

from __future__ import annotations

import torch
from torch import nn


def invalidate(model: nn.Module) -> list[str]:
    """Drop what the modules of ``model`` derived from their weights; returns the paths of the dicts emptied
    (attributes as ``blocks.0.attn.attention_bias_cache``). Modes are restored flag by flag, not by
    ``train()``, so no override runs a second time."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(True)  # timm: `if self.attention_bias_cache: self.attention_bias_cache = {}`
    finally:
        for m, training in modes:
            m.training = training
    emptied = []
    for path, module in model.named_modules():
        for name, value in list(vars(module).items()):
            if "cache" in name.lower() and isinstance(value, dict) and _holds_tensors(value):
                value.clear()  # in place: a dict several modules share stays shared
                emptied.append(f"{path}.{name}" if path else name)
    return emptied


def _holds_tensors(d: dict) -> bool:
    return any(isinstance(v, torch.Tensor) or (isinstance(v, tuple | list) and any(isinstance(t, torch.Tensor)
                                                                                     for t in v))
               for v in d.values())
