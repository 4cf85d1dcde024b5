"""Arithmetic: sums and differences (of branches or with constants), negation, products and
quotients by constants, concatenation.

Two input-dependent operands combine (:class:`~lipreg.functional.specs.Combine`): a sum by
``Σ |w_i| L_i``, a concatenation by ``sqrt(Σ L_i²)``. A product or quotient of two
input-dependent tensors has no global Lipschitz constant and is refused.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor

from lipreg.functional.rules.registry import register_rule
from lipreg.functional.rules.shape import identity
from lipreg.functional.specs import (
    Affine,
    Combine,
    InputArg,
    NodeContext,
    RuleFn,
    Spec,
    UnsupportedNodeError,
    single_input,
)

__all__: list[str] = []


def _scalar_norm(c: Any) -> float | None:
    if isinstance(c, int | float):
        return abs(float(c))
    if isinstance(c, Tensor) and c.numel() == 1:
        return float(c.detach().abs())
    return None


def _broadcast_factor(ctx: NodeContext, index: int) -> float:
    """Norm ``sqrt(k)`` of broadcasting input ``index`` to the output (each entry copied k
    times); 1 when the shapes agree."""
    n_in = math.prod(ctx.in_shapes[index])
    n_out = math.prod(ctx.out_shape) if ctx.out_shape is not None else n_in
    return math.sqrt(n_out / n_in) if n_in else 1.0


def _add_like(sign: float) -> RuleFn:
    def rule(ctx: NodeContext) -> Spec:
        alpha = ctx.kwargs.get("alpha", 1)
        if isinstance(alpha, InputArg):
            raise UnsupportedNodeError("alpha must not depend on the input.")
        weights = []
        for i, a in enumerate(ctx.args[:2]):
            if isinstance(a, InputArg):
                coef = 1.0 if i == 0 else abs(float(alpha))
                weights.append(coef * _broadcast_factor(ctx, a.index))
        if ctx.n_inputs >= 2:
            return Combine("sum", tuple(weights))
        # One input-dependent side: x ± b, or b − x.
        negate = sign < 0 and isinstance(ctx.args[1], InputArg)
        coef = float(alpha) if isinstance(ctx.args[1], InputArg) else 1.0
        coef = -coef if negate else coef
        in_shape, out_shape = ctx.in_shapes[0], ctx.out_shape
        if tuple(in_shape) != tuple(out_shape):  # broadcasting duplicates entries
            return ctx.generic_affine()

        def linear(x: Tensor) -> Tensor:
            return x * coef if coef != 1.0 else x

        return Affine(linear=linear, norm=abs(coef), isometry=True)

    return rule


def _rsub(ctx: NodeContext) -> Spec:
    # torch.rsub(input, other, alpha) = other − alpha · input
    if ctx.n_inputs >= 2:
        alpha = abs(float(ctx.arg(2, "alpha", 1)))
        weights = tuple(
            (alpha if i == 0 else 1.0) * _broadcast_factor(ctx, a.index)
            for i, a in enumerate(ctx.args[:2])
            if isinstance(a, InputArg)
        )
        return Combine("sum", weights)
    return ctx.generic_affine()


def _neg(ctx: NodeContext) -> Affine:
    single_input(ctx, "negation")
    return Affine(linear=lambda x: -x, norm=1.0, isometry=True)


def _mul(ctx: NodeContext) -> Affine:
    if ctx.n_inputs >= 2:
        raise UnsupportedNodeError(
            "product of two input-dependent tensors: its Lipschitz constant is unbounded on "
            "R^n (AutoLip's max over Z is +inf). Only products with constants are supported."
        )
    const = ctx.args[1] if isinstance(ctx.args[0], InputArg) else ctx.args[0]
    c = _scalar_norm(const)
    if c is not None:
        k = float(const) if not isinstance(const, Tensor) else float(const.detach())
        return Affine(linear=lambda x: x * k, norm=c, isometry=True)
    in_shape, out_shape = ctx.in_shapes[0], ctx.out_shape
    const_t = const.to(ctx.dtype) if isinstance(const, Tensor) else const
    if tuple(in_shape) == tuple(out_shape):
        # element-wise scaling by a constant tensor (broadcast over x): diagonal operator.
        return Affine(linear=lambda x: x * const_t, norm=float(const_t.detach().abs().max()))
    return ctx.generic_affine()


def _div(ctx: NodeContext) -> Affine:
    if not isinstance(ctx.args[0], InputArg) or ctx.n_inputs >= 2:
        raise UnsupportedNodeError(
            "division by an input-dependent tensor is not Lipschitz on R^n; only x / constant "
            "is supported."
        )
    if ctx.kwargs.get("rounding_mode") is not None:
        raise UnsupportedNodeError("division with rounding_mode is not continuous.")
    const = ctx.args[1]
    c = _scalar_norm(const)
    if c is not None:
        k = 1.0 / (float(const) if not isinstance(const, Tensor) else float(const.detach()))
        return Affine(linear=lambda x: x * k, norm=abs(k), isometry=True)
    inv = 1.0 / const.to(ctx.dtype)
    if tuple(ctx.in_shapes[0]) == tuple(ctx.out_shape):
        return Affine(linear=lambda x: x * inv, norm=float(inv.detach().abs().max()))
    return ctx.generic_affine()


def _concat(ctx: NodeContext) -> Spec:
    # ‖[f(x); g(x)] − [f(y); g(y)]‖² = ‖Δf‖² + ‖Δg‖²  ⇒  L ≤ sqrt(L_f² + L_g²).
    return Combine("l2")


for _t in (operator.add, operator.iadd, torch.add, "add"):
    register_rule(_t, _add_like(+1))
for _t in (operator.sub, operator.isub, torch.sub, torch.subtract, "sub"):
    register_rule(_t, _add_like(-1))
register_rule(torch.rsub, _rsub)
for _t in (operator.neg, torch.neg, torch.negative, "neg"):
    register_rule(_t, _neg)
register_rule(operator.pos, identity)
for _t in (operator.mul, operator.imul, torch.mul, torch.multiply, "mul"):
    register_rule(_t, _mul)
for _t in (operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div"):
    register_rule(_t, _div)
for _t in (torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack):
    register_rule(_t, _concat)
