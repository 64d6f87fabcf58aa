"""Deprecated path: the proxies live in :mod:`criticality.interventions.proxies` (this shim goes next release)."""

import warnings

from criticality.interventions.proxies import (  # noqa: F401
    PROXIES,
    TARGETS,
    block_proxies,
    blocks,
    correlations,
    spearman,
    write,
)

warnings.warn("criticality.proxies moved to criticality.interventions.proxies; the old path goes in the next release",
              FutureWarning, stacklevel=2)
