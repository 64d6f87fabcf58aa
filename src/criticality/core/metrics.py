"""Per-example metrics: what a cell measures, kept per example so a cell can be tested, not only averaged.

A metric maps ``(logits, targets, reference)`` to ``(values (N,), counts (N,))``: per example the sum of
its measurements and how many there are (1 for a classifier; the scored tokens of a sequence). The cell's
value is ``values.sum() / counts.sum()``: a token-weighted mean over the whole data set, never a mean of
batch means. ``reference`` is the final model's logits on the same batch (for ``agreement`` and ``kl``).

Built in:

- classification (logits ``(N, C)``, targets ``(N,)``): ``error`` (top-1 wrong), ``loss`` (cross-entropy,
  nats);
- sequences (logits ``(N, T, V)``, targets ``(N, T)``): ``token_error``, ``nll`` (nats per token). The labels
  are shifted as a causal LM is trained (logits at t predict the label at t + 1) unless the metric is made
  with ``shift=False`` (labels already aligned: masked LMs, token classification, pre-shifted labels).
  Labels ``-100`` and padded positions (``attention_mask`` = 0) are not scored;
- label-free: ``agreement`` (top-1 equal to the final model's; per token for sequences) and ``kl``
  (KL(final ‖ variant) of the predicted distributions, nats).

A plain function ``fn(logits, targets) -> (N,)`` is a metric too (one count per example).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from criticality.core.batches import IGNORE, attention_mask, batch_len
from criticality.errors import CriticalityError

Pair = tuple[torch.Tensor, torch.Tensor]  # values (N,) float64, counts (N,) int64


class Metric:
    """A built-in metric; ``mask`` ((N, T), 1 = a real token) comes from the batch's attention mask."""

    needs_labels = True
    needs_reference = False

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor | None, reference: torch.Tensor | None,
                 mask: torch.Tensor | None = None) -> Pair:
        raise NotImplementedError


def _ones(n: int, device) -> torch.Tensor:
    return torch.ones(n, dtype=torch.int64, device=device)


def _classifier(name: str, logits: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise CriticalityError(f"metric {name!r} is for classifiers (logits (N, C)); these logits are "
                               f"{tuple(logits.shape)}: for a sequence model use 'token_error' and 'nll'")


class Error(Metric):
    def __call__(self, logits, targets, reference, mask=None):
        _classifier("error", logits)
        return (logits.argmax(dim=1) != targets).to(torch.float64), _ones(len(logits), logits.device)


class Loss(Metric):
    def __call__(self, logits, targets, reference, mask=None):
        _classifier("loss", logits)
        values = F.cross_entropy(logits.float(), targets, reduction="none").to(torch.float64)
        return values, _ones(len(logits), logits.device)


def _aligned(name: str, logits: torch.Tensor, targets: torch.Tensor, shift: bool) -> Pair:
    """Logits and labels at the positions that score: (N, T', V), (N, T') with -100 where nothing scores."""
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise CriticalityError(f"metric {name!r} is for sequence models (logits (N, T, V), labels (N, T)); got "
                               f"logits {tuple(logits.shape)} and labels {tuple(targets.shape)}")
    if shift:
        return logits[:, :-1], targets[:, 1:]
    return logits, targets


@dataclass(frozen=True)
class TokenError(Metric):
    shift: bool = True  # causal LM: logits at t predict labels at t + 1

    def __call__(self, logits, targets, reference, mask=None):
        logits, targets = _aligned("token_error", logits, targets, self.shift)
        scored = targets != IGNORE
        wrong = (logits.argmax(dim=-1) != targets) & scored
        return wrong.sum(1).to(torch.float64), scored.sum(1)


@dataclass(frozen=True)
class NLL(Metric):
    shift: bool = True

    def __call__(self, logits, targets, reference, mask=None):
        logits, targets = _aligned("nll", logits, targets, self.shift)
        scored = targets != IGNORE
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets.masked_fill(~scored, 0), reduction="none")
        return (nll.to(torch.float64) * scored).sum(1), scored.sum(1)


def _positions(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Which positions count for a label-free metric: (N,) all ones, or (N, T) from the padding mask."""
    if logits.ndim == 2:
        return torch.ones(len(logits), dtype=torch.bool, device=logits.device)
    if mask is not None and mask.shape == logits.shape[:2]:
        return mask != 0
    return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)


def _per_example(values: torch.Tensor, keep: torch.Tensor) -> Pair:
    values = values.to(torch.float64) * keep
    if values.ndim == 1:
        return values, keep.to(torch.int64)
    return values.sum(1), keep.sum(1).to(torch.int64)


class Agreement(Metric):
    needs_labels, needs_reference = False, True

    def __call__(self, logits, targets, reference, mask=None):
        same = logits.argmax(dim=-1) == reference.argmax(dim=-1)
        return _per_example(same, _positions(logits, mask))


class KL(Metric):
    needs_labels, needs_reference = False, True

    def __call__(self, logits, targets, reference, mask=None):
        p_log = F.log_softmax(reference.float(), dim=-1)
        q_log = F.log_softmax(logits.float(), dim=-1)
        kl = (p_log.exp() * (p_log - q_log)).sum(-1)  # KL(final ‖ variant), nats
        return _per_example(kl, _positions(logits, mask))


class Plain(Metric):
    """A user's function ``fn(logits, targets) -> (N,)`` or ``fn(logits, targets, reference)`` (values, or
    ``(values, counts)``)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.needs_reference = len(params) >= 3
        self.needs_labels = True

    def __call__(self, logits, targets, reference, mask=None):
        out = self.fn(logits, targets, reference) if self.needs_reference else self.fn(logits, targets)
        values, counts = out if isinstance(out, tuple) else (out, _ones(len(out), out.device))
        return values.to(torch.float64), counts.to(torch.int64)


METRICS: dict[str, Metric] = {"error": Error(), "loss": Loss(), "token_error": TokenError(), "nll": NLL(),
                              "agreement": Agreement(), "kl": KL()}

# Default metric sets (names in METRICS). The first of each is the one verdicts are read from. analyze()
# chooses its own from the model's logits when given none (:func:`choose`).
DEFAULT_METRICS = ("error", "loss")  # a classifier evaluated on its own (evaluate, Engine)
CLASSIFIER_METRICS = ("error", "loss", "agreement", "kl")  # a classifier's grid, compared with the final model
SEQUENCE_METRICS = ("token_error", "nll", "agreement", "kl")  # a language model's grid, likewise


def choose(logits: torch.Tensor, targets: torch.Tensor | None) -> tuple[tuple[str, ...], str]:
    """The metrics that fit a model's logits on one batch, and why: classification logits ``(N, C)`` with class
    targets ``(N,)`` → ``error``, ``loss``; sequence logits ``(N, T, V)`` with labels ``(N, T)`` →
    ``token_error``, ``nll``; data without labels → ``agreement``, ``kl``. Anything else is refused: the
    caller names the metrics."""
    shape = tuple(logits.shape)
    if targets is None:
        return ("agreement", "kl"), f"logits {shape} and no labels: compared with the final model"
    labels = tuple(targets.shape)
    if logits.ndim == 2 and targets.ndim == 1 and labels[0] == shape[0] and not targets.is_floating_point():
        return ("error", "loss"), f"classification logits {shape} with class targets {labels}"
    if logits.ndim == 3 and labels == shape[:2] and not targets.is_floating_point():
        return ("token_error", "nll"), f"sequence logits {shape} with labels {labels}"
    raise CriticalityError(f"cannot choose metrics for logits {shape} with targets {labels} ({targets.dtype}); pass "
                           "metrics=('error', 'loss') for a classifier, ('token_error', 'nll') for a sequence model, "
                           "('agreement', 'kl') to compare with the final model, or your own functions")


def resolve(metrics: Mapping[str, Metric | Callable] | list | tuple) -> dict[str, Metric]:
    """Names or functions → built-in :class:`Metric` objects (user functions wrapped in :class:`Plain`)."""
    if isinstance(metrics, str):
        metrics = [metrics]
    items = metrics.items() if isinstance(metrics, Mapping) else [(m, m) for m in metrics]
    out = {}
    for name, m in items:
        if isinstance(m, str):
            if m not in METRICS:
                raise CriticalityError(f"unknown metric {m!r}; built in: {', '.join(METRICS)} (or pass a function)")
            m = METRICS[m]
        out[name] = m if isinstance(m, Metric) else Plain(m)
    return out


def measure(metrics: Mapping[str, Metric], logits: torch.Tensor, targets: torch.Tensor | None,
            reference: torch.Tensor | None, mask: torch.Tensor | None) -> dict[str, Pair]:
    """Every metric on one batch; a clear error when one needs labels the data does not have."""
    out = {}
    for name, m in metrics.items():
        if m.needs_labels and targets is None:
            raise CriticalityError(f"metric {name!r} needs labels and the data has none; use the label-free "
                                   "metrics 'agreement' and 'kl', or give (inputs, labels) batches")
        out[name] = m(logits, targets, reference, mask)
    return out


def needs_reference(metrics: Mapping[str, Metric]) -> bool:
    return any(m.needs_reference for m in metrics.values())


class CellResult(dict):
    """``{metric: mean, "n": examples}``; ``records[metric]`` = per-example ``(values float64 (N,),
    counts int64 (N,))`` in data order."""

    records: dict[str, Pair]


class Records:
    """Per-example metric values of one cell, kept on the device until the cell is done."""

    def __init__(self, names: Iterable[str]):
        self.parts: dict[str, list[Pair]] = {name: [] for name in names}
        self.n = 0

    def score(self, metrics: Mapping[str, Metric], logits: torch.Tensor, inputs: Any, targets: torch.Tensor | None,
              reference: torch.Tensor | None) -> None:
        """Add one batch: its logits against its targets (and the final model's logits)."""
        pairs = measure(metrics, logits, targets, reference, attention_mask(inputs))
        for name, pair in pairs.items():
            self.parts[name].append(pair)
        self.n += batch_len(inputs)

    def result(self) -> CellResult:
        if self.n == 0:
            raise ValueError("no data to evaluate on")
        out = CellResult()
        out.records = {}
        for name, parts in self.parts.items():
            values = torch.cat([v for v, _ in parts]).to("cpu", torch.float64)
            counts = torch.cat([c for _, c in parts]).to("cpu", torch.int64)
            out.records[name] = (values, counts)
            out[name] = float(values.sum() / counts.sum())  # token-weighted over the whole data set
        out["n"] = self.n
        return out
