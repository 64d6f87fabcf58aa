"""The command line does what it says, and a hostile or unlucky user still gets one clear line.

Run: ``.venv/bin/pytest tests/test_cli.py -q`` (about 60 s on 2 cores; digits, CPU, no internet).

Checks: malformed --groups files (wrong types, empty, non-string patterns, duplicate names); grids too
large to run; option values with close matches (``--init xavier``); ``list zzz``; a corrupt summary.json
under ``report``; experiments by any unique part of their key; the verdict table after ``analyze``;
divergence (stops by default, ``--allow-divergence`` goes on) and strict JSON everywhere; the run-directory
lock (refused with the holder's PID, ``--wait``, a dead holder's lock taken over); one permission rule;
disk full while writing a checkpoint or the tables; a read-only run directory; SIGTERM and Ctrl-C during
training and analysis (clean line, resumable); a checkpoint holding NaN; exit codes 130, 143 and 1; only
rank 0 prints under torchrun; the installed console script; parquet output.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import criticality.core.run
from criticality import cli
from criticality.core.checkpoints import list_epochs, load_checkpoint, save_checkpoint
from criticality.errors import CriticalityError
from criticality.infra import files, lock
from criticality.paper.train import train
from criticality.paper.training.config import TrainConfig

TINY = dict(model="fcn-2x16", data="digits", epochs=2, batch_size=64, device="cpu")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished run (checkpoints 0, 1, 2), copied by every test that writes into it."""
    return train(TrainConfig(**TINY), tmp_path_factory.mktemp("runs") / "run", progress=False)


def copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("analysis", ".lock"))
    return out


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main(["--no-progress", *map(str, argv)])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    said = [line for line in err.strip().splitlines() if line.startswith("criticality:")]
    assert len(said) == 1 and said[0] == err.strip().splitlines()[-1], err  # progress lines may precede it
    assert said[0].startswith("criticality: error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


GROUP_FILES = {
    "int value": ('{"a": 3}', "must be a pattern or a list"),
    "empty list": ('{"a": []}', "empty list"),
    "non-string pattern": ('{"a": [1]}', "non-empty strings"),
    "empty pattern": ('{"a": [""]}', "non-empty strings"),
    "null pattern": ('{"a": [null]}', "non-empty strings"),
    "dict value": ('{"a": {"b": 1}}', "must be a pattern or a list"),
    "no groups": ("{}", "no groups"),
    "a list": ('["fc1"]', "expected a JSON object"),
    "duplicate": ('{"a": ["fc1"], "a": ["fc2"]}', "defined twice"),
    "empty name": ('{"": ["fc1"]}', "non-empty strings"),
    "not json": ("{a: 1", "not valid JSON"),
    "binary": (b"\xff\xfe\x00", "not valid JSON"),
    "dead pattern": ('{"a": ["nothing*"]}', "matches no state-dict key"),
}


@pytest.mark.parametrize("case", GROUP_FILES, ids=list(GROUP_FILES))
def test_malformed_group_files_are_one_line(run, tmp_path, capsys, case):
    text, words = GROUP_FILES[case]
    spec = tmp_path / "groups.json"
    spec.write_bytes(text if isinstance(text, bytes) else text.encode())
    code, _, err = run_cli(capsys, "analyze", run, "--groups", spec, "--device", "cpu")
    one_line_error(code, err, words)


def test_grid_too_large_is_refused_before_any_cell(run, tmp_path, capsys):
    for seeds in ("100000000000", "100000"):
        code, _, err = run_cli(capsys, "analyze", copy(run, tmp_path / seeds), "--seeds", seeds, "--device", "cpu")
        one_line_error(code, err, "seeds" if len(seeds) > 6 else "cells")
    assert not (tmp_path / "100000" / "run" / "analysis" / "cells.jsonl").exists()


@pytest.mark.parametrize("argv,words", [
    (["train", "--init", "xavier"], ["'glorot'"]),
    (["train", "--schedule", "cosin"], ["'cosine'"]),
    (["train", "--data", "fashionmnist"], ["'fashion-mnist'"]),
    (["list", "zzz"], ["no experiment matches 'zzz'"]),
    (["list", "--models", "zzz"], ["no model matches"]),
    (["run", "zzz"], ["unknown experiment"]),
])
def test_option_values_are_checked(tmp_path, capsys, argv, words):
    if argv[0] == "train":
        argv = [*argv, "--out", tmp_path / "x"]
    code, _, err = run_cli(capsys, *argv)
    one_line_error(code, err, *words)
    assert not (tmp_path / "x").exists()


def test_experiments_match_any_unique_part_of_their_key():
    from criticality.paper import experiments

    assert experiments.get("fcn-3x256").key == "fig1/fcn-3x256/mnist"  # beside beyond/fcn-3x256-interventions
    assert experiments.get("1/fcn-3x2").key == "fig1/fcn-3x256/mnist"
    with pytest.raises(CriticalityError, match="ambiguous: fig1/fcn-3x256/mnist, beyond/fcn-3x256-interventions"):
        experiments.get("3x256")
    assert experiments.get("fig6/resnet50").key == "fig6/resnet50/imagenet"
    assert experiments.get("fcn-5x256").key == "fig2/fcn-5x256/mnist"  # a whole component wins over fig8's key


def test_report_on_corrupt_or_missing_summary_is_one_line(run, tmp_path, capsys):
    r = copy(run, tmp_path)
    one_line_error(*run_cli(capsys, "report", r)[::2], "no analysis")
    (r / "analysis").mkdir()
    (r / "analysis" / "summary.json").write_text("{not json")
    one_line_error(*run_cli(capsys, "report", r)[::2], "not valid JSON")
    (r / "analysis" / "summary.json").write_text("[1, 2]")
    one_line_error(*run_cli(capsys, "report", r)[::2], "not an analysis summary")


def test_analyze_prints_the_verdict_table_and_writes_strict_json(run, tmp_path, capsys):
    r = copy(run, tmp_path)
    code, out, err = run_cli(capsys, "analyze", r, "--device", "cpu", "--seeds", "1")
    assert code == 0, err
    head, *rows = out.splitlines()[:4]
    assert head.split()[:2] == ["group", "Δ"] and "verdict" in head and "re-randomized" in head
    summary = json.loads((r / "analysis" / "summary.json").read_text())
    assert [row.split()[0] for row in rows] == [v["group"] for v in summary["verdicts"]]
    assert [row.split()[2] for row in rows] == [v["verdict"] for v in summary["verdicts"]]
    assert "analysis: 10 cells" in err
    pyarrow = pytest.importorskip("pyarrow")
    assert pyarrow is not None
    parquet = pd.read_parquet(r / "analysis" / "cells.parquet")
    csv = pd.read_csv(r / "analysis" / "cells.csv")
    assert list(parquet.columns) == list(csv.columns) and (parquet.error.to_numpy() == csv.error.to_numpy()).all()


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_divergence_stops_loudly_or_goes_on_when_allowed(tmp_path, capsys):
    argv = ["train", "fcn-2x16", "--data", "digits", "--epochs", "3", "--lr", "1e12", "--device", "cpu"]
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "a")
    one_line_error(code, err, "diverged in epoch 1", "--allow-divergence")
    assert list_epochs(tmp_path / "a") == [0]  # the last finite epoch is kept, the diverged one is not
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "b", "--allow-divergence")
    assert code == 0 and "warning: epoch 1" in err and "diverged" in err
    log = [strict_json(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log[1]["train_loss"] == "NaN"  # strict JSON: the string, which files.loads turns back into a float
    assert files.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[1])["train_loss"] != 0
    for path in (tmp_path / "b").rglob("*.json"):
        strict_json(path.read_text())


def test_json_writers_are_strict_and_round_trip(tmp_path):
    obj = {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}, "e": "x"}
    files.write_json(tmp_path / "x.json", obj)
    text = (tmp_path / "x.json").read_text()
    assert strict_json(text) == {"a": "NaN", "b": ["Infinity", 1.5], "c": {"d": "-Infinity"}, "e": "x"}
    back = files.read_json(tmp_path / "x.json")
    assert back["a"] != back["a"] and back["c"]["d"] == -float("inf")


def test_nan_checkpoint_is_recorded_not_a_crash(run, tmp_path, capsys):
    r = copy(run, tmp_path)
    state = load_checkpoint(r, 2)
    state["fc1.linear.weight"].fill_(float("nan"))
    save_checkpoint(r, 2, state)
    code, _, err = run_cli(capsys, "analyze", r, "--device", "cpu", "--seeds", "1")
    assert code == 0, err
    assert "non-finite" in err
    for name in ("summary.json",):
        strict_json((r / "analysis" / name).read_text())
    for line in (r / "analysis" / "cells.jsonl").read_text().splitlines():
        strict_json(line)


def test_outputs_share_one_permission_rule(run):
    mode = files.output_mode()
    outputs = [p for p in run.rglob("*") if p.is_file() and p.name != ".lock"]
    assert any(p.suffix == ".safetensors" for p in outputs) and any(p.suffix == ".pt" for p in outputs)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in outputs} == {p.name: mode for p in outputs}


def test_lock_refuses_a_second_process_names_it_and_waits_when_asked(run, tmp_path, capsys):
    r = copy(run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from criticality.infra import lock; fd = lock.acquire(sys.argv[1], 'test holder'); "
        "print('held', flush=True); time.sleep(float(sys.argv[2]))"), str(r), "4"],
        stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_cli(capsys, "analyze", r, "--device", "cpu", "--seeds", "1")
        one_line_error(code, err, f"PID {holder.pid}", "test holder", "--wait")
        code, _, err = run_cli(capsys, "train", "fcn-2x16", "--data", "digits", "--epochs", "3", "--out", r)
        one_line_error(code, err, f"PID {holder.pid}")
        start = time.monotonic()
        code, _, err = run_cli(capsys, "analyze", r, "--device", "cpu", "--seeds", "1", "--wait")
        assert code == 0 and "waiting for PID" in err and time.monotonic() - start > 1
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", (
        "import sys, os; from criticality.infra import lock; lock.acquire(sys.argv[1], 'killed'); os._exit(9)"),
        str(tmp_path)], env=ENV)
    assert dead.returncode == 9 and "killed" in (tmp_path / lock.NAME).read_text()
    with lock.held(tmp_path, "next"):
        assert json.loads((tmp_path / lock.NAME).read_text())["pid"] == os.getpid()


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_files(run, tmp_path, capsys, monkeypatch):
    r = copy(run, tmp_path)
    before = {p: p.read_bytes() for p in r.rglob("*") if p.is_file()}
    monkeypatch.setattr("criticality.core.checkpoints.save_file", enospc)
    code, _, err = run_cli(capsys, "train", "fcn-2x16", "--data", "digits", "--epochs", "3", "--batch-size", "64",
                           "--device", "cpu", "--out", r)
    one_line_error(code, err, "No space left on device", "intact")
    kept = (".lock", "config.json")  # config.json records the extension to 3 epochs before training starts
    after = {p: p.read_bytes() for p in r.rglob("*") if p.is_file() and p.name not in kept}
    assert after == {p: b for p, b in before.items() if p.name not in kept}  # no temporary file, nothing changed
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "train", "fcn-2x16", "--data", "digits", "--epochs", "3", "--batch-size", "64",
                           "--device", "cpu", "--out", r)
    assert code == 0 and list_epochs(r) == [0, 1, 2, 3], err


def test_disk_full_while_writing_the_tables_keeps_the_previous_ones(run, tmp_path, capsys, monkeypatch):
    r = copy(run, tmp_path)
    assert run_cli(capsys, "analyze", r, "--device", "cpu", "--seeds", "1")[0] == 0
    tables = {p: p.read_bytes() for p in (r / "analysis").iterdir()}
    monkeypatch.setattr(pd.DataFrame, "to_csv", enospc)
    code, _, err = run_cli(capsys, "analyze", r, "--device", "cpu", "--seeds", "1")
    one_line_error(code, err, "No space left on device", "cells.csv")
    assert {p: p.read_bytes() for p in (r / "analysis").iterdir()} == tables


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_run_directory(run, tmp_path, capsys):
    r = copy(run, tmp_path)
    for p in [r, *r.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        one_line_error(*run_cli(capsys, "analyze", r, "--device", "cpu")[::2], "not writable")
        one_line_error(*run_cli(capsys, "report", r)[::2])
    finally:
        for p in [r, *r.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


def test_read_only_run_directory_as_root(run, tmp_path, capsys, monkeypatch):
    """The same refusal, simulated where the tests run as root (which may write anywhere)."""
    r = copy(run, tmp_path)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(r / lock.NAME))

    monkeypatch.setattr(lock.os, "open", read_only)
    one_line_error(*run_cli(capsys, "analyze", r, "--device", "cpu")[::2], "not writable")
    monkeypatch.undo()
    assert run_cli(capsys, "analyze", r, "--device", "cpu", "--seeds", "1")[0] == 0
    monkeypatch.setattr("criticality.infra.files.tempfile.mkstemp", read_only)
    one_line_error(*run_cli(capsys, "report", r)[::2], "Read-only file system")


def start(argv: list, marker: bytes, cwd: Path) -> subprocess.Popen:
    """Start the CLI; return once its stderr matches the regular expression ``marker``."""
    proc = subprocess.Popen([sys.executable, "-m", "criticality", *map(str, argv)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, deadline = b"", time.monotonic() + 120
    while not re.search(marker, seen):
        assert time.monotonic() < deadline and proc.poll() is None, seen
        seen += os.read(proc.stderr.fileno(), 1 << 16)
    return proc


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
                         ids=["sigterm", "ctrl-c"])
def test_signals_during_training_and_analysis_are_clean_and_resumable(run, tmp_path, capsys, sig, code, word):
    train_argv = ["train", "fcn-2x16", "--data", "digits", "--epochs", "40", "--batch-size", "16", "--device", "cpu",
                  "--out", "t"]
    proc = start(train_argv, b"epoch 2/40", tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and word in err.decode() and "Traceback" not in err.decode(), err
    assert err.decode().strip().splitlines()[-1].startswith("criticality: ")
    assert list_epochs(tmp_path / "t")[:2] == [0, 1] and not list((tmp_path / "t").rglob(".*.*"))

    r = copy(run, tmp_path)
    # 97 cells of 360 one-example batches: several seconds, so the signal lands mid-grid
    analyze = ["analyze", r, "--engine", "naive", "--batch-size", "1", "--seeds", "30", "--device", "cpu"]
    proc = start(analyze, rb" [1-9]\d?/97 \[", tmp_path)  # the bar shows at least one cell stored
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and word in err.decode(), err
    code, _, err = run_cli(capsys, *analyze)  # in this process: no second start-up of python and torch
    assert code == 0 and "resuming: " in err, err


def test_internal_error_is_exit_1_with_one_line(run, capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("criticality.cli.analyze_run", bug)  # the name the CLI calls
    code, _, err = run_cli(capsys, "analyze", run)
    assert code == 1 and err.startswith("criticality: internal error: ZeroDivisionError: a bug")
    assert len(err.strip().splitlines()) == 1


def test_only_rank_0_prints_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    code, out, err = run_cli(capsys, "analyze", tmp_path)
    assert code == 2 and err == ""
    monkeypatch.setenv("RANK", "0")
    code, out, err = run_cli(capsys, "analyze", tmp_path)
    assert code == 2 and err.startswith("criticality: error:")


def test_installed_console_script(tmp_path):
    script = Path(sys.executable).parent / "criticality"
    if not script.exists():
        pytest.skip("no console script next to this Python (package not installed with pip)")
    listed = subprocess.run([str(script), "list"], capture_output=True, text=True, env=ENV, timeout=120)
    assert listed.returncode == 0 and "fig1/fcn-3x256/mnist" in listed.stdout
    bad = subprocess.run([str(script), "analyze", str(tmp_path)], capture_output=True, text=True, env=ENV,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("criticality: error:")


def test_report_from_the_cli(run, tmp_path, capsys):
    r = copy(run, tmp_path)
    assert run_cli(capsys, "analyze", r, "--device", "cpu", "--seeds", "1")[0] == 0
    code, out, err = run_cli(capsys, "report", r)
    assert code == 0 and out.strip() == f"report: {r / 'report.html'}", err
    assert (r / "report.html").stat().st_size > 1000 and list((r / "figures").iterdir())


@pytest.mark.parametrize("root", [None, "DIR"])
def test_quick_scale_uses_the_experiments_own_data_when_given(tmp_path, capsys, monkeypatch, root):
    from criticality import cli
    from criticality.paper import data

    seen = {}

    def fake_run(exp, **kw):
        seen.update(kw, key=exp.key)
        return []

    monkeypatch.setattr(cli, "run_experiment", fake_run)
    argv = ["run", "fig4/vgg11/cifar10", *(["--data-root", tmp_path] if root else [])]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    if root:
        assert seen["data"] == "cifar10" and seen["data_root"] == str(tmp_path) and "stands in" not in err
    else:
        assert seen["data"] == data.default_data()
        assert f"quick scale: {data.default_data()} stands in for cifar10" in err


def test_resuming_line_comes_from_rank_0_only(run, tmp_path, capsys, monkeypatch):
    r = copy(run, tmp_path)
    assert run_cli(capsys, "analyze", r, "--device", "cpu", "--seeds", "1")[0] == 0
    code, _, err = run_cli(capsys, "analyze", r, "--device", "cpu", "--seeds", "1")
    assert code == 0 and "resuming: 10 of 10" in err
    monkeypatch.setattr(criticality.core.run.distributed, "is_main", lambda: False)  # as rank 1 sees it
    code, _, err = run_cli(capsys, "analyze", r, "--device", "cpu", "--seeds", "1")
    assert code == 0 and "resuming" not in err


def test_run_help_shows_no_train_defaults_it_does_not_use(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 20)" not in text and "(default: the experiment's, at --scale)" in text
    assert "--wait" in text


def test_a_finite_but_exploding_loss_is_said_once(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "fcn-2x16", "--data", "digits", "--epochs", "3", "--lr", "1000",
                           "--device", "cpu", "--out", tmp_path / "r")
    assert code == 0 and err.count("training is diverging") == 1, err


def test_paper_scale_without_the_data_says_what_is_needed_before_training(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "fcn-3x256", "--scale", "paper", "--out", tmp_path / "r")
    one_line_error(code, err, "mnist: files not found", "--data-root")
    assert not (tmp_path / "r").exists()


def test_verdict_metric_picks_what_the_verdicts_judge(run, tmp_path, capsys):
    """--verdict-metric loss judges Δ loss at epoch 0 against --threshold (in nats); the summary says so."""
    r = copy(run, tmp_path)
    code, out, err = run_cli(capsys, "analyze", r, "--seeds", "1", "--verdict-metric", "loss", "--threshold", "0")
    assert code == 0, err
    summary = json.loads((r / "analysis" / "summary.json").read_text())
    cells = pd.read_csv(r / "analysis" / "cells.csv")
    assert summary["verdict_metric"] == "loss" and "Δ loss" in out
    for v in summary["verdicts"]:
        at0 = cells[(cells.op == "reinit") & (cells.group == v["group"]) & (cells.checkpoint == 0)].iloc[0]
        expected = "critical" if at0.delta_loss_low > 0 else "robust" if at0.delta_loss_high <= 0 else "inconclusive"
        assert v["verdict"] == expected, v
    one_line_error(*run_cli(capsys, "analyze", r, "--verdict-metric", "speed")[::2], "--verdict-metric")
