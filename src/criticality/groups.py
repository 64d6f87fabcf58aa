"""Layer groups.

The public path of :mod:`criticality.core.groups`, which holds the code."""

from criticality.core.groups import (  # noqa: F401
    SPECS,
    Groups,
    GroupSpec,
    Part,
    check_mapping,
    default_spec,
    joint,
    matches,
    resolve,
    select,
    sublayer_parts,
)
