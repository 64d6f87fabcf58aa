"""Layer groups: which state-dict entries make up each "layer" that surgery resets together.

A group is an ordered tuple of state-dict keys (parameters *and* buffers). Ways to form groups:

- ``"model"``: the model's own ``layer_groups()`` (every zoo model declares one);
- ``"blocks"``: one group per block of the model's repeated stack (:func:`criticality.core.stacks.find_stack`:
  ``model.layers.3`` of a Llama, ``transformer.h.3`` of GPT-2, ``blocks.3`` or ``layer2.1`` of timm
  models), and every other module that holds state *around* the stack as one group each: the
  embeddings, the final norm, the head (``model.embed_tokens``, ``model.norm``, ``lm_head``); raw tensors
  of a module that contains the stack (timm's ``cls_token``, ``pos_embed``) form one group named by
  them (``cls_token+pos_embed``). Without a stack: each top-level module that holds state;
- ``"sublayers"``: like ``"blocks"``, but each transformer block splits into its attention part and its
  MLP part, each with the norm layers that belong to it (:func:`sublayer_parts`): ``model.layers.3.self_attn``
  (``input_layernorm`` + ``self_attn``) and ``model.layers.3.mlp`` (``post_attention_layernorm`` + ``mlp``);
  blocks that are not transformer blocks stay whole;
- ``"auto"``: each module that owns tensors, with every norm layer merged into a neighbour so running
  statistics and affine parameters travel with a layer. Inside the stack's transformer blocks a norm
  joins the first layer of the sub-layer it belongs to (Llama's ``input_layernorm`` joins
  ``self_attn.q_proj``), read from the block's layout (names, then registration order: pre-norm), not
  from a probe forward, so no data is needed. Elsewhere a norm joins the layer registered before it
  (post-norm conv + BatchNorm nets; a pre-activation net wants ``"blocks"`` or a mapping);
- an explicit mapping ``{name: [keys, module prefixes or glob patterns]}``.

:func:`default_spec` picks ``"model"`` when the model declares ``layer_groups()``, else ``"blocks"``
when it has a stack, else ``"auto"``. Norm layers are recognised by class (torch's norms) or by name
(any ``*Norm*`` class with a ``weight``: ``LlamaRMSNorm``, …). Patterns match a key when equal to it,
when they are a module prefix of it (``fc1`` matches ``fc1.weight``), or as a glob
(``stage2.*.conv1.*``). A pattern that matches nothing is an error. Tied parameters (one tensor under
several names) always land in one group, named after all its holders (``transformer.wte+lm_head``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from criticality.core.stacks import find_stack, holds_state, is_norm
from criticality.core.state import tied_keys
from criticality.errors import CriticalityError

GroupSpec = str | Mapping[str, Sequence[str]]
SPECS = ("model", "blocks", "sublayers", "auto")


@dataclass(frozen=True)
class Groups:
    """Named groups of state-dict keys, in input-to-output order, plus the keys left out."""

    members: dict[str, tuple[str, ...]]
    unassigned: tuple[str, ...] = ()
    spec: str = "mapping"  # how they were formed: one of SPECS, or "mapping"

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


def default_spec(model: nn.Module) -> str:
    """``"model"`` when the model declares its groups, else ``"blocks"`` when it has a stack, else ``"auto"``."""
    if callable(getattr(model, "layer_groups", None)):
        return "model"
    return "blocks" if find_stack(model) else "auto"


def resolve(model: nn.Module, spec: GroupSpec | None = None) -> Groups:
    """Form the groups of ``model`` according to ``spec`` (see the module docstring; None: :func:`default_spec`)."""
    keys = list(model.state_dict().keys())
    spec = default_spec(model) if spec is None else spec
    if isinstance(spec, Mapping):
        named = check_mapping(spec)
    elif spec == "model":
        if not callable(getattr(model, "layer_groups", None)):
            raise CriticalityError(f"{type(model).__name__} declares no layer_groups(); use groups='blocks', "
                                   "'sublayers', 'auto' or an explicit mapping")
        named = model.layer_groups()
    elif spec in ("blocks", "sublayers"):
        named = _blocks(model, split=spec == "sublayers")
    elif spec == "auto":
        named = _auto(model)
    else:
        raise CriticalityError(f"unknown group spec {spec!r}; use {', '.join(map(repr, SPECS))} or a mapping")
    members = {name: select(keys, patterns, f"group {name!r}") for name, patterns in named.items()}
    groups = _finish(model, members, keys)
    return Groups(groups.members, groups.unassigned, spec if isinstance(spec, str) else "mapping")


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
    for tied in tied_keys(model):
        holders = {owner.get(k) for k in tied}
        if len(holders) > 1:
            raise CriticalityError(f"tied parameters {', '.join(tied)} must be in one group, "
                                   f"found in {sorted(map(str, holders))}")
    return Groups(members, tuple(k for k in keys if k not in owner))


def _own_keys(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}{k}" for k in module.state_dict(keep_vars=True) if "." not in k]


def _auto(model: nn.Module) -> dict[str, list[str]]:
    """Each module owning tensors, with every norm layer merged into the layer it belongs to (see module doc)."""
    feeds = _norms_feeding(model)
    blocks = [p for p, _ in find_stack(model)]

    def inside(path: str) -> bool:
        return any(path == b or path.startswith(b + ".") for b in blocks)

    groups: dict[str, list[str]] = {}
    owner_of: dict[str, str] = {}  # module path -> the group its own tensors went to
    last, orphans = None, []
    for name, module in model.named_modules():
        own = _own_keys(module, f"{name}." if name else "")
        if not own:
            continue
        if name in feeds:
            orphans.append((feeds[name], own))  # placed once the layer it feeds has a group
        elif is_norm(module) and last is not None and inside(last) and not inside(name):
            groups[name] = own  # the final norm after the stack is no part of the last block
            last = name
        elif is_norm(module) and last is not None:
            groups[last] += own  # post-norm order: a norm travels with the layer before it
        elif is_norm(module):
            orphans.append((None, own))  # a leading norm: joins the first layer
        else:
            last = name or "+".join(own)  # the root's raw tensors: cls_token+pos_embed
            groups[last] = own
            owner_of[name] = last
    for target, own in orphans:
        group = owner_of.get(target) if target is not None else next(iter(groups), None)
        if group is None:
            group = target or "_root"
            groups[group] = []
        groups[group] += own
    return _merge_tied(model, groups)


def _norms_feeding(model: nn.Module) -> dict[str, str]:
    """Norms of the stack's transformer blocks -> path of the first layer of the sub-layer they belong to."""
    out: dict[str, str] = {}
    for path, block in find_stack(model):
        for part in sublayer_parts(block):
            first = next((f"{path}.{c}.{n}".rstrip(".") for c in part.layers
                          for n, m in block.get_submodule(c).named_modules()
                          if _own_keys(m, "") and not is_norm(m)), None)
            out |= {f"{path}.{norm}": first for norm in part.norms if first is not None}
    return out


def _blocks(model: nn.Module, split: bool = False) -> dict[str, list[str]]:
    """One group per block of the stack, and every state-holding module around it (see module doc).

    ``split=True`` cuts each transformer block into its sub-layers (``"sublayers"``).
    """
    stack = dict(find_stack(model))
    ancestors = {".".join(p.split(".")[:i]) for p in stack for i in range(p.count(".") + 1)} or {""}
    groups: dict[str, list[str]] = {}

    def walk(path: str, module: nn.Module) -> None:
        if path in stack:
            if not holds_state(module):  # a declared stage without state (flatten, pooling)
                return
            parts = sublayer_parts(module) if split else []
            for part in parts:
                groups[f"{path}.{'+'.join(part.layers)}"] = [f"{path}.{c}" for c in (*part.norms, *part.layers)]
            if not parts:
                groups[path] = [path]
            return
        if path not in ancestors:
            if holds_state(module):
                groups[path] = [path]
            return
        own = _own_keys(module, f"{path}." if path else "")
        if own:  # raw tensors on an ancestor (timm's cls_token, pos_embed): one group, named by them
            groups["+".join(own)] = own
        for name, child in module.named_children():
            walk(f"{path}.{name}" if path else name, child)

    walk("", model)
    return _merge_tied(model, groups)


@dataclass(frozen=True)
class Part:
    """One sub-layer of a transformer block: its layers (child names) and the norms that belong to it."""

    layers: tuple[str, ...]
    norms: tuple[str, ...] = ()


_ATTENTION = re.compile(r"attn|attention", re.I)
_MLP = re.compile(r"mlp|ffn|feed_?forward|intermediate|moe|^output$|^fc\d?$", re.I)  # Mixtral: block_sparse_moe
_NORM_TO_ATTENTION = re.compile(r"input|before|ln_?1$|norm1$|pre_attn|attn_?(layer_?)?norm|attention_?(layer_?)?norm",
                                re.I)  # OPT/BART/Whisper: self_attn_layer_norm
_NORM_TO_MLP = re.compile(r"post_attention|after|ln_?2$|norm2$|ffn_(layer_?)?norm|feedforward|mlp_norm"
                          r"|final_layer_norm", re.I)  # OPT/BART: final_layer_norm feeds fc1


def sublayer_parts(block: nn.Module) -> list[Part]:
    """A transformer block's sub-layers: each attention child, then the MLP children, with their norms.

    A norm (recognised by :func:`~criticality.core.stacks.is_norm`, RMSNorm variants included) goes to the part
    its name says it feeds (Llama ``input_layernorm`` -> attention, ``post_attention_layernorm`` -> MLP;
    GPT-2 ``ln_1``/``ln_2``; ViT ``layernorm_before``/``_after``; timm ``norm1``/``norm2``), else to the
    next part in registration order (pre-norm). Norms nested inside a part stay there (BERT's post-norms:
    ``attention.output.LayerNorm`` is attention's, ``output.LayerNorm`` the MLP's). Any other state-holding
    child (timm's LayerScale ``ls1``) joins the part registered before it. A block without an attention
    and an MLP child is not a transformer block: ``[]`` (it stays one group).
    """
    children = [(n, c) for n, c in block.named_children() if holds_state(c)]
    attention = [n for n, c in children if _ATTENTION.search(n) and not is_norm(c)]
    mlp = [n for n, c in children if _MLP.search(n) and not is_norm(c) and n not in attention]
    if not attention or not mlp:
        return []
    layers = {n: [n] for n in attention} | {mlp[0]: list(mlp)}
    norms: dict[str, list[str]] = {n: [] for n in layers}
    order = [n for n, _ in children]
    for i, (name, child) in enumerate(children):
        before = [n for n in order[:i] if n in layers]
        after = [n for n in order[i:] if n in layers]
        if name in attention or name in mlp:
            continue
        if not is_norm(child):
            layers[(before or after)[-1 if before else 0]].append(name)
        elif _NORM_TO_MLP.search(name):  # before the attention test: "post_attention_norm" feeds the MLP
            norms[mlp[0]].append(name)
        elif _NORM_TO_ATTENTION.search(name):
            norms[attention[0]].append(name)
        else:  # pre-norm: the next part in registration order, else the last one
            norms[after[0] if after else list(layers)[-1]].append(name)
    return [Part(tuple(layers[n]), tuple(norms[n])) for n in layers]


def _merge_tied(model: nn.Module, groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """Fold groups that share a tied tensor into the first of them, renamed ``first+second`` (``wte+lm_head``)."""
    for tied in tied_keys(model):
        holders = [g for g, pats in groups.items() if any(matches(k, p) for k in tied for p in pats)]
        if len(holders) > 1:
            merged = [p for g in holders for p in groups[g]]
            groups = {("+".join(holders) if g == holders[0] else g): (merged if g == holders[0] else pats)
                      for g, pats in groups.items() if g not in holders[1:]}
    # The duplicate name of a tied tensor may sit in no group at all: add it to its partner's group.
    for tied in tied_keys(model):
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
