"""criticality: which layers of a trained network matter?

The Python entry point is :func:`analyze` (see :mod:`criticality.analysis`).
"""

from criticality.analysis import Result, analyze
from criticality.errors import CriticalityError
from criticality.module_criticality import module_criticality  # the function shadows its module's name here

__version__ = "0.1.0"
__all__ = ["CriticalityError", "Result", "analyze", "module_criticality", "__version__"]
