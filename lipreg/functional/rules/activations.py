"""Activations: ONE table of element-wise activations, plus softmax and log-softmax.

Each element-wise activation is declared once, as an :class:`Activation` entry of
:data:`ACTIVATIONS`: its ``nn.Module`` classes, its functional forms, its tensor-method names,
its slope range ``[σ'_min, σ'_max]`` and the arguments that range reads. The rules of the three
forms are generated from the entry (:func:`register_activations`), so they cannot disagree.

All constants are exact Lipschitz constants for the l2 norm (paper.md §2.5), several tighter
than the blanket "1" of the paper: sigmoid 1/4, LeakyReLU ``max(1, |α|)``, hard-sigmoid 1/6.
Where no closed form is at hand (SiLU, Mish, tanh-GELU) the extremum of ``σ'`` is found
numerically and padded outwards (:func:`extreme_slope`).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipreg.functional.rules.registry import register_rule
from lipreg.functional.specs import (
    Elementwise,
    NodeContext,
    Nonlinear,
    RuleFn,
    UnsupportedNodeError,
    single_input,
)

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "Param",
    "SlopeRange",
    "extreme_slope",
    "register_activations",
]


# --------------------------------------------------------------------------------------------
# Slope ranges without a closed form
# --------------------------------------------------------------------------------------------


def extreme_slope(fn: Callable[[Tensor], Tensor], lo: float, hi: float, sign: float) -> float:
    """max (sign=+1) or min (sign=-1) of fn' on [lo, hi], refined to ~1e-13 and padded.

    A dense grid localises the extremum, then golden-section search refines it; the returned
    value is moved outwards by 1e-9 so that it stays a valid bound despite rounding.
    """
    x = torch.linspace(lo, hi, 200001, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(fn(x).sum(), x)
    x, d = x.detach(), d.detach()
    i = int(torch.argmax(sign * d))
    a = float(x[max(i - 1, 0)])
    b = float(x[min(i + 1, x.numel() - 1)])

    def slope(t: float) -> float:
        tt = torch.tensor([t], dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(fn(tt).sum(), tt)
        return sign * float(g)

    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        c, e = b - ratio * (b - a), a + ratio * (b - a)
        if slope(c) > slope(e):
            b = e
        else:
            a = c
    best = max(slope(a), slope(b), float(sign * d[i]))
    return sign * (best + 1e-9)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# Outside [-10, 10] these slopes are within 1e-3 of 0 or 1, far inside the extrema found.
@functools.cache
def _silu_range() -> tuple[float, float]:
    return (extreme_slope(F.silu, -10, 0, -1), extreme_slope(F.silu, 0, 10, 1))


@functools.cache
def _gelu_tanh_range() -> tuple[float, float]:
    return (extreme_slope(_gelu_tanh, -10, 0, -1), extreme_slope(_gelu_tanh, 0, 10, 1))


@functools.cache
def _mish_range() -> tuple[float, float]:
    return (extreme_slope(F.mish, -10, 0, -1), extreme_slope(F.mish, 0, 10, 1))


# exact GELU: f' = Φ(x) + xφ(x), extrema at ±√2 in closed form
_GELU_RANGE = (
    0.5 * (1 + math.erf(-1.0)) - math.sqrt(2) * math.exp(-1.0) / math.sqrt(2 * math.pi) - 1e-12,
    0.5 * (1 + math.erf(1.0)) + math.sqrt(2) * math.exp(-1.0) / math.sqrt(2 * math.pi) + 1e-12,
)
_SELU_SCALE = 1.0507009873554804934193349852946
_SELU_ALPHA = 1.6732632423543772848170429916717


def _leaky(negative_slope: float) -> tuple[float, float]:
    # slope 1 for x > 0, α for x < 0.
    return (min(negative_slope, 1.0), max(negative_slope, 1.0))


def _elu(alpha: float) -> tuple[float, float]:
    # x > 0: slope 1; x < 0: α e^x, between 0 and α.
    return (min(0.0, alpha), max(1.0, alpha))


def _gelu(approximate: str) -> tuple[float, float]:
    return _gelu_tanh_range() if approximate == "tanh" else _GELU_RANGE


def _prelu(weight: Tensor) -> tuple[float, float]:
    # one learned negative slope per channel (or one for all): the extremes of them and 1.
    a = weight.detach()
    return (min(float(a.min()), 1.0), max(float(a.max()), 1.0))


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

SlopeRange = tuple[float, float] | Callable[..., tuple[float, float]]


@dataclass(frozen=True)
class Param:
    """An argument the slope range of an activation reads.

    Attributes:
        name: the attribute of the module (``nn.LeakyReLU().negative_slope``) and the keyword
            of the functional and method forms (``F.leaky_relu(x, negative_slope=...)``).
        position: its positional index in the functional form, the input being 0
            (``F.leaky_relu(x, 0.2)``: 1); ``None`` for a keyword-only argument.
        default: its value when the functional form omits it.
    """

    name: str
    position: int | None = None
    default: Any = None

    def read(self, ctx: NodeContext, form: Literal["module", "function", "method"]) -> Any:
        """The argument's value at the node ``ctx`` called in ``form``."""
        if form == "module":
            return getattr(ctx.target, self.name)
        if self.position is None:
            return ctx.kwargs.get(self.name, self.default)
        return ctx.arg(self.position, self.name, self.default)


@dataclass(frozen=True)
class Activation:
    """One element-wise activation ``σ`` and every way a network may call it.

    Attributes:
        name: for messages and docs.
        slopes: ``(σ'_min, σ'_max)``, a proven interval containing every slope of ``σ``; or a
            callable returning it from the values of ``params`` (a cached callable without
            params for ranges computed once, e.g. by :func:`extreme_slope`). The Lipschitz
            constant is ``max(|σ'_min|, |σ'_max|)``.
        modules: ``nn.Module`` classes computing ``σ`` (their subclasses bind only when they
            redefine no method).
        functions: functions computing ``σ`` (matched by identity), in-place ones included.
        methods: tensor-method names (``x.name()``; ``x.name_()`` binds too).
        params: the arguments ``slopes`` is called with, read from the module's attributes or
            from the call's arguments.
    """

    name: str
    slopes: SlopeRange
    modules: tuple[type[nn.Module], ...] = ()
    functions: tuple[Callable[..., Any], ...] = ()
    methods: tuple[str, ...] = ()
    params: tuple[Param, ...] = ()

    def rule(self, form: Literal["module", "function", "method"]) -> RuleFn:
        """The rule of this activation called as ``form``."""

        def rule(ctx: NodeContext) -> Elementwise:
            single_input(ctx, "an element-wise activation")
            if not callable(self.slopes):
                return Elementwise(*self.slopes)
            return Elementwise(*self.slopes(*(p.read(ctx, form) for p in self.params)))

        return rule


def register_activations(table: Iterable[Activation]) -> None:
    """Register the module, function and method rules of every entry of ``table``."""
    for act in table:
        for cls in act.modules:
            register_rule(cls, act.rule("module"))
        for fn in act.functions:
            register_rule(fn, act.rule("function"))
        for name in act.methods:
            register_rule(name, act.rule("method"))


_SELU = (0.0, _SELU_SCALE * _SELU_ALPHA)

ACTIVATIONS: tuple[Activation, ...] = (
    Activation(
        "relu", (0.0, 1.0), (nn.ReLU,), (F.relu, torch.relu, F.relu_, torch.relu_), ("relu",)
    ),
    Activation("relu6", (0.0, 1.0), (nn.ReLU6,), (F.relu6,)),
    Activation(
        "sigmoid",
        (0.0, 0.25),
        (nn.Sigmoid,),
        (torch.sigmoid, F.sigmoid, torch.special.expit),
        ("sigmoid",),
    ),
    Activation("tanh", (0.0, 1.0), (nn.Tanh,), (torch.tanh, F.tanh), ("tanh",)),
    Activation("softsign", (0.0, 1.0), (nn.Softsign,), (F.softsign,)),
    Activation("hardtanh", (0.0, 1.0), (nn.Hardtanh,), (F.hardtanh, F.hardtanh_)),
    Activation("hardsigmoid", (0.0, 1.0 / 6.0), (nn.Hardsigmoid,), (F.hardsigmoid,)),
    Activation("hardswish", (-0.5, 1.5), (nn.Hardswish,), (F.hardswish,)),
    Activation("logsigmoid", (0.0, 1.0), (nn.LogSigmoid,), (F.logsigmoid,)),
    Activation("tanhshrink", (0.0, 1.0), (nn.Tanhshrink,), (F.tanhshrink,)),
    Activation("softshrink", (0.0, 1.0), (nn.Softshrink,), (F.softshrink,)),
    Activation("silu", _silu_range, (nn.SiLU,), (F.silu,)),
    Activation("mish", _mish_range, (nn.Mish,), (F.mish,)),
    Activation("selu", _SELU, (nn.SELU,), (F.selu, torch.selu)),
    # softplus_β' = sigmoid(βx) ∈ (0, 1) for every β; CELU's slope e^{x/α} ∈ (0, 1] for every α.
    Activation("softplus", (0.0, 1.0), (nn.Softplus,), (F.softplus,)),
    Activation("celu", (0.0, 1.0), (nn.CELU,), (F.celu,)),
    Activation(
        "leaky_relu",
        lambda negative_slope: _leaky(float(negative_slope)),
        (nn.LeakyReLU,),
        (F.leaky_relu, F.leaky_relu_),
        params=(Param("negative_slope", 1, 0.01),),
    ),
    Activation(
        "elu",
        lambda alpha: _elu(float(alpha)),
        (nn.ELU,),
        (F.elu, F.elu_),
        params=(Param("alpha", 1, 1.0),),
    ),
    Activation("gelu", _gelu, (nn.GELU,), (F.gelu,), params=(Param("approximate", None, "none"),)),
    # in evaluation mode RReLU is a leaky ReLU of slope (lower + upper) / 2.
    Activation(
        "rrelu",
        lambda lower, upper: _leaky((lower + upper) / 2),
        (nn.RReLU,),
        params=(Param("lower"), Param("upper")),
    ),
    Activation("prelu", _prelu, (nn.PReLU,), params=(Param("weight"),)),
    Activation("abs", (-1.0, 1.0), (), (torch.abs, abs, operator.abs), ("abs",)),
    Activation("sin", (-1.0, 1.0), (), (torch.sin,), ("sin",)),
    Activation("cos", (-1.0, 1.0), (), (torch.cos,), ("cos",)),
    Activation("atan", (0.0, 1.0), (), (torch.atan, torch.arctan), ("atan",)),
    # clamping to constant bounds: slope 0 outside, 1 inside (input-dependent bounds are
    # refused as a second input).
    Activation(
        "clamp",
        (0.0, 1.0),
        (),
        (torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max),
        ("clamp", "clip", "clamp_min", "clamp_max"),
    ),
)

register_activations(ACTIVATIONS)


# --------------------------------------------------------------------------------------------
# Softmax and log-softmax (not element-wise)
# --------------------------------------------------------------------------------------------


def _softmax_rule(ctx: NodeContext) -> Nonlinear:
    # Jacobian diag(p) − p pᵀ: by Gershgorin its eigenvalues lie in [0, 2 p_i (1 − p_i)] ≤ 1/2.
    single_input(ctx, "softmax")
    return Nonlinear(0.5, "softmax: ‖diag(p) − ppᵀ‖ ≤ max_i 2p_i(1−p_i) ≤ 1/2")


def _log_softmax_bound(ctx: NodeContext, dim: int | None) -> Nonlinear:
    # Jacobian I − 1 pᵀ: ‖·‖ ≤ 1 + ‖1‖‖p‖ ≤ 1 + sqrt(n), n the size of the softmax dimension.
    single_input(ctx, "log_softmax")
    if dim is None:
        raise UnsupportedNodeError("log_softmax without an explicit dim is not supported.")
    size = (1, *ctx.in_shapes[0])[dim]
    return Nonlinear(1.0 + math.sqrt(size), "log_softmax: ‖I − 1pᵀ‖ ≤ 1 + sqrt(n)")


def _log_softmax_rule(ctx: NodeContext) -> Nonlinear:
    return _log_softmax_bound(ctx, ctx.arg(1, "dim", None))


for _t in (nn.Softmax, nn.Softmax2d, F.softmax, torch.softmax, "softmax"):
    register_rule(_t, _softmax_rule)
register_rule(nn.LogSoftmax, lambda ctx: _log_softmax_bound(ctx, ctx.target.dim))
for _t in (F.log_softmax, torch.log_softmax, "log_softmax"):
    register_rule(_t, _log_softmax_rule)
