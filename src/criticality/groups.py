"""Layer groups: which state-dict entries make up each "layer" that surgery resets together.

A group is an ordered tuple of state-dict keys (parameters *and* buffers). Ways to form groups:

- ``"model"``: the model's own ``layer_groups()`` (every zoo model declares one; the default when present);
- ``"auto"``: each module that owns parameters, with a following norm layer (BatchNorm, LayerNorm,
  GroupNorm) merged into it, so running statistics and affine parameters travel with their layer.
  "Following" means registration order, which suits post-norm nets; in a pre-activation net the norm
  comes *before* its conv, so use ``"blocks"`` or a mapping there;
- ``"blocks"``: each child of an ``nn.Sequential``/``nn.ModuleList`` stage (e.g. residual blocks), and
  each other top-level module that holds state;
- an explicit mapping ``{name: [keys, module prefixes or glob patterns]}``.

Patterns match a key when equal to it, when they are a module prefix of it (``fc1`` matches
``fc1.weight``), or as a glob (``stage2.*.conv1.*``). A pattern that matches nothing is an error.
Tied parameters (one tensor under several names) always land in one group.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from criticality.errors import CriticalityError

GroupSpec = str | Mapping[str, Sequence[str]]
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_CONTAINERS = (nn.Sequential, nn.ModuleList)


@dataclass(frozen=True)
class Groups:
    """Named groups of state-dict keys, in input-to-output order, plus the keys left out."""

    members: dict[str, tuple[str, ...]]
    unassigned: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return list(self.members)

    def coverage(self) -> dict[str, list[str]]:
        """Which keys are in which group; ``_unassigned`` lists those that stay as trained."""
        return {**{g: list(k) for g, k in self.members.items()}, "_unassigned": list(self.unassigned)}


def matches(key: str, pattern: str) -> bool:
    return key == pattern or key.startswith(pattern + ".") or fnmatch.fnmatchcase(key, pattern)


def select(keys: Sequence[str], patterns: Sequence[str], what: str = "group") -> tuple[str, ...]:
    """The keys matched by any of ``patterns``, in ``keys`` order; a dead pattern is an error."""
    if isinstance(patterns, str):
        patterns = [patterns]
    for p in patterns:
        if not any(matches(k, p) for k in keys):
            raise CriticalityError(f"{what}: pattern {p!r} matches no state-dict key of the model "
                                   f"(keys look like {', '.join(list(keys)[:4])}, …)")
    return tuple(k for k in keys if any(matches(k, p) for p in patterns))


def resolve(model: nn.Module, spec: GroupSpec = "model") -> Groups:
    """Form the groups of ``model`` according to ``spec`` (see the module docstring)."""
    keys = list(model.state_dict().keys())
    if isinstance(spec, Mapping):
        named = check_mapping(spec)
    elif spec == "model":
        if not hasattr(model, "layer_groups"):
            raise CriticalityError(f"{type(model).__name__} declares no layer_groups(); use groups='auto', "
                                   "'blocks' or an explicit mapping")
        named = model.layer_groups()
    elif spec == "auto":
        named = _auto(model)
    elif spec == "blocks":
        named = _blocks(model)
    else:
        raise CriticalityError(f"unknown group spec {spec!r}; use 'model', 'auto', 'blocks' or a mapping")
    members = {name: select(keys, patterns, f"group {name!r}") for name, patterns in named.items()}
    return _finish(model, members, keys)


def joint(groups: Groups, members: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """A joint group from member group names (or patterns over group names): ``(name, keys)``.

    The name joins the members with ``+`` (``fc2+fc3+fc4``), as the tables and figures expect.
    """
    names = [g for g in groups.names if any(g == m or fnmatch.fnmatchcase(g, m) for m in members)]
    for m in members:  # a plain name must exist; a glob may come up empty (alternatives for other depths)
        is_glob = any(c in m for c in "*?[")
        if not is_glob and m not in groups.names:
            raise CriticalityError(f"joint group member {m!r} names no group (groups: {', '.join(groups.names)})")
    if len(names) < 2:
        raise CriticalityError(f"a joint group needs at least two member groups, got {names}")
    keys = tuple(k for g in names for k in groups.members[g])
    return "+".join(names), keys


def _finish(model: nn.Module, members: dict[str, tuple[str, ...]], keys: list[str]) -> Groups:
    owner: dict[str, str] = {}
    for name, group_keys in members.items():
        if not group_keys:
            raise CriticalityError(f"group {name!r} is empty")
        for k in group_keys:
            if k in owner:
                raise CriticalityError(f"state-dict key {k!r} is in two groups: {owner[k]!r} and {name!r}")
            owner[k] = name
    for tied in _tied_keys(model):
        holders = {owner.get(k) for k in tied}
        if len(holders) > 1:
            raise CriticalityError(f"tied parameters {', '.join(tied)} must be in one group, "
                                   f"found in {sorted(map(str, holders))}")
    return Groups(members, tuple(k for k in keys if k not in owner))


def _tied_keys(model: nn.Module) -> list[tuple[str, ...]]:
    """Sets of state-dict keys that name one and the same tensor."""
    by_tensor: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(v), []).append(k)
    return [tuple(ks) for ks in by_tensor.values() if len(ks) > 1]


def _own_keys(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}{k}" for k in module.state_dict(keep_vars=True) if "." not in k]


def _auto(model: nn.Module) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    last = None
    for name, module in model.named_modules():
        own = _own_keys(module, f"{name}." if name else "")
        if not own:
            continue
        if isinstance(module, _NORMS) and last is not None:
            groups[last] += own  # a norm layer travels with the layer it follows
        else:
            last = name or type(module).__name__
            groups[last] = own
    return _merge_tied(model, groups)


def _blocks(model: nn.Module) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    last = None
    for name, child in model.named_children():
        units = list(child.named_children()) if isinstance(child, _CONTAINERS) else [("", child)]
        for sub, module in units:
            path = f"{name}.{sub}" if sub else name
            if not module.state_dict():
                continue
            if isinstance(module, _NORMS) and last is not None:
                groups[last].append(path)
            else:
                groups[path] = [path]
                last = path
    own = _own_keys(model, "")
    if own:
        groups["_root"] = own
    return _merge_tied(model, groups)


def _merge_tied(model: nn.Module, groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """Fold groups that share a tied tensor into the first of them."""
    for tied in _tied_keys(model):
        holders = [g for g, pats in groups.items() if any(matches(k, p) for k in tied for p in pats)]
        for g in holders[1:]:
            groups[holders[0]] += groups.pop(g)
    # The duplicate name of a tied tensor may sit in no group at all: add it to its partner's group.
    for tied in _tied_keys(model):
        for pats in groups.values():
            if any(matches(k, p) for k in tied for p in pats):
                pats += [k for k in tied if not any(matches(k, p) for p in pats)]
    return groups


def check_mapping(spec: Mapping, source: str = "groups") -> dict[str, list[str]]:
    """A user's ``{name: pattern or [patterns]}`` as ``{name: [patterns]}``; anything else is one clear line."""
    if not spec:
        raise CriticalityError(f"{source}: no groups given (expected {{name: [patterns]}})")
    out = {}
    for name, patterns in spec.items():
        if not isinstance(name, str) or not name.strip():
            raise CriticalityError(f"{source}: group names must be non-empty strings, got {name!r}")
        if isinstance(patterns, str):
            patterns = [patterns]
        if not isinstance(patterns, list | tuple):
            raise CriticalityError(f"{source}: group {name!r} must be a pattern or a list of patterns, "
                                   f"got {type(patterns).__name__} {patterns!r}")
        if not patterns:
            raise CriticalityError(f"{source}: group {name!r} has an empty list of patterns")
        bad = [p for p in patterns if not isinstance(p, str) or not p]
        if bad:
            raise CriticalityError(f"{source}: group {name!r}: patterns must be non-empty strings, got {bad[0]!r}")
        out[name] = list(patterns)
    return out
