"""What every figure shares: an Agg-backed :class:`~matplotlib.figure.Figure`, the colour map, labels that
are never mathtext, and the atomic PNG + SVG writer.

No pyplot: importing this never changes a notebook's backend.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from criticality.infra.files import atomic_path

DPI = 150
CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="0.82")  # bad: non-finite cells are grey


def new_figure(width: float = 6.0, height: float = 3.6) -> tuple[Figure, Axes]:
    """A figure (inches) with one axes, rendered by the Agg canvas."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def literal(label: object) -> str:
    """Escape ``$`` so a layer name is never parsed as mathtext."""
    return str(label).replace("$", r"\$")


def finite_max(values: np.ndarray, default: float = 1.0) -> float:
    """The largest finite value when it is positive, else ``default`` (a colour scale's top)."""
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size and finite.max() > 0 else default


def save(fig: Figure, path_without_suffix: str | Path) -> list[Path]:
    """Write ``<path>.png`` (150 dpi) and ``<path>.svg`` atomically; close the figure. Returns both paths."""
    base = Path(path_without_suffix)
    written = []
    for fmt in ("png", "svg"):
        target = base.with_name(f"{base.name}.{fmt}")
        with atomic_path(target) as tmp:
            # No dates in the metadata, so re-drawing identical tables gives identical files.
            meta = {"Date": None} if fmt == "svg" else {"Software": None}
            fig.savefig(tmp, format=fmt, dpi=DPI, metadata=meta)
        written.append(target)
    if "matplotlib.pyplot" in sys.modules:  # only pyplot-managed figures need closing there
        sys.modules["matplotlib.pyplot"].close(fig)
    return written
