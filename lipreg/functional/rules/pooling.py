"""Pooling and padding.

Max-pooling is bounded by ``sqrt(c)``, ``c`` the largest number of pooling windows that contain
one input (:func:`maxpool_lipschitz`). Average pooling and padding are linear with entries
``≥ 0`` (certified by the Schur test).
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn.functional as F
from torch import nn

from lipreg.functional.rules.registry import register_rule
from lipreg.functional.rules.shape import generic_nonnegative
from lipreg.functional.specs import (
    NodeContext,
    Nonlinear,
    RuleFn,
    UnsupportedNodeError,
    single_input,
)

__all__ = ["maxpool_lipschitz"]


def _coverage_1d(length: int, n_out: int, kernel: int, stride: int, pad: int, dil: int) -> int:
    counts = [0] * length
    for o in range(n_out):
        start = o * stride - pad
        for j in range(kernel):
            i = start + j * dil
            if 0 <= i < length:
                counts[i] += 1
    return max(counts) if counts else 0


def _adaptive_coverage_1d(length: int, n_out: int) -> int:
    counts = [0] * length
    for o in range(n_out):
        start = (o * length) // n_out
        end = -((-(o + 1) * length) // n_out)
        for i in range(start, end):
            counts[i] += 1
    return max(counts)


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    return v if len(v) == n else (v[0],) * n


def maxpool_lipschitz(
    in_spatial: tuple[int, ...],
    out_spatial: tuple[int, ...],
    kernel: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
) -> float:
    """``sqrt(c)``, ``c`` = the largest number of pooling windows that contain one input.

    Proof: ``|max_W x − max_W y| ≤ max_{i∈W} |x_i − y_i|``, so
    ``‖P x − P y‖² ≤ Σ_W Σ_{i∈W} |x_i − y_i|² ≤ c ‖x − y‖²``. Tight for 3×3/stride-2 (c = 4).
    Windows are separable, so ``c`` is the product of the per-axis maxima.
    """
    d = len(in_spatial)
    stride = kernel if stride is None or stride == [] or stride == () else stride
    k, s, p, dl = (_tuple(v, d) for v in (kernel, stride, padding, dilation))
    c = 1
    for ax in range(d):
        c *= _coverage_1d(in_spatial[ax], out_spatial[ax], k[ax], s[ax], p[ax], dl[ax])
    return math.sqrt(c)


def _maxpool_module(ctx: NodeContext) -> Nonlinear:
    single_input(ctx, "max-pooling")
    m = ctx.target
    if getattr(m, "return_indices", False):
        raise UnsupportedNodeError("max-pooling with return_indices=True returns a tuple.")
    d = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(m)]
    in_sp, out_sp = ctx.in_shapes[0][-d:], ctx.out_shape[-d:]
    lip = maxpool_lipschitz(in_sp, out_sp, m.kernel_size, m.stride, m.padding, m.dilation)
    return Nonlinear(lip, f"max-pool, sqrt(max windows per input) = {lip:g}")


def _maxpool_function(d: int) -> RuleFn:
    def rule(ctx: NodeContext) -> Nonlinear:
        single_input(ctx, "max-pooling")
        if ctx.arg(6, "return_indices", False):
            raise UnsupportedNodeError("max-pooling with return_indices=True returns a tuple.")
        kernel = ctx.arg(1, "kernel_size")
        stride = ctx.arg(2, "stride", None) or kernel
        padding = ctx.arg(3, "padding", 0)
        dilation = ctx.arg(4, "dilation", 1)
        in_sp, out_sp = ctx.in_shapes[0][-d:], ctx.out_shape[-d:]
        lip = maxpool_lipschitz(in_sp, out_sp, kernel, stride, padding, dilation)
        return Nonlinear(lip, f"max-pool, sqrt(max windows per input) = {lip:g}")

    return rule


def _adaptive_maxpool(d: int) -> RuleFn:
    def rule(ctx: NodeContext) -> Nonlinear:
        single_input(ctx, "adaptive max-pooling")
        in_sp, out_sp = ctx.in_shapes[0][-d:], ctx.out_shape[-d:]
        c = math.prod(_adaptive_coverage_1d(a, b) for a, b in zip(in_sp, out_sp, strict=True))
        return Nonlinear(math.sqrt(c), f"adaptive max-pool, sqrt({c})")

    return rule


for _t in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
    register_rule(_t, _maxpool_module)
for _d, _t in ((1, F.max_pool1d), (2, F.max_pool2d), (3, F.max_pool3d)):
    register_rule(_t, _maxpool_function(_d))
for _d, _t in ((1, nn.AdaptiveMaxPool1d), (2, nn.AdaptiveMaxPool2d), (3, nn.AdaptiveMaxPool3d)):
    register_rule(_t, _adaptive_maxpool(_d))
for _d, _t in (
    (1, F.adaptive_max_pool1d),
    (2, F.adaptive_max_pool2d),
    (3, F.adaptive_max_pool3d),
):
    register_rule(_t, _adaptive_maxpool(_d))

# Averages and paddings (zero, constant, reflection, replication, circular): each output entry
# is a copy or a mean of inputs (or a constant, which the affine offset removes): the linear
# part is a matrix of entries >= 0.
for _t in (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.CircularPad1d,
    nn.CircularPad2d,
    nn.CircularPad3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.pad,
):
    register_rule(_t, generic_nonnegative)
