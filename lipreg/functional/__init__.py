"""Pure estimators: tensors and modules in, results out. Imports neither Lightning nor Hydra."""

from lipreg.functional.autolip import AutoLip, autolip
from lipreg.functional.chains import NotSequentialError
from lipreg.functional.linear_map import LinearMap
from lipreg.functional.lower_bound import jacobian_norms, lower_bound
from lipreg.functional.power_iteration import operator_norm, top_singular_triplets
from lipreg.functional.results import LayerBound, LipschitzResult
from lipreg.functional.rules import register_rule, registered_targets
from lipreg.functional.seqlip import seqlip
from lipreg.functional.specs import (
    Affine,
    Combine,
    Elementwise,
    NodeContext,
    Nonlinear,
    UnsupportedNodeError,
)
from lipreg.functional.tight import certified_bound
from lipreg.functional.trace import TraceError, UnsupportedOperationError

__all__ = [
    "Affine",
    "AutoLip",
    "Combine",
    "Elementwise",
    "LayerBound",
    "LinearMap",
    "LipschitzResult",
    "NodeContext",
    "Nonlinear",
    "NotSequentialError",
    "TraceError",
    "UnsupportedNodeError",
    "UnsupportedOperationError",
    "autolip",
    "certified_bound",
    "jacobian_norms",
    "lower_bound",
    "operator_norm",
    "register_rule",
    "registered_targets",
    "seqlip",
    "top_singular_triplets",
]
