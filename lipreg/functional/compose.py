"""The AutoLip walk (Scaman & Virmaux 2018, Algorithm 1), for floats and for tensors.

For every node ``θ_k = g_k(θ_{i_1}, …)`` of the graph, in topological order,

.. math::

    \\hat L_{\\text{input}} = 1, \\qquad
    \\hat L_{\\text{chain end}} = s_c\\, \\hat L_{\\text{chain source}}, \\qquad
    \\hat L_k = \\operatorname{Lip}(g_k)\\, \\hat L_{\\text{parent}} \\ \\text{(activation)},

    \\hat L_k = \\sum_i |w_i|\\, \\hat L_i \\ \\text{(Combine "sum")}, \\qquad
    \\hat L_k = \\sqrt{\\textstyle\\sum_i \\hat L_i^2} \\ \\text{(Combine "l2")},

with ``s_c`` the factor of the affine chain ``c`` ending at the node (its certified bound, its
iterative estimate, or a differentiable ``σ̂_c``). Interior nodes of a chain get no value (they
are folded into the end), nor do nodes that do not depend on the input.

**Guarantee.** If every ``s_c`` is an upper bound on its chain's operator norm, the value at
the output is an upper bound on the network's l2 Lipschitz constant (the rules' constants are
upper bounds). :func:`propagate` only does the arithmetic: the same operations in the same
order for Python floats (:func:`lipreg.autolip`) and for tensors with autograd
(:class:`lipreg.LipschitzPenalty`), so both give the same number for the same factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor, fx

from lipreg.functional.analysis import Analysis
from lipreg.functional.chains import AffineChain
from lipreg.functional.specs import Affine, Combine, Elementwise, Nonlinear, Spec

__all__ = ["combine", "node_lipschitz", "output_value", "propagate"]

T = TypeVar("T", float, Tensor)


def node_lipschitz(spec: Spec) -> float:
    """Lipschitz constant of a single-input non-affine spec (its rule's constant)."""
    if isinstance(spec, Elementwise | Nonlinear):
        return spec.lipschitz
    raise TypeError(f"no scalar constant for {spec!r}")


def _sqrt(x: T) -> T:
    return torch.sqrt(x) if isinstance(x, Tensor) else math.sqrt(x)


def combine(spec: Combine, parent_values: Sequence[T]) -> T:
    """``Σ_i |w_i| L_i`` (``mode="sum"``, weights default to 1) or ``sqrt(Σ_i L_i²)``
    (``mode="l2"``) of the parents' values, floats or tensors."""
    if spec.mode == "sum":
        weights = spec.weights or (1.0,) * len(parent_values)
        return sum(abs(w) * v for w, v in zip(weights, parent_values, strict=True))
    if spec.mode == "l2":
        return _sqrt(sum(v * v for v in parent_values))
    raise ValueError(f"unknown Combine mode {spec.mode!r}")


def propagate(
    analysis: Analysis,
    chains: Mapping[fx.Node, AffineChain],
    factor: Callable[[AffineChain], T],
    one: T,
) -> dict[fx.Node, T]:
    """The AutoLip value of every input-dependent node (module docstring).

    Args:
        analysis: the network's analysis.
        chains: its affine chains keyed by their last node (:func:`find_affine_chains`).
        factor: the factor ``s_c`` of a chain (a float or a scalar tensor), called once per
            chain in graph order.
        one: the value at the input (``1.0`` or a scalar tensor of the right dtype/device).

    Returns:
        ``{node: value}`` for the input, chain ends, activations, nonlinear and Combine nodes.
    """
    values: dict[fx.Node, T] = {analysis.input_node: one}
    for node in analysis.order[1:]:
        spec, parents = analysis.specs[node], analysis.inputs[node]
        if isinstance(spec, Affine):
            chain = chains.get(node)
            if chain is not None:  # else: interior of a chain, folded into its end
                values[node] = factor(chain) * values[chain.source]
        elif isinstance(spec, Elementwise | Nonlinear):
            values[node] = node_lipschitz(spec) * values[parents[0]]
        elif isinstance(spec, Combine):
            values[node] = combine(spec, [values[p] for p in parents])
    return values


def output_value(analysis: Analysis, values: Mapping[fx.Node, T]) -> T | None:
    """The value at the network's output, or ``None`` when the output does not depend on the
    input (a constant function: Lipschitz constant 0, which the caller reports with why)."""
    out = analysis.output_node
    return values.get(out) if out is not None else None
