"""``criticality run KEY``: train, analyse, draw and report a registered experiment end to end.

``run_experiment(exp)`` trains each of the experiment's runs (reusing finished ones), analyses them
(:func:`~criticality.pipelines.analyze_run.analyze_run`), draws the figures (``RUN/figures``) and writes
``RUN/report.html``; the width sweep adds ``OUT/widths.csv`` and the Fig 3 bars, the frozen-blocks
experiment ``OUT/table1.csv``; the journal's LM experiment is :mod:`criticality.pipelines.lm_experiment`.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import pandas as pd

from criticality.core import engine, stubs
from criticality.core.checkpoints import load_checkpoints
from criticality.infra import distributed
from criticality.infra.files import atomic_path, write_json
from criticality.output import figures as plots
from criticality.output import report
from criticality.output.tables import read_cells
from criticality.paper import data as datasets
from criticality.paper import models
from criticality.paper.experiments import Experiment, Sweep, run_configs
from criticality.paper.train import train
from criticality.paper.training.config import TrainConfig
from criticality.pipelines import lm_experiment
from criticality.pipelines.analyze_run import analyze_run, read_run


def run_experiment(exp: Experiment, *, scale: str = "quick", data: str | None = None, out: str | Path | None = None,
                   progress: bool = True, wait: bool = False, **overrides: Any) -> list[Path]:
    """Train (or resume), analyse, draw and report every run of ``exp``; returns the report paths."""
    if exp.sweep == Sweep.LM:  # the journal's decoder LM: an HF folder and a text corpus (lm_experiment)
        return lm_experiment.run(exp, scale=scale, out=out, progress=progress, data=data, **overrides)
    out = Path(out) if out else Path("runs") / exp.key / scale
    configs = run_configs(exp, scale, data, **overrides)
    reports, widths, is_main = [], [], True
    for name, cfg in configs.items():
        run_dir = out if len(configs) == 1 else out / name
        train(cfg, run_dir, progress=progress, wait=wait)
        is_main = distributed.setup(cfg.device).is_main
        if is_main:
            _note_experiment(run_dir, exp, scale)
        distributed.barrier()
        analyze_run(run_dir, seeds=exp.seeds, joint=[list(j) for j in exp.joint] or None, device=cfg.device,
                    progress=progress, wait=wait, ops=exp.ops, alphas=exp.alphas, sigmas=exp.sigmas)
        if not is_main:
            continue
        plots.draw_run(run_dir)
        reports.append(report.write_report(run_dir))
        if exp.sweep == Sweep.WIDTH:
            widths.append(_width_rows(run_dir, cfg))
    if exp.sweep == Sweep.FROZEN and is_main:
        _frozen_table(out, configs)
    if widths:
        table = pd.concat(widths, ignore_index=True)
        with atomic_path(out / "widths.csv") as tmp:
            table.to_csv(tmp, index=False)
        title = f"Fig 3, {scale} scale: layers 2..L reset to epoch 0"
        plots.save(plots.width_bars(table, title=title), out / "figures" / "width_bars")
    return reports


def _frozen_table(out: Path, configs: dict[str, TrainConfig]) -> pd.DataFrame:
    """Table 1 (journal): test error of the full model, mean ± std of single-block re-inits to epoch 0 over
    the frozen blocks, the full model with those blocks jointly re-initialized, removed (identity), and
    the model trained with them frozen. Written to ``out/table1.csv``."""
    full, frozen = out / "full", out / "frozen"
    cells = read_cells(full / "analysis" / "cells.csv")
    patterns = list(configs["frozen"].freeze_patterns)
    at0 = cells[(cells.op == "reinit") & (cells.checkpoint == 0)]
    single = at0[~at0.joint & at0.group.map(lambda g: any(fnmatch.fnmatchcase(g, p) for p in patterns))]
    joint = at0[at0.joint]
    final = lambda run: float(read_cells(run / "analysis" / "cells.csv").query("op == 'final'").error.iloc[0])  # noqa: E731
    table = pd.DataFrame([
        {"model": "full", "error": final(full)},
        {"model": "single block re-initialized (mean ± std)", "error": single.error.mean(), "std": single.error.std()},
        {"model": "re-initialized jointly", "error": float(joint.error.iloc[0]) if len(joint) else float("nan")},
        {"model": "removed jointly (identity)", "error": _removed_error(full, patterns)},
        {"model": "frozen jointly (trained so)", "error": final(frozen)},
    ])
    with atomic_path(out / "table1.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table


def _removed_error(run_dir: Path, patterns: list[str]) -> float:
    """Test error of the final model with the stages matching ``patterns`` returning their input (skipped, as
    the skip operation does: :func:`criticality.core.stubs.skipping`)."""
    config = read_run(run_dir)
    cfg, build = TrainConfig(**config["config"]), config["model"]["build"]
    model = models.build(**build, init=cfg.init)
    checkpoints = load_checkpoints(run_dir)
    model.load_state_dict(dict(checkpoints[max(checkpoints)]))
    removed = [prefix for prefix, _ in model.stages() if any(fnmatch.fnmatchcase(prefix, p) for p in patterns)]
    dataset = datasets.load(cfg.data, cfg.data_root, max_train=cfg.max_train, max_test=cfg.max_test,
                            image_size=cfg.image_size)
    with stubs.skipping(model, removed, {}):  # {}: each stage returns a tensor
        return engine.evaluate(model, dataset.test)["error"]


def _note_experiment(run_dir: Path, exp: Experiment, scale: str) -> None:
    config = read_run(run_dir)
    config["experiment"] = {"key": exp.key, "figure": exp.figure, "scale": scale, "paper_data": exp.data,
                            "columns": list(exp.columns) if scale == "paper" else None,
                            "assumptions": list(exp.assumptions), "stands_in": exp.stands_in or None}
    write_json(run_dir / "config.json", config)


def _width_rows(run_dir: Path, cfg: TrainConfig) -> pd.DataFrame:
    """Fig 3 rows, one per layer 2..L: Δ test error when that layer alone is reset to epoch 0."""
    cells = read_cells(run_dir / "analysis" / "cells.csv")
    at0 = cells[(cells.op == "reinit") & (cells.checkpoint == 0) & ~cells.joint]
    at0 = at0[at0.group != at0.group.iloc[0]]
    depth, width = (int(v) for v in cfg.model.removeprefix("fcn-").split("x"))
    return pd.DataFrame({"depth": depth, "width": width, "group": at0.group.to_numpy(), "seed": cfg.seed,
                         "delta_error": at0.delta_error.to_numpy(), "error": at0.error.to_numpy()})
