"""The one reader and writer of ``RUN/analysis``: cells, distances, summary.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from criticality.core.distances import LABELS as DISTANCE_LABELS
from criticality.errors import CriticalityError
from criticality.infra.files import atomic_path, read_json, write_json

NORMS = tuple(DISTANCE_LABELS)  # distances.csv's columns: l2, linf (the paper's), l2_rel, linf_rel, cosine (ours)
_CELL_NA = ["", "nan", "NaN", "<NA>"]
_CELL_NUMERIC = ["checkpoint", "seed", "error", "loss", "n", "delta_error", "delta_loss", "delta_error_low",
                 "delta_error_high", "delta_loss_low", "delta_loss_high", "p_value"]


def read_cells(path: str | Path) -> pd.DataFrame:
    """``cells.csv`` back into the analysis dtypes (the final row's empty group stays ``""``)."""
    df = pd.read_csv(path, keep_default_na=False, na_values={c: _CELL_NA for c in _CELL_NUMERIC},
                     dtype={"group": str, "op": str})
    for col in ("checkpoint", "seed"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col]).astype("Int64")
    for col in ("joint", "finite"):
        if col in df.columns and df[col].dtype != bool:
            df[col] = df[col].astype(str).str.lower().eq("true")
    return df


def read_distances(path: str | Path) -> pd.DataFrame:
    """``distances.csv``: group, checkpoint and one column per norm (:data:`NORMS`)."""
    return pd.read_csv(path, keep_default_na=False, na_values={c: _CELL_NA for c in NORMS}, dtype={"group": str})


def read_summary(analysis_dir: str | Path, *, missing_ok: bool = False) -> dict[str, Any]:
    """``analysis/summary.json`` as written by :func:`analyze_run` (``"NaN"`` strings back to floats);
    missing (``{}`` with ``missing_ok``) or corrupt is one clear line."""
    path = Path(analysis_dir) / "summary.json"
    if missing_ok and not path.is_file():
        return {}
    if not path.is_file():
        raise CriticalityError(f"no analysis summary at {path}; run `criticality analyze {path.parent.parent}` "
                               "first")
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
