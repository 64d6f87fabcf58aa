"""Checkpoint trajectories read lazily.

The public path of :mod:`criticality.core.trajectory`, which holds the code."""

from criticality.core.trajectory import (  # noqa: F401
    PICKLES,
    SAFETENSORS,
    LazyCheckpoint,
    TensorFile,
    Trajectory,
    alias_tied,
    checkpoint_at,
    discover,
    run_files,
    trajectory,
)
