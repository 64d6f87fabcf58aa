"""Tests for criticality.models: the same checks over every registered model, at width 8.

Run: .venv/bin/pytest tests/test_models.py -q   (about half a minute on 2 CPU cores)

Checks, for every name in ``models.names()``: output shape for every input it accepts; the layer
groups cover every state-dict key exactly once; the stage chain reproduces ``forward`` bit for bit
(eval mode, BatchNorm statistics moved off their defaults); each group lies in one stage and groups
follow stage order; builds are seeded. Then: Glorot init bounds, error messages, and full-width
parameter counts against independent arithmetic.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from criticality.errors import CriticalityError
from criticality.paper import models

NAMES = models.names()
SMALL_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
WIDTH = 8


def _build(name, shape=(3, 32, 32), **kw):
    kw.setdefault("width", None if name.lower().startswith("fcn") else WIDTH)
    return models.build(name, shape, 10, **kw)


def _cases():
    for name in NAMES:
        for shape in SMALL_SHAPES:
            yield name, shape, None
        if name.startswith("resnet"):
            yield name, (3, 72, 72), "imagenet"
            yield name, (1, 28, 28), "imagenet"


def _group_of(key, groups):
    hits = [g for g, prefixes in groups.items() if any(key == p or key.startswith(p + ".") for p in prefixes)]
    return hits


def _perturb_batchnorm(model, generator):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                m.weight.normal_(1.0, 0.2, generator=generator)
                m.bias.normal_(0.0, 0.2, generator=generator)
                m.num_batches_tracked.fill_(7)


@pytest.mark.parametrize("name,shape,stem", list(_cases()), ids=lambda v: str(v))
def test_forward_shape(name, shape, stem):
    model = _build(name, shape, stem=stem).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_groups_cover_state_dict_exactly_once(name):
    model = _build(name)
    groups = model.layer_groups()
    keys = list(model.state_dict())
    for key in keys:
        assert len(_group_of(key, groups)) == 1, key
    for group, prefixes in groups.items():
        assert prefixes, group
        for p in prefixes:
            assert any(k == p or k.startswith(p + ".") for k in keys), f"{group}: prefix {p!r} matches nothing"


@pytest.mark.parametrize("name", NAMES)
def test_stages_chain_equals_forward_and_holds_groups(name):
    model = _build(name)
    _perturb_batchnorm(model, torch.Generator().manual_seed(2))
    model.eval()
    stages = model.stages()
    modules = dict(model.named_modules())
    for prefix, module in stages:
        assert modules[prefix] is module
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        chained = functools.reduce(lambda h, s: s[1](h), stages, x)
        assert torch.equal(chained, model(x))

    stage_index = {}
    for key in model.state_dict():
        owners = [i for i, (p, _) in enumerate(stages) if key.startswith(p + ".")]
        assert len(owners) == 1, key
        stage_index[key] = owners[0]
    order = []
    for group in model.layer_groups().values():
        in_group = {stage_index[k] for k in model.state_dict() if _group_of(k, {"g": group})}
        assert len(in_group) == 1, group
        order.append(in_group.pop())
    assert order == sorted(order), "groups out of stage order"


@pytest.mark.parametrize("name", NAMES)
def test_build_is_seeded(name):
    a = _build(name, generator=torch.Generator().manual_seed(5)).state_dict()
    b = _build(name, generator=torch.Generator().manual_seed(5)).state_dict()
    c = _build(name, generator=torch.Generator().manual_seed(6)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", NAMES)
def test_glorot_init(name):
    model = _build(name, init="glorot")
    assert model.init_scheme == "glorot"
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            w = m.weight
            receptive = math.prod(w.shape[2:])
            bound = math.sqrt(6.0 / (w.shape[1] * receptive + w.shape[0] * receptive))
            assert w.abs().max() <= bound + 1e-7
            assert w.std() > bound / 4  # drawn, not zero
            if m.bias is not None:
                assert torch.all(m.bias == 0)


def test_group_names_per_family():
    assert list(_build("fcn-3x256").layer_groups()) == ["fc1", "fc2", "fc3", "fc4"]
    assert list(_build("fcn-5x32", (1, 8, 8)).layer_groups()) == [f"fc{i}" for i in range(1, 7)]
    vgg = _build("vgg11-bn").layer_groups()
    assert list(vgg) == [f"conv{i}" for i in range(1, 9)] + ["fc1", "fc2", "fc3"]
    assert len(_build("vgg19").layer_groups()) == 16 + 3
    blocks = [f"stage{s}.block{b}" for s in range(1, 5) for b in (1, 2)]
    assert list(_build("resnet18").layer_groups()) == ["stem", *blocks, "head"]
    assert len(_build("resnet101").layer_groups()) == 1 + 3 + 4 + 23 + 3 + 1


def test_downsampling_blocks_have_projection_shortcut():
    sd = _build("resnet18").state_dict()
    with_proj = sorted({k.split(".shortcut")[0] for k in sd if ".shortcut." in k})
    assert with_proj == ["stage2.block1", "stage3.block1", "stage4.block1"]
    assert "stage2.block1.shortcut.bn.running_var" in sd
    sd50 = _build("resnet50").state_dict()
    assert "stage1.block1.shortcut.conv.weight" in sd50  # 8 -> 32 channels in the first bottleneck


def test_stem_choice():
    assert "stem.bn.weight" not in _build("resnet18", (3, 64, 64)).state_dict()
    assert "stem.bn.weight" in _build("resnet18", (3, 72, 72)).state_dict()
    assert "stem.bn.weight" not in _build("resnet18", (3, 72, 72), stem="cifar").state_dict()
    assert _build("resnet18", (3, 72, 72)).build_kwargs["stem"] == "imagenet"


def test_names_and_canonical_name():
    assert NAMES[:2] == ["fcn-3x256", "fcn-5x256"]
    assert "vgg16-bn" in NAMES and "resnet101" in NAMES and len(NAMES) == 2 + 8 + 4 + 2  # + vit-tiny, mixer-tiny
    model = _build("FCN-03x16", (1, 8, 8))
    assert model.name == "fcn-3x16"
    assert model.build_kwargs == dict(name="fcn-3x16", input_shape=(1, 8, 8), num_classes=10, width=None, stem=None)
    again = models.build(**model.build_kwargs)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


def test_errors():
    with pytest.raises(CriticalityError, match="resnet18"):
        models.build("resnet19", (3, 32, 32), 10)
    with pytest.raises(CriticalityError, match="vgg16-bn"):
        models.build("vgg16_bn", (3, 32, 32), 10)
    with pytest.raises(CriticalityError, match="stem"):
        models.build("resnet18", (3, 32, 32), 10, stem="tiny")
    with pytest.raises(CriticalityError, match="resnets only"):
        models.build("vgg11", (3, 32, 32), 10, stem="cifar")
    with pytest.raises(CriticalityError, match="unknown model 'vgg12'"):
        models.build("vgg12", (3, 32, 32), 10, stem="cifar")
    with pytest.raises(CriticalityError, match="from its name"):
        models.build("fcn-3x256", (1, 28, 28), 10, width=8)
    with pytest.raises(CriticalityError, match=">= 1"):
        models.build("fcn-0x256", (1, 28, 28), 10)
    with pytest.raises(CriticalityError, match="input_shape"):
        models.build("fcn-3x256", (28, 28), 10)


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_param_counts_against_arithmetic():
    """Full-width models, counted by hand from the architecture description."""
    fcn = 784 * 256 + 256 + 2 * (256 * 256 + 256) + 256 * 10 + 10
    assert _n_params(models.build("fcn-3x256", (1, 28, 28), 10)) == fcn == 335_114

    convs, c_in = 0, 3
    for c in (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512):
        convs += 9 * c_in * c + c
        c_in = c
    vgg16 = convs + 2 * (512 * 512 + 512) + 512 * 10 + 10
    assert _n_params(models.build("vgg16", (3, 32, 32), 10)) == vgg16 == 15_245_130

    def conv(a, b, k):
        return a * b * k * k

    def bn(c):
        return 2 * c

    total = conv(3, 64, 3)  # CIFAR stem: conv only
    c_in = 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for b in range(2):
            total += bn(c_in) + conv(c_in, planes, 3) + bn(planes) + conv(planes, planes, 3)
            if b == 0 and stride == 2:
                total += conv(c_in, planes, 1) + bn(planes)
            c_in = planes
    total += bn(512) + 512 * 10 + 10
    assert _n_params(models.build("resnet18", (3, 32, 32), 10)) == total
    assert 11.1e6 < total < 11.3e6
