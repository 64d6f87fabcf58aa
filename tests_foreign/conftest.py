"""The architecture matrix runs in its own environment (``make test-foreign``: torch + torchvision + timm +
transformers + accelerate in ``.venv-foreign``), apart from the main suite (``make test`` collects ``tests/``
only). Under ``CRITICALITY_REQUIRE_DATA=1`` (CI) a missing timm or transformers is an error, never a skip.

At the end of the session the outcomes of the cases that ran are written as markdown to ``$MATRIX_TABLE``
(default ``build/architectures.md``); ``docs/architectures.md`` is a copy of one such run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

MISSING = [name for name in ("timm", "transformers") if importlib.util.find_spec(name) is None]
if MISSING and os.environ.get("CRITICALITY_REQUIRE_DATA") == "1":
    raise RuntimeError(f"the architecture matrix needs {' and '.join(MISSING)}: run it through `make test-foreign`, "
                       "which installs timm and transformers in .venv-foreign")

# One torch thread: on a shared 2-core machine more threads spin against each other (10x slower measured under
# load); single-threaded timings are also the steadiest for the speed-up column. MATRIX_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MATRIX_THREADS", "1")))

OUTCOMES: list = []  # matrix.Outcome of every case run, in run order


@pytest.fixture
def record():
    return OUTCOMES.append


def pytest_sessionfinish(session, exitstatus):
    if not OUTCOMES or MISSING:
        return
    from known import KNOWN
    from matrix import table

    path = Path(os.environ.get("MATRIX_TABLE", HERE.parent / "build" / "architectures.md"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table(OUTCOMES, KNOWN))
    print(f"\narchitecture matrix: {len(OUTCOMES)} cases, table written to {path}", file=sys.stderr)
