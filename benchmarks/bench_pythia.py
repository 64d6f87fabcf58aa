"""A Pythia-70m-sized suite from a local hub cache, analysed per block: peak memory, wall time, fast vs naive.

Run::

    .venv/bin/python benchmarks/bench_pythia.py            # Pythia-70m's config, 8 revisions, 64 × 256 tokens
    .venv/bin/python benchmarks/bench_pythia.py --small    # a toy of the same shape (tests/test_benchmarks.py)

Builds a GPT-NeoX with Pythia-70m's configuration (6 layers, d = 512, 8 heads, vocab 50304, rotary 25 %,
untied head; random weights, float32: 70.4 M parameters, 282 MB), writes 8 revisions ``step0``,
``step1``, ``step2``, ``step4`` … ``step64`` into a hub-cache layout (``step1`` serves ``step0``'s files,
Pythia's known defect, so the integrity check collapses it), then, for each engine, in a fresh process with
``HF_HUB_OFFLINE=1``: reads the revisions through ``huggingface_hub``'s cache API, checks their integrity and
runs the per-block grid (``groups="blocks"``) on ``--sequences`` random sequences of ``--seq-len`` tokens.
Cells: the final model, every group reset to ``--reinit-to`` (default step 0 only: the paper's headline
column; ``all`` for every earlier revision) and ``--seeds`` re-randomizations per group. Printed per engine:
peak RSS of the process, (peak − baseline) / model size, where the baseline is an interpreter that imports
torch, pandas and transformers; wall time of the analysis; whether the cell tables (every metric) are equal.
Exit status 1 when they differ or when the peak exceeds ``--max-model-sizes`` (3).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REPO = "bench/pythia-70m-random"
BASELINE = "import torch, pandas, transformers, safetensors, huggingface_hub"
PYTHIA_70M = dict(vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                  intermediate_size=2048, max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000,
                  use_parallel_residual=True, tie_word_embeddings=False)
SMALL = {**PYTHIA_70M, "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 64}
STEPS = (0, 1, 2, 4, 8, 16, 32, 64)  # Pythia's early branches; step1 = step0 as published


def build_suite(root: Path, config: dict, sequences: int, seq_len: int) -> tuple[Path, Path, int]:
    """(hub cache, eval file, model bytes): the revisions as drifting copies of one random init."""
    import transformers
    from safetensors.torch import save_file

    from criticality.adapters.hub import add_to_cache

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config))
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    g = torch.Generator().manual_seed(1)
    cache = root / "hub"
    done = cache / f"models--{REPO.replace('/', '--')}" / "refs" / f"step{STEPS[-1]}"
    if done.is_file() and (root / f"eval_{sequences}x{seq_len}.safetensors").is_file():  # a kept --workdir
        return cache, root / f"eval_{sequences}x{seq_len}.safetensors", nbytes
    with torch.no_grad():
        params = dict(model.named_parameters())
        init = {k: p.detach().clone() for k, p in params.items()}
        for step in STEPS:
            scale = 0.0 if step <= 1 else 0.004 * step ** 0.5  # ‖θ_t − θ_0‖ grows with the step
            for k, p in params.items():
                p.copy_(init[k] + scale * torch.randn(p.shape, generator=g))
            saved = root / "saved"
            model.save_pretrained(saved)
            add_to_cache(cache, REPO, f"step{step}", {f.name: f for f in saved.iterdir() if f.is_file()}, move=True)
            shutil.rmtree(saved)
    ids = torch.randint(0, config["vocab_size"], (sequences, seq_len), generator=g)
    save_file({"input_ids": ids}, str(root / f"eval_{sequences}x{seq_len}.safetensors"))
    return cache, root / f"eval_{sequences}x{seq_len}.safetensors", nbytes


def child(args: argparse.Namespace) -> None:
    """One engine's analysis, as a user's process would run it (the parent measures its peak RSS)."""
    from criticality.core.analysis import analyze
    from criticality.pipelines import analyze_hf as hf

    start = time.perf_counter()
    found = hf.find_trajectory(REPO, revisions="step*", cache_dir=args.cache)
    model = hf.build_model(hf.config_folder(found))
    states, checked = hf.checked_states(found, model)
    hf.hold_final(model, states[max(states)])  # as analyze-hf does
    ids = hf.read_tokens(Path(args.data), args.seq_len)["input_ids"]
    reinit_to = None if args.reinit_to == "all" else [int(x) for x in args.reinit_to.split(",")]
    result = analyze(model, states, (ids, ids), groups="blocks", seeds=args.seeds, reinit_to=reinit_to,
                     metrics=("token_error", "nll"), engine=args.engine, batch_size=args.batch_size,
                     verdict_metric="token_error", progress=False)
    result.table.to_csv(Path(args.out) / f"cells_{args.engine}.csv", index=False)
    report = {"seconds": time.perf_counter() - start, "cells": len(result.table),
              "integrity": checked.summary()["duplicates"], "groups": sorted(set(result.table.group.dropna()))}
    (Path(args.out) / f"run_{args.engine}.json").write_text(json.dumps(report))


def _read_csv(path: Path):
    import pandas as pd

    return pd.read_csv(path)


def peak_rss(cmd: list[str], env: dict[str, str]) -> int:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.stderr.write(proc.stderr.read().decode()[-3000:])
        raise SystemExit(f"child failed: {' '.join(cmd)}")
    return usage.ru_maxrss * 1024  # kB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a toy config, 8 sequences of 16 tokens")
    parser.add_argument("--sequences", type=int, default=None, help="evaluation sequences (default 64)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    parser.add_argument("--seeds", type=int, default=1, help="re-randomization draws per group")
    parser.add_argument("--reinit-to", default="0", help="steps to reset groups to: '0' (default), '0,8' or 'all'")
    parser.add_argument("--engines", nargs="+", default=["fast", "naive"])
    parser.add_argument("--max-model-sizes", type=float, default=3.0)
    parser.add_argument("--workdir", type=Path, help="keep the suite and tables here (default: a temp dir)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sequences = args.sequences or (8 if args.small else 64)
    args.seq_len = args.seq_len or (16 if args.small else 256)
    if args.child:
        child(args)
        return 0
    if args.build:
        cache, data, nbytes = build_suite(Path(args.out), SMALL if args.small else PYTHIA_70M, args.sequences,
                                          args.seq_len)
        print(json.dumps({"cache": str(cache), "data": str(data), "nbytes": nbytes}))
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_pythia_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        return measure(args, root)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def measure(args: argparse.Namespace, root: Path) -> int:
    # Every child is started from this lean parent (a forked child's peak RSS counts the parent's pages
    # until it execs), and the suite is built in a child of its own, after the baseline.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    baseline = peak_rss([sys.executable, "-c", BASELINE], env)
    t0 = time.perf_counter()
    built = subprocess.run([sys.executable, __file__, "--build", "--out", str(root), "--sequences", str(args.sequences),
                            "--seq-len", str(args.seq_len)] + (["--small"] if args.small else []), env=env,
                           capture_output=True, text=True, check=True)
    suite = json.loads(built.stdout.strip().splitlines()[-1])
    cache, data, nbytes = suite["cache"], suite["data"], suite["nbytes"]
    name = "small" if args.small else "Pythia-70m config"
    print(f"suite: {len(STEPS)} revisions of a {nbytes / 2**20:.0f} MiB GPT-NeoX ({name}) written in "
          f"{time.perf_counter() - t0:.0f} s; eval {args.sequences} × {args.seq_len}")
    tables, ok = {}, True
    for engine in args.engines:
        cmd = [sys.executable, __file__, "--child", "--engine", engine, "--cache", str(cache), "--data", str(data),
               "--out", str(root), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
               "--seeds", str(args.seeds), "--reinit-to", args.reinit_to]
        peak = peak_rss(cmd, env)
        run = json.loads((root / f"run_{engine}.json").read_text())
        sizes = (peak - baseline) / nbytes
        ok &= args.small or sizes <= args.max_model_sizes  # a toy model is smaller than the interpreter's noise
        tables[engine] = _read_csv(root / f"cells_{engine}.csv")
        print(f"{engine:>5}: {run['cells']} cells over {len(run['groups'])} groups in {run['seconds']:.1f} s; "
              f"peak RSS {peak / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB → {sizes:.2f} model sizes "
              f"(limit {args.max_model_sizes}); integrity: {run['integrity']}")
    if len(tables) == 2:
        a, b = tables.values()
        equal = a.equals(b)
        close = a.shape == b.shape and all(
            ((a[c] - b[c]).abs().fillna(0) <= 1e-6).all() for c in a.columns if a[c].dtype.kind == "f")
        seconds = [json.loads((root / f"run_{e}.json").read_text())["seconds"] for e in args.engines]
        print(f"tables equal: {equal} (within 1e-6: {close}); {args.engines[1]} / {args.engines[0]} time "
              f"{seconds[1] / seconds[0]:.2f}×")
        ok &= close
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
