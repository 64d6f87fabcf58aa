"""Interventions beyond the paper's two resets, each one more operation of the analysis grid
(:mod:`criticality.core.ops`), evaluated by the same engine and stored in the same table:

- ``interpolate`` (:mod:`.interpolate`, column ``alpha``): the group between a source checkpoint and the final model.
- ``noise`` (:mod:`.noise`, columns ``sigma``, ``seed``): Gaussian noise scaled by the group's training movement.
- ``skip`` (:mod:`.skip`): the group's module returns its input.
- ``swap`` (:mod:`.swap`): two adjacent blocks exchange their weights (one cell per pair).

Importing this package registers the four. Beside them: :mod:`.module_criticality` (the smallest
interpolation-plus-noise a group tolerates) and :mod:`.proxies` (representation proxies of block importance).
The functions on state dicts are pure (new tensors for the changed entries, the caller's for the rest).
"""

from criticality.interventions.interpolate import DEFAULT_ALPHAS, Interpolate, check_unit
from criticality.interventions.noise import (
    DEFAULT_SIGMAS,
    NOISE_CONVENTION,
    Noise,
    add_noise,
    noise_generator,
    noise_scale,
    parameter_keys,
)
from criticality.interventions.skip import Skip, SkipPlan, module_of, plan_skips, plan_skips_on
from criticality.interventions.swap import Swap

__all__ = ["DEFAULT_ALPHAS", "DEFAULT_SIGMAS", "NOISE_CONVENTION", "Interpolate", "Noise", "Skip", "SkipPlan", "Swap",
           "add_noise", "check_unit", "module_of", "noise_generator", "noise_scale", "parameter_keys", "plan_skips",
           "plan_skips_on"]
