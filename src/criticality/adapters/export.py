"""A model with some blocks of its stack removed, saved so that it loads without ``criticality``.

::

    save_pruned(model, state, ["model.layers.1", "model.layers.2"], "pruned/")  # HF: from_pretrained("pruned/")
    pruned = without_blocks(model, state, removed)                              # the same model, in memory

Hugging Face models (anything with ``config`` and ``save_pretrained``) are cut for real: the removed layers
leave their ``nn.ModuleList``, the kept ones are renumbered (every submodule's integer ``layer_idx``, which
the KV cache is indexed by: transformers #30508), the config's ``num_hidden_layers`` (or the name its
``attribute_map`` gives it, GPT-2's ``n_layer``) becomes the kept count and its per-layer lists (any list
with one entry per layer, such as ``layer_types``) lose the removed entries. ``save_pretrained`` writes it,
the source folder's tokenizer files are copied, and ``pruned.json`` records which layers went, by module path
and by original index, and which original layer each kept one was. Its logits equal those of the full
model with the removed blocks skipped (tested). Refused: stacks that are not one ``nn.ModuleList`` of
``num_hidden_layers`` layers (encoder-decoder models), and GPT-2 with ``scale_attn_by_inverse_layer_idx``
unless only its last layers go (its attention depends on the layer's index, so renumbering changes it).

Other models are not rebuilt (their forward may address blocks by name): ``model.safetensors`` holds the
state of the kept modules under their original keys and ``pruned.json`` the removed paths;
:func:`load_pruned` puts both into a freshly built model, whose removed blocks then return their input.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from criticality.errors import CriticalityError
from criticality.infra.files import atomic_path, read_json, write_json

StateDict = Mapping[str, torch.Tensor]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")


def is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and callable(getattr(model, "save_pretrained", None))


def _stack_of(model: nn.Module, removed: Sequence[str]) -> tuple[str, nn.ModuleList, list[int]]:
    """The ModuleList the removed blocks are children of, its path, and their indices in it."""
    if not removed:
        raise CriticalityError("no blocks to remove")
    parents = {p.rpartition(".")[0] for p in removed}
    if len(parents) != 1:
        raise CriticalityError(f"the removed blocks {list(removed)} are not children of one container")
    parent = parents.pop()
    container = model.get_submodule(parent) if parent else model
    if not isinstance(container, nn.ModuleList):
        raise CriticalityError(f"{parent!r} is a {type(container).__name__}, not the nn.ModuleList of the layers")
    names = [name for name, _ in container.named_children()]
    missing = [p for p in removed if p.rpartition(".")[2] not in names]
    if missing or len(set(removed)) != len(removed):
        raise CriticalityError(f"blocks {missing or list(removed)} are not distinct children of {parent!r}")
    return parent, container, sorted(names.index(p.rpartition(".")[2]) for p in removed)


def without_blocks(model: nn.Module, state: StateDict, removed: Sequence[str]) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of the HF ``model`` holding ``state`` with the blocks at ``removed`` deleted (see the module
    docstring); the input model is not changed. Returns (the pruned model, what ``pruned.json`` records)."""
    if not is_hf(model):
        raise CriticalityError(f"{type(model).__name__} is not a Hugging Face model; use save_pruned, which "
                               "writes its state dict and the removed paths")
    config = model.config
    parent, container, gone = _stack_of(model, removed)
    n = len(container)
    if getattr(config, "num_hidden_layers", None) != n:
        raise CriticalityError(f"{parent!r} holds {n} layers but config.num_hidden_layers is "
                               f"{getattr(config, 'num_hidden_layers', None)}: not the model's one layer stack")
    kept = [i for i in range(n) if i not in gone]
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and kept != list(range(len(kept))):
        raise CriticalityError("the model scales attention by 1/(layer index + 1) (scale_attn_by_inverse_layer_idx)"
                               ": renumbering the layers would change what the kept ones compute (only the last "
                               "layers can be removed from it)")
    pruned = copy.deepcopy(model)
    pruned.load_state_dict(dict(state))
    layers = pruned.get_submodule(parent) if parent else pruned
    new = nn.ModuleList([layers[i] for i in kept])
    for new_idx, block in enumerate(new):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    owner, _, name = parent.rpartition(".")
    setattr(pruned.get_submodule(owner) if owner else pruned, name, new)
    lists = _prune_config(pruned.config, n, kept)
    pruned.config.use_cache = True  # generation reuses the (renumbered) KV cache
    info = {"removed": list(removed), "removed_indices": gone, "kept_from": kept, "layers_before": n,
            "layers_after": len(kept), "stack": parent, "per_layer_config": lists}
    return pruned.eval(), info


def _prune_config(config: Any, n: int, kept: Sequence[int]) -> list[str]:
    """Set the layer count; drop the removed entries of every per-layer list. Returns those lists' names."""
    lists = []
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == n and key not in ("architectures",):
            setattr(config, key, [value[i] for i in kept])
            lists.append(key)
    config.num_hidden_layers = len(kept)
    return lists


def save_pruned(model: nn.Module, state: StateDict, removed: Sequence[str], out: str | Path, *,
                source: str | Path | None = None) -> Path:
    """Write ``model`` (with ``state``) minus the blocks at ``removed`` into ``out`` (see the module docstring);
    ``source``: a folder whose tokenizer files are copied along."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not is_hf(model):
        gone = {k for p in removed for k in _keys_under(model, p)}
        kept = {k: v.detach().clone().contiguous() for k, v in dict(state).items() if k not in gone}
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(kept, str(tmp))
        write_json(out / "pruned.json", {"removed": list(removed), "model": type(model).__name__})
        return out
    pruned, info = without_blocks(model, state, removed)
    dtype = next((v.dtype for v in dict(state).values() if v.is_floating_point()), torch.float32)
    pruned.to(dtype).save_pretrained(out)
    for name in TOKENIZER_FILES if source else ():
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, out / name)
    write_json(out / "pruned.json", info)
    return out


def _keys_under(model: nn.Module, path: str) -> list[str]:
    try:
        module = model.get_submodule(path)
    except AttributeError as e:
        raise CriticalityError(f"{type(model).__name__} has no module {path!r}") from e
    return [f"{path}.{k}" for k in module.state_dict()]


class Removed(nn.Module):
    """A removed block: returns the hidden state it is called with (its first argument)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))


def load_pruned(model: nn.Module, folder: str | Path) -> nn.Module:
    """A non-HF model saved by :func:`save_pruned`, loaded into ``model`` (built as the original was; changed in
    place and returned): the removed blocks become :class:`Removed`, the rest take the saved weights."""
    folder = Path(folder)
    info = read_json(folder / "pruned.json")
    for path in info["removed"]:
        owner, _, name = path.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, name, Removed())
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model
