"""Evaluation batches and model outputs, whatever form the user's data and model have.

A :data:`Batch` is ``(inputs, targets)``: ``inputs`` a tensor (the model's one argument) or a dict of
tensors (the model's keyword arguments, as Hugging Face models take them); ``targets`` a tensor, or
``None`` for unlabelled data (then only label-free metrics such as ``agreement`` and ``kl`` apply).

Accepted data (:func:`iter_batches`):

- in-memory tensors ``(x, y)``, ``(x,)`` or ``x`` alone, or a dict of equally long tensors: sliced
  into batches of ``batch_size``;
- a re-iterable loader (e.g. a ``DataLoader``) of ``(x, y)`` tuples, ``(x,)``/``x`` alone, or dicts.

In a dict the key ``labels`` (or ``label``) is taken out as the targets and the rest are passed to the
model as keyword arguments. Where a dict batch carries an ``attention_mask`` of the labels' shape, padded
positions get the label ``-100`` (ignored by the sequence metrics).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from criticality.errors import CriticalityError

Inputs = torch.Tensor | dict[str, torch.Tensor]
Batch = tuple[Inputs, torch.Tensor | None]
Data = Any  # see the module docstring for the accepted forms
Output = str | Callable[[Any], torch.Tensor] | None
LABEL_KEYS = ("labels", "label")
IGNORE = -100  # the label that marks a position without a target (the Hugging Face convention)


def iter_batches(data: Data, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
    """The evaluation batches: slices of in-memory tensors, or the batches of an iterable/DataLoader.

    ``limit`` keeps only the first ``limit`` examples (a fixed subset, for quick looks).
    """
    if isinstance(data, Iterator) or not isinstance(data, Iterable):
        why = ": every cell reads it again" if isinstance(data, Iterator) else ""
        raise CriticalityError("data must be tensors (x, y), x alone, or a re-iterable loader (e.g. a DataLoader), "
                               f"not {type(data).__name__}{why}")
    whole = in_memory(data)
    if whole is not None:
        inputs, targets = whole
        n = batch_len(inputs) if limit is None else min(limit, batch_len(inputs))
        for i in range(0, n, batch_size):
            yield _slice(inputs, i, min(i + batch_size, n)), _slice(targets, i, min(i + batch_size, n))
        return
    seen = 0
    for item in data:
        inputs, targets = split(item)
        size = batch_len(inputs)
        if limit is not None and seen + size > limit:
            inputs, targets = _slice(inputs, 0, limit - seen), _slice(targets, 0, limit - seen)
            size = limit - seen
        if size:
            yield inputs, targets
        seen += size
        if limit is not None and seen >= limit:
            return


def split(item: Any) -> Batch:
    """One batch as the user gave it → ``(inputs, targets)``."""
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, Mapping):
        inputs = dict(item)
        found = [k for k in LABEL_KEYS if k in inputs]
        targets = inputs.pop(found[0]) if found else None
        mask = inputs.get("attention_mask")
        if isinstance(targets, torch.Tensor) and isinstance(mask, torch.Tensor) and mask.shape == targets.shape:
            targets = targets.masked_fill(mask == 0, IGNORE)
        return inputs, targets
    if isinstance(item, list | tuple) and len(item) in (1, 2) and isinstance(item[0], torch.Tensor | Mapping):
        inputs = item[0] if isinstance(item[0], torch.Tensor) else split(item[0])[0]
        return inputs, item[1] if len(item) == 2 else None
    raise CriticalityError(f"cannot read a batch of type {type(item).__name__}: give (inputs, labels) tuples, "
                           "inputs alone, or dicts of tensors (HF style, 'labels' as the targets)")


def in_memory(data: Data) -> Batch | None:
    """``(inputs, targets)`` when ``data`` is the whole data set as tensors, else None (a loader)."""
    if isinstance(data, torch.Tensor):
        return data, None
    if isinstance(data, Mapping) and all(isinstance(v, torch.Tensor) for v in data.values()):
        return split(data)
    if isinstance(data, tuple) and len(data) in (1, 2) and isinstance(data[0], torch.Tensor):
        return data[0], data[1] if len(data) == 2 else None
    return None


def first_examples(batch: Batch, n: int) -> Batch:
    """The first ``n`` examples of a batch."""
    return _slice(batch[0], 0, n), _slice(batch[1], 0, n)


def _slice(t: Inputs | None, start: int, stop: int) -> Inputs | None:
    if t is None:
        return None
    if isinstance(t, Mapping):
        return {k: v[start:stop] for k, v in t.items()}
    return t[start:stop]


def batch_len(inputs: Inputs) -> int:
    """Examples (sequences) in a batch: the length of its tensor, or of the first tensor of a dict."""
    if isinstance(inputs, Mapping):
        first = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
        if first is None:
            raise CriticalityError(f"a dict batch holds no tensor (keys: {', '.join(inputs)})")
        return len(first)
    return len(inputs)


def to_device(batch: Batch, device: str | torch.device) -> Batch:
    inputs, targets = batch
    if isinstance(inputs, Mapping):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    else:
        inputs = inputs.to(device)
    return inputs, None if targets is None else targets.to(device)


def attention_mask(inputs: Inputs) -> torch.Tensor | None:
    """The padding mask of a dict batch ((N, T), 1 = a real token), if it has one."""
    return inputs.get("attention_mask") if isinstance(inputs, Mapping) else None


def call(model: nn.Module, inputs: Inputs, output: Output = None) -> torch.Tensor:
    """Run ``model`` on a batch and return its logits (``(N, C)``, or ``(N, T, V)`` for sequence models).

    Outputs: a tensor; a tuple or list (its first element); a dict or ``ModelOutput`` (``logits``).
    ``output`` overrides: a key/attribute name, or a function of the raw output.
    """
    kwargs = dict(inputs) if isinstance(inputs, Mapping) else {}
    if getattr(getattr(model, "config", None), "use_cache", False) and "use_cache" not in kwargs \
            and _takes(model, "use_cache"):
        kwargs["use_cache"] = False  # a Hugging Face generation cache is only overhead here
    out = model(**kwargs) if isinstance(inputs, Mapping) else model(inputs, **kwargs)
    return logits_of(out, output)


def _takes(model: nn.Module, name: str) -> bool:
    """Whether ``model``'s forward accepts the keyword ``name`` (by name, or as ``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def logits_of(out: Any, output: Output = None) -> torch.Tensor:
    """The logits tensor in a model's raw output (see :func:`call`)."""
    if callable(output):
        out = output(out)
    elif isinstance(output, str):
        if isinstance(out, Mapping) and output in out:
            out = out[output]
        elif hasattr(out, output):
            out = getattr(out, output)
        else:
            raise CriticalityError(f"the model's output ({type(out).__name__}) has no {output!r}")
    elif isinstance(out, Mapping):  # dicts and ModelOutput (an OrderedDict)
        if "logits" not in out:
            raise CriticalityError(f"the model returned a {type(out).__name__} without 'logits' (keys: "
                                   f"{', '.join(map(str, out))}); pass output= (a key or a function)")
        out = out["logits"]
    elif isinstance(out, list | tuple) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise CriticalityError(f"cannot read logits from a model output of type {type(out).__name__}; pass "
                               "output= (a key, or a function mapping the output to a logits tensor)")
    return out
