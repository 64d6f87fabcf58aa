"""The repeated block stack of a model: the layers a deep network is "made of", wherever they are nested.

    find_stack(llama)   # [("model.layers.0", LlamaDecoderLayer), ("model.layers.1", …), …]
    find_stack(resnet)  # timm: [("layer1.0", BasicBlock), ("layer1.1", …), ("layer2.0", …), …]

Where the stack is looked for, first match wins:

1. a declared ``stages()`` method (the zoo models of :mod:`criticality.paper.models`; the chain as declared);
2. a plain ``nn.Sequential`` (not a subclass with its own forward): its children;
3. a small table of known layouts (:data:`LAYOUTS`: Hugging Face ``model.layers``, ``transformer.h``,
   ``encoder.layer``, …; timm ``blocks``, ``stages.*.blocks``, ``layer1`` … ``layerN``), each a dotted path
   in which ``*`` stands for every child and a glob for the matching children. A path that ends on an
   ``nn.ModuleList``/``nn.Sequential`` contributes its children; several containers (stages) are
   flattened in registration order. The table is tried on the model, then on each of its children (a
   wrapper around an HF model);
4. a generic fallback: the ``nn.ModuleList``/``nn.Sequential`` with at least two children, all of one
   class and holding state, that holds the most parameters.

Execution order is taken to be registration order (true of every layout in the table). A stack has at
least two blocks; ``[]`` means none was found. Used by ``groups="blocks"``/``"sublayers"``, the engine's
prefix reuse, skipping blocks and the representation proxies.
"""

from __future__ import annotations

import fnmatch

from torch import nn

Stack = list[tuple[str, nn.Module]]
_CONTAINERS = (nn.Sequential, nn.ModuleList)

# Known layouts (prefix-free paths; the first that yields >= 2 blocks wins). Bare models (BertModel,
# LlamaModel) and task heads (…ForCausalLM, …ForSequenceClassification) differ by one leading level.
LAYOUTS = (
    "model.layers", "model.decoder.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
    "transformer.blocks", "bert.encoder.layer", "roberta.encoder.layer", "vit.encoder.layer", "vit.layers",
    "encoder.layer", "encoder.layers", "decoder.layers", "layers.*.blocks", "layers", "h",  # timm Swin: layers.*.blocks
    "resnet.encoder.stages.*.layers", "encoder.stages.*.layers",  # HF ResNet / ConvNeXt-like
    "blocks", "stages.*.blocks", "layer[0-9]*",  # timm ViT (EfficientNet: its stages), ConvNeXt, ResNet
)


def find_stack(model: nn.Module) -> Stack:
    """The model's repeated block stack as ``[(module path, block), …]`` in execution order; ``[]`` if none."""
    if callable(getattr(type(model), "stages", None)):
        return list(model.stages())
    if type(model) is nn.Sequential:
        return list(model.named_children())
    for prefix, base in [("", model), *model.named_children()]:  # the model, or the model a wrapper holds
        for layout in LAYOUTS:
            stack = _follow(base, layout)
            if len(stack) >= 2:
                return [(f"{prefix}.{path}" if prefix else path, block) for path, block in stack]
    return _largest_uniform_container(model)


def is_norm(module: nn.Module) -> bool:
    """A normalization layer: torch's norms, or any class named ``*Norm*`` with a ``weight`` (RMSNorm variants)."""
    if isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm | nn.RMSNorm):
        return True
    return "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), nn.Parameter)


def holds_state(module: nn.Module) -> bool:
    return bool(module.state_dict())


def _follow(model: nn.Module, layout: str) -> Stack:
    """The blocks a layout path reaches: ``[]`` when any step of the path is absent."""
    found: Stack = [("", model)]
    for step in layout.split("."):
        nxt: Stack = []
        for path, module in found:
            for name, child in module.named_children():
                if name == step or (any(c in step for c in "*?[") and fnmatch.fnmatchcase(name, step)):
                    nxt.append((f"{path}.{name}" if path else name, child))
        if not nxt:
            return []
        found = nxt
    blocks: Stack = []
    for path, module in found:
        if isinstance(module, _CONTAINERS):
            blocks += [(f"{path}.{name}", child) for name, child in module.named_children()]
        else:
            blocks.append((path, module))
    return blocks if all(holds_state(b) for _, b in blocks) else []


def _largest_uniform_container(model: nn.Module) -> Stack:
    best: Stack = []
    best_size = 0
    for path, module in model.named_modules():
        if not isinstance(module, _CONTAINERS) or module is model:
            continue
        children = list(module.named_children())
        if len(children) < 2 or len({type(c) for _, c in children}) != 1 or not holds_state(children[0][1]):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = [(f"{path}.{name}", child) for name, child in children], size
    return best
