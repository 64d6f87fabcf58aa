"""Temporary changes to a model that always come undone: forward hooks and train/eval mode.

Both are context managers (as TransformerLens' hooks are): whatever the ``with`` block does, also when it
raises, the hooks it added are removed and every module's ``training`` flag is what it was before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from torch import nn

__all__ = ["eval_mode", "hooks"]


@contextlib.contextmanager
def hooks(pairs: Iterable[tuple[nn.Module, Callable[..., Any]]], *, pre: bool = False,
          with_kwargs: bool = False) -> Iterator[None]:
    """Register ``hook`` on each ``module`` of ``pairs`` for the ``with`` block; always removed afterwards.

    Forward hooks ``hook(module, args, output)`` by default; ``pre=True``: forward pre-hooks
    ``hook(module, args)``. ``with_kwargs``: as in ``register_forward_hook`` (the hook gets the keyword
    arguments too). Pairs are registered in order; a failure part-way removes those already registered.
    """
    handles = []
    try:
        for module, hook in pairs:
            if pre:
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))
            else:
                handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


@contextlib.contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Every module of ``models`` (``None`` entries ignored) in eval mode for the ``with`` block; each
    module's own ``training`` flag comes back afterwards (a model that was partly in eval stays so)."""
    modes = {id(m): (m, m.training) for net in models if net is not None for m in net.modules()}
    try:
        for net in models:
            if net is not None:
                net.eval()
        yield
    finally:
        for m, training in modes.values():
            m.training = training
