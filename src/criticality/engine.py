"""Fast evaluation of many variants of one model, and the plain reference it must agree with.

A *variant* is the trained model with some state-dict entries replaced (one cell of the grid). The
reference, :func:`evaluate_naive`, deep-copies the model, loads the variant's full state dict and runs
the test set. The :class:`Engine` gives the same numbers faster:

- no copy per cell: the variant's entries are swapped into one model in place and restored afterwards,
  also when evaluation raises (:func:`swapped`);
- prefix caching: when the model is a chain of stages (``model.stages()``, or an ``nn.Sequential``),
  the activations in front of the first modified stage do not change; they are computed once per
  position and only the suffix is re-run for each variant. Other models fall back to a full forward;
- ``torch.inference_mode`` and large batches; the data is processed in chunks whose cached activations
  stay under ``max_cache_bytes``.

Both paths split the data into the same batches and run the same operations on them, so errors agree
exactly and losses to float rounding of the sums. Metrics are per-example functions
``metric(logits (N, C), targets (N,)) -> (N,)``, averaged over the data in float64.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Data = tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]]
Batch = tuple[torch.Tensor, torch.Tensor]


def error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 where the top-1 prediction is wrong, else 0."""
    return (logits.argmax(dim=1) != targets).to(torch.float64)


def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example (nats)."""
    return F.cross_entropy(logits.float(), targets, reduction="none").to(torch.float64)


METRICS: dict[str, Metric] = {"error": error, "loss": loss}


@dataclass(frozen=True)
class Variant:
    """One cell: ``entries`` are the state-dict entries that differ from the engine's base model.

    ``entries`` may also be a function that makes them, with ``keys`` naming the keys it will return:
    then a variant's tensors exist only while it is evaluated, not for the whole grid at once.
    """

    id: Hashable
    entries: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]] = field(default_factory=dict)
    keys: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()  # module paths that return their input in this cell (contract 3)

    def touched(self) -> tuple[str, ...]:
        return tuple(self.entries) if self.keys is None else self.keys

    def materialize(self) -> Mapping[str, torch.Tensor]:
        entries = self.entries() if callable(self.entries) else self.entries
        if self.keys is not None and set(entries) != set(self.keys):
            raise KeyError(f"variant {self.id!r} made keys {sorted(entries)}, announced {sorted(self.keys)}")
        return entries


def iter_batches(data: Data, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
    """The evaluation batches: slices of in-memory tensors, or the batches of an iterable/DataLoader.

    ``limit`` keeps only the first ``limit`` examples (a fixed subset, for quick looks).
    """
    if isinstance(data, Iterator):
        raise TypeError("data must be tensors (x, y) or a re-iterable loader (e.g. a DataLoader), not a one-shot "
                        "iterator: every cell reads it again")
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        n = len(x) if limit is None else min(limit, len(x))
        for i in range(0, n, batch_size):
            yield x[i:min(i + batch_size, n)], y[i:min(i + batch_size, n)]
        return
    seen = 0
    for x, y in data:
        if limit is not None and seen + len(x) > limit:
            x, y = x[:limit - seen], y[:limit - seen]
        if len(x):
            yield x, y
        seen += len(x)
        if limit is not None and seen >= limit:
            return


class _Totals:
    """Running float64 sums of per-example metrics, kept on the device: no host sync per batch."""

    def __init__(self, names: Sequence[str]):
        self.sums: dict[str, torch.Tensor | float] = dict.fromkeys(names, 0.0)
        self.n = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, metrics: Mapping[str, Metric]) -> None:
        for name, fn in metrics.items():
            self.sums[name] = self.sums[name] + fn(logits, targets).to(torch.float64).sum()  # (,) on the device
        self.n += len(targets)

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no data to evaluate on")
        return {**{k: float(v) / self.n for k, v in self.sums.items()}, "n": self.n}


def evaluate(model: nn.Module, data: Data, *, metrics: Mapping[str, Metric] = METRICS, batch_size: int = 1000,
             device: str | torch.device = "cpu", limit: int | None = None) -> dict[str, float]:
    """Mean of each metric of ``model`` (in eval mode; its mode is restored) over ``data``."""
    was_training = model.training
    model.eval()
    totals = _Totals(list(metrics))
    try:
        with torch.inference_mode():
            for x, y in iter_batches(data, batch_size, limit):
                x, y = x.to(device), y.to(device)
                totals.add(model(x), y, metrics)
    finally:
        model.train(was_training)
    return totals.result()


def evaluate_naive(model: nn.Module, state: Mapping[str, torch.Tensor], data: Data, *,
                   metrics: Mapping[str, Metric] = METRICS, batch_size: int = 1000,
                   device: str | torch.device = "cpu", limit: int | None = None) -> dict[str, float]:
    """The reference: deepcopy, ``load_state_dict``, evaluate in batches. Obviously correct, slow."""
    m = copy.deepcopy(model).to(device)
    m.load_state_dict(state)
    return evaluate(m, data, metrics=metrics, batch_size=batch_size, device=device, limit=limit)


@contextlib.contextmanager
def swapped(model: nn.Module, entries: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Temporarily copy ``entries`` into ``model``'s own tensors; the originals always come back."""
    own = model.state_dict(keep_vars=True)
    unknown = [k for k in entries if k not in own]
    if unknown:
        raise KeyError(f"keys not in the model: {', '.join(unknown[:8])}")
    saved = {k: own[k].detach().clone() for k in entries}
    try:
        with torch.no_grad():
            for k, v in entries.items():
                own[k].copy_(v)
        yield model
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                own[k].copy_(v)


def chain_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model as a list of ``(module prefix, stage)``; one full-model stage when it declares none.

    A declared ``stages()`` method wins; a plain ``nn.Sequential`` (not a subclass with its own forward)
    is its children, a module registered twice included. The engine checks the chain against
    ``model(x)`` before trusting it.
    """
    if callable(getattr(type(model), "stages", None)):
        return list(model.stages())
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        return list(model._modules.items())
    return [("", model)]


class Engine:
    """Evaluates variants of ``model`` (with ``base`` loaded) on ``data``, re-running only suffixes.

    ``evaluate(variants)`` yields ``(variant.id, {metric: mean, ..., "n": count})`` as cells finish.
    """

    def __init__(self, model: nn.Module, base: Mapping[str, torch.Tensor], data: Data, *,
                 metrics: Mapping[str, Metric] = METRICS, batch_size: int = 1000,
                 device: str | torch.device = "cpu", limit: int | None = None,
                 max_cache_bytes: int = 1 << 30, prefix_cache: bool = True):
        self.model = copy.deepcopy(model).to(device).eval()
        self.model.load_state_dict(base)
        self.data, self.metrics, self.batch_size = data, dict(metrics), batch_size
        self.device, self.limit, self.max_cache_bytes = torch.device(device), limit, max_cache_bytes
        self.stages, self._per_example = self._settle_chain(chain_of(self.model) if prefix_cache else [])
        self._stage_of = self._key_positions()
        self.cache_bytes = 0  # peak bytes of activations held for one chunk, measured

    def position(self, variant: Variant) -> int:
        """Index of the first stage the variant touches (len(stages): touches none)."""
        touched = [self._stage_of[k] for k in variant.touched()] + [self._module_stage(p) for p in variant.skip]
        return min(touched, default=len(self.stages))

    def _module_stage(self, path: str) -> int:
        """Index of the stage holding the module at ``path`` (0 when it is in none: re-run everything)."""
        module = self.model.get_submodule(path)
        return next((i for i, (_, s) in enumerate(self.stages) if any(m is module for m in s.modules())), 0)

    def evaluate(self, variants: Iterable[Variant]) -> Iterator[tuple[Hashable, dict[str, float]]]:
        variants = sorted(variants, key=self.position)
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

    def _pass(self, variants: list[Variant], per_chunk: int) -> Iterator[tuple[Hashable, dict[str, float]]]:
        totals = {i: _Totals(list(self.metrics)) for i in range(len(variants))}
        for chunk, last_chunk in _chunks(iter_batches(self.data, self.batch_size, self.limit), per_chunk):
            chunk = [(x.to(self.device), y.to(self.device)) for x, y in chunk]
            acts, at = [x for x, _ in chunk], 0  # activations at stage index `at`, one per batch
            for i, v in enumerate(variants):
                pos = self.position(v)
                acts, at = self._advance(acts, at, pos), pos
                self.cache_bytes = max(self.cache_bytes, sum(a.numel() * a.element_size() for a in acts))
                from criticality.interventions import skipping  # interim skip hook (contract 3); local: no cycle

                with swapped(self.model, v.materialize()), skipping(self.model, v.skip), torch.inference_mode():
                    for a, (_, y) in zip(acts, chunk, strict=True):
                        # The suffix gets a copy: a stage may work in place on its input (inplace=True),
                        # and the cached activation must survive for the next cell.
                        suffix_input = a.clone() if pos < len(self.stages) else a
                        totals[i].add(self._run(suffix_input, pos, len(self.stages)), y, self.metrics)
                if last_chunk:
                    yield v.id, totals.pop(i).result()
        if totals:
            raise ValueError("no data to evaluate on")

    def _advance(self, acts: list[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
        if start == stop:
            return acts
        with torch.inference_mode():
            return [self._run(a, start, stop) for a in acts]

    def _run(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for _, stage in self.stages[start:stop]:
            h = stage(h)
        return h

    def _batches_per_chunk(self) -> int:
        """Batches per chunk, so that the cached activations of one chunk fit ``max_cache_bytes``."""
        return max(1, self.max_cache_bytes // max(1, self._per_example * self.batch_size))

    def _n_batches(self) -> int | None:
        """How many batches the data holds, when that is known without reading it."""
        if isinstance(self.data, tuple) and isinstance(self.data[0], torch.Tensor):
            n = len(self.data[0]) if self.limit is None else min(self.limit, len(self.data[0]))
            return -(-n // self.batch_size)
        if self.limit is None and hasattr(self.data, "__len__"):
            return len(self.data)
        return None

    def _settle_chain(self, stages: list[tuple[str, nn.Module]]) -> tuple[list[tuple[str, nn.Module]], int]:
        """The stages to cache between, and the largest activation at their boundaries (bytes per example),
        both from one probe batch.

        ``stages`` are kept only if running them equals ``model(x)`` bit for bit: a chain that is not the
        model's forward (a functional op or a skip connection between stages, a subclass with its own
        forward) would make prefix caching give other numbers than the reference. Otherwise the whole model
        is one stage.
        """
        x = self._probe().to(self.device)
        size = lambda t: t[:1].numel() * t.element_size()  # noqa: E731
        chained = len(stages) > 1
        with torch.inference_mode():
            whole, h, largest = self.model(x), x.clone(), size(x)
            for _, stage in stages if chained else []:
                h = stage(h)
                largest = max(largest, size(h))
        if chained and h.shape == whole.shape and torch.allclose(h, whole, rtol=0, atol=0, equal_nan=True):
            return stages, largest
        if chained:
            warnings.warn(f"{type(self.model).__name__}: its chain of stages does not reproduce its forward; "
                          "evaluating every cell with the full forward (no prefix caching)", stacklevel=3)
        return [("", self.model)], max(size(x), size(whole))

    def _probe(self) -> torch.Tensor:
        first = next(iter_batches(self.data, 2, self.limit), None)
        if first is None:
            raise ValueError("no data to evaluate on")
        return first[0][:2]

    def _key_positions(self) -> dict[str, int]:
        """Stage index of each state-dict key, by tensor identity (names can mislead)."""
        owned = [{id(t) for t in stage.state_dict(keep_vars=True).values()} for _, stage in self.stages]
        positions = {}
        for key, tensor in self.model.state_dict(keep_vars=True).items():
            hits = [i for i, ids in enumerate(owned) if id(tensor) in ids]
            positions[key] = min(hits) if hits else 0  # a tensor outside the chain: re-run everything
        return positions


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
