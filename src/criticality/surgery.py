"""Model surgery as pure functions on state dicts.

The public path of :mod:`criticality.core.surgery`, which holds the code."""

from criticality.core.state import BUFFER_MODES, buffer_keys  # noqa: F401
from criticality.core.surgery import (  # noqa: F401
    Overlay,
    StateDict,
    fresh_group,
    fresh_state,
    interpolate,
    recalibrate,
    reinit,
    replace,
    rerandomize,
)
