"""Stubs that make a block of a model return a given output, or its own input, while the model's own
forward runs around it.

This is how the engine reuses an unmodified prefix in any model with a repeated block stack (Hugging Face
decoder/encoder layers, timm blocks, ResNet stages): it does not re-implement the model's forward (masks,
rotary embeddings, heads stay the model's business), it only makes block ``k - 1`` return its cached output
for this batch and the blocks before it return at once. A stub is an instance attribute ``forward`` set for
the duration of a ``with`` block and always removed afterwards; the module's hooks and attributes stay.

A block returns a tensor, a tuple whose first element is the hidden state (older transformers), or a mapping
(a dict, a transformers ``ModelOutput``) whose first tensor value is the hidden state; a stub returns the same
structure (:data:`Shape`), with the hidden state in its place and nothing in the other places.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from criticality.core.hooks import hooks

_MISSING = object()
# None: the block returns a tensor; n: a tuple of n elements (hidden state first); (cls, key): a mapping of
# class cls (dict, ModelOutput) whose hidden state is under key
Shape = int | tuple[type, str] | None


class Stop(Exception):
    """Raised by :func:`output_of`'s hook to end a forward once the wanted block has run."""


def shape_of(out: Any) -> Shape:
    """The return structure of a block's output; ValueError for one a stub cannot imitate."""
    if isinstance(out, torch.Tensor):
        return None
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return len(out)
    if isinstance(out, Mapping):
        key = _hidden_key(out)
        if key is not None:
            return (type(out), key)
    raise ValueError(f"a block returned {type(out).__name__}, not a tensor, a tuple starting with one or a "
                     "mapping holding one")


def _hidden_key(out: Mapping) -> str | None:
    """The key of a mapping's first tensor value (a ModelOutput holds only the fields that are set)."""
    return next((k for k, v in out.items() if isinstance(k, str) and isinstance(v, torch.Tensor)), None)


def hidden_of(out: Any) -> torch.Tensor | None:
    """The hidden state in a block's output (see :func:`shape_of`), or None when it holds none."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping):
        key = _hidden_key(out)
        return None if key is None else out[key]
    return None


def first_input(args: tuple, kwargs: dict) -> Any:
    """The hidden state a block was called with: its first positional argument, else ``hidden_states``, else
    its first keyword argument (None for a call without arguments)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(iter(kwargs.values()), None)


def as_shape(h: torch.Tensor, shape: Shape) -> Any:
    """``h`` in a block's return structure: the other places of a tuple are None, a mapping holds ``h`` alone."""
    if isinstance(shape, int):
        return (h, *([None] * (shape - 1)))
    if isinstance(shape, tuple):
        cls, key = shape
        return cls(**{key: h})
    return h


def identity(shape: Shape) -> Callable[..., Any]:
    """A forward that returns its input in the block's return structure (a skipped block)."""
    return lambda *args, **kwargs: as_shape(first_input(args, kwargs), shape)


def returning(out: Any) -> Callable[..., Any]:
    """A forward that returns a copy of ``out`` (a cached output): the next block may work in place on it."""
    def forward(*args, **kwargs):
        if isinstance(out, torch.Tensor):
            return out.clone()
        if isinstance(out, Mapping):
            key = _hidden_key(out)
            return type(out)(**{**out, key: out[key].clone()})
        return (out[0].clone(), *out[1:])
    return forward


@contextlib.contextmanager
def stubbed(stubs: Sequence[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    """Temporarily replace the ``forward`` of each module instance; the originals always come back."""
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for module, fn in stubs:
            saved.append((module, module.__dict__.get("forward", _MISSING)))
            module.__dict__["forward"] = fn
        yield
    finally:
        for module, old in reversed(saved):
            if old is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = old


def output_of(run: Callable[[], Any], block: nn.Module) -> Any:
    """``block``'s output during ``run()`` (a model forward), stopping the forward right after it.

    Raises LookupError when the forward never called ``block``.
    """
    box: list[Any] = []

    def hook(module, args, out):
        box.append(out)
        raise Stop

    with hooks([(block, hook)]), contextlib.suppress(Stop):
        run()
    if not box:
        raise LookupError("the block did not run in the model's forward")
    return box[0]


def skipping(model: nn.Module, paths: Sequence[str], shapes: dict[str, Shape]):
    """Context: the modules at ``paths`` return their input (in their return structure) instead of running."""
    return stubbed([(model.get_submodule(p), identity(shapes.get(p))) for p in paths])


def shapes_of(run: Callable[[], Any], modules: dict[str, nn.Module]) -> dict[str, Shape]:
    """The return structure of each module during one ``run()`` (modules that did not run: left out)."""
    seen: dict[str, Shape] = {}

    def record(path: str) -> Callable[..., None]:
        def hook(module, args, out) -> None:  # None: a forward hook's return value would replace the output
            seen.setdefault(path, _safe_shape(out))
        return hook

    with hooks([(m, record(p)) for p, m in modules.items()]):
        run()
    return seen


def _safe_shape(out: Any) -> Shape | str:
    try:
        return shape_of(out)
    except ValueError:
        return "unsupported"

