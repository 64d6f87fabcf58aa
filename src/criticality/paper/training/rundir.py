"""The run directory's files other than checkpoints (those are :mod:`criticality.core.checkpoints`)::

    RUN/config.json     resolved TrainConfig + provenance + data set + effective batch/lr (``resolved_config``)
    RUN/log.jsonl       one line per epoch: train/test error and loss, seconds, images/s (``append_log``)

``check_same_run`` refuses to resume a run directory written with other settings; ``record_extension``
keeps config.json true when a resumed run trains for more epochs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from torch import nn

from criticality.errors import CriticalityError
from criticality.infra import distributed
from criticality.infra.files import atomic_write, dumps, loads, write_json
from criticality.infra.provenance import provenance
from criticality.paper.data import Dataset, split_size
from criticality.paper.training.config import TrainConfig

RUN_FORMAT = 1  # bump when the run-directory layout changes incompatibly


def record_extension(path: Path, resolved: dict[str, Any]) -> None:
    """Keep config.json true when a resumed run trains for more epochs or keeps other checkpoints."""
    old = read_config(path)
    new_epochs, new_spec = resolved["config"]["epochs"], resolved["config"]["checkpoints"]
    if (old["config"]["epochs"], old["config"]["checkpoints"]) == (new_epochs, new_spec):
        return
    old.setdefault("extended", []).append({"from_epochs": old["config"]["epochs"], "to_epochs": new_epochs,
                                           "provenance": resolved["provenance"]})
    old["config"].update(epochs=new_epochs, checkpoints=new_spec)
    old["checkpoint_epochs"] = sorted(set(old.get("checkpoint_epochs", [])) | set(resolved["checkpoint_epochs"]))
    write_json(path, old)


def resolved_config(config: TrainConfig, dataset: Dataset, module: nn.Module,
                    ctx: distributed.Context) -> dict[str, Any]:
    """What config.json holds: the config as given, the data set, the model, the distributed setup, provenance."""
    d = dataset
    return {
        "format": RUN_FORMAT,
        "config": dataclasses.asdict(config),
        "data": {
            "name": d.name,
            "source": d.source,
            "normalization": d.normalization,
            "n_train": split_size(d.train),
            "n_test": split_size(d.test),
            "num_classes": d.num_classes,
            "input_shape": list(d.input_shape),
        },
        "model": {
            "name": getattr(module, "name", config.model),
            "build": getattr(module, "build_kwargs", {}),
            "parameters": sum(p.numel() for p in module.parameters()),
        },
        "checkpoint_epochs": config.kept_epochs,
        "distributed": {
            "world_size": ctx.world,
            "per_process_batch": -(-config.batch_size // ctx.world),  # at most; shares differ by ≤ 1 example
            "effective_batch_size": config.batch_size,
            "effective_lr": config.lr,
            "device": str(ctx.device),
        },
        "provenance": provenance(),
    }


def read_config(path: Path) -> dict:
    """A run's ``config.json`` as a dict; anything else is a one-line error naming the file."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CriticalityError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CriticalityError(f"{path} is not a run configuration (a JSON object)")
    return config


def check_same_run(old: dict, new: dict, run_dir: Path) -> None:
    if old.get("format") != RUN_FORMAT:
        raise CriticalityError(
            f"{run_dir} was written by an incompatible version of criticality "
            f"(run format {old.get('format')!r}, this version reads {RUN_FORMAT}); use a new --out"
        )
    ignore = {"epochs", "checkpoints", "device", "download", "data_root", "workers", "allow_divergence", "compile",
              "channels_last"}
    # A run written before a field existed ran with that field's default.
    a, b = {**dataclasses.asdict(TrainConfig()), **old.get("config", {})}, new["config"]
    if a.get("epochs") != b["epochs"] and b["schedule"] in ("step", "cosine"):
        raise CriticalityError(
            f"{run_dir} was trained with a {b['schedule']} schedule over {a.get('epochs')} epochs; "
            f"--epochs {b['epochs']} would change that schedule midway. Use a new --out"
        )
    differs = sorted(k for k in set(a) | set(b) if k not in ignore and a.get(k) != b.get(k))
    if differs:
        raise CriticalityError(
            f"{run_dir} holds a run with other settings ({', '.join(differs)} differ); "
            "use another --out or the same settings to resume"
        )


def logged_metrics(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k.startswith(("train_", "test_"))}


def append_log(run_dir: Path, record: dict[str, Any]) -> None:
    """Rewrite log.jsonl atomically with ``record`` replacing any earlier line for its epoch."""
    path = run_dir / "log.jsonl"
    lines = [loads(s) for s in path.read_text().splitlines() if s.strip()] if path.exists() else []
    lines = [r for r in lines if r["epoch"] < record["epoch"]] + [record]
    with atomic_write(path) as f:  # strict JSON: a NaN loss is the string "NaN" (see criticality.infra.files)
        f.writelines(dumps(r) + "\n" for r in lines)

