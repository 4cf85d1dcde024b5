"""Layers with weights: linear, convolution, transposed convolution, batch norm (evaluation
mode), matrix products with a constant.

Dense layers on 1-d samples hand their weight to the exact SVD certificate (``Affine.weight``);
convolutions a certified FFT/Toeplitz bound (``Affine.certify``); batch norm its closed-form
norm ``max_c |γ_c| / sqrt(var_c + ε)`` (``Affine.norm``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipreg.functional.rules.registry import register_rule
from lipreg.functional.rules.shape import generic_linear
from lipreg.functional.specs import (
    Affine,
    ConvData,
    InputArg,
    NodeContext,
    RuleFn,
    UnsupportedNodeError,
    single_input,
)

__all__: list[str] = []


def _matrix_norm_bound(w: Tensor) -> float:
    # imported when called: certify.py belongs to the estimators, which import the rules.
    from lipreg.functional.certify import matrix_norm_bound

    return matrix_norm_bound(w)[0]


def _conv_bound() -> Callable[..., float]:
    from lipreg.functional.conv_bounds import conv_operator_norm_bound

    return conv_operator_norm_bound


def _dense(w: Tensor, ctx: NodeContext) -> Affine:
    """``x ↦ x Wᵀ``: its weight on a 1-d sample; a certified norm bound of ``W`` otherwise."""
    if len(ctx.in_shapes[0]) == 1:
        return Affine(linear=lambda x: F.linear(x, w), weight=w)

    # On a (..., in) sample the map is I ⊗ W: same norm as W, but W is not its matrix;
    # |I ⊗ W| = I ⊗ |W|, whose norm the Schur test bounds (rounding of materialised chains).
    def abs_norm() -> tuple[float, int]:
        a = w.detach().to(torch.float64).abs()
        return math.sqrt(float(a.sum(0).max()) * float(a.sum(1).max())) * (1 + 1e-6), a.shape[1]

    return Affine(
        linear=lambda x: F.linear(x, w),
        certify=lambda: _matrix_norm_bound(w),
        abs_norm=abs_norm,
    )


def _linear_module(ctx: NodeContext) -> Affine:
    single_input(ctx, "nn.Linear")
    return _dense(ctx.param(ctx.target.weight), ctx)


def _linear_function(ctx: NodeContext) -> Affine:
    single_input(ctx, "F.linear")
    w = ctx.arg(1, "weight")
    if not isinstance(ctx.args[0], InputArg) or isinstance(w, InputArg):
        raise UnsupportedNodeError("F.linear with an input-dependent weight is a product.")
    return _dense(w, ctx)


def _check_rank(ctx: NodeContext, what: str, d: int) -> None:
    """A d-dimensional conv/pool needs per-sample inputs (C, *d spatial dims)."""
    shape = ctx.in_shapes[0]
    if len(shape) != d + 1:
        raise ValueError(
            f"{what} at node {ctx.node.name!r} expects each input sample to have shape "
            f"{('(C, L)', '(C, H, W)', '(C, D, H, W)')[d - 1]} but got {tuple(shape)}: "
            "input_shape must be the shape of ONE sample including "
            "its channel dimension, e.g. (1, 28, 28) for MNIST."
        )


def _conv_layer(ctx: NodeContext) -> tuple[nn.Module, int, Tensor, tuple[int, ...]]:
    """A conv module's node: the module, its dimension ``d``, its weight at the compute dtype
    and the ``d`` spatial sizes of one input sample (checked)."""
    single_input(ctx, type(ctx.target).__name__)
    m = ctx.target
    d = len(m.kernel_size)
    _check_rank(ctx, type(m).__name__, d)
    return m, d, ctx.param(m.weight), tuple(ctx.in_shapes[0][-d:])


def _module_certificate(
    m: nn.Module, in_spatial: tuple[int, ...], **geometry: Any
) -> Callable[[], float]:
    """The certified operator-norm bound of conv module ``m`` on inputs of ``in_spatial``
    (computed from the module's own weight, at its own precision). The weight is read now,
    while the rule runs (in evaluation mode, like the rest of the spec), not when the bound is
    asked for: a parametrized weight (e.g. ``spectral_norm``) read later in training mode
    would be another weight, and reading it would update the parametrization's state."""
    weight = m.weight.detach()

    def certify() -> float:
        return _conv_bound()(
            weight,
            in_spatial,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=m.groups,
            **geometry,
        )

    return certify


def _as_tuple(value: Any, d: int) -> tuple[int, ...] | None:
    """An int or a length-``d`` sequence of ints as a tuple; ``None`` for anything else
    (string paddings such as ``"same"``: no :class:`ConvData`, deny by default)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * d
    if (
        isinstance(value, (tuple, list))
        and len(value) == d
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return tuple(value)
    return None


def _conv_data(
    ctx: NodeContext, w: Tensor, stride: Any, padding: Any, dilation: Any, groups: Any
) -> ConvData | None:
    """The convolution's :class:`ConvData` when every geometry argument is a plain integer
    (or tuple of them) and the padding is zero padding; else ``None``."""
    d = w.dim() - 2
    geometry = [_as_tuple(v, d) for v in (stride, padding, dilation)]
    if any(g is None for g in geometry) or not isinstance(groups, int):
        return None
    stride_t, padding_t, dilation_t = geometry
    return ConvData(
        weight=w,
        stride=stride_t,  # type: ignore[arg-type]
        padding=padding_t,  # type: ignore[arg-type]
        dilation=dilation_t,  # type: ignore[arg-type]
        groups=groups,
        in_shape=tuple(ctx.in_shapes[0]),
    )


def _conv_abs_norm(w: Tensor, groups: int, copies: int) -> Callable[[], tuple[float, int]]:
    """``Affine.abs_norm`` of a convolution (any padding mode, or transposed): the Schur-test
    bound of :func:`lipreg.functional.banded_gram.abs_norm_bound` (``copies``: entries
    duplicated by the padding mode), and ``w.numel()`` as the longest inner product. Evaluated
    when a chain is materialised (rounding.py)."""

    def abs_norm() -> tuple[float, int]:
        # imported when called: banded_gram imports the estimators, which import the rules
        from lipreg.functional.banded_gram import abs_norm_bound

        return abs_norm_bound(w, groups, copies=copies), w.numel()

    return abs_norm


def _conv_module(ctx: NodeContext) -> Affine:
    m, d, w, in_spatial = _conv_layer(ctx)
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    if m.padding_mode != "zeros":
        pad = m._reversed_padding_repeated_twice
        mode = m.padding_mode

        def linear(x: Tensor) -> Tensor:
            return conv(F.pad(x, pad, mode=mode), w, None, m.stride, 0, m.dilation, m.groups)

    else:

        def linear(x: Tensor) -> Tensor:
            return conv(x, w, None, m.stride, m.padding, m.dilation, m.groups)

    certify = _module_certificate(m, in_spatial, padding_mode=m.padding_mode)
    data = None
    if m.padding_mode == "zeros":
        data = _conv_data(ctx, w, m.stride, m.padding, m.dilation, m.groups)
    # reflect/replicate/circular padding copies an entry at most (1 + 2p) times per axis
    copies = math.prod(1 + 2 * p for p in _as_tuple(m.padding, d) or (0,) * d)
    abs_norm = _conv_abs_norm(w, m.groups, copies)
    return Affine(linear=linear, certify=certify, conv=data, abs_norm=abs_norm)


def _conv_transpose_module(ctx: NodeContext) -> Affine:
    m, d, w, in_spatial = _conv_layer(ctx)
    convt = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1]
    out_spatial = tuple(ctx.out_shape[-d:])
    # The output padding actually used (it may come from an output_size argument).
    out_pad = tuple(
        out_spatial[i]
        - (
            (in_spatial[i] - 1) * m.stride[i]
            - 2 * m.padding[i]
            + m.dilation[i] * (m.kernel_size[i] - 1)
            + 1
        )
        for i in range(d)
    )

    def linear(x: Tensor) -> Tensor:
        return convt(x, w, None, m.stride, m.padding, out_pad, m.groups, m.dilation)

    certify = _module_certificate(m, in_spatial, transposed=True, output_padding=out_pad)
    return Affine(linear=linear, certify=certify, abs_norm=_conv_abs_norm(w, m.groups, 1))


def _conv_function(d: int) -> RuleFn:
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]

    def rule(ctx: NodeContext) -> Affine:
        single_input(ctx, conv.__name__)
        w = ctx.arg(1, "weight")
        if not isinstance(ctx.args[0], InputArg) or isinstance(w, InputArg):
            raise UnsupportedNodeError(f"{conv.__name__} with an input-dependent weight.")
        _check_rank(ctx, conv.__name__, d)
        stride, padding = ctx.arg(3, "stride", 1), ctx.arg(4, "padding", 0)
        dilation, groups = ctx.arg(5, "dilation", 1), ctx.arg(6, "groups", 1)
        in_spatial = tuple(ctx.in_shapes[0][-d:])

        def linear(x: Tensor) -> Tensor:
            return conv(x, w, None, stride, padding, dilation, groups)

        def certify() -> float:
            return _conv_bound()(
                w, in_spatial, stride=stride, padding=padding, dilation=dilation, groups=groups
            )

        data = _conv_data(ctx, w, stride, padding, dilation, groups)
        abs_norm = _conv_abs_norm(w, groups if isinstance(groups, int) else 1, 1)
        return Affine(linear=linear, certify=certify, conv=data, abs_norm=abs_norm)

    return rule


def _channel_scaling(ctx: NodeContext, scale: Tensor) -> Affine:
    """``x ↦ s_c x`` per channel (dimension 1): a diagonal map of norm ``max_c |s_c|``."""
    s = scale.reshape((1, -1) + (1,) * (len(ctx.in_shapes[0]) - 1))
    return Affine(
        linear=lambda x: x * s, norm=float(scale.detach().abs().max()), channel_scale=scale
    )


def _batchnorm_module(ctx: NodeContext) -> Affine:
    single_input(ctx, "BatchNorm")
    m = ctx.target
    if m.running_var is None:
        raise UnsupportedNodeError(
            f"{type(m).__name__} has track_running_stats=False, so it normalises with the "
            "statistics of the batch even in eval mode: the network is then not a function of "
            "one sample and has no per-sample Lipschitz constant. Use track_running_stats=True."
        )
    scale = 1.0 / torch.sqrt(ctx.param(m.running_var) + m.eps)
    if m.weight is not None:
        scale = scale * ctx.param(m.weight)
    return _channel_scaling(ctx, scale)


def _batch_norm_function(ctx: NodeContext) -> Affine:
    single_input(ctx, "F.batch_norm")
    rm, rv = ctx.arg(1, "running_mean"), ctx.arg(2, "running_var")
    w, eps = ctx.arg(3, "weight"), ctx.arg(7, "eps", 1e-5)
    if ctx.arg(5, "training", False) is not False:
        raise UnsupportedNodeError(
            "F.batch_norm with training=True normalises with the batch's statistics even in "
            "evaluation mode: not a per-sample function. Pass training=self.training."
        )
    if (
        rv is None
        or isinstance(rv, InputArg)
        or isinstance(w, InputArg)
        or isinstance(rm, InputArg)
    ):
        raise UnsupportedNodeError("F.batch_norm needs constant running statistics.")
    scale = 1.0 / torch.sqrt(rv.to(ctx.dtype) + eps)
    if w is not None:
        scale = scale * w.to(ctx.dtype)
    return _channel_scaling(ctx, scale)


register_rule(nn.Linear, _linear_module)
register_rule(F.linear, _linear_function)
for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_t, _conv_module)
for _d, _f in ((1, F.conv1d), (2, F.conv2d), (3, F.conv3d)):
    register_rule(_f, _conv_function(_d))
for _t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_rule(_t, _conv_transpose_module)
for _t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_t, _batchnorm_module)
register_rule(F.batch_norm, _batch_norm_function)
# x @ C with a constant C (a product of two input-dependent tensors is refused by
# generic_linear's single-input check).
for _t in (torch.matmul, operator.matmul):
    register_rule(_t, generic_linear)
