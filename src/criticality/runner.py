"""The steps the CLI composes: analyse a run directory, and run a registered experiment end to end.

``analyze_run(RUN)`` rebuilds the model from ``RUN/config.json``, loads the checkpoints and the data,
runs :func:`criticality.analyze` (resumable through ``RUN/analysis/cells.jsonl``) and writes::

    RUN/analysis/cells.csv        one row per cell (also cells.parquet when pyarrow is installed)
    RUN/analysis/distances.csv    normalized ℓ2 / ℓ∞ / cosine distance to epoch 0, per group and checkpoint
    RUN/analysis/summary.json     verdicts, threshold, chance error, group coverage, data set, provenance

``run_experiment(exp)`` trains each of the experiment's runs (reusing finished ones), analyses them,
draws the figures (``RUN/figures``) and writes ``RUN/report.html``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from criticality import data as datasets
from criticality import distributed, interventions, models, plots, report
from criticality.analysis import DEFAULT_THRESHOLD, finish, make_plan, run_cells
from criticality.checkpoints import load_checkpoints
from criticality.errors import CriticalityError
from criticality.experiments import Experiment, run_configs
from criticality.files import atomic_path, write_json
from criticality.provenance import provenance
from criticality.store import cell_key
from criticality.train import RUN_FORMAT, TrainConfig, read_config, train


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """``RUN/config.json``, checked for a format this version reads."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CriticalityError(f"{run_dir} is not a run directory (no config.json); train one with `criticality train`")
    config = read_config(path)
    if config.get("format") != RUN_FORMAT:
        raise CriticalityError(f"{run_dir} was written by an incompatible version of criticality "
                               f"(run format {config.get('format')!r}, this version reads {RUN_FORMAT})")
    return config


def analyze_run(run_dir: str | Path, *, groups: str | dict = "model", seeds: int = 3,
                joint: Sequence[Sequence[str]] | None = None, split: str = "test", engine: str = "fast",
                batch_size: int = 1000, device: str = "auto", max_examples: int | None = None,
                threshold: float = DEFAULT_THRESHOLD, buffers: str = "reset", progress: bool = True,
                ops: Sequence[str] | str = interventions.PAPER_OPS, alphas: Sequence[float] | None = None,
                sigmas: Sequence[float] | None = None, eps: float | None = None) -> Path:
    """Analyse a training run directory and write ``RUN/analysis`` (``RUN/analysis_train`` for the training
    split); returns that directory. ``ops`` adds interventions (:mod:`criticality.interventions`) and
    ``criticality`` / ``proxies``, whose tables land beside cells.csv (rank 0 only under torchrun)."""
    grid_ops, extras = interventions.split_ops(ops)
    run_dir = Path(run_dir)
    config = read_run(run_dir)
    try:
        cfg, build = TrainConfig(**config["config"]), config["model"]["build"]
    except (KeyError, TypeError) as e:
        raise CriticalityError(f"{run_dir / 'config.json'} is incomplete or has unknown fields ({e})") from e
    if split not in ("test", "train"):
        raise CriticalityError(f"--split must be test or train, got {split!r}")
    ctx = distributed.setup(device)
    dataset = datasets.load(cfg.data, cfg.data_root, max_train=cfg.max_train, max_test=cfg.max_test,
                            image_size=cfg.image_size)
    split_data = dataset.test if split == "test" else dataset.train
    data = split_data if isinstance(split_data, tuple) else torch.utils.data.DataLoader(
        split_data, batch_size=batch_size, num_workers=cfg.workers)
    model = models.build(**build, init=cfg.init)
    plan = make_plan(model, load_checkpoints(run_dir), groups, seeds, joint, None, None, None, ("error", "loss"),
                     engine, batch_size, max_examples, buffers,
                     calibration=_calibration(dataset, cfg) if buffers == "recalibrate" else None, ops=grid_ops,
                     alphas=alphas or interventions.DEFAULT_ALPHAS, sigmas=sigmas or interventions.DEFAULT_SIGMAS,
                     probe=data)
    out = run_dir / ("analysis" if split == "test" else f"analysis_{split}")  # the report reads analysis/
    store = out / ("cells.jsonl" if ctx.world == 1 else f"cells.rank{ctx.rank}-of-{ctx.world}.jsonl")
    rows = run_cells(plan, data, device=ctx.device, store=str(store),
                     shard=(ctx.rank, ctx.world) if ctx.world > 1 else None, progress=progress and ctx.is_main)
    rows = _merge_shards(distributed.gather(rows), plan)
    if not ctx.is_main:
        distributed.barrier()  # return once rank 0 has written the tables
        return out
    result = finish(plan, rows, threshold=threshold, provenance={**provenance(), "world_size": ctx.world,
                                                                 "device": str(ctx.device)})
    n = int(result.table.n.iloc[0])
    paper_data = config.get("experiment", {}).get("paper_data")
    result.summary.update(
        chance_error=1 - 1 / dataset.num_classes,
        data={"name": dataset.name, "split": split, "n_test": n, "max_examples": max_examples,
              "stands_in_for": paper_data if paper_data and paper_data != dataset.name else None,
              "source": dataset.source})
    if extras:
        result.summary.update(interventions.run_extras(
            plan, data, out, result.table, extras, draws=seeds, alphas=alphas, sigmas=sigmas, eps=eps,
            device=ctx.device, store=str(store), progress=progress))
    write_tables(out, result.table, result.distances, result.summary)
    distributed.barrier()
    return out


CALIBRATION_EXAMPLES = 2048  # training images that re-estimate BatchNorm statistics (buffers="recalibrate")


def _calibration(dataset: datasets.Dataset, cfg: TrainConfig):
    """The first CALIBRATION_EXAMPLES training examples, unaugmented, for buffers="recalibrate"."""
    train = dataset.train
    if isinstance(train, tuple):
        return train[0][:CALIBRATION_EXAMPLES], train[1][:CALIBRATION_EXAMPLES]
    subset = torch.utils.data.Subset(train, range(min(CALIBRATION_EXAMPLES, len(train))))
    return torch.utils.data.DataLoader(subset, batch_size=256, num_workers=cfg.workers)


def _merge_shards(shards: list[list[dict]], plan) -> list[dict]:
    """Rank-order shards back into grid order (rank r evaluated cells r, r + W, r + 2W, …; a rank beyond
    the number of cells evaluated none)."""
    world = len(shards)
    if [len(s) for s in shards] != [len(plan.cells[r::world]) for r in range(world)]:
        raise CriticalityError(f"shards of {[len(s) for s in shards]} rows do not split {len(plan.cells)} cells "
                               f"over {world} processes")
    merged = [shards[i % world][i // world] for i in range(len(plan.cells))]
    for row, cell in zip(merged, plan.cells, strict=True):
        if cell_key(row) != cell_key(cell.as_dict()):
            raise CriticalityError(f"shard row {cell_key(row)} is out of place (expected {cell_key(cell.as_dict())})")
    return merged


def write_tables(out: Path, table: pd.DataFrame, dist: pd.DataFrame, summary: dict) -> None:
    with atomic_path(out / "cells.csv") as tmp:
        table.to_csv(tmp, index=False)
    try:
        import pyarrow  # noqa: F401  (optional: parquet output)

        with atomic_path(out / "cells.parquet") as tmp:
            table.to_parquet(tmp, index=False)
    except ImportError:
        pass
    with atomic_path(out / "distances.csv") as tmp:
        dist.to_csv(tmp, index=False)
    write_json(out / "summary.json", summary)


def run_experiment(exp: Experiment, *, scale: str = "quick", data: str | None = None, out: str | Path | None = None,
                   progress: bool = True, **overrides: Any) -> list[Path]:
    """Train (or resume), analyse, draw and report every run of ``exp``; returns the report paths."""
    out = Path(out) if out else Path("runs") / exp.key / scale
    configs = run_configs(exp, scale, data, **overrides)
    reports, widths, is_main = [], [], True
    for name, cfg in configs.items():
        run_dir = out if len(configs) == 1 else out / name
        train(cfg, run_dir, progress=progress)
        is_main = distributed.setup(cfg.device).is_main
        if is_main:
            _note_experiment(run_dir, exp, scale)
        distributed.barrier()
        analyze_run(run_dir, seeds=exp.seeds, joint=[list(j) for j in exp.joint] or None, device=cfg.device,
                    progress=progress, ops=exp.ops, alphas=exp.alphas, sigmas=exp.sigmas)
        if not is_main:
            continue
        plots.draw_run(run_dir)
        reports.append(report.write_report(run_dir))
        if exp.sweep == "width":
            widths.append(_width_rows(run_dir, cfg))
    if widths:
        table = pd.concat(widths, ignore_index=True)
        with atomic_path(out / "widths.csv") as tmp:
            table.to_csv(tmp, index=False)
        plots.save(plots.width_bars(table, title=exp.description), out / "figures" / "width_bars")
    return reports


def _note_experiment(run_dir: Path, exp: Experiment, scale: str) -> None:
    config = read_run(run_dir)
    config["experiment"] = {"key": exp.key, "figure": exp.figure, "scale": scale, "paper_data": exp.data}
    write_json(run_dir / "config.json", config)


def _width_rows(run_dir: Path, cfg: TrainConfig) -> pd.DataFrame:
    """Fig 3 rows: Δ test error when each layer except the first is reset to epoch 0."""
    cells = plots.read_cells(run_dir / "analysis" / "cells.csv")
    at0 = cells[(cells.op == "reinit") & (cells.checkpoint == 0) & ~cells.joint]
    at0 = at0[at0.group != at0.group.iloc[0]]
    width = int(cfg.model.split("x")[-1])
    return pd.DataFrame({"width": width, "group": at0.group.to_numpy(), "seed": cfg.seed,
                         "delta_error": at0.delta_error.to_numpy()})
