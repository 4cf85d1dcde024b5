"""Compatibility shim: the names other modules imported from ``graph`` before the split.

Tracing and the graph interpreter live in :mod:`lipreg.functional.trace`, probing in
:mod:`lipreg.functional.probe`, the analysis in :mod:`lipreg.functional.analysis`. Import from
those; this module goes away once no importer is left.
"""

from __future__ import annotations

import math

from lipreg.functional.analysis import Analysis, analyse
from lipreg.functional.evaluation import evaluation_mode
from lipreg.functional.rules import Affine, Combine, Elementwise, Nonlinear, Spec
from lipreg.functional.trace import (
    TraceError,
    UnsupportedOperationError,
    all_finite,
    check_finite_parameters,
    check_has_forward,
    check_input_shape,
    eval_function,
    has_forward,
    sub_networks,
    trace,
    unwrap_compiled,
)

__all__ = [
    "Affine",
    "Analysis",
    "TraceError",
    "UnsupportedOperationError",
    "all_finite",
    "analyse",
    "check_finite_parameters",
    "check_has_forward",
    "check_input_shape",
    "combine",
    "eval_function",
    "evaluation_mode",
    "has_forward",
    "node_lipschitz",
    "sub_networks",
    "trace",
    "unwrap_compiled",
]


def node_lipschitz(spec: Spec) -> float:
    """Lipschitz constant of a single-input non-affine spec."""
    if isinstance(spec, Elementwise):
        return spec.lipschitz
    if isinstance(spec, Nonlinear):
        return spec.lipschitz
    raise TypeError(f"no scalar constant for {spec!r}")


def combine(spec: Combine, parent_values: list[float]) -> float:
    if spec.mode == "sum":
        weights = spec.weights or (1.0,) * len(parent_values)
        return sum(abs(w) * v for w, v in zip(weights, parent_values, strict=True))
    if spec.mode == "l2":
        return math.sqrt(sum(v * v for v in parent_values))
    raise ValueError(f"unknown Combine mode {spec.mode!r}")
