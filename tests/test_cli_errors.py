"""Every bad input gets one clear line: ``criticality: error: …`` on stderr, exit status 2, no traceback.

Run: ``.venv/bin/pytest tests/test_cli_errors.py -q`` (about 20 s on 2 cores; digits, CPU, no internet).

Checks, table-driven through ``criticality.cli.main`` (one case per row of ``CASES``): unknown experiment,
model and data-set names (with close matches suggested); missing data files (naming them and --download);
truncated or corrupted IDX files; a corrupted CIFAR-10 pickle; checkpoints of another architecture (for
analysis and for resuming training); a checkpoint altered after writing (sha256); a --groups pattern
matching nothing; an empty checkpoint set; no epoch 0; a run directory of an incompatible version
(config.json "format": 999); invalid numbers in options. Then: a checkpoint with inf weights is analysed,
recorded with finite=False and reported in a warning line; ``--debug`` shows the traceback; and one real
``python -m criticality`` process shows the same behaviour end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

from criticality import cli
from criticality.core.checkpoints import checkpoint_path, load_checkpoint, save_checkpoint
from criticality.errors import CriticalityError
from criticality.paper.train import train
from criticality.paper.training.config import TrainConfig
from fixtures import write_cifar, write_mnist

TINY = dict(model="fcn-2x16", data="digits", epochs=2, batch_size=64, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only thrash on a busy machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finished run (checkpoints 0, 1, 2) and a run of another architecture, shared read-only."""
    root = tmp_path_factory.mktemp("runs")
    return {"run": train(TrainConfig(**TINY), root / "run", progress=False),
            "wide": train(TrainConfig(**{**TINY, "model": "fcn-2x32", "epochs": 1}), root / "wide", progress=False)}


def run_cli(capsys, *argv: str | Path) -> tuple[int, str, str]:
    try:
        code = cli.main(["--no-progress", *map(str, argv)])
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ---- the table: each setup gets (tmp_path, a private copy of the run, runs) and returns argv ----

def copy_of(runs: dict[str, Path], tmp: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(runs[name], tmp / f"copy-{name}"))


def edit_config(run: Path, edit: Callable[[dict], None]) -> Path:
    config = json.loads((run / "config.json").read_text())
    edit(config)
    (run / "config.json").write_text(json.dumps(config))
    return run


def analyze(run: Path, *more: str) -> list:
    return ["analyze", run, "--device", "cpu", "--seeds", "1", *more]


def mnist(tmp: Path, damage: Callable[[Path], None], gz: bool = False) -> list:
    write_mnist(tmp / "mnist", gz=gz)
    damage(tmp / "mnist" / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    return ["train", "--data", "mnist", "--data-root", tmp / "mnist", "--out", tmp / "new"]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def corrupt_middle(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 8] = b"\xff" * 8
    path.write_bytes(bytes(raw))


def cifar(tmp: Path) -> list:
    write_cifar(tmp / "cifar" / "cifar-10-batches-py")
    (tmp / "cifar" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04\x95garbage, not a pickle")
    return ["train", "--data", "cifar10", "--data-root", tmp / "cifar", "--out", tmp / "new"]


def swap_checkpoint(run: Path, runs: dict[str, Path]) -> Path:
    """A valid checkpoint (its sidecar agrees) of another architecture, in place of epoch 1."""
    save_checkpoint(run, 1, load_checkpoint(runs["wide"], 1))
    return run


def swap_state(run: Path, runs: dict[str, Path]) -> Path:
    """The resume state of another architecture, in a run whose config.json is its own."""
    shutil.rmtree(run / "state")
    shutil.copytree(runs["wide"] / "state", run / "state")
    return run


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def alter(run: Path) -> Path:
    path = checkpoint_path(run, 1)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # one bit of one weight
    path.write_bytes(bytes(raw))
    return run


def delete_checkpoints(run: Path, epochs: tuple[int, ...]) -> Path:
    for e in epochs:
        checkpoint_path(run, e).unlink()
        checkpoint_path(run, e).with_suffix(".json").unlink()
    return run


def groups_file(tmp: Path, mapping: dict) -> Path:
    (tmp / "groups.json").write_text(json.dumps(mapping))
    return tmp / "groups.json"


def set_format(config: dict) -> None:
    config["format"] = 999


def set_model(config: dict) -> None:
    config["model"]["build"]["name"] = "fcn-3x16"


RESUME = ["train", "fcn-2x16", "--data", "digits", "--epochs", "3", "--batch-size", "64", "--device", "cpu",
          "--out"]

CASES = {
    # names
    "unknown experiment": (lambda t, r, runs: ["run", "fig1/fcn-3x265/mnist"],
                           "did you mean 'fig1/fcn-3x256/mnist'"),
    "unknown model": (lambda t, r, runs: ["train", "fcn-3x25b", "--data", "digits", "--out", t / "new"],
                      "unknown model 'fcn-3x25b'; did you mean 'fcn-3x256'"),
    "unknown data set": (lambda t, r, runs: ["train", "--data", "fashion", "--out", t / "new"],
                         "unknown --data 'fashion'; did you mean 'fashion-mnist'"),
    "unknown device": (lambda t, r, runs: analyze(r, "--device", "tpu"), "unknown device 'tpu'"),
    # data files
    "missing data set": (lambda t, r, runs: ["train", "--data", "mnist", "--data-root", t, "--out", t / "new"],
                         "train-images-idx3-ubyte[.gz]"),
    "missing data set names --download": (lambda t, r, runs: ["train", "--data", "mnist", "--data-root", t,
                                                              "--out", t / "new"], "--download"),
    "truncated IDX file": (lambda t, r, runs: mnist(t, truncate), "truncated or corrupt"),
    "corrupted gzip IDX file": (lambda t, r, runs: mnist(t, corrupt_middle, gz=True), "cannot read IDX file"),
    "corrupted CIFAR pickle": (lambda t, r, runs: cifar(t), "data_batch_3: not a readable CIFAR-10 batch"),
    # checkpoints and run directories
    "another architecture (config)": (lambda t, r, runs: analyze(edit_config(r, set_model)),
                                      "does not fit the model (another architecture?)"),
    "another architecture (checkpoint)": (lambda t, r, runs: analyze(swap_checkpoint(r, runs)),
                                          "checkpoint of epoch 1 does not fit the model"),
    "another architecture lists shapes": (lambda t, r, runs: analyze(swap_checkpoint(r, runs)),
                                          "fc1.linear.weight: (32, 64) vs model (16, 64)"),
    "another architecture (resume state)": (lambda t, r, runs: [*RESUME, swap_state(r, runs)],
                                            "resume.pt does not fit the model"),
    "other training settings": (lambda t, r, runs: [*RESUME, r, "--lr", "0.5"], "holds a run with other settings"),
    "checkpoint altered after writing": (lambda t, r, runs: analyze(alter(r)), "does not match the sha256"),
    "group pattern matching nothing": (lambda t, r, runs: analyze(r, "--groups", groups_file(t, {"a": ["fc9*"]})),
                                       "pattern 'fc9*' matches no state-dict key"),
    "groups file not JSON": (lambda t, r, runs: analyze(r, "--groups", write(t / "groups.json", "{")),
                             "not valid JSON"),
    "joint group of unknown groups": (lambda t, r, runs: analyze(r, "--joint", "fc1,fc7"), "'fc7' names no group"),
    "empty checkpoint set": (lambda t, r, runs: analyze(delete_checkpoints(r, (0, 1, 2))), "no checkpoints in"),
    "no epoch 0": (lambda t, r, runs: analyze(delete_checkpoints(r, (0,))), "no epoch 0"),
    "only epoch 0": (lambda t, r, runs: analyze(delete_checkpoints(r, (1, 2))), "holds only epoch 0"),
    "not a run directory": (lambda t, r, runs: analyze(t), "is not a run directory (no config.json)"),
    "config.json not JSON": (lambda t, r, runs: analyze(write(r / "config.json", "{").parent),
                             "config.json is not valid JSON"),
    "config.json not JSON (train)": (lambda t, r, runs: [*RESUME, write(r / "config.json", "{").parent],
                                     "config.json is not valid JSON"),
    "incompatible version (analyze)": (lambda t, r, runs: analyze(edit_config(r, set_format)),
                                       "incompatible version of criticality (run format 999"),
    "incompatible version (train)": (lambda t, r, runs: [*RESUME, edit_config(r, set_format)],
                                     "incompatible version of criticality (run format 999"),
    # numbers
    "--seeds -1": (lambda t, r, runs: analyze(r, "--seeds", "-1"), "--seeds: '-1' is not a non-negative integer"),
    "--batch-size 0 (analyze)": (lambda t, r, runs: analyze(r, "--batch-size", "0"),
                                 "--batch-size: '0' is not a positive integer"),
    "--batch-size 1.5": (lambda t, r, runs: analyze(r, "--batch-size", "1.5"), "'1.5' is not a positive integer"),
    "--max-examples 0": (lambda t, r, runs: analyze(r, "--max-examples", "0"), "'0' is not a positive integer"),
    "--threshold nan": (lambda t, r, runs: analyze(r, "--threshold", "nan"), "'nan' is not a non-negative number"),
    "--batch-size 0 (train)": (lambda t, r, runs: [*RESUME, r, "--batch-size", "0"],
                               "'0' is not a positive integer"),
    "--epochs 0": (lambda t, r, runs: ["train", "--epochs", "0", "--out", t], "--epochs: '0' is not a positive"),
    "--epochs ten": (lambda t, r, runs: ["train", "--epochs", "ten", "--out", t], "'ten' is not a positive integer"),
    "--lr -1": (lambda t, r, runs: ["train", "--lr", "-1", "--out", t], "--lr: '-1' is not a non-negative number"),
    "--lr inf": (lambda t, r, runs: ["train", "--lr", "inf", "--out", t], "'inf' is not a non-negative number"),
    "--checkpoints a,b": (lambda t, r, runs: [*RESUME, t / "new", "--checkpoints", "a,b"],
                          "--checkpoints must be auto, every or comma-separated epochs"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2(runs, tmp_path, capsys, case):
    setup, expected = CASES[case]
    argv = setup(tmp_path, copy_of(runs, tmp_path), runs)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("criticality: error: "), err
    assert expected in lines[0]
    assert not (tmp_path / "new").exists(), "a refused command must not leave a run directory behind"


def test_non_finite_cells_are_recorded_and_reported(runs, tmp_path, capsys):
    run = copy_of(runs, tmp_path)
    state = load_checkpoint(run, 2)
    state["fc1.linear.weight"].fill_(float("inf"))
    save_checkpoint(run, 2, state)
    code, _, err = run_cli(capsys, *analyze(run))
    assert code == 0, err
    assert "criticality: warning:" in err and "non-finite" in err and "finite=False" in err
    cells = pd.read_csv(run / "analysis" / "cells.csv")
    assert not cells.finite.all() and cells.finite.any()  # resetting fc1 to epoch 0 or 1 cures the model
    assert not cells[cells.op == "final"].finite.any()
    assert json.loads((run / "analysis" / "summary.json").read_text())["non_finite_cells"] == (~cells.finite).sum()


def test_debug_shows_the_traceback(runs, tmp_path):
    with pytest.raises(CriticalityError, match="not a run directory"):
        cli.main(["--debug", "analyze", str(tmp_path)])
    with pytest.raises(CriticalityError, match="not a run directory"):
        cli.main(["analyze", str(tmp_path), "--debug"])  # after the command name too


def test_real_process(tmp_path):
    """The installed entry point behaves the same: one line and 2, or the traceback with --debug."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "criticality", "analyze", str(tmp_path)]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 2 and plain.stderr.startswith("criticality: error: ")
    assert len(plain.stderr.splitlines()) == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "CriticalityError" in debug.stderr
