"""The GPU training path as far as a CPU runs it: autocast modes, channels_last, augmentation on the
data's device, --freeze; checkpoints stay float32 with the same meaning.

Run: ``.venv/bin/pytest tests/test_precision.py -q`` (about 30 s on 2 cores; tiny models on digits).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from criticality.core.checkpoints import load_checkpoint
from criticality.errors import CriticalityError
from criticality.paper import data
from criticality.paper.train import train
from criticality.paper.training.config import TrainConfig
from criticality.paper.training.precision import autocast_dtype, grad_scaler, use_channels_last

TINY_CONV = dict(model="vgg11-bn", width=4, data="digits", epochs=2, device="cpu", batch_size=64, max_train=300,
                 max_test=100)


def test_amp_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("off", cuda) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16 and autocast_dtype("fp16", cpu) == torch.float16
    assert grad_scaler(torch.bfloat16, cpu) is None and grad_scaler(torch.float16, cpu) is not None
    with pytest.raises(CriticalityError, match="--amp"):
        autocast_dtype("fp8", cpu)


def test_channels_last_and_autocast_train_and_save_float32(tmp_path):
    plain = train(TrainConfig(**TINY_CONV, channels_last="off", amp="off"), tmp_path / "plain", progress=False)
    nhwc = train(TrainConfig(**TINY_CONV, channels_last="on", amp="off"), tmp_path / "nhwc", progress=False)
    bf16 = train(TrainConfig(**TINY_CONV, channels_last="on", amp="bf16"), tmp_path / "bf16", progress=False)
    a, b, c = (load_checkpoint(r, 2) for r in (plain, nhwc, bf16))
    assert all(t.dtype == a[k].dtype for k, t in c.items())  # float32 weights (and int64 counters)
    assert all(t.is_contiguous() for t in b.values())
    for k in a:  # the same computation in another memory layout: equal up to summation order
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-4, rtol=1e-3), k
    assert any(not torch.equal(a[k], c[k]) for k in a)  # bf16 really ran
    assert use_channels_last("auto", torch.nn.Conv2d(1, 1, 1), torch.device("cpu")) is False


def reference_crop_flip(x, shifts, flips, padding=4):
    """Per image: pad, crop at (dy, dx), flip left-right when drawn: the textbook loop."""
    out = []
    for img, dy, dx, f in zip(x, shifts[0], shifts[1], flips, strict=True):
        crop = F.pad(img, (padding,) * 4)[:, dy:dy + x.shape[2], dx:dx + x.shape[3]]
        out.append(crop.flip(-1) if f else crop)
    return torch.stack(out)


def test_device_augmentation_equals_the_per_image_loop():
    x = torch.randn(64, 3, 8, 8)
    g = torch.Generator().manual_seed(5)
    got = data.crop_flip(x, g)
    g = torch.Generator().manual_seed(5)
    shifts = torch.randint(0, 9, (2, 64), generator=g)
    flips = torch.rand(64, generator=g) < 0.5
    assert torch.equal(got, reference_crop_flip(x, shifts, flips))


def test_freeze_keeps_groups_bit_identical_to_epoch_0(tmp_path):
    run = train(TrainConfig(**TINY_CONV, freeze="conv1,fc*", augment=True), tmp_path / "run", progress=False)
    start, end = load_checkpoint(run, 0), load_checkpoint(run, 2)
    frozen = [k for k in start if k.startswith(("conv1.", "fc"))]
    assert any("running_mean" in k for k in frozen)  # BatchNorm statistics are frozen too
    assert all(torch.equal(start[k], end[k]) for k in frozen)
    assert not torch.equal(start["conv2.conv.weight"], end["conv2.conv.weight"])
    with pytest.raises(CriticalityError, match="matches no layer group"):
        train(TrainConfig(**TINY_CONV, freeze="block9"), tmp_path / "bad", progress=False)


def test_compile_wraps_the_training_model_only(tmp_path, monkeypatch):
    """--compile hands the training net to torch.compile; checkpoints come from the bare module."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda net: seen.append(net) or net)
    run = train(TrainConfig(**{**TINY_CONV, "model": "fcn-1x16", "width": None}, compile=True), tmp_path / "run",
                progress=False)
    assert len(seen) == 1 and set(load_checkpoint(run, 2)) == set(seen[0].state_dict())
