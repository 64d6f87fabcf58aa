"""benchmarks/bench_pythia.py still runs at a toy size and its engines agree (a smoke run; speed and memory
are not asserted here: the full-size figures are in docs/suites.md).

Run: ``PYTHONPATH=src .venv/bin/pytest tests/test_bench_pythia.py -q`` (about 30 s on 2 idle cores). The
script exits 1 when the fast engine's cell table differs from the naive one's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_pythia_small_agrees(tmp_path):
    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_pythia.py"), "--small",
                           "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tables equal: True" in done.stdout
    assert "'kept': 'step0', 'same': ['step1']" in done.stdout  # Pythia's step0 == step1 collapsed
    assert (tmp_path / "hub" / "models--bench--pythia-70m-random" / "refs" / "step64").is_file()
