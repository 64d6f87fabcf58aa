"""criticality: which layers of a trained network matter?"""

__version__ = "0.1.0"
