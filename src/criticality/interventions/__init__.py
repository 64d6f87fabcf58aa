"""Interventions beyond the paper's two resets: interpolation, noise and skipping a module.

Each is one more ``op`` of the analysis grid (:mod:`criticality.analysis`), evaluated by the same engine
and stored in the same table:

- ``interpolate`` (column ``alpha``): the group at ``(1 - α)·θ_source + α·θ_final`` (``checkpoint`` =
  the source, default epoch 0); α = 0 is re-initialization, α = 1 the trained model.
- ``noise`` (columns ``sigma``, ``seed``): Gaussian noise added to the group's parameters. **Scale
  convention**: the noise on every entry has standard deviation ``σ · s`` with
  ``s = ‖θ_final − θ_source‖₂ / √n`` over the group's n floating-point parameter entries — the RMS of
  how far training moved the group — so σ = 1 is noise as large as the training movement, whatever the
  layer's size or parametrization. Buffers (running statistics) get no noise. The draw ``z ~ N(0, I)``
  comes from a generator seeded by ``(seed, group)`` only, so every σ (and α) of one seed scales the
  same direction (common random numbers: error curves over σ are smooth, not re-drawn per point).
  A noise cell may also carry ``alpha`` (module criticality, :mod:`criticality.module_criticality`):
  then the noise is added to the interpolated group ``θ(α)``.
- ``skip``: the group's module returns its input (identity), in the module's own return structure (a
  tensor, or a tuple whose first element is the hidden state). The module is not removed: its
  ``forward`` is overridden for the cell (as nnsight's ``skip``), so its parameters, the attributes
  its parent reads (HF's ``attention_type``, ``layer_idx``) and the state-dict keys stay. It applies
  when a group is exactly the state of one module (a residual block, a transformer layer, a linear
  layer with a square weight) that maps its input to an output of the same shape, checked on one probe
  batch; other groups get no skip cells and :class:`SkipPlan` says why.

The functions on state dicts are pure (new tensors for the changed entries, the caller's for the rest).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from criticality.core import surgery
from criticality.core.engine import iter_batches
from criticality.errors import CriticalityError

StateDict = dict[str, torch.Tensor]
OPS = ("final", "reinit", "rerandomize", "interpolate", "noise", "skip")
PAPER_OPS = ("reinit", "rerandomize")
NEW_OPS = ("interpolate", "noise", "skip")
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
DEFAULT_SIGMAS = (0.1, 0.25, 0.5, 1.0)
NOISE_SALT = 2_000_029  # noise draw (seed, group) uses generator seed SALT·(seed + 1) + crc32(group)
NOISE_CONVENTION = ("noise std per entry = sigma * ||theta_final - theta_source||_2 / sqrt(n), over the group's n "
                    "floating-point parameter entries (the RMS of its training movement); buffers get no noise; "
                    "z ~ N(0, I) drawn per (seed, group), shared by every sigma and alpha")


def check_ops(ops: Sequence[str]) -> tuple[str, ...]:
    """The grid's ops, validated; ``final`` is implied (the grid always holds the trained model)."""
    if isinstance(ops, str):
        ops = [o for o in ops.split(",") if o]
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        raise CriticalityError(f"unknown op {unknown[0]!r}; choose from {', '.join(OPS[1:])}")
    return tuple(dict.fromkeys(o for o in ops if o != "final"))


def check_unit(values: Sequence[float], what: str, *, zero: bool = True) -> tuple[float, ...]:
    """Sorted, distinct values in [0, 1] (``zero=False``: in (0, 1])."""
    out = tuple(sorted({float(v) for v in values}))
    bad = [v for v in out if not (0.0 <= v <= 1.0) or (v == 0.0 and not zero) or math.isnan(v)]
    if bad or not out:
        raise CriticalityError(f"{what} must be {'' if zero else 'positive '}numbers in [0, 1], got {list(values)}")
    return out


# ----------------------------------------------------------------------------- noise (pure)


def parameter_keys(keys: Collection[str], state: Mapping[str, torch.Tensor], buffer_keys: Collection[str]) -> list[str]:
    """The group's floating-point parameter keys: the entries that receive noise."""
    buffers = set(buffer_keys)
    return [k for k in keys if k not in buffers and state[k].is_floating_point()]


def noise_scale(final: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], keys: Sequence[str]) -> float:
    """``s = ‖θ_final − θ_source‖₂ / √n`` over ``keys`` (float64): the RMS of the group's movement."""
    if not keys:
        return 0.0
    sq = sum(float((final[k].detach().double().cpu() - source[k].detach().double().cpu()).pow(2).sum()) for k in keys)
    n = sum(final[k].numel() for k in keys)
    return math.sqrt(sq / n) if n else 0.0


def noise_generator(seed: int, group: str) -> torch.Generator:
    """The generator of noise draw ``seed`` for ``group``: independent across groups and seeds."""
    return torch.Generator().manual_seed(NOISE_SALT * (seed + 1) + zlib.crc32(group.encode()))


def add_noise(state: Mapping[str, torch.Tensor], keys: Sequence[str], std: float,
              generator: torch.Generator, ties: Mapping[str, str] | None = None) -> StateDict:
    """A copy of ``state`` with ``N(0, std²)`` noise added to every entry of ``keys``.

    ``z`` is drawn on the CPU in float32, key by key in ``keys`` order, so a draw does not depend on the
    device. ``ties`` maps a key to the first key of the same tied tensor, which gives it the same values.
    """
    out: dict[str, torch.Tensor] = {}  # the new entries; ``state`` is read for ``keys`` only
    ties = ties or {}
    for k in keys:
        if k in ties and ties[k] in state and ties[k] != k:
            out[k] = out[ties[k]] if ties[k] in out else state[ties[k]]
            continue
        v = state[k].detach()
        z = torch.randn(v.shape, generator=generator, dtype=torch.float32)
        out[k] = (v + (std * z).to(device=v.device, dtype=v.dtype)) if std else v.clone()
    return surgery.Overlay(state, out)


def tied_keys(model: nn.Module) -> dict[str, str]:
    """Each state-dict key of a tied tensor → the first key naming that tensor."""
    first: dict[int, str] = {}
    out = {}
    for k, v in model.state_dict(keep_vars=True).items():
        out[k] = first.setdefault(id(v), k)
    return {k: f for k, f in out.items() if k != f}


# ----------------------------------------------------------------------------- the grid's cells


def cell_state(plan: Any, cell: Any) -> StateDict:
    """The full state dict of an ``interpolate`` / ``noise`` / ``skip`` cell of ``plan`` (an analysis Plan)."""
    final = plan.checkpoints[plan.final_epoch]
    if cell.op == "skip":
        return surgery.Overlay(final, {})  # the weights stay; the module's forward changes (see skipping())
    keys = _moving(plan, cell)
    source = plan.checkpoints[cell.checkpoint]
    state = surgery.Overlay(final, {})  # read per key: a lazy final checkpoint is never loaded whole
    if cell.op == "interpolate" or cell.alpha is not None:
        state = surgery.interpolate(final, source, keys, cell.alpha)
    if cell.op == "noise":
        params = parameter_keys(keys, final, surgery.buffer_keys(plan.model))
        scale = noise_scale(final, source, params)
        state = add_noise(state, params, cell.sigma * scale, noise_generator(cell.seed, cell.group),
                          tied_keys(plan.model))
    return state


def moved_keys(plan: Any, cell: Any) -> tuple[str, ...]:
    """The keys :func:`cell_state` gives new tensors, known without doing the surgery."""
    if cell.op == "skip":
        return ()
    keys = _moving(plan, cell)
    if cell.op == "interpolate" or cell.alpha is not None:
        return tuple(keys)
    final = plan.checkpoints[plan.final_epoch]
    return tuple(parameter_keys(keys, final, surgery.buffer_keys(plan.model)))


def _moving(plan: Any, cell: Any) -> list[str]:
    keys = plan.keys(cell.group)
    if plan.buffers == "keep":
        kept = surgery.buffer_keys(plan.model)
        keys = tuple(k for k in keys if k not in kept)
    return list(keys)


# ----------------------------------------------------------------------------- skip


@dataclass(frozen=True)
class SkipPlan:
    """Which groups can be skipped: group → module path, the module's return structure, and refusals."""

    paths: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)  # path → 0 (returns a tensor) or tuple length
    refused: dict[str, str] = field(default_factory=dict)  # group → why it gets no skip cells


def plan_skips_on(model: nn.Module, groups: Mapping[str, Sequence[str]], data: Any, batch_size: int) -> SkipPlan:
    """:func:`plan_skips` on the first (at most 2) examples of the evaluation ``data``."""
    if data is None:
        raise CriticalityError("the skip op needs data to check each module's input and output shapes")
    first = next(iter_batches(data, min(batch_size, 2)), None)
    if first is None:
        raise CriticalityError("no data to evaluate on")
    device = next(iter(model.state_dict().values()), torch.empty(0)).device
    inputs = first[0]
    inputs = {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, Mapping) else inputs.to(device)
    return plan_skips(model, groups, inputs)


def module_of(model: nn.Module, keys: Collection[str], name: str | None = None) -> str | None:
    """Path of the module whose state-dict keys are exactly ``keys`` (the one named ``name`` if it is one of
    them, else the outermost), or None. The root module itself never counts."""
    wanted = set(keys)
    hits = []
    for path, module in model.named_modules():
        if not path:
            continue
        own = {f"{path}.{k}" for k in module.state_dict(keep_vars=True)}
        if own == wanted:
            hits.append(path)
    if name in hits:
        return name
    return min(hits, key=lambda p: p.count("."), default=None)


def plan_skips(model: nn.Module, groups: Mapping[str, Sequence[str]], probe: Any) -> SkipPlan:
    """Find each group's module and check on ``probe`` (a batch of inputs) that it maps a shape to itself."""
    paths, refused = {}, {}
    for group, keys in groups.items():
        path = module_of(model, keys, group)
        if path is None:
            refused[group] = "its keys are not the state of one module (several modules, or part of one)"
        else:
            paths[group] = path
    seen = _probe_io(model, sorted(set(paths.values())), probe)
    outputs = {}
    for group, path in list(paths.items()):
        io = seen.get(path)
        why = _skip_refusal(io)
        if why:
            refused[group] = f"module {path!r} {why}"
            del paths[group]
        else:
            outputs[path] = io["outputs"]
    if not paths:
        reasons = "; ".join(f"{g}: {r}" for g, r in refused.items())
        raise CriticalityError(f"no group can be skipped ({reasons})")
    return SkipPlan(paths, outputs, refused)


def _skip_refusal(io: dict | None) -> str | None:
    if io is None:
        return "is not called in the model's forward"
    if io["input"] is None:
        return "takes no tensor input"
    if io["output"] is None:
        return f"returns a {io['type']}, not a tensor or a tuple starting with one"
    if io["input"] != io["output"]:
        return f"maps shape {io['input']} to {io['output']}: the identity cannot replace it"
    return None


def _probe_io(model: nn.Module, paths: Sequence[str], probe: Any) -> dict[str, dict]:
    """Input/output shapes and return structure of the modules at ``paths`` on one forward of ``probe``."""
    seen: dict[str, dict] = {}

    def hook(path):
        def record(module, args, kwargs, output):
            x = hidden_input(args, kwargs)
            first = output[0] if isinstance(output, tuple) and output else output
            seen.setdefault(path, {
                "input": tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else None,
                "output": tuple(first.shape[1:]) if isinstance(first, torch.Tensor) else None,
                "outputs": len(output) if isinstance(output, tuple) else 0,
                "type": type(output).__name__})
        return record

    handles = [model.get_submodule(p).register_forward_hook(hook(p), with_kwargs=True) for p in paths]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            call_model(model, probe)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return seen


def hidden_input(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """A module's hidden-state input: the first positional tensor, else the ``hidden_states`` keyword."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    x = kwargs.get("hidden_states")
    return x if isinstance(x, torch.Tensor) else None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict of model kwargs, else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def _identity(outputs: int | None, module: nn.Module | None = None):
    """A forward that returns its hidden-state input in a return structure of ``outputs`` (0: a tensor).

    ``outputs=None``: the structure is learnt from one call of ``module``'s own forward, on the first call.
    """
    known = {} if outputs is None else {"n": outputs}

    def forward(*args, **kwargs):
        x = hidden_input(args, kwargs)
        if "n" not in known:
            out = type(module).forward(module, *args, **kwargs)
            known["n"] = len(out) if isinstance(out, tuple) else 0
        return x if known["n"] == 0 else (x, *([None] * (known["n"] - 1)))
    return forward


@contextlib.contextmanager
def skipping(model: nn.Module, paths: Sequence[str],
             outputs: Mapping[str, int] | None = None) -> Iterator[nn.Module]:
    """Temporarily make the modules at ``paths`` of ``model`` return their input; restored on exit.
    ``outputs``: each module's return structure (see :class:`SkipPlan`), learnt on first use when absent."""
    modules = [model.get_submodule(p) for p in paths]
    try:
        for p, m in zip(paths, modules, strict=True):
            m.forward = _identity((outputs or {}).get(p), m)  # an instance attribute shadows the class's forward
        yield model
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)


def summary(plan: Any) -> dict[str, Any]:
    """What the analysis summary records about the ops that ran (nothing for the paper's two alone)."""
    cells = [c for c in plan.cells if c.op in NEW_OPS]
    if not cells:
        return {}
    out: dict[str, Any] = {"ops": sorted({c.op for c in plan.cells if c.op != "final"}, key=OPS.index)}
    if any(c.op == "interpolate" for c in cells):
        out["alphas"] = sorted({c.alpha for c in cells if c.op == "interpolate"})
    noise = [c for c in cells if c.op == "noise"]
    if noise:
        final = plan.checkpoints[plan.final_epoch]
        buffers = surgery.buffer_keys(plan.model)
        scales = {}
        for c in {(c.group, c.checkpoint): c for c in noise}.values():
            keys = parameter_keys(_moving(plan, c), final, buffers)
            scales[c.group] = noise_scale(final, plan.checkpoints[c.checkpoint], keys)
        out["noise"] = {"convention": NOISE_CONVENTION, "sigmas": sorted({c.sigma for c in noise}),
                        "draws": sorted({c.seed for c in noise}), "scale": scales}
    if any(c.op == "skip" for c in cells) or plan.skips.refused:
        out["skip_modules"] = dict(plan.skips.paths)
        out["skip_refused"] = dict(plan.skips.refused)
    return out
