"""Fast evaluation of many variants of one model.

A *variant* is the trained model with some state-dict entries replaced, and optionally some modules
skipped (one cell of the grid). The reference, :func:`criticality.core.evaluate.evaluate_naive`, deep-copies
the model, loads the variant's full state dict and runs the test set. The :class:`Engine` gives the same
numbers faster:

- no copy of the model: it evaluates on the caller's instance (the final state loaded into it; every
  tensor it changed is restored bit for bit afterwards, also when evaluation raises), or on one copy when
  the model must move to another device; a variant's entries are swapped in and out (:func:`swapped`), and
  what modules derived from their weights (timm's attention bias caches) is dropped each time
  (:mod:`criticality.core.caches`);
- prefix reuse: for a model with a repeated block stack (``blocks``), a variant whose first modified block
  is ``k`` needs blocks ``k..L`` re-run only. The model's own forward runs, but block ``k - 1`` returns its
  cached output for this batch and the blocks before it return at once (:mod:`criticality.core.stubs`), so
  masks, rotary embeddings and heads need no special code. Every position is checked bit for bit against
  the full forward on a probe batch; positions that do not reproduce it fall back to the full forward;
- ``torch.inference_mode`` and large batches; the data is processed in chunks whose cached outputs (and
  the final model's logits, for ``agreement``/``kl``) stay under ``max_cache_bytes``.

Both paths give the same :class:`CellResult`s (see :mod:`criticality.core.evaluate`); this module
re-exports the reference's names.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from criticality.core import batches
from criticality.core import stubs as stubs
from criticality.core.batches import Batch, Data, Output, iter_batches
from criticality.core.caches import invalidate
from criticality.core.evaluate import evaluate, evaluate_naive  # re-exported: the reference next to the engine
from criticality.core.hooks import eval_mode, hooks
from criticality.core.metrics import DEFAULT_METRICS, METRICS, CellResult, Metric, Records, needs_reference, resolve
from criticality.core.stacks import find_stack

__all__ = ["DEFAULT_METRICS", "METRICS", "CellResult", "Data", "Engine", "Metric", "Variant", "evaluate",
           "evaluate_naive", "iter_batches", "loaded", "placed", "swapped"]


@dataclass(frozen=True)
class Variant:
    """One cell: ``entries`` are the state-dict entries that differ from the engine's base model.

    ``entries`` may also be a function that makes them, with ``keys`` naming the keys it will return:
    then a variant's tensors exist only while it is evaluated, not for the whole grid at once. ``skip``
    names modules (by path) that return their input instead of running.
    """

    id: Hashable
    entries: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]] = field(default_factory=dict)
    keys: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()

    def touched(self) -> tuple[str, ...]:
        return tuple(self.entries) if self.keys is None else self.keys

    def materialize(self) -> Mapping[str, torch.Tensor]:
        entries = self.entries() if callable(self.entries) else self.entries
        if self.keys is not None and set(entries) != set(self.keys):
            raise KeyError(f"variant {self.id!r} made keys {sorted(entries)}, announced {sorted(self.keys)}")
        return entries


@contextlib.contextmanager
def swapped(model: nn.Module, entries: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Temporarily copy ``entries`` into ``model``'s own tensors; the originals always come back. What the
    modules derived from their weights is dropped both ways (:func:`criticality.core.caches.invalidate`)."""
    own = model.state_dict(keep_vars=True)
    unknown = [k for k in entries if k not in own]
    if unknown:
        raise KeyError(f"keys not in the model: {', '.join(unknown[:8])}")
    saved = {k: own[k].detach().clone() for k in entries}
    try:
        with torch.no_grad():
            for k, v in entries.items():
                own[k].copy_(v)
        if entries:
            invalidate(model)
        yield model
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                own[k].copy_(v)
        if saved:
            invalidate(model)


@contextlib.contextmanager
def loaded(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """``model`` holding ``state`` in eval mode; afterwards every tensor it changed (only those are saved)
    and every module's mode are restored bit for bit, also after an exception."""
    own = model.state_dict(keep_vars=True)
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(tensor) -> (tensor, its original values)
    try:
        with eval_mode(model):
            with torch.no_grad():
                for k, t in own.items():
                    v = state[k]  # one tensor at a time: a lazy checkpoint is never gathered whole
                    if id(t) not in saved and (t.shape != v.shape or not torch.equal(t, v.to(t.device, t.dtype))):
                        saved[id(t)] = (t, t.detach().clone())
                if saved:  # the model's own loading of the keys that differ: tied keys resolve as in the reference
                    model.load_state_dict({k: state[k] for k, t in own.items() if id(t) in saved}, strict=False)
            invalidate(model)  # also when nothing differs: a cache may hold another state's values
            yield model
    finally:
        with torch.no_grad():
            for t, original in saved.values():
                t.copy_(original)
        invalidate(model)


def placed(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself when it is already on ``device`` (or dispatched over devices: ``hf_device_map``),
    else one copy on ``device``."""
    if getattr(model, "hf_device_map", None):
        return model
    tensors = [*model.parameters(), *model.buffers()]
    here = all(t.device.type == device.type and (device.index is None or t.device.index == device.index)
               for t in tensors)
    return model if here else copy.deepcopy(model).to(device)


@dataclass
class _Settled:
    """What one probe batch established about the model (see :meth:`Engine._settle`)."""

    valid: list[int]  # positions whose prefix reuse reproduces the full forward (0 always)
    key_position: dict[str, int]
    module_position: dict[int, int]  # id(module) → position
    shapes: list[stubs.Shape]  # return structure of each block
    act_bytes: int  # largest cached block output, bytes per example
    logit_bytes: int  # logits, bytes per example


class Engine:
    """Evaluates variants of ``model`` (with ``base`` loaded) on ``data``, re-running only suffixes.

    ``evaluate(variants)`` yields ``(variant.id, CellResult)`` as cells finish. ``blocks``: the model's
    repeated block stack in execution order, ``[(path, module), ...]`` (default: found by
    :func:`criticality.core.stacks.find_stack`).
    """

    def __init__(self, model: nn.Module, base: Mapping[str, torch.Tensor], data: Data, *,
                 metrics: Any = DEFAULT_METRICS, batch_size: int = 1000, device: str | torch.device = "cpu",
                 limit: int | None = None, max_cache_bytes: int = 1 << 30, prefix_cache: bool = True,
                 output: Output = None, blocks: Sequence[tuple[str, nn.Module]] | None = None):
        self.device = torch.device(device)
        self.model = placed(model, self.device)
        self.base, self.data, self.metrics = base, data, resolve(metrics)
        self.batch_size, self.limit, self.max_cache_bytes, self.output = batch_size, limit, max_cache_bytes, output
        if not prefix_cache:
            blocks = []
        elif blocks is None or self.model is not model:
            blocks = find_stack(self.model)
        self.blocks = [m for _, m in blocks]
        self._settled: _Settled | None = None
        self._shapes: dict[str, stubs.Shape] = {}
        self.cache_bytes = 0  # peak bytes of cached outputs and reference logits held for one chunk, measured

    def position(self, variant: Variant) -> int:
        """Index of the first block the variant changes (len(blocks): none), lowered to a verified one."""
        s = self._settle()
        touched = [s.key_position.get(k, 0) for k in variant.touched()]
        touched += [s.module_position.get(id(self.model.get_submodule(p)), 0) for p in variant.skip]
        pos = min(touched, default=len(self.blocks))
        return max(p for p in s.valid if p <= pos)

    def evaluate(self, variants: Iterable[Variant]) -> Iterator[tuple[Hashable, CellResult]]:
        yield from self._evaluate(variants)

    def _evaluate(self, variants: Iterable[Variant]) -> Iterator[tuple[Hashable, CellResult]]:
        with loaded(self.model, self.base):
            self._settle()
            variants = sorted(variants, key=self.position)
            self._learn_shapes({p for v in variants for p in v.skip})
            per_chunk = self._batches_per_chunk()
            n_batches = self._n_batches()
            if n_batches is not None and n_batches <= per_chunk:
                yield from self._pass(variants, per_chunk)
                return
            # Several chunks: one pass per position, so finished cells are reported (and saved) as we go.
            by_position: dict[int, list[Variant]] = {}
            for v in variants:
                by_position.setdefault(self.position(v), []).append(v)
            for wave in by_position.values():
                yield from self._pass(wave, per_chunk)

    def evaluate_on(self, data: Data, metrics: Any, variants: Iterable[Variant]) -> dict[Hashable, CellResult]:
        """:meth:`evaluate` on other data and metrics, keeping what the engine settled: for data that starts
        with the same two examples (the canary's probe batch, :mod:`criticality.core.canary`)."""
        saved = self.data, self.metrics, self.limit
        self.data, self.metrics, self.limit = data, resolve(metrics), None
        try:
            return dict(self._evaluate(variants))  # not evaluate(): these are checks, not the grid's cells
        finally:
            self.data, self.metrics, self.limit = saved

    def _pass(self, variants: list[Variant], per_chunk: int) -> Iterator[tuple[Hashable, CellResult]]:
        records = {i: Records(self.metrics) for i in range(len(variants))}
        with_reference = needs_reference(self.metrics)
        for chunk, last_chunk in _chunks(iter_batches(self.data, self.batch_size, self.limit), per_chunk):
            chunk = [batches.to_device(b, self.device) for b in chunk]
            with torch.inference_mode():
                refs = [self._forward(x, 0, None) if with_reference else None for x, _ in chunk]
            cached, at = [None] * len(chunk), 0  # output of block at - 1, one per batch
            for i, v in enumerate(variants):
                pos = self.position(v)
                cached, at = self._advance(chunk, cached, at, pos), pos
                self.cache_bytes = max(self.cache_bytes, _bytes(cached) + _bytes(refs))
                with swapped(self.model, v.materialize()), stubs.skipping(self.model, v.skip, self._shapes), \
                        torch.inference_mode():
                    for (x, y), c, ref in zip(chunk, cached, refs, strict=True):
                        logits = self._forward(x, pos, c)
                        records[i].score(self.metrics, logits, x, y, ref)
                if last_chunk:
                    yield v.id, records.pop(i).result()
        if records:
            raise ValueError("no data to evaluate on")

    def _forward(self, inputs: Any, pos: int, cached: Any) -> torch.Tensor:
        """The model's logits, with blocks ``< pos`` stubbed: block ``pos - 1`` returns ``cached``."""
        if pos == 0:
            return batches.call(self.model, inputs, self.output)
        shapes = self._settled.shapes  # set by _settle before any stubbed forward
        plan = [(b, stubs.identity(shapes[i])) for i, b in enumerate(self.blocks[:pos - 1])]
        with stubs.stubbed([*plan, (self.blocks[pos - 1], stubs.returning(cached))]):
            return batches.call(self.model, inputs, self.output)

    def _advance(self, chunk: list[Batch], cached: list[Any], start: int, stop: int) -> list[Any]:
        """The outputs of block ``stop - 1`` per batch, from those of block ``start - 1``."""
        if start == stop:
            return cached
        with torch.inference_mode():
            return [stubs.output_of(lambda x=x, c=c: self._forward(x, start, c), self.blocks[stop - 1])
                    for (x, _), c in zip(chunk, cached, strict=True)]

    def _settle(self) -> _Settled:
        """Positions of keys and modules, block return structures and the positions whose prefix reuse
        reproduces the full forward bit for bit, all from one probe batch (once per engine).

        The modules that run before the stack (embeddings, a ResNet's stem) are tried as leading blocks
        too, so that cells past them skip them; when that does not reproduce the forward (their outputs
        feed more than the stack, e.g. rotary embeddings), the stack alone is used.
        """
        if self._settled is not None:
            return self._settled
        inputs = batches.to_device(self._probe(), self.device)[0]
        stack = self.blocks
        with loaded(self.model, self.base):  # eval mode (dropout off), also when called before evaluate()
            stem = self._stem(inputs) if stack else []
            if stem:
                self.blocks = stem + stack
                if len(stem) + 1 in self._check(inputs).valid:
                    return self._warned(len(stem))
            self.blocks = stack
            self._check(inputs)
        return self._warned(0)

    def _warned(self, stem: int) -> _Settled:
        failed = sorted(set(range(stem + 1, len(self.blocks) + 1)) - set(self._settled.valid))
        if failed:
            warnings.warn(f"{type(self.model).__name__}: reusing the prefix before block(s) {failed} does not "
                          "reproduce its forward; those cells run the model from an earlier block", stacklevel=5)
        return self._settled

    def _check(self, inputs: Any) -> _Settled:
        """:meth:`_settle`'s work for the current ``self.blocks``."""
        n = batches.batch_len(inputs)
        self._settled = _Settled([0], {}, {}, [None] * len(self.blocks), 0, 0)
        with torch.inference_mode():
            whole, module_position, shapes = self._order(inputs)
            self._settled.shapes = shapes
            valid, act, last = [0], 0, None  # last: the previous valid position's cached output
            for pos in range(1, len(self.blocks) + 1):
                # from the previous valid position (each block runs once), else from the input
                starts = [(valid[-1], last)] if valid[-1] else []
                same = False
                for start, cached in [*starts, (0, None)]:
                    try:
                        out = stubs.output_of(lambda s=start, c=cached: self._forward(inputs, s, c),
                                              self.blocks[pos - 1])
                        same = _identical(self._forward(inputs, pos, out), whole)
                    except Exception:  # noqa: BLE001 - a stub the model cannot take is a failed check
                        same = False
                    if same:
                        break
                if same:
                    valid.append(pos)
                    act, last = max(act, _bytes([out]) // n), out
        owners: dict[int, int] = {}
        for module in self.model.modules():
            for t in [*module._parameters.values(), *module._buffers.values()]:
                if t is not None:
                    pos = module_position.get(id(module), 0)
                    owners[id(t)] = min(owners.get(id(t), pos), pos)
        keys = {k: owners.get(id(t), 0) for k, t in self.model.state_dict(keep_vars=True).items()}
        self._settled = _Settled(valid, keys, module_position, shapes, act, _bytes([whole]) // n)
        return self._settled

    def _stem(self, inputs: Any) -> list[nn.Module]:
        """The modules that run before the first block, in call order: children of the first block's
        ancestors that are neither its ancestors nor called after it started."""
        order: dict[int, int] = {}

        def seen(module, args):  # returns None: a pre-hook's result would replace the input
            order.setdefault(id(module), len(order))

        with hooks([(m, seen) for m in self.model.modules()], pre=True), torch.inference_mode():
            batches.call(self.model, inputs, self.output)
        first = self.blocks[0]
        if id(first) not in order:
            return []
        ancestors = [m for m in self.model.modules() if any(c is first for c in m.modules()) and m is not first]
        inside = {id(a) for a in ancestors} | {id(first)}
        stem = [c for a in ancestors for c in a.children()
                if id(c) not in inside and order.get(id(c), len(order)) < order[id(first)]]
        return sorted({id(c): c for c in stem}.values(), key=lambda c: order[id(c)])

    def _order(self, inputs: Any) -> tuple[torch.Tensor, dict[int, int], list[stubs.Shape]]:
        """One full forward: its logits; each module's position (the block it is in, else how many blocks
        had finished when it first ran; 0 for modules that did not run); each block's return structure."""
        finished, first, shapes = [0], {}, [None] * len(self.blocks)

        def pre(module, args):
            first.setdefault(id(module), finished[0])

        def post(i):
            def hook(module, args, out):
                finished[0] = max(finished[0], i + 1)
                shapes[i] = stubs._safe_shape(out)
            return hook

        with hooks([(m, pre) for m in self.model.modules()], pre=True), \
                hooks([(b, post(i)) for i, b in enumerate(self.blocks)]):
            whole = self._forward(inputs, 0, None)
        for i, b in reversed(list(enumerate(self.blocks))):  # the block a module is in wins
            for m in b.modules():
                first[id(m)] = i
        shapes = [s if s != "unsupported" else None for s in shapes]
        return whole, first, shapes

    def _learn_shapes(self, paths: set[str]) -> None:
        paths = paths - set(self._shapes)
        if paths:
            inputs = batches.to_device(self._probe(), self.device)[0]
            with torch.inference_mode():
                self._shapes.update(stubs.shapes_of(lambda: self._forward(inputs, 0, None),
                                                    {p: self.model.get_submodule(p) for p in paths}))

    def _batches_per_chunk(self) -> int:
        """Batches per chunk, so that one chunk's cached outputs (and reference logits) fit ``max_cache_bytes``."""
        s = self._settle()
        per_example = max(s.act_bytes, 1) + (s.logit_bytes if needs_reference(self.metrics) else 0)
        return max(1, self.max_cache_bytes // max(1, per_example * self.batch_size))

    def _n_batches(self) -> int | None:
        """How many batches the data holds, when that is known without reading it."""
        whole = batches.in_memory(self.data)
        if whole is not None:
            n = batches.batch_len(whole[0]) if self.limit is None else min(self.limit, batches.batch_len(whole[0]))
            return -(-n // self.batch_size)
        if self.limit is None and hasattr(self.data, "__len__"):
            return len(self.data)
        return None

    def _probe(self) -> Batch:
        """The first two examples (a loader's first batch cut down: the checks run about 2L forwards)."""
        first = next(iter_batches(self.data, 2, self.limit), None)
        if first is None:
            raise ValueError("no data to evaluate on")
        return batches.first_examples(first, 2)


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit the same logits, NaN matching NaN (a non-finite final model is recorded, not fatal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) if a.is_floating_point() else torch.equal(a, b)


def _bytes(outputs: Sequence[Any]) -> int:
    """Bytes held by cached block outputs or logits (the hidden state of a tuple or mapping)."""
    total = 0
    for out in outputs:
        t = stubs.hidden_of(out)
        if t is not None:
            total += t.numel() * t.element_size()
    return total


def _chunks(batches: Iterator[Batch], size: int) -> Iterator[tuple[list[Batch], bool]]:
    """Group batches into lists of ``size``, flagging the last list (one batch of look-ahead)."""
    chunk: list[Batch] = []
    for batch in batches:
        if len(chunk) == size:
            yield chunk, False
            chunk = []
        chunk.append(batch)
    if chunk:
        yield chunk, True
