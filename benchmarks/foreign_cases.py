"""Foreign-model cases of ``bench_engine.py``: a transformers Llama-style LM, a transformers ViT and a
timm-like ResNet-18 (``layer1..layer4``, no ``stages()``), naive loop vs fast engine in one process.

The trajectory is synthetic (the engine's work does not depend on what the weights learned): checkpoint
``e`` of ``epochs`` is the initialization moved ``e / epochs`` of the way along one seeded random direction.
The grid is the paper's per group: re-initialization to every earlier checkpoint and ``seeds`` fresh draws
(seeded Gaussian tensors with each tensor's scale), plus the final model. Groups: each block of the stack,
the modules before it (embeddings, stem) and after it (final norm, head). The engine's FLOPs are counted
from per-block FLOPs (``FlopCounterMode``): one advance through the prefix, then per cell the suffix from
its position, the modules outside the stack included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from criticality.core import batches, engine
from criticality.core.stacks import find_stack


@dataclass(frozen=True)
class Foreign:
    key: str
    examples: int  # sequences or images per cell
    epochs: int  # checkpoints 0..epochs
    seeds: int
    batch: int
    target: float


FULL = (Foreign("llama", 256, 7, 2, 64, 1.7), Foreign("vit", 512, 7, 2, 128, 1.7),
        Foreign("resnet-timm", 512, 7, 2, 256, 1.8))
SMALL = (Foreign("llama", 16, 7, 2, 16, 1.7), Foreign("vit", 64, 7, 2, 64, 1.7),
         Foreign("resnet-timm", 64, 7, 2, 64, 1.8))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                           if stride != 1 or c_in != c_out else None)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class TimmLikeResNet18(nn.Module):
    """timm's ``resnet18`` layout: conv1/bn1/act1/maxpool stem, ``layer1..layer4`` of BasicBlocks, pooled fc."""

    def __init__(self, in_chans: int = 3, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
        self.bn1, self.act1, self.maxpool = nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        c = width
        for i, mult in enumerate((1, 2, 4, 8), start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(c, width * mult, stride),
                                                     BasicBlock(width * mult, width * mult, 1)))
            c = width * mult
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def build(case: Foreign) -> tuple[nn.Module, object, tuple[str, ...]]:
    """The model, its evaluation data and the metrics it is measured with."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if case.key == "llama":
        import transformers
        cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        ids = torch.randint(0, 512, (case.examples, 128), generator=g)
        data = [{"input_ids": ids[i:i + case.batch], "labels": ids[i:i + case.batch]}
                for i in range(0, len(ids), case.batch)]
        return transformers.LlamaForCausalLM(cfg).eval(), data, ("token_error", "nll")
    if case.key == "vit":
        import transformers
        cfg = transformers.ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=192,
                                     num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, num_labels=10)
        x = torch.randn(case.examples, 3, 32, 32, generator=g)
        return transformers.ViTForImageClassification(cfg).eval(), (x, torch.randint(0, 10, (len(x),), generator=g)), \
            ("error", "loss")
    x = torch.randn(case.examples, 3, 64, 64, generator=g)
    return TimmLikeResNet18().eval(), (x, torch.randint(0, 10, (len(x),), generator=g)), ("error", "loss")


def trajectory(model: nn.Module, epochs: int) -> dict[int, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    step = {k: 0.5 * v.float().std().nan_to_num(0.0).clamp(min=0.02) * torch.randn(v.shape, generator=g)
            if v.is_floating_point() else None for k, v in start.items()}
    return {e: {k: v + e / epochs * step[k] if step[k] is not None else v for k, v in start.items()}
            for e in range(epochs + 1)}


def grid(states, case: Foreign, groups: dict[str, list[str]]) -> list[engine.Variant]:
    final = states[case.epochs]
    out = [engine.Variant("final")]
    for name, keys in groups.items():
        for e in range(case.epochs):
            out.append(engine.Variant((name, "reinit", e), {k: states[e][k] for k in keys}))
        for s in range(case.seeds):
            g = torch.Generator().manual_seed(1000 + s)
            out.append(engine.Variant((name, "seed", s), {
                k: final[k].float().std().nan_to_num(0.0).clamp(min=0.02) * torch.randn(final[k].shape, generator=g)
                if final[k].is_floating_point() else final[k] for k in keys}))
    return out


def groups_of(fast: engine.Engine, stack: list[tuple[str, nn.Module]]) -> dict[str, list[str]]:
    """One group per block of the stack, one for the keys before it and one for those after it."""
    pos = fast._settle().key_position
    first = len(fast.blocks) - len(stack)  # the stack's first position (after the stem's modules, if any lead it)
    groups: dict[str, list[str]] = {"before": [], **{p: [] for p, _ in stack}, "after": []}
    for k in pos:
        owner = next((p for p, _ in stack if k.startswith(p + ".")), None)
        groups[owner if owner else ("before" if pos[k] <= first else "after")].append(k)
    return {g: ks for g, ks in groups.items() if ks}


def flops(model: nn.Module, data, stack, variants, fast: engine.Engine) -> tuple[float, float]:
    """(naive FLOPs, engine FLOPs) over the whole data set: per-block counts from one probe forward."""
    inputs = batches.to_device(next(batches.iter_batches(data, 4)), fast.device)[0]
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        batches.call(model, inputs)
    counts = counter.get_flop_counts()
    total = sum(counts.get("Global", {}).values())
    root = type(model).__name__  # FlopCounterMode names modules "<root class>.<path>"
    path = {id(m): name for name, m in model.named_modules()}
    per_block = [sum(counts.get(f"{root}.{path[id(b)]}", {}).values()) for b in fast.blocks]  # stem included
    n = sum(batches.batch_len(b[0]) for b in batches.iter_batches(data, 1 << 30))
    scale = n / batches.batch_len(inputs)
    positions = [fast.position(v) for v in variants]
    suffix = [total - sum(per_block[:p]) for p in positions]
    return len(variants) * total * scale, (sum(per_block[:max(positions)]) + sum(suffix)) * scale


def run(case: Foreign, repeats: int = 1, device: str | torch.device = "cpu") -> dict:
    model, data, names = build(case)
    model = model.to(device)
    states = trajectory(model, case.epochs)
    final = states[case.epochs]
    stack = find_stack(model)
    fast = engine.Engine(model, final, data, metrics=names, batch_size=case.batch, blocks=stack, device=device)
    variants = grid(states, case, groups_of(fast, stack))
    times: dict[str, list[float]] = {"naive": [], "fast": []}
    for _ in range(repeats):
        start = time.perf_counter()
        naive = {v.id: engine.evaluate_naive(model, {**final, **v.materialize()}, data, metrics=names,
                                             batch_size=case.batch, device=device) for v in variants}
        times["naive"].append(time.perf_counter() - start)
        start = time.perf_counter()
        got = dict(engine.Engine(model, final, data, metrics=names, batch_size=case.batch, blocks=stack,
                                 device=device).evaluate(variants))
        times["fast"].append(time.perf_counter() - start)
    first = names[0]
    errors_equal = all(got[k][first] == naive[k][first] for k in naive)
    loss_diff = max(abs(got[k][names[1]] - naive[k][names[1]]) for k in naive)
    naive_flops, fast_flops = flops(model, data, stack, variants, fast)
    naive_t, fast_t = min(times["naive"]), min(times["fast"])
    return {"case": case.key, "model": type(model).__name__, "cells": len(variants), "examples": case.examples,
            "blocks": len(stack), "valid_positions": len(fast._settle().valid) - 1, "naive_s": naive_t,
            "fast_s": fast_t, "ratio": naive_t / fast_t, "target": case.target, "met": naive_t / fast_t >= case.target,
            "flop_ratio": naive_flops / fast_flops, "naive_gflop": naive_flops / 1e9, "fast_gflop": fast_flops / 1e9,
            "naive_gflops": naive_flops / naive_t / 1e9, "fast_gflops": fast_flops / fast_t / 1e9,
            "naive_runs_s": times["naive"], "fast_runs_s": times["fast"], "errors_equal": errors_equal,
            "max_loss_diff": loss_diff, "equal": bool(errors_equal and loss_diff <= 1e-5)}
