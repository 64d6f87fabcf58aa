"""Model surgery as pure functions on state dicts.

The public path of :mod:`criticality.core.surgery`, which holds the code."""

from criticality.core.surgery import (  # noqa: F401
    BUFFER_MODES,
    Overlay,
    StateDict,
    buffer_keys,
    fresh_group,
    fresh_state,
    interpolate,
    recalibrate,
    reinit,
    replace,
    rerandomize,
)
