"""The benchmarks still run and still agree with the reference (a smoke run; speed is not asserted here).

Run: ``.venv/bin/pytest tests/test_benchmarks.py -q`` (about 30 s). ``bench_engine.py --quick`` exits 1 when
the engine's table differs from the naive loop's, so this test fails on any disagreement.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from criticality.paper.data import DEBIAN_FASHION

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not Path(DEBIAN_FASHION).is_dir(), reason="apt package dataset-fashion-mnist not installed")
def test_bench_engine_quick_agrees():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("equal: True") == 3
