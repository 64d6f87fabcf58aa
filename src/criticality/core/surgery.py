"""Model surgery as pure functions on state dicts.

Every function returns a new state dict and never mutates its inputs: replaced entries are fresh tensors,
the other entries are the caller's own tensors, shared and left untouched. Key accounting is strict: a
key that is absent from either side is an error, never a silent no-op. The result is an :class:`Overlay`
(a read-only mapping: the new tensors over the base): the base is read only for the keys asked, so a
lazy checkpoint (:mod:`criticality.trajectory`) is never loaded whole; ``dict(out)`` gives a plain dict.

- :func:`reinit` puts a group back to its values at an earlier checkpoint.
- :func:`rerandomize` puts a group to a fresh draw from the initializer (:func:`fresh_state`,
  :func:`fresh_group` for one group's modules only).
- :func:`interpolate` moves a group along the straight line between two checkpoints.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Iterator, Mapping

import torch
from torch import nn

from criticality.core.initializers import InitScheme, draw_seed, module_scheme, scheme_name
from criticality.core.state import first_of_tied, moving_keys
from criticality.errors import CriticalityError

StateDict = dict[str, torch.Tensor]


class Overlay(Mapping):
    """``base`` with the entries of ``changed`` replaced: a state dict that reads ``base[key]`` only when
    that key is asked for. ``changed`` holds exactly the entries that differ from ``base`` (what the
    engine swaps in); an overlay over an overlay keeps one base."""

    def __init__(self, base: Mapping[str, torch.Tensor], changed: Mapping[str, torch.Tensor]):
        if isinstance(base, Overlay):
            base, changed = base.base, {**base.changed, **changed}
        self.base, self.changed = base, dict(changed)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.changed[key] if key in self.changed else self.base[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __contains__(self, key: object) -> bool:
        return key in self.base

    def __repr__(self) -> str:
        return f"Overlay({len(self.changed)} of {len(self)} entries changed)"


def replace(base: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor],
            keys: Collection[str], *, copy: bool = True) -> Overlay:
    """``base`` whose ``keys`` are taken from ``source`` (copies; ``copy=False`` takes ``source``'s tensors
    themselves, for a source the caller owns and never writes, such as a fresh draw)."""
    _check_keys(base, source, keys)
    return Overlay(base, {k: source[k].detach().clone() if copy else source[k].detach() for k in keys})


def reinit(final: Mapping[str, torch.Tensor], checkpoint: Mapping[str, torch.Tensor], keys: Collection[str],
           *, buffers: str = "reset", buffer_keys: Collection[str] = ()) -> Overlay:
    """Re-initialization: ``final`` with the group ``keys`` taken from ``checkpoint``.

    ``buffers="reset"`` takes every key of the group from the checkpoint (running statistics included);
    ``"keep"`` leaves the keys listed in ``buffer_keys`` as trained.
    """
    return replace(final, checkpoint, moving_keys(keys, buffers, buffer_keys))


def rerandomize(final: Mapping[str, torch.Tensor], fresh: Mapping[str, torch.Tensor], keys: Collection[str],
                *, buffers: str = "reset", buffer_keys: Collection[str] = (), copy: bool = True) -> Overlay:
    """Re-randomization: ``final`` with the group ``keys`` taken from a fresh draw (see :func:`fresh_state`);
    ``copy=False``: the draw's own tensors (see :func:`replace`)."""
    return replace(final, fresh, moving_keys(keys, buffers, buffer_keys), copy=copy)


def interpolate(final: Mapping[str, torch.Tensor], checkpoint: Mapping[str, torch.Tensor],
                keys: Collection[str], alpha: float) -> Overlay:
    """``final`` with the group at ``(1 - alpha) * checkpoint + alpha * final`` (alpha = 1: unchanged).

    Integer entries (BatchNorm's ``num_batches_tracked``) cannot be interpolated: they come from
    ``final`` when ``alpha >= 0.5`` and from ``checkpoint`` otherwise.
    """
    _check_keys(final, checkpoint, keys)
    out = {}
    for k in keys:
        a, b = checkpoint[k], final[k]
        if a.is_floating_point():
            out[k] = torch.lerp(a.detach(), b.detach().to(a.dtype), alpha)
        else:
            out[k] = (b if alpha >= 0.5 else a).detach().clone()
    return Overlay(final, out)


def fresh_state(model: nn.Module, init: InitScheme, seed: int, *,
                start: Mapping[str, torch.Tensor] | None = None) -> StateDict:
    """The state dict of a fresh copy of ``model`` drawn by ``init`` from ``seed`` (every key).

    The draw goes module by module, children before parents (as models initialize on construction),
    each module from its own generator seeded by ``draw_seed(seed, module path)``: a module's draw does
    not depend on which other modules are drawn, so :func:`fresh_group` can draw one group alone and get
    the same tensors. (The first version drew the whole model from one generator: its draws for a given
    seed differ.) ``init="shuffle"`` permutes each tensor of ``start`` (the epoch-0
    state) instead. The copy lives on the CPU, so the draw is the same whatever device ``model`` sits on.
    Every floating-point parameter must be drawn anew (one the scheme leaves alone would keep the values
    of the model passed in): such a parameter is an error.
    """
    return _fresh(model, init, seed, list(model.state_dict().keys()), start, whole=True)


def fresh_group(model: nn.Module, init: InitScheme, seed: int, keys: Collection[str], *,
                start: Mapping[str, torch.Tensor] | None = None) -> StateDict:
    """``fresh_state(model, init, seed)`` restricted to ``keys``, drawing only the modules that hold them.

    The modules run are the holders of ``keys`` and their ancestors (whose init may write into their
    children: GPT-2's attention scales its ``c_proj``), on a copy of the model whose other tensors are
    on the ``meta`` device: memory is the group's, not the model's. Equality with :func:`fresh_state`
    holds when an ancestor's init draws only tensors of the same group before drawing a group tensor (true
    of torch, HF and timm inits with the built-in groupings; checked by the tests). A callable ``init``
    has no per-module form: it runs on a whole-model CPU copy, and ``keys`` are taken from it.
    """
    return _fresh(model, init, seed, list(keys), start, whole=False)


def _fresh(model: nn.Module, init: InitScheme, seed: int, keys: list[str],
           start: Mapping[str, torch.Tensor] | None, whole: bool) -> StateDict:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"a fresh draw takes an integer seed, got {type(seed).__name__}")
    absent = [k for k in keys if k not in model.state_dict(keep_vars=True)]
    if absent or not keys:
        raise CriticalityError(f"a fresh draw of keys the model does not have: {', '.join(absent[:8])}" if absent
                               else "a fresh draw of an empty group of keys")
    if init == "shuffle":
        return _shuffled(model, seed, keys, start)
    if callable(init):
        whole, run = True, None
    else:
        one = module_scheme(init)
        owners = {k.rpartition(".")[0] for k in keys}
        wanted = {".".join(o.split(".")[:i]) for o in owners for i in range(o.count(".") + 2)} | {""}
        run = [p for p, _ in _post_order(model) if whole or p in wanted]
    fresh = _copy(model, None if whole else {*keys, *_own_keys(model, run or [])})
    state = fresh.state_dict(keep_vars=True)
    params = {id(p) for p in fresh.parameters()}
    with torch.no_grad():
        for k in state:
            if id(state[k]) in params and state[k].is_floating_point():
                state[k].fill_(float("nan"))  # a marker: whatever the scheme does not draw stays NaN
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        if run is None:
            torch.default_generator.manual_seed(draw_seed(seed, ""))
            init(fresh)
        else:
            for path in run:
                torch.default_generator.manual_seed(draw_seed(seed, path))
                one(fresh.get_submodule(path), path, fresh)
    state = fresh.state_dict(keep_vars=True)
    missed = [k for k in keys if id(state[k]) in params and state[k].is_floating_point() and state[k].isnan().any()]
    if missed:
        raise CriticalityError(f"the init scheme {scheme_name(init)!r} does not draw {', '.join(missed[:6])}"
                               f"{' …' if len(missed) > 6 else ''}: use init='shuffle' (each tensor gets its "
                               "initial values in a random order; works for any model), or give analyze() an "
                               "init=callable that initializes every parameter (e.g. the model's own init)")
    return {k: state[k].detach() for k in keys}


def _shuffled(model: nn.Module, seed: int, keys: list[str], start: Mapping[str, torch.Tensor] | None) -> StateDict:
    """Each tensor's ``start`` values in a random order; tied names share one permutation (of the first name)."""
    if start is None:
        raise CriticalityError("init='shuffle' needs the initial (epoch-0) state to permute")
    first = first_of_tied(model)
    out = {}
    for k in keys:
        t0 = start[k].detach().to("cpu")
        g = torch.Generator().manual_seed(draw_seed(seed, first.get(k, k)))
        out[k] = t0.reshape(-1)[torch.randperm(t0.numel(), generator=g)].reshape(t0.shape)
    return out


def _post_order(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module as ``(path, module)``, children before their parent, in registration order."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(path: str, module: nn.Module) -> None:
        seen.add(id(module))
        for name, child in module.named_children():
            if id(child) not in seen:
                visit(f"{path}.{name}" if path else name, child)
        out.append((path, module))

    visit("", model)
    return out


def _own_keys(model: nn.Module, paths: list[str]) -> set[str]:
    """State-dict keys of the tensors the modules at ``paths`` hold themselves (not their children's)."""
    out = set()
    for p in paths:
        out |= {f"{p}.{k}" if p else k for k in model.get_submodule(p).state_dict(keep_vars=True) if "." not in k}
    return out


def _copy(model: nn.Module, real: set[str] | None) -> nn.Module:
    """A copy of ``model`` whose state-dict entries in ``real`` (None: every tensor) are CPU clones and every
    other tensor is on the ``meta`` device (no memory). Tied tensors stay tied; HF's ``_is_hf_initialized``
    flags do not carry over (new tensor objects)."""
    everything = [t for _, t in (*model.named_parameters(remove_duplicate=False),
                                 *model.named_buffers(remove_duplicate=False))]
    real_ids = ({id(t) for t in everything} if real is None else
                {id(t) for k, t in model.state_dict(keep_vars=True).items() if k in real})
    memo: dict[int, object] = {}
    for t in everything:
        if id(t) in memo or t is None:
            continue
        data = t.detach().to("cpu", copy=True) if id(t) in real_ids else torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
    return copy.deepcopy(model, memo)


def recalibrate(model: nn.Module, state: Mapping[str, torch.Tensor], keys: Collection[str],
                batches: Iterable[torch.Tensor]) -> Overlay:
    """``state`` with the running statistics of the norm layers among ``keys`` recomputed.

    The variant model runs forward over ``batches`` (training inputs) with those norm layers in training
    mode and ``momentum=None`` (an exact average over the batches); everything else stays in eval mode
    and no parameter changes. Other groups' buffers stay as they are in ``state``.
    """
    keys = set(keys)
    if not _norms(model, keys):  # nothing to recompute: no copy of the model
        return Overlay(state, {})
    m = copy.deepcopy(model).to("cpu").eval()
    m.load_state_dict(state)
    norms = _norms(m, keys)
    for mod in norms:
        mod.reset_running_stats()
        mod.momentum = None
        mod.train()
    with torch.no_grad():
        for x in batches:
            m(x.to("cpu"))
    fresh = m.state_dict()
    return Overlay(state, {k: fresh[k].detach().clone() for k in keys
                           if k.endswith(("running_mean", "running_var", "num_batches_tracked"))})


def _norms(model: nn.Module, keys: Collection[str]) -> list[nn.Module]:
    """The BatchNorm layers whose running statistics are among ``keys``."""
    return [mod for name, mod in model.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
            and f"{name}.running_mean" in keys]


def _check_keys(base: Mapping, source: Mapping, keys: Collection[str]) -> None:
    if not keys:
        raise CriticalityError("surgery on an empty group of keys")
    for side, d in (("the model's state", base), ("the source state", source)):
        absent = [k for k in keys if k not in d]
        if absent:
            raise CriticalityError(f"keys not in {side}: {', '.join(absent[:8])}")
    for k in keys:
        if _shape(base, k) != _shape(source, k):
            raise CriticalityError(f"shape of {k!r} differs: {_shape(base, k)} vs {_shape(source, k)}")


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """A tensor's shape; a lazy checkpoint tells it from its file header, without reading the tensor."""
    if isinstance(state, Overlay) and key not in state.changed:
        state = state.base
    shape_of = getattr(state, "shape_of", None)
    return tuple(shape_of(key)) if callable(shape_of) else tuple(state[key].shape)
