"""Initialization schemes: how a fresh model's parameters are drawn.

Initialization is part of the experiment, because re-randomization draws from it again:

- ``torch``: each module's own ``reset_parameters()`` (PyTorch's defaults, and any custom scheme a
  user's module implements there).
- ``glorot``: TensorFlow's dense/conv default, used by the paper: Glorot-uniform weights, zero biases;
  norm layers get weight 1, bias 0 and fresh running statistics.
- ``kaiming``: He-normal weights (fan-out, ReLU gain) for convolutions, as torchvision's VGG and ResNet
  do, PyTorch's default for linear layers, zero conv biases; deep plain nets (VGG without BatchNorm)
  train from it where the modules' defaults make the signal vanish.

For fresh draws of models from other packages, schemes registered with :func:`register` (a
:class:`DrawScheme`: the per-module draw, a detector that recognises the package's models, optional notes
for the analysis summary). :mod:`criticality.adapters` registers its own when imported (``import
criticality`` does that); this module never imports it:

- ``hf``: Hugging Face's ``_init_weights`` per module; ``timm``: timm's init patterns per module;
- ``shuffle``: each tensor gets its own initial (epoch-0) values in a random order: a draw from the
  layer's own initial distribution for any model (constant tensors stay constant).

A scheme may also be any callable ``init(model)`` that re-initializes ``model`` in place, drawing from
torch's global generator. Randomness is always an argument: :func:`initialize` runs the scheme inside
``torch.random.fork_rng`` seeded from the given generator, so the caller's global RNG is untouched.

Training (:func:`initialize`) draws the whole model from one generator. Fresh draws for
re-randomization (:func:`criticality.surgery.fresh_state`) go module by module: :func:`module_scheme`
gives the scheme's per-module form and :func:`draw_seed` each module's own seed, so a group's draw does
not depend on which other modules are drawn with it. :func:`choose` picks the scheme when none is given.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

InitScheme = str | Callable[[nn.Module], None]
SCHEMES = ("torch", "glorot", "kaiming")  # training; fresh draws also take draw_schemes()
SHUFFLE = "shuffle"  # works on state-dict entries (criticality.surgery), not per module
ModuleInit = Callable[[nn.Module, str, nn.Module], None]  # (module, its path, the root model)
Members = dict[str, tuple[str, ...]]  # group name -> its state-dict keys


@dataclass(frozen=True)
class DrawScheme:
    """A package's own initializer for fresh draws: ``init(module, path, root)`` draws one module;
    ``detect(model)`` says whether a model comes from that package; ``notes(model, groups)`` adds facts
    to the analysis summary's ``draws`` entry (e.g. groups whose fresh draw is an identity)."""

    name: str
    init: ModuleInit
    detect: Callable[[nn.Module], bool]
    notes: Callable[[nn.Module, Members], dict[str, object]] | None = None


_REGISTERED: dict[str, DrawScheme] = {}  # in registration order: the order :func:`choose` tries them
_INITIAL: contextvars.ContextVar[Mapping[str, torch.Tensor] | None] = contextvars.ContextVar("initial", default=None)


@contextlib.contextmanager
def initial_state(state: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Within the block, :func:`initial_value` reads ``state`` (the run's epoch-0 checkpoint): a draw scheme
    takes the value a parameter was given at construction from it (a timm layer scale's ``init_values``)."""
    token = _INITIAL.set(state)
    try:
        yield
    finally:
        _INITIAL.reset(token)


def initial_value(key: str) -> torch.Tensor | None:
    """The tensor ``key`` of the initial state set by :func:`initial_state` (None outside one, or without it)."""
    state = _INITIAL.get()
    if state is None or key not in state:
        return None
    return state[key]


def register(scheme: DrawScheme) -> DrawScheme:
    """Add (or replace, by name) a draw scheme; returns it. The built-in names cannot be taken."""
    if scheme.name in (*SCHEMES, SHUFFLE):
        raise ValueError(f"init scheme {scheme.name!r} is built in")
    _REGISTERED[scheme.name] = scheme
    return scheme


def draw_schemes() -> tuple[str, ...]:
    """The names fresh draws accept now: the training schemes, the registered ones, ``shuffle``."""
    return (*SCHEMES, *_REGISTERED, SHUFFLE)


def __getattr__(name: str) -> object:
    if name == "DRAW_SCHEMES":  # the older constant, computed when read (registrations come later)
        return draw_schemes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _reset(module: nn.Module) -> None:
    """The module's own initialization (``_reset_parameters``: nn.MultiheadAttention, Transformer)."""
    for name in ("reset_parameters", "_reset_parameters"):
        fn = getattr(module, name, None)
        if callable(fn):
            fn()
            return


def _glorot_one(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    else:
        _reset(module)  # norm layers: weight 1, bias 0, fresh running stats; others: their own scheme


def _kaiming_one(module: nn.Module) -> None:
    if isinstance(module, nn.modules.conv._ConvNd):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    else:
        _reset(module)


_ONE = {"torch": _reset, "glorot": _glorot_one, "kaiming": _kaiming_one}


def _whole(one: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    def apply(model: nn.Module) -> None:
        for module in model.modules():
            one(module)
    return apply


def module_scheme(scheme: str) -> ModuleInit:
    """The per-module form of a named scheme (``shuffle`` has none: it works on state-dict entries)."""
    if scheme in _ONE:
        one = _ONE[scheme]
        return lambda module, path, root: one(module)
    if scheme in _REGISTERED:
        return _REGISTERED[scheme].init
    raise ValueError(f"unknown init scheme {scheme!r} for fresh draws; choose one of {', '.join(draw_schemes())}")


def choose(model: nn.Module, init: InitScheme | None = None) -> tuple[InitScheme, bool]:
    """The scheme for fresh draws and whether it was a guess: ``init`` when given, else the first
    registered scheme that detects the model (``hf`` for a Hugging Face model, ``timm`` for a timm model),
    ``model.init_scheme`` (zoo models), the first registered scheme that detects a module inside the
    model (a user's wrapper around a foreign model), else ``torch`` (each module's ``reset_parameters``;
    the only guess)."""
    if init is not None:
        return init, False
    for scheme in _REGISTERED.values():
        if scheme.detect(model):
            return scheme.name, False
    own = getattr(model, "init_scheme", None)
    if own is not None:
        return own, False
    inner = list(model.modules())[1:]
    for scheme in _REGISTERED.values():
        if any(scheme.detect(m) for m in inner):
            return scheme.name, False
    return "torch", True


def draws_summary(model: nn.Module, init: str, groups: Members) -> dict[str, object]:
    """For the analysis summary: the initializer the fresh draws ran, with its scheme's notes (if any)."""
    out: dict[str, object] = {"init": init}
    scheme = _REGISTERED.get(init)
    if scheme is not None and scheme.notes is not None:
        out.update(scheme.notes(model, groups))
    return out


def draw_seed(seed: int, name: str) -> int:
    """The seed of one module's (or one tensor's) draw: 63 bits of sha256 over ``seed`` and its path."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


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
        fn = _whole(_ONE[scheme])
    else:
        fn = scheme
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.default_generator.set_state(generator.get_state())
        fn(model)
        generator.set_state(torch.default_generator.get_state())
    return model
