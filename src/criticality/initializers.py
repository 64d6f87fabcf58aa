"""Initialization schemes: how a fresh model's parameters are drawn.

Initialization is part of the experiment, because re-randomization draws from it again:

- ``torch``: each module's own ``reset_parameters()`` (PyTorch's defaults, and any custom scheme a
  user's module implements there).
- ``glorot``: TensorFlow's dense/conv default, used by the paper: Glorot-uniform weights, zero biases;
  norm layers get weight 1, bias 0 and fresh running statistics.
- ``kaiming``: He-normal weights (fan-out, ReLU gain) for convolutions, as torchvision's VGG and ResNet
  do, PyTorch's default for linear layers, zero conv biases; deep plain nets (VGG without BatchNorm)
  train from it where the modules' defaults make the signal vanish.

A scheme may also be any callable ``init(model)`` that re-initializes ``model`` in place, drawing from
torch's global generator. Randomness is always an argument: :func:`initialize` runs the scheme inside
``torch.random.fork_rng`` seeded from the given generator, so the caller's global RNG is untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

InitScheme = str | Callable[[nn.Module], None]
SCHEMES = ("torch", "glorot", "kaiming")



def _reset(module: nn.Module) -> None:
    """The module's own initialization (``_reset_parameters``: nn.MultiheadAttention, Transformer)."""
    for name in ("reset_parameters", "_reset_parameters"):
        fn = getattr(module, name, None)
        if callable(fn):
            fn()
            return


def _torch_default(model: nn.Module) -> None:
    for module in model.modules():
        _reset(module)


def _glorot(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            _reset(module)  # norm layers: weight 1, bias 0, fresh running stats; others: their own scheme


def _kaiming(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            _reset(module)


def scheme_name(scheme: InitScheme) -> str:
    """A printable name for a scheme, recorded in configs and tables."""
    if isinstance(scheme, str):
        return scheme
    return getattr(scheme, "__qualname__", repr(scheme))


def initialize(model: nn.Module, scheme: InitScheme, generator: torch.Generator) -> nn.Module:
    """Re-initialize ``model`` in place with ``scheme``, drawing from ``generator``; returns ``model``.

    The generator's state is advanced as if the draws had come from it, so two calls with two
    generators seeded alike give bit-identical models.
    """
    if isinstance(scheme, str):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown init scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
        fn = {"torch": _torch_default, "glorot": _glorot, "kaiming": _kaiming}[scheme]
    else:
        fn = scheme
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.default_generator.set_state(generator.get_state())
        fn(model)
        generator.set_state(torch.default_generator.get_state())
    return model
