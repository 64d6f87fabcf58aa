"""Peak memory of ``criticality analyze`` through the CLI, in model sizes above an interpreter baseline.

Run::

    .venv/bin/python benchmarks/bench_memory.py                       # fcn-5x512, -5x1024, -5x2048
    .venv/bin/python benchmarks/bench_memory.py --models fcn-5x2048 --old-src /path/to/other/src

For each model: train a short run (``--epochs`` epochs on ``--max-train`` examples, every epoch a checkpoint)
once, then run ``python -m criticality analyze RUN --seeds 2`` in a fresh process per source tree (this
tree's ``src``, and ``--old-src`` when given: today's path against the lean one) and read that process's
peak RSS (``wait4``'s ``ru_maxrss``). The baseline is the peak RSS of an interpreter that imports torch,
pandas and matplotlib (what the CLI imports anyway); the model size is the bytes of the final checkpoint's
tensors. Printed: peak RSS, (peak - baseline) / model size, and whether the cell tables (every column) are
identical. Measured on a 2-core CPU (fcn-5x2048, 70 MiB): 2.9 model sizes for the lean path, 7.2 before it.
On CUDA (``--device cuda``) the same holds for the process's RSS; GPU memory is not measured here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "import torch, pandas, matplotlib; import matplotlib.pyplot"


def peak_rss(cmd: list[str], env: dict[str, str]) -> tuple[int, int]:
    """(peak RSS in bytes, exit status) of one child process."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(proc.stderr.read().decode()[-2000:])
    return usage.ru_maxrss * 1024, proc.returncode  # ru_maxrss is in kB on Linux


def environment(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def model_bytes(run: Path) -> int:
    from safetensors import safe_open

    last = sorted((run / "checkpoints").glob("epoch_*.safetensors"))[-1]
    with safe_open(str(last), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118


def train(model: str, run: Path, args: argparse.Namespace) -> None:
    cmd = [sys.executable, "-m", "criticality", "train", model, "--out", str(run), "--epochs", str(args.epochs),
           "--checkpoints", ",".join(map(str, range(args.epochs + 1))), "--max-train", str(args.max_train),
           "--device", args.device, "--no-progress"]
    subprocess.run(cmd, env=environment(ROOT / "src"), check=True, stdout=subprocess.DEVNULL)


def analyze(run: Path, src: Path, args: argparse.Namespace) -> tuple[int, pd.DataFrame | None]:
    out = run / "analysis"
    if out.exists():
        for f in sorted(out.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
    cmd = [sys.executable, "-m", "criticality", "analyze", str(run), "--seeds", "2", "--groups", "auto",
           "--max-examples", str(args.max_examples), "--device", args.device, "--no-progress"]
    peak, status = peak_rss(cmd, environment(src))
    return peak, (pd.read_csv(out / "cells.csv") if status == 0 else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["fcn-5x512", "fcn-5x1024", "fcn-5x2048"])
    parser.add_argument("--old-src", type=Path, help="another source tree to compare with (e.g. main's src)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--max-examples", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    base, _ = peak_rss([sys.executable, "-c", BASELINE], environment(ROOT / "src"))
    print(f"baseline (python + torch + pandas + matplotlib): {base / 2**20:.0f} MiB")
    trees = {"this": ROOT / "src", **({"old": args.old_src} if args.old_src else {})}
    print(f"{'model':<12} {'size MiB':>8} " + " ".join(f"{t + ' MiB':>10} {t + ' sizes':>10}" for t in trees)
          + "  tables equal")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for model in args.models:
            run = work / model
            if not (run / "checkpoints").is_dir():
                train(model, run, args)
            size = model_bytes(run)
            cells = []
            tables = []
            for src in trees.values():
                peak, table = analyze(run, src, args)
                cells.append(f"{peak / 2**20:>10.0f} {(peak - base) / size:>10.1f}")
                tables.append(table)
            same = all(t is not None for t in tables) and all(t.equals(tables[0]) for t in tables)  # every column
            print(f"{model:<12} {size / 2**20:>8.1f} " + " ".join(cells) + f"  {same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
