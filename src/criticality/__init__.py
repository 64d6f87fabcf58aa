"""criticality: which layers of a trained network matter?

The Python entry point is :func:`analyze` (see :mod:`criticality.core.analysis`).
"""

import criticality.adapters  # noqa: F401  (registers the hf and timm draw schemes with the core)
from criticality._version import __version__
from criticality.core.analysis import Result, analyze
from criticality.errors import CriticalityError
from criticality.interventions.module_criticality import (
    module_criticality,  # the function shadows its module's name here
)

__all__ = ["CriticalityError", "Result", "analyze", "module_criticality", "__version__"]
