"""The paper's model zoo, built in-house: FCN, VGG (CIFAR variant) and ResNet V2 (pre-activation).

    build("fcn-3x256", (1, 28, 28), 10, init="glorot")  # 784-256-256-256-10, ReLU
    build("vgg16-bn", (3, 32, 32), 10, width=8)         # a tiny VGG-16 for tests and quick runs
    build("resnet18", (3, 224, 224), 1000)              # ImageNet stem, chosen from the input size

The contract every zoo model keeps; the analysis core relies on these two methods and nothing else:

``layer_groups() -> dict[str, list[str]]``
    The model's layers, ordered input -> output: group name -> module-name prefixes. A state-dict key
    belongs to a group when it equals a prefix or starts with ``prefix + "."``. Together the groups
    cover every state-dict key (parameters and buffers, BatchNorm's ``num_batches_tracked`` included)
    exactly once.
``stages() -> list[tuple[str, nn.Module]]``
    The model as a chain of (module-name prefix, module): ``forward(x)`` *is*
    ``functools.reduce(lambda h, s: s[1](h), stages(), x)``, so the two agree bit for bit. Every
    group's keys lie inside one stage, so an engine can cache the input of a stage and re-run only the
    suffix after a modified group. Parameterless ops (ReLU, pooling, flatten) are folded into the
    stage they follow or are stages of their own.

Groups, one stage each and named like it:

- FCN: ``fc1`` .. ``fc{depth+1}`` (keys ``fc1.linear.weight``; stages: ``flatten``, ``fc1`` (+ReLU), ...).
- VGG: ``conv1`` .. ``convK`` (each conv with its BatchNorm and ReLU), then ``fc1`` .. ``fc3``;
  the max pools, ``avgpool`` and ``flatten`` are stages without a group.
- ResNet: ``stem``, ``stage1.block1`` .. ``stage4.blockB``, ``head`` (final BN + ReLU + pool + Linear);
  keys read like ``stage2.block1.conv1.weight`` and ``stage2.block1.shortcut.conv.weight``.
- ``vit-tiny`` / ``mixer-tiny`` (:mod:`criticality.paper.patch_models`): one group per sub-layer, one stage per block.

:func:`build` also sets ``model.name`` (canonical name), ``model.init_scheme`` (the ``init`` it ran,
needed to re-randomize from the same scheme) and ``model.build_kwargs`` (resolved ``name``,
``input_shape``, ``num_classes``, ``width``, ``stem``), so ``build(**m.build_kwargs, init=...)``
makes a fresh model of the same architecture.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from itertools import pairwise

import torch
from torch import nn

from criticality.core.initializers import initialize
from criticality.errors import CriticalityError, unknown_name
from criticality.paper.patch_models import PatchNet

PATCH_MODELS = {"vit-tiny": "vit", "mixer-tiny": "mixer"}  # in-house, vit.py

Stages = list[tuple[str, nn.Module]]


def _chain(stages: Stages, x: torch.Tensor) -> torch.Tensor:
    for _, module in stages:
        x = module(x)
    return x


def _one_group_per_stage(stages: Stages) -> dict[str, list[str]]:
    """Each stage that holds state is one group, named by its prefix; stateless stages are no group."""
    return {prefix: [prefix] for prefix, module in stages if module.state_dict()}


# ---------------------------------------------------------------------------------------------- FCN


class FCN(nn.Module):
    """Flatten, then ``depth`` hidden Linear+ReLU layers of ``width`` units, then a Linear output."""

    def __init__(self, in_features: int, depth: int, width: int, num_classes: int):
        super().__init__()
        self.flatten = nn.Flatten()  # (N, C, H, W) -> (N, C*H*W)
        dims = [in_features] + [width] * depth + [num_classes]
        for i, (d_in, d_out) in enumerate(pairwise(dims), start=1):
            layer = OrderedDict(linear=nn.Linear(d_in, d_out))  # (N, d_in) -> (N, d_out)
            if i <= depth:
                layer["relu"] = nn.ReLU()
            self.add_module(f"fc{i}", nn.Sequential(layer))

    def stages(self) -> Stages:
        return list(self.named_children())

    def layer_groups(self) -> dict[str, list[str]]:
        return _one_group_per_stage(self.stages())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _chain(self.stages(), x)


# ---------------------------------------------------------------------------------------------- VGG

# Convs per stage; stage channels 64, 128, 256, 512, 512 at width 64 (c * w // 64 at width w),
# each stage ends in a 2x2 max pool.
_VGG_CHANNELS = (64, 128, 256, 512, 512)
_VGG_CONVS = {"vgg11": (1, 1, 2, 2, 2), "vgg13": (2, 2, 2, 2, 2), "vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}


class MaxPoolUnlessTiny(nn.MaxPool2d):
    """2x2 max pool that passes through maps already under 2x2 (tiny inputs, e.g. 8x8 digits)."""

    def __init__(self):
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < 2:
            return x  # (N, C, 1, W') or (N, C, H', 1): nothing left to pool
        return super().forward(x)  # (N, C, H, W) -> (N, C, H//2, W//2)


class VGG(nn.Module):
    """VGG, CIFAR variant: 3x3 convs (+BN) and max pools, global average pool, 3 Linear layers, no dropout.

    The average pool makes any input size work; at 32x32 the maps are already 1x1 there.
    """

    def __init__(self, convs: tuple[int, ...], in_channels: int, num_classes: int, width: int, batch_norm: bool):
        super().__init__()
        c_in, n_conv = in_channels, 0
        for stage, (n, channels) in enumerate(zip(convs, _VGG_CHANNELS, strict=True), start=1):
            c_out = channels * width // 64
            for _ in range(n):
                n_conv += 1
                layer = OrderedDict(conv=nn.Conv2d(c_in, c_out, 3, padding=1))  # (N, c_out, H, W)
                if batch_norm:
                    layer["bn"] = nn.BatchNorm2d(c_out)
                layer["relu"] = nn.ReLU()
                self.add_module(f"conv{n_conv}", nn.Sequential(layer))
                c_in = c_out
            self.add_module(f"pool{stage}", MaxPoolUnlessTiny())  # (N, c_out, H/2, W/2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # (N, 8w, h, w) -> (N, 8w, 1, 1)
        self.flatten = nn.Flatten()  # -> (N, 8w)
        self.fc1 = nn.Sequential(OrderedDict(linear=nn.Linear(c_in, c_in), relu=nn.ReLU()))  # (N, 8w)
        self.fc2 = nn.Sequential(OrderedDict(linear=nn.Linear(c_in, c_in), relu=nn.ReLU()))  # (N, 8w)
        self.fc3 = nn.Sequential(OrderedDict(linear=nn.Linear(c_in, num_classes)))  # (N, classes)

    def stages(self) -> Stages:
        return list(self.named_children())

    def layer_groups(self) -> dict[str, list[str]]:
        return _one_group_per_stage(self.stages())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _chain(self.stages(), x)


# ------------------------------------------------------------------------------------------- ResNet


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    """The skip path's downsampling branch (paper Fig 7, second kind): 1x1 conv + BN; None = identity."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(OrderedDict(conv=_conv(c_in, c_out, 1, stride), bn=nn.BatchNorm2d(c_out)))


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the skip (He et al. 2016, "Identity mappings")."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv(c_in, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.shortcut = _shortcut(c_in, planes, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, c_in, H, W)
        out = self.relu(self.bn1(x))
        # a projection sees the pre-activated input, as in the paper's reference code
        skip = x if self.shortcut is None else self.shortcut(out)  # (N, planes, H/s, W/s)
        out = self.conv1(out)  # (N, planes, H/s, W/s)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + skip


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3 (stride here), BN-ReLU-conv1x1 to 4x planes, plus the skip."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int):
        super().__init__()
        c_out = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv(c_in, planes, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, c_out, 1)
        self.shortcut = _shortcut(c_in, c_out, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, c_in, H, W)
        out = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)  # (N, 4*planes, H/s, W/s)
        out = self.conv1(out)  # (N, planes, H, W)
        out = self.conv2(self.relu(self.bn2(out)))  # (N, planes, H/s, W/s)
        out = self.conv3(self.relu(self.bn3(out)))  # (N, 4*planes, H/s, W/s)
        return out + skip


_RESNETS = {
    "resnet18": (PreActBasicBlock, (2, 2, 2, 2)),
    "resnet34": (PreActBasicBlock, (3, 4, 6, 3)),
    "resnet50": (PreActBottleneck, (3, 4, 6, 3)),
    "resnet101": (PreActBottleneck, (3, 4, 23, 3)),
}
STEMS = ("cifar", "imagenet")


def _stem(kind: str, in_channels: int, width: int) -> nn.Sequential:
    if kind == "cifar":  # (N, C, H, W) -> (N, w, H, W); the first block's BN-ReLU follows
        return nn.Sequential(OrderedDict(conv=_conv(in_channels, width, 3)))
    return nn.Sequential(  # (N, C, H, W) -> (N, w, H/4, W/4)
        OrderedDict(
            conv=_conv(in_channels, width, 7, stride=2),
            bn=nn.BatchNorm2d(width),
            relu=nn.ReLU(),
            pool=nn.MaxPool2d(3, stride=2, padding=1),
        )
    )


class ResNetV2(nn.Module):
    """Pre-activation ResNet: stem, four stages of blocks (channels w, 2w, 4w, 8w; x4 in bottlenecks), head.

    Stages 2..4 start with a stride-2 block; a block whose shape changes carries a 1x1 conv + BN
    shortcut (so stage1.block1 of a bottleneck net has one too).
    """

    def __init__(self, block: type, depths: tuple[int, ...], in_channels: int, num_classes: int, width: int, stem: str):
        super().__init__()
        self.stem = _stem(stem, in_channels, width)
        c_in = width
        for s, n_blocks in enumerate(depths, start=1):
            planes = width * 2 ** (s - 1)
            blocks = OrderedDict()
            for b in range(1, n_blocks + 1):
                blocks[f"block{b}"] = block(c_in, planes, 2 if s > 1 and b == 1 else 1)
                c_in = planes * block.expansion
            self.add_module(f"stage{s}", nn.Sequential(blocks))
        self.head = nn.Sequential(
            OrderedDict(
                bn=nn.BatchNorm2d(c_in),
                relu=nn.ReLU(),
                avgpool=nn.AdaptiveAvgPool2d(1),  # (N, c, h, w) -> (N, c, 1, 1)
                flatten=nn.Flatten(),  # (N, c)
                fc=nn.Linear(c_in, num_classes),  # (N, classes)
            )
        )

    def stages(self) -> Stages:
        out: Stages = []
        for name, child in self.named_children():
            if name.startswith("stage"):
                out += [(f"{name}.{b}", block) for b, block in child.named_children()]
            else:
                out.append((name, child))
        return out

    def layer_groups(self) -> dict[str, list[str]]:
        return _one_group_per_stage(self.stages())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _chain(self.stages(), x)


# -------------------------------------------------------------------------------------------- registry

_FCN_NAME = re.compile(r"fcn-(\d+)x(\d+)")


def names() -> list[str]:
    """Canonical registry names; ``build`` also accepts ``fcn-{depth}x{width}`` for any depth, width."""
    vggs = [v for name in _VGG_CONVS for v in (name, f"{name}-bn")]
    return ["fcn-3x256", "fcn-5x256", *vggs, *_RESNETS, *PATCH_MODELS]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise CriticalityError(message)


def _make(
    key: str, input_shape: tuple[int, int, int], num_classes: int, width: int | None, stem: str | None
) -> tuple[nn.Module, dict]:
    """The uninitialized model and its resolved build kwargs; raises for unknown names or bad options."""
    c, h, w = input_shape
    if match := _FCN_NAME.fullmatch(key):
        depth, hidden = int(match[1]), int(match[2])
        _check(depth >= 1 and hidden >= 1, f"fcn depth and width must be >= 1, got {key!r}")
        _check(width is None, f"an fcn's width comes from its name (fcn-DEPTHxWIDTH), not width={width}")
        key = f"fcn-{depth}x{hidden}"
        model = FCN(c * h * w, depth, hidden, num_classes)
    elif key.removesuffix("-bn") in _VGG_CONVS:
        width = 64 if width is None else width
        model = VGG(_VGG_CONVS[key.removesuffix("-bn")], c, num_classes, width, key.endswith("-bn"))
    elif key in _RESNETS:
        width = 64 if width is None else width
        stem = stem or ("cifar" if h <= 64 else "imagenet")
        _check(stem in STEMS, f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
        block, depths = _RESNETS[key]
        model = ResNetV2(block, depths, c, num_classes, width, stem)
    elif key in PATCH_MODELS:
        width = 64 if width is None else width
        model = PatchNet(PATCH_MODELS[key], (c, h, w), num_classes, width)
    else:
        raise unknown_name("model", key, names())
    _check(stem is None or key in _RESNETS, f"option stem applies to resnets only, not {key!r}")
    kwargs = dict(name=key, input_shape=input_shape, num_classes=num_classes, width=width, stem=stem)
    return model, kwargs


def build(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    init: str | Callable[[nn.Module], None] = "torch",
    generator: torch.Generator | None = None,
    width: int | None = None,
    stem: str | None = None,
) -> nn.Module:
    """Build zoo model ``name`` on CPU for inputs of ``input_shape`` (C, H, W), initialized by ``init``.

    ``width`` is the base channel count of VGGs and ResNets (default 64); ``stem`` forces a ResNet's
    stem (default: ``cifar`` when H <= 64, else ``imagenet``). ``generator`` defaults to a fresh one
    seeded 0, so a build is always reproducible.
    """
    input_shape = tuple(int(d) for d in input_shape)
    _check(len(input_shape) == 3 and min(input_shape) >= 1, f"input_shape must be (C, H, W), got {input_shape}")
    _check(num_classes >= 1, f"num_classes must be >= 1, got {num_classes}")
    _check(width is None or width >= 1, f"width must be >= 1, got {width}")
    model, kwargs = _make(name.strip().lower(), input_shape, num_classes, width, stem)
    initialize(model, init, generator if generator is not None else torch.Generator().manual_seed(0))
    model.name = kwargs["name"]
    model.init_scheme = init
    model.build_kwargs = kwargs
    return model
