"""The paper's recipe in training: the lr of every epoch, kept checkpoints, the registry's paper columns.

Run: ``.venv/bin/pytest tests/test_schedules.py -q`` (about 20 s on 2 cores; tiny FCNs on digits).
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from criticality.errors import CriticalityError
from criticality.output import figures as plots
from criticality.paper import experiments
from criticality.paper.train import train
from criticality.paper.training.config import TrainConfig, checkpoint_epochs
from criticality.pipelines.analyze_run import analyze_run
from criticality.pipelines.run_experiment import _note_experiment

TINY = dict(model="fcn-1x16", data="digits", device="cpu", batch_size=64)


def test_piecewise_lr_for_the_whole_paper_schedule():
    c = TrainConfig(lr=0.1, epochs=100, schedule="piecewise", milestones="30,60,90", gamma=0.2)
    want = [0.1] * 30 + [0.02] * 30 + [0.004] * 30 + [0.0008] * 10  # epochs 1..100
    assert [c.lr_schedule.lr_at(e) for e in range(1, 101)] == pytest.approx(want)
    warm = dataclasses.replace(c, warmup=2)
    assert [warm.lr_schedule.lr_at(e) for e in (1, 2, 3, 31)] == pytest.approx([0.01, 0.055, 0.1, 0.02])


def test_the_optimizer_runs_at_lr_at(tmp_path):
    cfg = TrainConfig(**TINY, epochs=5, lr=0.05, schedule="piecewise", milestones="2,4", gamma=0.5, warmup=1)
    run = train(cfg, tmp_path / "run", progress=False)
    logged = [json.loads(line)["lr"] for line in (run / "log.jsonl").read_text().splitlines()[1:]]
    assert logged == pytest.approx([cfg.lr_schedule.lr_at(e) for e in range(1, 6)])
    assert logged == pytest.approx([0.005, 0.05, 0.025, 0.025, 0.0125])


def test_checkpoints_every_and_mixed_specs():
    assert checkpoint_epochs(5, "every") == [0, 1, 2, 3, 4, 5]
    assert checkpoint_epochs(100, "auto,8,90") == [0, 1, 2, 3, 5, 8, 10, 20, 40, 80, 90, 100]
    with pytest.raises(CriticalityError, match="--checkpoints"):
        checkpoint_epochs(5, "sometimes")
    with pytest.raises(CriticalityError, match="--milestones"):
        TrainConfig(milestones="30,x").validate()


def test_paper_scale_registry_follows_the_paper():
    for key in experiments.names():
        exp = experiments.get(key)
        if exp.sweep == "lm":  # the journal's LM (Adam, its own epochs): checked in test_lm_experiment.py
            continue
        for cfg in experiments.run_configs(exp, "paper", None).values():
            assert (cfg.schedule, cfg.milestones, cfg.gamma, cfg.epochs) == ("piecewise", "30,60,90", 0.2, 100), key
            assert cfg.weight_decay == 0 and not cfg.model.endswith("-bn"), key
            assert set(exp.columns) <= set(checkpoint_epochs(cfg.epochs, cfg.checkpoints)), key
        assert exp.assumptions, key
    assert experiments.get("fig1/fcn-3x256/mnist").columns == (0, 1, 2, 3, 8, 40, 90, 100)
    assert experiments.get("fig4/vgg11/cifar10").columns == (0, 1, 10, 100)
    sweep = experiments.run_configs(experiments.get("fig3/fcn-width-sweep/mnist"), "paper", None)
    assert {c.model for c in sweep.values()} == {f"fcn-{d}x{w}" for d in (3, 5) for w in (16, 32, 64, 128, 256, 512)}
    assert len(sweep) == 60


def test_paper_columns_are_what_analysis_and_figures_show(tmp_path):
    run = train(TrainConfig(**TINY, epochs=4, checkpoints="every"), tmp_path / "run", progress=False)
    exp = dataclasses.replace(experiments.get("fig1/fcn-3x256/mnist"), columns=(0, 2, 4))
    _note_experiment(run, exp, "paper")
    analyze_run(run, seeds=1, device="cpu", progress=False)
    cells = plots.read_cells(run / "analysis" / "cells.csv")
    assert sorted(cells[cells.op == "reinit"].checkpoint.unique()) == [0, 2]  # 4 is the final model
    distances = plots.read_distances(run / "analysis" / "distances.csv")
    assert sorted(distances.checkpoint.unique()) == [0, 1, 2, 3, 4]  # every kept epoch is measured
    config = json.loads((run / "config.json").read_text())
    assert config["experiment"]["columns"] == [0, 2, 4] and config["experiment"]["assumptions"]
    figures = plots.draw_run(run)
    assert run / "figures" / "distance_l2_rel.png" in figures
    grid, _, _ = plots.robustness_grid(cells)
    assert list(grid.columns) == ["rand", "0", "2", "final"]


def test_frozen_vs_removed_table_end_to_end(tmp_path):
    """Table 1 at toy scale: the frozen run's blocks stay at init; removed = the blocks as identity."""
    from criticality.pipelines.run_experiment import run_experiment

    exp = experiments.get("journal-table1/resnet18-frozen/cifar10")
    run_experiment(exp, scale="quick", data="digits", out=tmp_path, progress=False, epochs=1, max_train=200,
                   max_test=100, width=4, device="cpu")
    table = pd.read_csv(tmp_path / "table1.csv").set_index("model")
    assert len(table) == 5 and table.error.between(0, 1).all()
    config = json.loads((tmp_path / "frozen" / "config.json").read_text())
    assert config["config"]["freeze"] == "stage*.block2" and config["experiment"]["stands_in"]
