"""``criticality train`` and ``criticality analyze`` under torchrun (gloo on CPU) against one process.

Run: ``.venv/bin/pytest tests/test_distributed.py -q`` (about 60 s on 2 cores: two launches of
``torchrun --standalone --nproc_per_node=2`` on the bundled digits, each killed after 240 s so that a hung
rendezvous or collective fails instead of hanging CI). The reference is the same command in one process:
training must give the same checkpoint schedule and the same weights up to float reduction order (each
rank takes its slice of every global batch, DDP averages the gradients); the sharded analysis must give
the same table, row for row. The rest checks sharding, merging and device selection in-process.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from criticality import cli
from criticality.core.checkpoints import list_epochs, load_checkpoint
from criticality.core.plan import PlanSpec, make_plan
from criticality.core.run import run_cells
from criticality.core.stores import cell_key
from criticality.errors import CriticalityError
from criticality.infra import distributed
from criticality.infra.distributed import Context, resolve_device
from criticality.paper.training.config import TrainConfig
from criticality.paper.training.trainer import Trainer as _Trainer
from criticality.pipelines.grid import merge_shards as _merge_shards
from toy import fcn

TIMEOUT_S = 240
TRAIN = ["fcn-2x32", "--data", "digits", "--epochs", "3", "--checkpoints", "auto", "--device", "cpu"]


def torchrun(*args: str, cwd: Path, nproc: int = 2) -> str:
    """``torchrun --standalone --nproc_per_node=N -m criticality --no-progress ARGS``; its stdout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "criticality", "--no-progress", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the agent and its workers: the whole session
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{err[-3000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}"
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> SimpleNamespace:
    """One-process reference: a trained run, a copy of it not yet analysed, and its analysis."""
    root = tmp_path_factory.mktemp("single")
    run = root / "run"
    assert cli.main(["--no-progress", "train", *TRAIN, "--out", str(run)]) == 0
    fresh = root / "fresh"
    shutil.copytree(run, fresh)
    assert cli.main(["--no-progress", "analyze", str(run), "--device", "cpu"]) == 0
    return SimpleNamespace(root=root, run=run, fresh=fresh)


@pytest.mark.slow
def test_training_under_torchrun_matches_one_process(single, tmp_path):
    out = torchrun("train", *TRAIN, "--out", "ddp", cwd=tmp_path)
    assert out.count("trained fcn-2x32") == 1  # only rank 0 prints
    ddp = tmp_path / "ddp"
    assert list_epochs(ddp) == list_epochs(single.run) == [0, 1, 2, 3]
    names = sorted(p.name for p in (single.run / "checkpoints").iterdir())
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == names
    config = json.loads((ddp / "config.json").read_text())
    assert config["distributed"] == {"world_size": 2, "per_process_batch": 64, "effective_batch_size": 128,
                                     "effective_lr": 0.01, "device": "cpu"}
    assert json.loads((single.run / "config.json").read_text())["distributed"]["world_size"] == 1

    start, end = load_checkpoint(single.run, 0), load_checkpoint(single.run, 3)
    moved = max((end[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-2  # training moved the weights far more than the tolerance below
    for epoch in (0, 1, 2, 3):
        a, b = load_checkpoint(single.run, epoch), load_checkpoint(ddp, epoch)
        for k in a:  # 1437 examples = 11 batches of 128 + 29: the odd last batch splits 15 / 14
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"epoch {epoch} {k}")

    logs = [[json.loads(s) for s in (r / "log.jsonl").read_text().splitlines()] for r in (single.run, ddp)]
    for a, b in zip(*logs, strict=True):
        assert a["epoch"] == b["epoch"] and a.get("train_error") == b.get("train_error")  # summed over ranks
        assert a["test_error"] == b["test_error"]
        assert math.isclose(a.get("train_loss", 0), b.get("train_loss", 0), rel_tol=1e-5)


def _key(row: pd.Series) -> tuple:
    """A cells.csv row's cell key, as the store writes it (empty group and missing epoch/seed read as NaN)."""
    def opt(v):
        return None if pd.isna(v) else int(v)

    def real(v):  # alpha / sigma (interventions), absent from the paper's ops
        return None if pd.isna(v) else float(v)

    return (row.op, "" if pd.isna(row.group) else row.group, opt(row.checkpoint), opt(row.seed),
            real(row.get("alpha")), real(row.get("sigma")))


@pytest.mark.slow
def test_sharded_analysis_matches_one_process_and_resumes(single, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(single.fresh, run)
    reference = pd.read_csv(single.run / "analysis" / "cells.csv")
    lines = (single.run / "analysis" / "cells.jsonl").read_text().splitlines()
    by_key = {cell_key(json.loads(s)): s for s in lines[1:]}
    grid = [by_key[_key(r)] for _, r in reference.iterrows()]  # store lines in table (grid) order
    # Rank 1 of 2 owns cells 1, 3, 5, …; as if killed after 4 of them, mid-way through writing the 5th.
    rank1 = grid[1::2]
    store1 = run / "analysis" / "cells.rank1-of-2.jsonl"
    store1.parent.mkdir()
    store1.write_text("\n".join([lines[0], *rank1[:4], rank1[4][:25]]))
    # Its per-example records likewise (each written just before its cell's line).
    records = (single.run / "analysis" / "examples.jsonl").read_text().splitlines()
    by_cell = {cell_key(json.loads(s)["cell"]): s for s in records[1:] if '"cell"' in s}
    rank1_cells = [json.loads(s) for s in rank1]
    rank1_records = [by_cell[cell_key(c)] for c in rank1_cells]
    (run / "analysis" / "examples.rank1-of-2.jsonl").write_text(
        "\n".join([records[0], *rank1_records[:4], rank1_records[4][:40]]))

    out = torchrun("analyze", "run", "--device", "cpu", cwd=tmp_path)
    assert out.count("wrote ") == 1  # only rank 0 prints

    table = pd.read_csv(run / "analysis" / "cells.csv")
    assert list(table.columns) == list(reference.columns)
    assert [_key(r) for _, r in table.iterrows()] == [_key(r) for _, r in reference.iterrows()]
    assert (table.error == reference.error).all() and (table.n == reference.n).all()
    assert (table.loss - reference.loss).abs().max() <= 1e-5
    for column in reference.columns:  # the intervals and p too, from the same per-example records
        if column.startswith("delta_error") or column == "p_value":
            pd.testing.assert_series_equal(table[column], reference[column])
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    verdicts = json.loads((single.run / "analysis" / "summary.json").read_text())["verdicts"]
    assert summary["verdicts"] == verdicts
    assert all(v["delta_error_low"] is not None and v["rerandomize_error_low"] is not None for v in verdicts)
    assert summary["provenance"]["world_size"] == 2

    # The 4 stored cells were reused, not recomputed: each cell once, the seeded lines untouched.
    kept = store1.read_text().splitlines()
    assert kept[:5] == [lines[0], *rank1[:4]] and len(kept) == 1 + len(rank1)
    assert {cell_key(json.loads(s)) for s in kept[1:]} == {cell_key(json.loads(s)) for s in rank1}
    assert len((run / "analysis" / "cells.rank0-of-2.jsonl").read_text().splitlines()) == 1 + len(grid[0::2])
    kept = (run / "analysis" / "examples.rank1-of-2.jsonl").read_text().splitlines()
    cells = [cell_key(json.loads(s)["cell"]) for s in kept[1:] if '"cell"' in s]  # (and the labels' line)
    assert kept[:5] == [records[0], *rank1_records[:4]]
    assert len(cells) == len(set(cells)) == len(rank1) and set(cells) == set(map(cell_key, rank1_cells))


def _plan():
    g = torch.Generator().manual_seed(0)
    model = fcn()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    end = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    x = torch.randn(120, 1, 6, 6, generator=g)
    y = torch.randint(0, 5, (120,), generator=g)
    plan = make_plan(model, {0: start, 2: end}, PlanSpec("auto", 1, batch_size=50))
    return plan, (x, y)


def test_shards_merge_back_to_the_grid_for_any_world_size(tmp_path):
    plan, data = _plan()
    whole = run_cells(plan, data, progress=False)
    n = len(plan.cells)
    for world in (2, 3, n, n + 3):  # n + 3: three ranks get no cell at all
        shards = [run_cells(plan, data, store=str(tmp_path / f"cells.rank{r}-of-{world}.jsonl"), shard=(r, world),
                            progress=False) for r in range(world)]
        assert [len(s) for s in shards] == [len(range(r, n, world)) for r in range(world)]
        merged = _merge_shards(shards, plan)
        assert [cell_key(r) for r in merged] == [cell_key(c.as_dict()) for c in plan.cells]
        for a, b in zip(merged, whole, strict=True):
            assert a["error"] == b["error"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    empty = (tmp_path / f"cells.rank{n + 2}-of-{n + 3}.jsonl").read_text().splitlines()
    assert len(empty) == 1 and json.loads(empty[0])["kind"] == "criticality-cells"  # header only


def test_merge_refuses_shards_that_do_not_fit():
    plan, data = _plan()
    shards = [run_cells(plan, data, shard=(r, 2), progress=False) for r in range(2)]
    with pytest.raises(CriticalityError, match="do not split"):
        _merge_shards([shards[0], shards[1][:-1]], plan)
    with pytest.raises(CriticalityError, match="out of place"):
        _merge_shards([shards[0][::-1], shards[1]], plan)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("tensors", [True, False], ids=["tensors", "dataset"])
def test_each_global_batch_is_split_across_ranks(world, tensors):
    """Ranks' shares of every step put together are the one-process batch; n is the global batch size."""
    x, y = torch.arange(18.0).reshape(18, 1, 1, 1), torch.arange(18)  # batches of 8: 8, 8, 2
    train = (x, y) if tensors else torch.utils.data.TensorDataset(x, y)
    config = TrainConfig(model="-", data="-", batch_size=8, workers=0)
    dataset = SimpleNamespace(train=train, test=None)

    def steps(rank: int, w: int) -> list:
        trainer = _Trainer(config, torch.nn.Linear(1, 1), dataset, Context(rank, w, rank, torch.device("cpu")))
        return list(trainer._batches())

    reference = steps(0, 1)
    assert [n for *_, n in reference] == [8, 8, 2]
    shares = [steps(r, world) for r in range(world)]
    kept = [s for s in reference if s[2] >= world]  # a last batch smaller than the world is dropped
    for i, (xs, ys, n) in enumerate(kept):
        assert all(share[i][2] == n for share in shares)
        assert torch.equal(torch.cat([share[i][1] for share in shares]), ys)
        assert torch.equal(torch.cat([share[i][0] for share in shares]), xs)
        sizes = [len(share[i][1]) for share in shares]
        assert max(sizes) - min(sizes) <= 1
    assert all(len(share) == len(kept) for share in shares)  # every rank takes the same number of steps


def test_without_torchrun_everything_is_one_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.setup("cpu")
    assert ctx == Context(0, 1, 0, torch.device("cpu")) and ctx.is_main
    assert not distributed.active() and distributed.is_main()
    assert distributed.broadcast({"a": 1}) == {"a": 1} and distributed.gather(3) == [3]
    assert distributed.sum_over_ranks([1, 2.5], ctx.device) == [1, 2.5]
    distributed.barrier()
    distributed.teardown()


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_resolve_device(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert resolve_device("cpu") == resolve_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(CriticalityError, match=f"--device {spec}: no CUDA device is available here"):
            resolve_device(spec)
    for spec in ("gpu", "CUDA", "cuda0", "mps", ""):
        with pytest.raises(CriticalityError, match="unknown device"):
            resolve_device(spec)

    fake_gpus(monkeypatch, 8)  # one node of 8 GPUs: process LOCAL_RANK takes cuda:LOCAL_RANK
    assert [resolve_device("cuda", r, 8) for r in range(8)] == [torch.device("cuda", r) for r in range(8)]
    assert resolve_device("auto", 5, 8) == torch.device("cuda", 5)
    assert resolve_device("cuda:7") == torch.device("cuda", 7)
    with pytest.raises(CriticalityError, match="16 processes on this node but 8 GPUs"):
        resolve_device("cuda", 9, 16)
    with pytest.raises(CriticalityError, match="would share one GPU; use --device cuda"):
        resolve_device("cuda:0", 1, 2)
    for spec in ("cuda:8", "cuda:x", "cuda:"):
        with pytest.raises(CriticalityError, match=r"this machine has 8 GPUs \(cuda:0 … cuda:7\)"):
            resolve_device(spec)


def test_setup_reads_torchrun_environment_for_the_device(monkeypatch):
    """A world of one process (no process group) still honours RANK / LOCAL_RANK for the device."""
    fake_gpus(monkeypatch, 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(CriticalityError, match="no CUDA device"):
        distributed.setup("cuda")
    assert distributed.setup("auto").device == torch.device("cpu")
