"""Crash safety and file security: a killed job resumes exactly, outputs are atomic, untrusted files run no code.

Run: ``.venv/bin/pytest tests/test_reliability.py -q`` (about 40 s on 2 cores; digits, CPU, no internet).

Checks:

- ``criticality train`` killed with SIGKILL in the middle of epoch 3 (the kill is sent as soon as that
  epoch's progress bar appears on stderr, so it lands inside the epoch without any test hook), then rerun
  with the same command, ends with every tensor of every checkpoint and every logged metric equal to an
  uninterrupted run's;
- ``criticality analyze`` killed with SIGKILL mid-grid, then rerun, writes the same ``cells.csv`` as an
  uninterrupted analysis and computes only the missing cells (it says "resuming: N of M cells …");
- the crash windows inside one epoch: a run directory holding only config.json (killed during epoch 0's
  evaluation), epoch 0's checkpoint without resume state, a cells.jsonl whose last row lacks its newline;
- a failing writer inside ``files.atomic_write`` / ``atomic_path`` leaves the old file and no temporary file;
- security: a pickle renamed to ``.safetensors`` (with a matching sidecar checksum) is refused and never
  unpickled; a crafted ``state/resume.pt`` is refused by ``torch.load(weights_only=True)`` with a one-line
  error and runs no code. (The restricted CIFAR-10 unpickler is tested in
  ``tests/test_data.py::test_malicious_cifar_pickle_is_refused_not_run``.)
"""

from __future__ import annotations

import json
import os
import pickle
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from criticality import cli
from criticality.core.checkpoints import checkpoint_path, list_epochs, load_checkpoint
from criticality.core.stores import CellStore
from criticality.errors import CriticalityError
from criticality.infra.files import atomic_path, atomic_write, sha256_file, write_json
from criticality.paper.train import train
from criticality.paper.training.config import TrainConfig
from criticality.pipelines.analyze_run import analyze_run

# Five epochs of a small FCN on digits; checkpoints at 0, 1, 2, 3, 5 (epoch 4 lives only in state/).
CONFIG = dict(model="fcn-3x64", data="digits", epochs=5, batch_size=8, device="cpu")
TRAIN = ["train", "fcn-3x64", "--data", "digits", "--epochs", "5", "--batch-size", "8", "--device", "cpu"]
# The naive engine at batch 1 makes every cell take a while, so a kill lands mid-grid.
ANALYZE = dict(engine="naive", batch_size=1, seeds=3, device="cpu")
ANALYZE_ARGS = ["--engine", "naive", "--batch-size", "1", "--seeds", "3", "--device", "cpu"]
METRICS = ("train_loss", "train_error", "test_error", "test_loss", "lr")
# One intra-op thread, here and in the subprocesses: the same arithmetic in both, and no thread thrashing
# on a busy machine (two threads on two loaded cores made an epoch 30x slower).
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def criticality(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "criticality", *map(str, args)]


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path, epochs: list[int]) -> None:
    assert list_epochs(a) == list_epochs(b) == epochs
    for e in epochs:
        sa, sb = load_checkpoint(a, e), load_checkpoint(b, e)
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), f"epoch {e} differs"
    la, lb = read_log(a), read_log(b)
    assert [{k: r.get(k) for k in ("epoch", *METRICS)} for r in la] == \
           [{k: r.get(k) for k in ("epoch", *METRICS)} for r in lb]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.is_file() and p.name != ".lock"]  # .lock: the run's lock file


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    return train(TrainConfig(**CONFIG), tmp_path_factory.mktemp("reference") / "run", progress=False)


def kill_when_stderr_shows(proc: subprocess.Popen, marker: bytes, timeout: float = 300) -> bytes:
    """SIGKILL ``proc`` the moment ``marker`` appears on its stderr; returns what it had written."""
    fd, seen, deadline = proc.stderr.fileno(), b"", time.monotonic() + timeout
    try:
        while marker not in seen:
            assert time.monotonic() < deadline, f"no {marker!r} on stderr within {timeout} s"
            if select.select([fd], [], [], 1.0)[0]:
                chunk = os.read(fd, 1 << 16)
                assert chunk, f"exited ({proc.wait()}) before {marker!r}: {seen[-2000:]!r}"
                seen += chunk
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    return seen


def test_training_killed_mid_epoch_resumes_exactly(reference, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(criticality(*TRAIN, "--out", run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=ENV)
    kill_when_stderr_shows(proc, b"epoch 3/5")  # the bar appears once epochs 0-2 are saved
    assert proc.returncode == -9
    assert [r["epoch"] for r in read_log(run)] == [0, 1, 2] and list_epochs(run) == [0, 1, 2], \
        "the kill should land inside epoch 3"

    again = subprocess.run(criticality("--no-progress", *TRAIN, "--out", run), capture_output=True, text=True,
                           env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming {run} after epoch 2" in again.stderr
    assert_same_run(run, reference, [0, 1, 2, 3, 5])
    final = torch.load(run / "state" / "resume.pt", weights_only=True)
    ref = torch.load(reference / "state" / "resume.pt", weights_only=True)
    assert final["epoch"] == ref["epoch"] == 5
    assert torch.equal(final["generator"], ref["generator"])
    assert all(torch.equal(final["model"][k], ref["model"][k]) for k in ref["model"])
    assert not temp_files(run)


def test_analysis_killed_mid_grid_resumes_missing_cells(reference, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    shutil.copytree(reference, whole)
    shutil.copytree(reference, killed)
    analyze_run(whole, **ANALYZE, progress=False)
    expected = (whole / "analysis" / "cells.csv").read_text()
    total = len(expected.splitlines()) - 1  # rows under the header

    store = killed / "analysis" / "cells.jsonl"
    proc = subprocess.Popen(criticality("--no-progress", "analyze", killed, *ANALYZE_ARGS),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 300
    while not (store.is_file() and store.read_text().count("\n") >= 4):  # the header and 3 cells
        assert proc.poll() is None, "the analysis ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    rows = [line for line in store.read_text().split("\n")[1:] if line.endswith("}")]
    done = len(rows)
    assert 3 <= done < total and not (killed / "analysis" / "cells.csv").exists()

    again = subprocess.run(criticality("--no-progress", "analyze", killed, *ANALYZE_ARGS), capture_output=True,
                           text=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {done} of {total} cells already done" in again.stderr
    assert f"computing {total - done}" in again.stderr
    assert (killed / "analysis" / "cells.csv").read_text() == expected
    assert len(store.read_text().splitlines()) == 1 + total  # each cell stored once
    assert not temp_files(killed)


@pytest.mark.parametrize("window", ["config.json only", "epoch 0 without resume state"])
def test_killed_before_epoch_0_resume_state(reference, tmp_path, window):
    """Killed during epoch 0's evaluation (only config.json written) or right after its checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(reference / "config.json", run / "config.json")
    if window != "config.json only":
        shutil.copytree(reference / "checkpoints", run / "checkpoints",
                        ignore=lambda _, names: [n for n in names if not n.startswith("epoch_0000.")])
    train(TrainConfig(**{**CONFIG, "epochs": 2}), run, progress=False)
    for e in (0, 1, 2):
        a, b = load_checkpoint(run, e), load_checkpoint(reference, e)
        assert all(torch.equal(a[k], b[k]) for k in a), f"epoch {e} differs"
    assert [{k: r.get(k) for k in METRICS} for r in read_log(run)] == \
           [{k: r.get(k) for k in METRICS} for r in read_log(reference)[:3]]


def test_cell_store_repairs_a_missing_final_newline(tmp_path):
    path, settings = tmp_path / "cells.jsonl", {"model": "m"}
    rows = [{"op": "reinit", "group": g, "checkpoint": 0, "seed": None, "error": 0.5} for g in ("a", "b", "c")]
    store = CellStore(path, settings)
    store.add(rows[0])
    store.add(rows[1])
    path.write_text(path.read_text().rstrip("\n"))  # killed between a row and its newline
    store = CellStore(path, settings)
    assert len(store.rows) == 2
    store.add(rows[2])
    assert len(CellStore(path, settings).rows) == 3
    with pytest.raises(CriticalityError, match="other settings"):
        CellStore(path, {"model": "other"})


# ---- atomic writes ----

class WriterFailed(Exception):
    pass


@pytest.mark.parametrize("error", [WriterFailed, KeyboardInterrupt])
@pytest.mark.parametrize("how", ["atomic_write", "atomic_path"])
def test_failing_writer_keeps_old_file(tmp_path, how, error):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    with pytest.raises(error):
        if how == "atomic_write":
            with atomic_write(target) as f:
                f.write("half a ta")
                raise error()
        else:
            with atomic_path(target) as tmp:
                tmp.write_text("half a ta")
                raise error()
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_atomic_writers_replace_on_success(tmp_path):
    with atomic_write(tmp_path / "a.txt") as f:
        f.write("new")
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"\x00\x01")
    write_json(tmp_path / "c.json", {"x": 1})
    assert (tmp_path / "a.txt").read_text() == "new" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.json"]


# ---- untrusted files ----

class RunsShell:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run_cli(capsys, *argv: str | Path) -> tuple[int, str]:
    try:
        code = cli.main(["--no-progress", *map(str, argv)])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_pickle_disguised_as_safetensors_is_never_unpickled(reference, tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(reference, run)
    path = checkpoint_path(run, 5)
    path.write_bytes(pickle.dumps({"fc1.linear.weight": RunsShell(marker)}))
    sidecar = json.loads(path.with_suffix(".json").read_text())
    write_json(path.with_suffix(".json"), {**sidecar, "sha256": sha256_file(path)})  # the checksum passes
    with pytest.raises(CriticalityError, match="not a readable safetensors file"):
        load_checkpoint(run, 5)
    code, err = run_cli(capsys, "analyze", run, "--device", "cpu")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and "not a readable safetensors file" in err
    assert not marker.exists()


def test_crafted_resume_state_is_refused_without_running(reference, tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(reference, run)
    torch.save({"epoch": 5, "optimizer": RunsShell(marker), "scheduler": {}, "generator": None},
               run / "state" / "resume.pt")
    code, err = run_cli(capsys, *TRAIN, "--out", run)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines() == [err.strip()]
    assert "resume.pt is not a resume state this version can load" in err and "delete" in err
    assert not marker.exists()
    # The advice works: without state/ the run resumes from its last checkpoint.
    shutil.rmtree(run / "state")
    assert run_cli(capsys, *TRAIN, "--out", run)[0] == 0
    assert not marker.exists()
