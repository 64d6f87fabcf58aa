"""How a training step runs fast on a GPU without changing what is saved: mixed precision and memory layout.

``amp``: ``auto`` picks bf16 autocast on a CUDA device that supports it, else fp16 autocast with a
GradScaler (fp16 gradients underflow without one); on CPU ``auto`` is off. ``bf16`` / ``fp16`` force a
mode (CPU autocast runs bf16; fp16 there is slow and only for tests). Parameters, optimizer state and
checkpoints stay float32 under every mode: autocast only changes the dtype of the ops' outputs.
``channels_last`` (``auto`` = conv nets on CUDA) stores conv weights and inputs NHWC; checkpoints are
written ``.contiguous()`` and so hold the same values in the usual layout.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from criticality.errors import CriticalityError

AMP_MODES = ("auto", "off", "bf16", "fp16")


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device``; None = full float32."""
    if mode not in AMP_MODES:
        raise CriticalityError(f"unknown --amp {mode!r}; use {', '.join(AMP_MODES)}")
    if mode == "auto":
        if device.type != "cuda":
            return None
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (bf16 has float32's exponent range and needs none)."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def use_channels_last(mode: str, model: nn.Module, device: torch.device) -> bool:
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return mode == "on" or (mode == "auto" and has_conv and device.type == "cuda")
