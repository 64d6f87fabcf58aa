"""The one reader and writer of ``RUN/analysis``: cells, distances, summary.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from criticality.errors import CriticalityError
from criticality.infra.files import atomic_path, read_json, write_json


def read_summary(analysis_dir: str | Path) -> dict[str, Any]:
    """``analysis/summary.json`` as written by :func:`analyze_run`; missing or corrupt is one clear line."""
    path = Path(analysis_dir) / "summary.json"
    if not path.is_file():
        raise CriticalityError(f"no analysis in {path.parent.parent} ({path} is missing); run "
                               f"`criticality analyze {path.parent.parent}` first")
    try:
        summary = read_json(path)
    except (OSError, ValueError) as e:
        raise CriticalityError(f"{path} is not valid JSON ({' '.join(str(e).split())}); rerun "
                               f"`criticality analyze {path.parent.parent}` to rewrite it") from e
    if not isinstance(summary, dict) or not isinstance(summary.get("verdicts"), list):
        raise CriticalityError(f"{path} is not an analysis summary (no verdicts); rerun "
                               f"`criticality analyze {path.parent.parent}` to rewrite it")
    return summary


def write_tables(out: Path, table: pd.DataFrame, dist: pd.DataFrame, summary: dict) -> None:
    with atomic_path(out / "cells.csv") as tmp:
        table.to_csv(tmp, index=False)
    try:
        import pyarrow  # noqa: F401  (optional: parquet output)

        with atomic_path(out / "cells.parquet") as tmp:
            table.to_parquet(tmp, index=False)
    except ImportError:
        pass
    with atomic_path(out / "distances.csv") as tmp:
        dist.to_csv(tmp, index=False)
    write_json(out / "summary.json", summary)
