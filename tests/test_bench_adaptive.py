"""``benchmarks/bench_adaptive.py --quick`` still runs and finds no critical <-> robust flip (a smoke run; the
speed targets are reported, not asserted here).

Run: ``.venv/bin/pytest tests/test_bench_adaptive.py -q`` (about 20 s). The script exits 1 on any flip against
the full evaluation's conclusive verdicts, so this test fails on one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from criticality.paper.data import DEBIAN_FASHION

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not Path(DEBIAN_FASHION).is_dir(), reason="apt package dataset-fashion-mnist not installed")
def test_bench_adaptive_quick_has_no_flip(tmp_path):
    out = tmp_path / "adaptive.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_adaptive.py"), "--quick", "--json",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "critical<->robust flips: 0" in done.stdout
    row = json.loads(out.read_text())["row"]
    assert row["forwards_adaptive"] < row["forwards_full"] == row["cells"] * row["examples"]
    assert row["agree_where_full_conclusive"] + row["adaptive_inconclusive_where_full_conclusive"] \
        == row["full_conclusive"]
