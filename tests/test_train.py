"""Training: the checkpoint schedule, the run directory, determinism and resuming.

Run: ``.venv/bin/pytest tests/test_train.py -q`` (about 30 s on 2 cores). Trains tiny FCNs on digits and on
a Fashion-MNIST subset (skipped only when the Debian package is absent).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from criticality.core.checkpoints import list_epochs, load_checkpoint
from criticality.errors import CriticalityError
from criticality.paper.data import DEBIAN_FASHION
from criticality.paper.train import train
from criticality.paper.training.config import TrainConfig, checkpoint_epochs

TINY = dict(model="fcn-2x32", data="digits", epochs=4, device="cpu", batch_size=64)


def test_checkpoint_schedule():
    assert checkpoint_epochs(20) == [0, 1, 2, 3, 5, 10, 20]
    assert checkpoint_epochs(100) == [0, 1, 2, 3, 5, 10, 20, 40, 80, 100]
    assert checkpoint_epochs(2) == [0, 1, 2]
    assert checkpoint_epochs(7, "0,4") == [0, 4, 7]
    with pytest.raises(CriticalityError):
        checkpoint_epochs(7, "a,b")


def test_run_directory_layout(tmp_path):
    run = train(TrainConfig(**TINY), tmp_path / "run", progress=False)
    assert list_epochs(run) == [0, 1, 2, 3, 4]
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["model"] == "fcn-2x32" and config["data"]["name"] == "digits"
    assert config["provenance"]["version"] and "git_commit" in config["provenance"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3, 4]
    assert log[-1]["test_error"] < log[0]["test_error"]
    sidecar = json.loads((run / "checkpoints" / "epoch_0004.json").read_text())
    assert sidecar["epoch"] == 4 and len(sidecar["sha256"]) == 64 and "test_error" in sidecar
    assert (run / "state" / "resume.pt").is_file()


def test_epoch_zero_is_the_initialization(tmp_path):
    from criticality.paper import data, models

    run = train(TrainConfig(**TINY, init="glorot"), tmp_path / "run", progress=False)
    ds = data.load("digits")
    fresh = models.build("fcn-2x32", ds.input_shape, ds.num_classes, init="glorot",
                         generator=torch.Generator().manual_seed(0))
    saved = load_checkpoint(run, 0)
    assert all(torch.equal(saved[k], v) for k, v in fresh.state_dict().items())


def test_deterministic_and_resume_matches_uninterrupted(tmp_path):
    whole = train(TrainConfig(**TINY), tmp_path / "whole", progress=False)
    again = train(TrainConfig(**TINY), tmp_path / "again", progress=False)
    part = train(TrainConfig(**{**TINY, "epochs": 2}), tmp_path / "part", progress=False)
    resumed = train(TrainConfig(**TINY), part, progress=False)
    for e in [0, 1, 2, 3, 4]:
        a, b, c = (load_checkpoint(r, e) for r in (whole, again, resumed))
        assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a), f"epoch {e} differs"


def test_other_settings_refused(tmp_path):
    train(TrainConfig(**{**TINY, "epochs": 1}), tmp_path / "run", progress=False)
    with pytest.raises(CriticalityError, match="other settings"):
        train(TrainConfig(**{**TINY, "lr": 0.5}), tmp_path / "run", progress=False)


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", 0), ("lr", -1.0), ("seed", -1),
                                         ("schedule", "linear")])
def test_invalid_config(field, value, tmp_path):
    with pytest.raises(CriticalityError):
        train(TrainConfig(**{**TINY, field: value}), tmp_path / "run", progress=False)


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_schedules_and_augmentation(schedule, tmp_path):
    run = train(TrainConfig(**{**TINY, "schedule": schedule, "augment": True, "model": "vgg11-bn", "width": 4,
                               "epochs": 2, "max_train": 300}), tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["lr"] < 0.01


@pytest.mark.skipif(not Path(DEBIAN_FASHION).is_dir(), reason="apt package dataset-fashion-mnist not installed")
def test_fashion_mnist_subset_learns(tmp_path):
    run = train(TrainConfig(model="fcn-3x256", data="fashion-mnist", epochs=2, max_train=10000, max_test=2000,
                            device="cpu"), tmp_path / "run", progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["test_error"] < 0.25


def test_extending_a_run(tmp_path):
    """More epochs: refused when the lr schedule depends on the length; recorded in config.json otherwise."""
    train(TrainConfig(**{**TINY, "epochs": 2, "schedule": "cosine"}), tmp_path / "cos", progress=False)
    with pytest.raises(CriticalityError, match="cosine schedule over 2 epochs"):
        train(TrainConfig(**{**TINY, "schedule": "cosine"}), tmp_path / "cos", progress=False)
    run = train(TrainConfig(**{**TINY, "epochs": 2}), tmp_path / "const", progress=False)
    train(TrainConfig(**TINY), run, progress=False)
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["epochs"] == 4 and config["checkpoint_epochs"] == [0, 1, 2, 3, 4]
    assert config["extended"][0]["from_epochs"] == 2
