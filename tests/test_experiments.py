"""Every registered experiment end to end at quick scale, the CIFAR-10 / ImageNet paths on format
fixtures, and the paper's pattern on real Fashion-MNIST.

Run: ``.venv/bin/pytest tests/test_experiments.py -q`` (a few minutes on 2 cores). Each run trains,
analyses, draws and writes its report; the checks read the files a user would read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from criticality.cli import main
from criticality.errors import CriticalityError
from criticality.paper import experiments
from criticality.paper.data import DEBIAN_FASHION
from criticality.pipelines.run_experiment import run_experiment
from fixtures import write_cifar, write_tree

TINY_CONV = dict(epochs=2, max_train=300, max_test=120, device="cpu")


def test_registry_covers_every_figure():
    figures = {experiments.REGISTRY[k].figure for k in experiments.names()}
    # beyond: issue 13's interventions
    assert figures == {"1", "2", "3", "4", "5", "6", "8", "9", "10", "journal", "table1", "beyond"}
    assert all(k.count("/") == 2 for k in experiments.names())
    assert experiments.get("fcn-3x256").key == "fig1/fcn-3x256/mnist"
    with pytest.raises(CriticalityError, match="did you mean"):
        experiments.get("fig1/fcn-3x265/mnist")
    for key in experiments.names():
        for scale in experiments.SCALES:
            assert experiments.run_configs(experiments.get(key), scale, None)


@pytest.mark.slow
@pytest.mark.parametrize("key", [k for k in experiments.names() if experiments.get(k).sweep != "lm"])
def test_quick_scale_end_to_end(key, tmp_path):
    exp = experiments.get(key)
    overrides = {"device": "cpu"} if exp.data == "mnist" else TINY_CONV
    reports = run_experiment(exp, scale="quick", data="digits", out=tmp_path, progress=False, **overrides)
    assert reports and all(p.is_file() for p in reports)
    run = reports[0].parent
    cells = pd.read_csv(run / "analysis" / "cells.csv")
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert set(cells.op) == {"final", *(op for op in exp.ops if op not in ("criticality", "proxies"))}
    assert summary["data"]["name"] == "digits" and summary["data"]["stands_in_for"] == exp.data
    assert (run / "figures" / "robustness_error.png").stat().st_size > 10_000
    if exp.joint:
        assert cells.joint.any() and (run / "figures" / "joint_error.png").is_file()
    if exp.sweep == "width":
        widths = pd.read_csv(tmp_path / "widths.csv")
        assert sorted(widths.width.unique()) == [16, 64, 256] and (tmp_path / "figures" / "width_bars.png").is_file()


@pytest.mark.slow
def test_cifar10_and_imagenet_paths_on_format_fixtures(tmp_path):
    write_cifar(tmp_path / "cifar" / "cifar-10-batches-py", n=40)
    code = main(["--no-progress", "run", "fig5/resnet18/cifar10", "--data", "cifar10", "--data-root",
                 str(tmp_path / "cifar"), "--out", str(tmp_path / "c"), "--epochs", "1", "--device", "cpu"])
    assert code == 0 and (tmp_path / "c" / "report.html").is_file()
    write_tree(tmp_path / "imagenet")
    code = main(["--no-progress", "run", "fig6/resnet18/imagenet", "--data", "imagenet", "--data-root",
                 str(tmp_path / "imagenet"), "--image-size", "32", "--workers", "0", "--out", str(tmp_path / "i"),
                 "--epochs", "1", "--device", "cpu"])
    assert code == 0 and (tmp_path / "i" / "report.html").is_file()
    config = json.loads((tmp_path / "i" / "config.json").read_text())
    assert config["data"]["input_shape"] == [3, 32, 32] and config["data"]["num_classes"] == 3


@pytest.mark.slow
@pytest.mark.skipif(not Path(DEBIAN_FASHION).is_dir(), reason="apt package dataset-fashion-mnist not installed")
def test_fashion_mnist_shows_the_papers_pattern(tmp_path):
    """The paper's claims 1-3 (docs/paper.md) on the default experiment at quick scale (FCN 3x256, 10k images)."""
    assert main(["--no-progress", "run", "--out", str(tmp_path), "--device", "cpu"]) == 0
    cells = pd.read_csv(tmp_path / "analysis" / "cells.csv")
    final = cells[cells.op == "final"].error.iloc[0]
    rand = cells[cells.op == "rerandomize"].groupby("group").error.mean()
    assert (rand > 0.7).all(), rand  # 1. re-randomizing any layer: near chance (0.9)
    at0 = cells[(cells.op == "reinit") & (cells.checkpoint == 0)].set_index("group").delta_error
    assert at0["fc1"] > 0.1 and at0["fc1"] > 2 * at0.drop("fc1").max(), at0  # 2. first layer critical
    fc1 = cells[(cells.op == "reinit") & (cells.group == "fc1")].sort_values("checkpoint").error.to_numpy()
    assert fc1[-1] - final < 0.5 * (fc1[0] - final)  # 3. error falls back towards final along checkpoints
    assert np.all(np.diff(fc1) < 0.02)
    verdicts = {v["group"]: v["verdict"] for v in json.loads((tmp_path / "analysis" / "summary.json").read_text())
                ["verdicts"]}
    assert verdicts["fc1"] == "critical"


def test_train_split_analysis_goes_beside_the_test_one(tmp_path):
    assert main(["--no-progress", "train", "fcn-1x16", "--data", "digits", "--epochs", "2", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    assert main(["--no-progress", "analyze", str(tmp_path), "--seeds", "1", "--device", "cpu"]) == 0
    assert main(["--no-progress", "analyze", str(tmp_path), "--seeds", "1", "--split", "train",
                 "--device", "cpu"]) == 0
    test = json.loads((tmp_path / "analysis" / "summary.json").read_text())["data"]
    train = json.loads((tmp_path / "analysis_train" / "summary.json").read_text())["data"]
    assert (test["split"], test["n_test"]) == ("test", 360) and (train["split"], train["n_test"]) == ("train", 1437)
