"""Per-node Lipschitz rules and the public rule registry.

Every node of a traced network is described by one of four *specs*:

* :class:`Affine` — affine in its single input-dependent argument (Linear, Conv, BatchNorm in
  eval, pooling by averaging, reshapes, ``x * c``, ``x + b`` …). Consecutive affine nodes are
  merged into one linear map whose operator norm is computed as a whole.
* :class:`Elementwise` — a scalar function applied coordinate-wise whose derivative lies in
  ``[slope_min, slope_max]``; its Lipschitz constant is ``max(|slope_min|, |slope_max|)``.
  SeqLip uses the slope interval.
* :class:`Nonlinear` — any other map of one input with a known Lipschitz constant (max-pool,
  softmax …).
* :class:`Combine` — several input-dependent arguments: ``x + y`` (sum of the constants) or
  concatenation (root of the sum of squares, since the pieces are orthogonal).

:func:`register_rule` adds or overrides the rule of a module class, a function, or a tensor
method name. A rule receives a :class:`NodeContext` and returns a spec, or raises
:class:`UnsupportedNodeError` with the reason.

All constants below are exact Lipschitz constants for the l2 norm (paper.md §2.5), several
tighter than the blanket "1" of the paper: sigmoid 1/4, LeakyReLU ``max(1, |α|)``, overlapping
max-pool ``sqrt(c)`` with ``c`` the largest number of windows that contain one input.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from lipreg.functional.evaluation import call_target, evaluation_mode

__all__ = [
    "Affine",
    "Combine",
    "Elementwise",
    "InputArg",
    "NodeContext",
    "Nonlinear",
    "UnsupportedNodeError",
    "register_rule",
    "registered_targets",
]


class UnsupportedNodeError(Exception):
    """Raised by a rule that cannot bound its node; the message says why."""


@dataclass(frozen=True)
class Affine:
    """The node is affine in its one input-dependent argument.

    Attributes:
        linear: batched linear part ``(B, *in) -> (B, *out)`` (bias removed).
        norm: the exact operator norm of ``linear`` when known in closed form, else ``None``.
        isometry: ``linear`` is ``norm`` times a bijective isometry (reshape, permutation,
            identity, multiplication by a scalar): in a chain it only scales the norm.
        nonnegative: every matrix entry of ``linear`` is ``≥ 0`` (pooling, padding, indexing):
            enables the Schur-test certificate ``‖A‖ ≤ sqrt(‖A‖_1 ‖A‖_∞)``.
        certify: optional callable returning a certified upper bound on ``‖linear‖``.
        weight: for a dense layer, the ``(out, in)`` matrix (enables exact SVDs).
    """

    linear: Callable[[Tensor], Tensor]
    norm: float | None = None
    isometry: bool = False
    nonnegative: bool = False
    certify: Callable[[], float] | None = None
    weight: Tensor | None = None


@dataclass(frozen=True)
class Elementwise:
    """A coordinate-wise scalar function with derivative in ``[slope_min, slope_max]``."""

    slope_min: float
    slope_max: float

    @property
    def lipschitz(self) -> float:
        return max(abs(self.slope_min), abs(self.slope_max))


@dataclass(frozen=True)
class Nonlinear:
    """A non-element-wise map of one input with Lipschitz constant ``lipschitz``."""

    lipschitz: float
    description: str = ""


@dataclass(frozen=True)
class Combine:
    """A node with several input-dependent arguments.

    ``mode="sum"``: ``L = Σ_i |w_i| L_i`` (sums, differences). ``mode="l2"``:
    ``L = sqrt(Σ_i L_i²)`` (concatenation / stacking of the arguments).
    """

    mode: str
    weights: tuple[float, ...] = ()


Spec = Affine | Elementwise | Nonlinear | Combine


class InputArg:
    """Marks the position of an input-dependent argument in a node's arguments."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<input {self.index}>"


@dataclass
class NodeContext:
    """What a rule can see about one node.

    Attributes:
        node: the ``torch.fx`` node.
        target: the module (for ``call_module``), the function, or the method name.
        args, kwargs: the node's arguments; input-dependent ones are ``InputArg`` markers, the
            others are their concrete values (floating tensors cast to ``dtype``).
        n_inputs: number of input-dependent arguments (counting repetitions).
        in_shapes: per-sample shapes of the input-dependent arguments.
        out_shape: per-sample shape of the node's output (``None`` if not a tensor).
        dtype, device: what the estimators compute in.
    """

    node: fx.Node
    target: Any
    args: tuple
    kwargs: dict
    n_inputs: int
    in_shapes: list[tuple[int, ...]]
    out_shape: tuple[int, ...] | None
    dtype: torch.dtype
    device: torch.device
    differentiable: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def module(self) -> nn.Module | None:
        return self.target if isinstance(self.target, nn.Module) else None

    def param(self, t: Tensor | None) -> Tensor | None:
        """A parameter or buffer cast to the compute dtype/device, detached from autograd
        unless the analysis is differentiable (the penalty's)."""
        if t is None:
            return None
        t = t.to(dtype=self.dtype, device=self.device)
        return t if self.differentiable else t.detach()

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Positional-or-keyword argument lookup."""
        if len(self.args) > index:
            return self.args[index]
        return self.kwargs.get(name, default)

    def var_positions(self) -> list[int]:
        return [i for i, a in enumerate(self.args) if isinstance(a, InputArg)]

    def call_with(self, *xs: Tensor) -> Tensor:
        """Call the node's target with the input-dependent arguments replaced by ``xs``."""

        def sub(a: Any) -> Any:
            return xs[a.index] if isinstance(a, InputArg) else a

        args = fx.node.map_aggregate(self.args, sub)
        kwargs = fx.node.map_aggregate(self.kwargs, sub)
        if self.node.op == "call_module":
            with evaluation_mode(self.target, restore_buffers=False):
                return call_target(self.node.op, self.target, args, kwargs)
        return call_target(self.node.op, self.target, args, kwargs)

    def generic_affine(self, **flags: Any) -> Affine:
        """Affine spec whose linear part is ``f(x) − f(0)`` evaluated by calling the node."""
        zero = torch.zeros(1, *self.in_shapes[0], dtype=self.dtype, device=self.device)
        with torch.no_grad():
            offset = self.call_with(zero)
        if not isinstance(offset, Tensor) or tuple(offset.shape) != (1, *(self.out_shape or ())):
            found = tuple(offset.shape) if isinstance(offset, Tensor) else type(offset).__name__
            raise UnsupportedNodeError(
                f"applied to ONE sample it returns {found}, not (1, *{self.out_shape}): its "
                "arguments depend on the batch size (e.g. x.size(0) or x.shape[0] passed to "
                "expand/repeat/index). Write the op so that it keeps the batch dimension "
                "(e.g. x.expand(-1, ...), x.flatten(1))."
            )

        def linear(x: Tensor) -> Tensor:
            return self.call_with(x) - offset

        return Affine(linear=linear, **flags)

    def reshape_to_output(self) -> Affine:
        out_shape = self.out_shape

        def linear(x: Tensor) -> Tensor:
            return x.reshape(x.shape[0], *out_shape)

        return Affine(linear=linear, norm=1.0, isometry=True, nonnegative=True)


RuleFn = Callable[[NodeContext], Spec]
_MODULE_RULES: dict[type, RuleFn] = {}
_FUNCTION_RULES: dict[Any, RuleFn] = {}
_METHOD_RULES: dict[str, RuleFn] = {}


def register_rule(target: type | Callable | str, rule: RuleFn | Spec) -> None:
    """Register how lipreg bounds a module class, a function or a tensor method.

    Args:
        target: an ``nn.Module`` subclass (matched along the MRO), a function such as
            ``torch.special.expit`` (matched by identity), or a method name such as
            ``"my_method"`` (for ``x.my_method(...)``).
        rule: a spec (for constant rules, e.g. ``Elementwise(0.0, 1.0)``) or a callable
            ``rule(ctx: NodeContext) -> Affine | Elementwise | Nonlinear | Combine``.

    Example:
        >>> import lipreg, torch
        >>> class Swish2(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * torch.sigmoid(x)
        >>> lipreg.register_rule(Swish2, lipreg.Elementwise(-0.0999, 1.0999))
    """
    fn: RuleFn = rule if callable(rule) else (lambda ctx, _s=rule: _s)  # type: ignore[misc]
    if isinstance(target, str):
        _METHOD_RULES[target] = fn
    elif isinstance(target, type) and issubclass(target, nn.Module):
        _MODULE_RULES[target] = fn
    elif callable(target):
        _FUNCTION_RULES[target] = fn
    else:
        raise TypeError(
            "register_rule target must be an nn.Module subclass, a function or a method "
            f"name (str), got {target!r}."
        )


def registered_targets() -> dict[str, list[str]]:
    """Names of everything that has a rule (for docs and error messages)."""
    return {
        "modules": sorted(t.__name__ for t in _MODULE_RULES),
        "functions": sorted(getattr(f, "__name__", repr(f)) for f in _FUNCTION_RULES),
        "methods": sorted(_METHOD_RULES),
    }


# Class attributes a subclass may redefine without changing what forward() computes:
# construction, printing, pickling and checkpoint plumbing (parametrized modules define
# __getstate__/__deepcopy__ and a ``weight`` property, which the rules read like any weight).
_HARMLESS_OVERRIDES = frozenset(
    {
        "__init__",
        "__repr__",
        "__getstate__",
        "__setstate__",
        "__deepcopy__",
        "__reduce__",
        "__reduce_ex__",
        "extra_repr",
        "reset_parameters",
        "_load_from_state_dict",
        "_save_to_state_dict",
        "_get_name",
    }
)


def _overridden_methods(cls: type, base: type) -> list[str]:
    """Functions that the classes between ``cls`` and ``base`` (excluded) define and that
    could change what ``base``'s ``forward`` computes."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is base:
            break
        for name, value in vars(klass).items():
            if name in _HARMLESS_OVERRIDES:
                continue
            if callable(value) or isinstance(value, staticmethod | classmethod):
                names.append(f"{klass.__name__}.{name}")
    return names


def module_rule_class(module: nn.Module) -> type | None:
    """The registered class whose rule binds to ``module``, or ``None``.

    A rule is proven for the code of the class it was registered for. It binds to a subclass
    only when the subclass redefines no method (a LoRA-style ``nn.Linear`` whose ``forward``
    adds ``A @ B``, a weight-standardised conv overriding ``_conv_forward``, a layer scaling
    ``super().forward(x)``): such a subclass is a different function and is traced through.
    """
    for cls in type(module).__mro__:
        if cls in _MODULE_RULES:
            return None if _overridden_methods(type(module), cls) else cls
    return None


def overriding_methods(module: nn.Module) -> list[str]:
    """Methods by which ``module``'s class departs from the nearest class with a rule."""
    for cls in type(module).__mro__:
        if cls in _MODULE_RULES:
            return _overridden_methods(type(module), cls)
    return []


def has_module_rule(module: nn.Module) -> bool:
    """Whether a registered rule binds to ``module`` (see :func:`module_rule_class`)."""
    return module_rule_class(module) is not None


def lookup_rule(node: fx.Node, target: Any) -> RuleFn | None:
    """The rule of a node, or ``None`` (deny by default).

    Module rules bind by :func:`module_rule_class`; function rules by identity; method rules
    by name (the analysis checks that ``self`` is a plain tensor). An in-place method
    ``x.op_()`` takes the rule of ``x.op()``: the analysis refuses in-place updates whose
    old value is still read afterwards, so the two compute the same function.
    """
    if node.op == "call_module":
        cls = module_rule_class(target)
        return _MODULE_RULES[cls] if cls is not None else None
    if node.op == "call_method":
        rule = _METHOD_RULES.get(target)
        if rule is None and target.endswith("_") and not target.startswith("_"):
            rule = _METHOD_RULES.get(target[:-1])
        return rule
    try:
        return _FUNCTION_RULES.get(target)
    except TypeError:  # unhashable target
        return None


def splits_into_pieces(node: fx.Node, target: Any) -> bool:
    """Whether the node returns a tuple of disjoint pieces of its input (split/chunk/...)."""
    return node.op != "call_module" and lookup_rule(node, target) is _split


# --------------------------------------------------------------------------------------------
# Exact constants of element-wise activations
# --------------------------------------------------------------------------------------------


def _extreme_slope(fn: Callable[[Tensor], Tensor], lo: float, hi: float, sign: float) -> float:
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


@functools.cache
def _silu_range() -> tuple[float, float]:
    return (_extreme_slope(F.silu, -10, 0, -1), _extreme_slope(F.silu, 0, 10, 1))


@functools.cache
def _gelu_tanh_range() -> tuple[float, float]:
    return (_extreme_slope(_gelu_tanh, -10, 0, -1), _extreme_slope(_gelu_tanh, 0, 10, 1))


@functools.cache
def _mish_range() -> tuple[float, float]:
    return (_extreme_slope(F.mish, -10, 0, -1), _extreme_slope(F.mish, 0, 10, 1))


# exact GELU: f' = Φ(x) + xφ(x), extrema at ±√2 in closed form
_GELU_RANGE = (
    0.5 * (1 + math.erf(-1.0)) - math.sqrt(2) * math.exp(-1.0) / math.sqrt(2 * math.pi) - 1e-12,
    0.5 * (1 + math.erf(1.0)) + math.sqrt(2) * math.exp(-1.0) / math.sqrt(2 * math.pi) + 1e-12,
)
_SELU_SCALE = 1.0507009873554804934193349852946
_SELU_ALPHA = 1.6732632423543772848170429916717


SlopeRange = tuple[float, float] | Callable[[], tuple[float, float]]


def _slopes(rng: SlopeRange) -> tuple[float, float]:
    return rng() if callable(rng) else rng


def _const(rng: SlopeRange) -> RuleFn:
    return lambda ctx: Elementwise(*_slopes(rng))


def _leaky(alpha: float) -> Elementwise:
    return Elementwise(min(alpha, 1.0), max(alpha, 1.0))


def _elu(alpha: float) -> Elementwise:
    # x > 0: slope 1; x < 0: α e^x, between 0 and α.
    return Elementwise(min(0.0, alpha), max(1.0, alpha))


def _gelu(approximate: str) -> Elementwise:
    return Elementwise(*(_gelu_tanh_range() if approximate == "tanh" else _GELU_RANGE))


def _single_input(ctx: NodeContext, what: str) -> None:
    if ctx.n_inputs != 1:
        raise UnsupportedNodeError(
            f"{what} with {ctx.n_inputs} input-dependent arguments is not supported."
        )


def _elementwise_rule(make: Callable[[NodeContext], Elementwise]) -> RuleFn:
    def rule(ctx: NodeContext) -> Elementwise:
        _single_input(ctx, "an element-wise activation")
        return make(ctx)

    return rule


for _cls, _rng in [
    (nn.ReLU, (0.0, 1.0)),
    (nn.ReLU6, (0.0, 1.0)),
    (nn.Sigmoid, (0.0, 0.25)),
    (nn.Tanh, (0.0, 1.0)),
    (nn.Softsign, (0.0, 1.0)),
    (nn.Hardtanh, (0.0, 1.0)),
    (nn.Hardsigmoid, (0.0, 1.0 / 6.0)),
    (nn.Hardswish, (-0.5, 1.5)),
    (nn.LogSigmoid, (0.0, 1.0)),
    (nn.Tanhshrink, (0.0, 1.0)),
    (nn.Softshrink, (0.0, 1.0)),
    (nn.SiLU, _silu_range),
    (nn.Mish, _mish_range),
    (nn.SELU, (0.0, _SELU_SCALE * _SELU_ALPHA)),
]:
    register_rule(_cls, _const(_rng))

register_rule(nn.Softplus, _const((0.0, 1.0)))
register_rule(nn.CELU, _const((0.0, 1.0)))
register_rule(nn.LeakyReLU, lambda ctx: _leaky(ctx.target.negative_slope))
register_rule(nn.ELU, lambda ctx: _elu(ctx.target.alpha))
register_rule(nn.GELU, lambda ctx: _gelu(ctx.target.approximate))
register_rule(nn.RReLU, lambda ctx: _leaky((ctx.target.lower + ctx.target.upper) / 2))


def _prelu(ctx: NodeContext) -> Elementwise:
    a = ctx.target.weight.detach()
    return Elementwise(min(float(a.min()), 1.0), max(float(a.max()), 1.0))


register_rule(nn.PReLU, _prelu)

for _fn, _rng in [
    (F.relu, (0.0, 1.0)),
    (torch.relu, (0.0, 1.0)),
    (F.relu6, (0.0, 1.0)),
    (torch.sigmoid, (0.0, 0.25)),
    (F.sigmoid, (0.0, 0.25)),
    (torch.special.expit, (0.0, 0.25)),
    (torch.tanh, (0.0, 1.0)),
    (F.tanh, (0.0, 1.0)),
    (F.softsign, (0.0, 1.0)),
    (F.softplus, (0.0, 1.0)),
    (F.hardtanh, (0.0, 1.0)),
    (F.hardsigmoid, (0.0, 1.0 / 6.0)),
    (F.hardswish, (-0.5, 1.5)),
    (F.logsigmoid, (0.0, 1.0)),
    (F.tanhshrink, (0.0, 1.0)),
    (F.softshrink, (0.0, 1.0)),
    (F.silu, _silu_range),
    (F.mish, _mish_range),
    (F.selu, (0.0, _SELU_SCALE * _SELU_ALPHA)),
    (torch.selu, (0.0, _SELU_SCALE * _SELU_ALPHA)),
    (F.celu, (0.0, 1.0)),
    (torch.abs, (-1.0, 1.0)),
    (abs, (-1.0, 1.0)),
    (operator.abs, (-1.0, 1.0)),
    (torch.sin, (-1.0, 1.0)),
    (torch.cos, (-1.0, 1.0)),
    (torch.atan, (0.0, 1.0)),
    (torch.arctan, (0.0, 1.0)),
    (torch.clamp, (0.0, 1.0)),
    (torch.clip, (0.0, 1.0)),
    (torch.clamp_min, (0.0, 1.0)),
    (torch.clamp_max, (0.0, 1.0)),
]:
    register_rule(_fn, _elementwise_rule(lambda ctx, _r=_rng: Elementwise(*_slopes(_r))))

for _name, _rng in [
    ("relu", (0.0, 1.0)),
    ("sigmoid", (0.0, 0.25)),
    ("tanh", (0.0, 1.0)),
    ("abs", (-1.0, 1.0)),
    ("sin", (-1.0, 1.0)),
    ("cos", (-1.0, 1.0)),
    ("atan", (0.0, 1.0)),
    ("clamp", (0.0, 1.0)),
    ("clip", (0.0, 1.0)),
    ("clamp_min", (0.0, 1.0)),
    ("clamp_max", (0.0, 1.0)),
]:
    register_rule(_name, _elementwise_rule(lambda ctx, _r=_rng: Elementwise(*_slopes(_r))))

register_rule(
    F.leaky_relu,
    _elementwise_rule(lambda ctx: _leaky(float(ctx.arg(1, "negative_slope", 0.01)))),
)
register_rule(F.elu, _elementwise_rule(lambda ctx: _elu(float(ctx.arg(1, "alpha", 1.0)))))
register_rule(F.gelu, _elementwise_rule(lambda ctx: _gelu(ctx.kwargs.get("approximate", "none"))))


def _softmax_rule(ctx: NodeContext) -> Nonlinear:
    # Jacobian diag(p) − p pᵀ: by Gershgorin its eigenvalues lie in [0, 2 p_i (1 − p_i)] ≤ 1/2.
    _single_input(ctx, "softmax")
    return Nonlinear(0.5, "softmax: ‖diag(p) − ppᵀ‖ ≤ max_i 2p_i(1−p_i) ≤ 1/2")


def _log_softmax_bound(ctx: NodeContext, dim: int | None) -> Nonlinear:
    # Jacobian I − 1 pᵀ: ‖·‖ ≤ 1 + ‖1‖‖p‖ ≤ 1 + sqrt(n), n the size of the softmax dimension.
    _single_input(ctx, "log_softmax")
    if dim is None:
        raise UnsupportedNodeError("log_softmax without an explicit dim is not supported.")
    size = (1, *ctx.in_shapes[0])[dim]
    return Nonlinear(1.0 + math.sqrt(size), "log_softmax: ‖I − 1pᵀ‖ ≤ 1 + sqrt(n)")


def _log_softmax_rule(ctx: NodeContext) -> Nonlinear:
    return _log_softmax_bound(ctx, ctx.arg(1, "dim", None))


for _t in (nn.Softmax, nn.Softmax2d):
    register_rule(_t, _softmax_rule)
register_rule(F.softmax, _softmax_rule)
register_rule(torch.softmax, _softmax_rule)
register_rule("softmax", _softmax_rule)
register_rule(nn.LogSoftmax, lambda ctx: _log_softmax_bound(ctx, ctx.target.dim))
register_rule(F.log_softmax, _log_softmax_rule)
register_rule(torch.log_softmax, _log_softmax_rule)
register_rule("log_softmax", _log_softmax_rule)


# --------------------------------------------------------------------------------------------
# Max-pooling: sqrt(max number of windows containing one input)
# --------------------------------------------------------------------------------------------


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
    _single_input(ctx, "max-pooling")
    m = ctx.target
    if getattr(m, "return_indices", False):
        raise UnsupportedNodeError("max-pooling with return_indices=True returns a tuple.")
    d = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}[type(m)]
    in_sp, out_sp = ctx.in_shapes[0][-d:], ctx.out_shape[-d:]
    lip = maxpool_lipschitz(in_sp, out_sp, m.kernel_size, m.stride, m.padding, m.dilation)
    return Nonlinear(lip, f"max-pool, sqrt(max windows per input) = {lip:g}")


def _maxpool_function(d: int) -> RuleFn:
    def rule(ctx: NodeContext) -> Nonlinear:
        _single_input(ctx, "max-pooling")
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
        _single_input(ctx, "adaptive max-pooling")
        in_sp, out_sp = ctx.in_shapes[0][-d:], ctx.out_shape[-d:]
        c = math.prod(_adaptive_coverage_1d(a, b) for a, b in zip(in_sp, out_sp, strict=True))
        return Nonlinear(math.sqrt(c), f"adaptive max-pool, sqrt({c})")

    return rule


for _cls in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
    register_rule(_cls, _maxpool_module)
for _d, _f in ((1, F.max_pool1d), (2, F.max_pool2d), (3, F.max_pool3d)):
    register_rule(_f, _maxpool_function(_d))
for _d, _cls in ((1, nn.AdaptiveMaxPool1d), (2, nn.AdaptiveMaxPool2d), (3, nn.AdaptiveMaxPool3d)):
    register_rule(_cls, _adaptive_maxpool(_d))
for _d, _f in (
    (1, F.adaptive_max_pool1d),
    (2, F.adaptive_max_pool2d),
    (3, F.adaptive_max_pool3d),
):
    register_rule(_f, _adaptive_maxpool(_d))


# --------------------------------------------------------------------------------------------
# Affine modules
# --------------------------------------------------------------------------------------------


def _linear_module(ctx: NodeContext) -> Affine:
    _single_input(ctx, "nn.Linear")
    w = ctx.param(ctx.target.weight)
    if len(ctx.in_shapes[0]) == 1:
        return Affine(linear=lambda x: F.linear(x, w), weight=w)
    # On a (..., in) sample the map is I ⊗ W: same norm as W, but W is not its matrix.
    return Affine(linear=lambda x: F.linear(x, w), certify=lambda: _matrix_norm_bound(w))


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


def _conv_module(ctx: NodeContext) -> Affine:
    from lipreg.functional.conv_bounds import conv_operator_norm_bound

    _single_input(ctx, type(ctx.target).__name__)
    m = ctx.target
    d = len(m.kernel_size)
    _check_rank(ctx, type(m).__name__, d)
    w = ctx.param(m.weight)
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    in_spatial = tuple(ctx.in_shapes[0][-d:])
    if m.padding_mode != "zeros":
        pad = m._reversed_padding_repeated_twice
        mode = m.padding_mode

        def linear(x: Tensor) -> Tensor:
            return conv(F.pad(x, pad, mode=mode), w, None, m.stride, 0, m.dilation, m.groups)

    else:

        def linear(x: Tensor) -> Tensor:
            return conv(x, w, None, m.stride, m.padding, m.dilation, m.groups)

    def certify() -> float:
        return conv_operator_norm_bound(
            m.weight.detach(),
            in_spatial,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=m.groups,
            padding_mode=m.padding_mode,
        )

    return Affine(linear=linear, certify=certify)


def _conv_transpose_module(ctx: NodeContext) -> Affine:
    from lipreg.functional.conv_bounds import conv_operator_norm_bound

    _single_input(ctx, type(ctx.target).__name__)
    m = ctx.target
    d = len(m.kernel_size)
    _check_rank(ctx, type(m).__name__, d)
    w = ctx.param(m.weight)
    convt = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[d - 1]
    in_spatial = tuple(ctx.in_shapes[0][-d:])
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

    def certify() -> float:
        return conv_operator_norm_bound(
            m.weight.detach(),
            in_spatial,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=m.groups,
            transposed=True,
            output_padding=out_pad,
        )

    return Affine(linear=linear, certify=certify)


def _batchnorm_scale(ctx: NodeContext, m: nn.modules.batchnorm._NormBase) -> Tensor:
    if m.running_var is None:
        raise UnsupportedNodeError(
            f"{type(m).__name__} has track_running_stats=False, so it normalises with the "
            "statistics of the batch even in eval mode: the network is then not a function of "
            "one sample and has no per-sample Lipschitz constant. Use track_running_stats=True."
        )
    var = ctx.param(m.running_var)
    scale = 1.0 / torch.sqrt(var + m.eps)
    if m.weight is not None:
        scale = scale * ctx.param(m.weight)
    return scale


def _batchnorm_module(ctx: NodeContext) -> Affine:
    _single_input(ctx, "BatchNorm")
    scale = _batchnorm_scale(ctx, ctx.target)
    ndim = len(ctx.in_shapes[0])
    view = (1, -1) + (1,) * (ndim - 1)
    s = scale.reshape(view)
    return Affine(linear=lambda x: x * s, norm=float(scale.detach().abs().max()))


def _identity(ctx: NodeContext) -> Affine:
    _single_input(ctx, "an identity-like node")
    return Affine(linear=lambda x: x, norm=1.0, isometry=True, nonnegative=True)


def _reshape(ctx: NodeContext) -> Affine:
    _single_input(ctx, "a reshape")
    return ctx.reshape_to_output()


def _generic_nonnegative(ctx: NodeContext) -> Affine:
    _single_input(ctx, f"{ctx.node.target}")
    return ctx.generic_affine(nonnegative=True)


def _generic_linear(ctx: NodeContext) -> Affine:
    _single_input(ctx, f"{ctx.node.target}")
    return ctx.generic_affine()


register_rule(nn.Linear, _linear_module)
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_cls, _conv_module)
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_rule(_cls, _conv_transpose_module)
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_cls, _batchnorm_module)
for _cls in (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
):
    register_rule(_cls, _identity)
for _cls in (nn.Flatten, nn.Unflatten):
    register_rule(_cls, _reshape)
for _cls in (
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
):
    register_rule(_cls, _generic_nonnegative)


def _upsample(ctx: NodeContext) -> Affine:
    _single_input(ctx, "upsampling")
    mode = getattr(ctx.target, "mode", None) or ctx.kwargs.get("mode", "nearest")
    # nearest / (bi/tri)linear interpolation weights are >= 0; bicubic ones are not.
    return ctx.generic_affine(nonnegative=mode != "bicubic")


register_rule(nn.Upsample, _upsample)
register_rule(nn.UpsamplingNearest2d, _generic_nonnegative)
register_rule(nn.UpsamplingBilinear2d, _generic_nonnegative)
register_rule(F.interpolate, _upsample)

# Functional affine ops.
for _f in (
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.pad,
):
    register_rule(_f, _generic_nonnegative)


def _linear_function(ctx: NodeContext) -> Affine:
    _single_input(ctx, "F.linear")
    w = ctx.arg(1, "weight")
    if not isinstance(ctx.args[0], InputArg) or isinstance(w, InputArg):
        raise UnsupportedNodeError("F.linear with an input-dependent weight is a product.")
    if len(ctx.in_shapes[0]) == 1:
        return Affine(linear=lambda x: F.linear(x, w), weight=w)
    return Affine(linear=lambda x: F.linear(x, w), certify=lambda: _matrix_norm_bound(w))


def _matrix_norm_bound(w: Tensor) -> float:
    from lipreg.functional.certify import matrix_norm_bound

    return matrix_norm_bound(w)[0]


def _conv_function(d: int) -> RuleFn:
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]

    def rule(ctx: NodeContext) -> Affine:
        from lipreg.functional.conv_bounds import conv_operator_norm_bound

        _single_input(ctx, conv.__name__)
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
            return conv_operator_norm_bound(
                w, in_spatial, stride=stride, padding=padding, dilation=dilation, groups=groups
            )

        return Affine(linear=linear, certify=certify)

    return rule


register_rule(F.linear, _linear_function)
for _d, _f in ((1, F.conv1d), (2, F.conv2d), (3, F.conv3d)):
    register_rule(_f, _conv_function(_d))
for _f in (torch.matmul, operator.matmul):
    register_rule(_f, _generic_linear)


def _dropout_function(ctx: NodeContext) -> Affine:
    # F.dropout(x, p, training=True, inplace=False): ``training`` defaults to True, so a bare
    # F.dropout(x) drops entries at random even in evaluation mode: no fixed function.
    if ctx.arg(2, "training", True) is not False:
        raise UnsupportedNodeError(
            "dropout called with training=True (F.dropout's default) is random even in "
            "evaluation mode, so there is no fixed function to bound. Pass "
            "training=self.training (or use nn.Dropout)."
        )
    return _identity(ctx)


for _f in (
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
):
    register_rule(_f, _dropout_function)
register_rule(torch.detach, _identity)
for _name in ("contiguous", "detach", "clone", "float", "double", "to", "type_as", "type"):
    register_rule(_name, _identity)
for _f in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze):
    register_rule(_f, _reshape)
for _name in ("flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as"):
    register_rule(_name, _reshape)


def _permutation(ctx: NodeContext) -> Affine:
    _single_input(ctx, "a permutation of axes")
    if ctx.out_shape is None:
        raise UnsupportedNodeError("a permutation must return a tensor.")
    if math.prod(ctx.in_shapes[0]) != math.prod(ctx.out_shape):
        raise UnsupportedNodeError(
            f"a rearrangement from {ctx.in_shapes[0]} to {ctx.out_shape} per sample changes "
            "the number of entries: it is not a permutation."
        )
    affine = ctx.generic_affine()
    return Affine(linear=affine.linear, norm=1.0, isometry=True, nonnegative=True)


# Every rearrangement of entries is a permutation matrix (norm 1, an isometry), and its
# linear map applies the op itself, so a merged chain composes the true permutation.
for _t in (
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
    F.pixel_shuffle,
    F.pixel_unshuffle,
    F.channel_shuffle,
    torch.pixel_shuffle,
    torch.pixel_unshuffle,
    torch.channel_shuffle,
    torch.permute,
    torch.transpose,
    torch.movedim,
    torch.moveaxis,
    torch.swapaxes,
    torch.swapdims,
    torch.roll,
    torch.flip,
    torch.fliplr,
    torch.flipud,
    torch.rot90,
):
    register_rule(_t, _permutation)
for _name in (
    "permute",
    "transpose",
    "movedim",
    "moveaxis",
    "swapaxes",
    "swapdims",
    "roll",
    "flip",
    "fliplr",
    "flipud",
    "rot90",
):
    register_rule(_name, _permutation)
for _f in (operator.getitem, torch.narrow, torch.select, torch.index_select, torch.gather):
    register_rule(_f, _generic_nonnegative)
for _name in ("narrow", "select", "index_select", "expand", "expand_as", "repeat", "gather"):
    register_rule(_name, _generic_nonnegative)
for _f in (torch.sum, torch.mean, torch.repeat_interleave, torch.tile):
    register_rule(_f, _generic_nonnegative)
for _name in ("sum", "mean", "repeat_interleave", "tile"):
    register_rule(_name, _generic_nonnegative)


def _batch_norm_function(ctx: NodeContext) -> Affine:
    _single_input(ctx, "F.batch_norm")
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
    s = scale.reshape((1, -1) + (1,) * (len(ctx.in_shapes[0]) - 1))
    return Affine(linear=lambda x: x * s, norm=float(scale.detach().abs().max()))


register_rule(F.batch_norm, _batch_norm_function)


# --------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------


def _scalar_norm(c: Any) -> float | None:
    if isinstance(c, int | float):
        return abs(float(c))
    if isinstance(c, Tensor) and c.numel() == 1:
        return float(c.detach().abs())
    return None


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


for _f in (operator.add, operator.iadd, torch.add):
    register_rule(_f, _add_like(+1))
for _f in (operator.sub, operator.isub, torch.sub, torch.subtract):
    register_rule(_f, _add_like(-1))
register_rule("add", _add_like(+1))
register_rule("sub", _add_like(-1))


def _broadcast_factor(ctx: NodeContext, index: int) -> float:
    """Norm ``sqrt(k)`` of broadcasting input ``index`` to the output (each entry copied k
    times); 1 when the shapes agree."""
    n_in = math.prod(ctx.in_shapes[index])
    n_out = math.prod(ctx.out_shape) if ctx.out_shape is not None else n_in
    return math.sqrt(n_out / n_in) if n_in else 1.0


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


register_rule(torch.rsub, _rsub)


def _neg(ctx: NodeContext) -> Affine:
    _single_input(ctx, "negation")
    return Affine(linear=lambda x: -x, norm=1.0, isometry=True)


for _f in (operator.neg, torch.neg, torch.negative):
    register_rule(_f, _neg)
register_rule("neg", _neg)
register_rule(operator.pos, _identity)


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


for _f in (operator.mul, operator.imul, torch.mul, torch.multiply):
    register_rule(_f, _mul)
register_rule("mul", _mul)
for _f in (operator.truediv, operator.itruediv, torch.div, torch.true_divide):
    register_rule(_f, _div)
register_rule("div", _div)


def _concat(ctx: NodeContext) -> Spec:
    # ‖[f(x); g(x)] − [f(y); g(y)]‖² = ‖Δf‖² + ‖Δg‖²  ⇒  L ≤ sqrt(L_f² + L_g²).
    return Combine("l2")


for _f in (torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack):
    register_rule(_f, _concat)


def _split(ctx: NodeContext) -> Spec:
    # Returns a tuple of disjoint pieces: each piece (taken by getitem) is a projection of x.
    _single_input(ctx, "split/chunk/unbind")
    return Nonlinear(1.0, "split into disjoint pieces (a tuple of projections)")


for _f in (torch.split, torch.chunk, torch.unbind, torch.tensor_split):
    register_rule(_f, _split)
for _name in ("split", "chunk", "unbind", "tensor_split"):
    register_rule(_name, _split)


# In-place functional variants compute what their out-of-place versions compute; the analysis
# refuses them when the overwritten value is read again.
for _inplace, _outofplace in (
    (torch.relu_, torch.relu),
    (F.relu_, F.relu),
    (F.leaky_relu_, F.leaky_relu),
    (F.elu_, F.elu),
    (F.hardtanh_, F.hardtanh),
):
    _FUNCTION_RULES[_inplace] = _FUNCTION_RULES[_outofplace]


_LOWER_BOUND_ADVICE = (
    " lipreg.lower_bound(model, input_shape) still gives a certified lower bound, and an "
    "upper bound exists for a sub-network without this op (model_attr=... in the callback)."
)
_NOT_GLOBALLY_LIPSCHITZ = (
    " It has no global Lipschitz constant, so no rule can exist (registering one would make "
    "the bound wrong)."
)

# Ops lipreg refuses on purpose, by class/function name, with the reason. Rules must NOT be
# suggested for them (see _describe_unsupported in graph.py).
NOT_LIPSCHITZ_HINTS: dict[str, str] = {
    "LayerNorm": "LayerNorm divides by the input's own standard deviation, so its slope grows "
    "without bound as that deviation shrinks." + _NOT_GLOBALLY_LIPSCHITZ + _LOWER_BOUND_ADVICE,
    "RMSNorm": "RMSNorm divides by the input's own root mean square, so its slope grows "
    "without bound near 0." + _NOT_GLOBALLY_LIPSCHITZ + _LOWER_BOUND_ADVICE,
    "GroupNorm": "GroupNorm divides by a data-dependent standard deviation."
    + _NOT_GLOBALLY_LIPSCHITZ
    + _LOWER_BOUND_ADVICE,
    "InstanceNorm": "InstanceNorm divides by a data-dependent standard deviation."
    + _NOT_GLOBALLY_LIPSCHITZ
    + _LOWER_BOUND_ADVICE,
    "LocalResponseNorm": "LocalResponseNorm divides by a data-dependent power of the input."
    + _LOWER_BOUND_ADVICE,
    "MultiheadAttention": "dot-product attention multiplies input-dependent queries, keys and "
    "values; its Jacobian grows with the input's norm (Kim et al., 'The Lipschitz constant "
    "of self-attention', 2021)." + _NOT_GLOBALLY_LIPSCHITZ + _LOWER_BOUND_ADVICE,
    "scaled_dot_product_attention": "dot-product attention multiplies input-dependent "
    "queries, keys and values (Kim et al., 2021)." + _NOT_GLOBALLY_LIPSCHITZ + _LOWER_BOUND_ADVICE,
    "Transformer": "transformer layers contain dot-product attention and LayerNorm, neither "
    "globally Lipschitz." + _NOT_GLOBALLY_LIPSCHITZ + _LOWER_BOUND_ADVICE,
    "LSTM": "recurrent layers multiply input-dependent gates step after step; lipreg has no "
    "certified rule for recurrent cells." + _LOWER_BOUND_ADVICE,
    "GRU": "recurrent layers multiply input-dependent gates step after step; lipreg has no "
    "certified rule for recurrent cells." + _LOWER_BOUND_ADVICE,
    "RNN": "recurrent layers apply the same cell step after step and return a tuple (output, "
    "hidden); lipreg has no certified rule for recurrent cells." + _LOWER_BOUND_ADVICE,
    "exp": "exp is not globally Lipschitz (its slope grows without bound).",
    "pow": "powers other than 1 are not globally Lipschitz.",
    "sqrt": "sqrt is not Lipschitz at 0.",
    "rsqrt": "1/sqrt is not Lipschitz near 0.",
    "log": "log is not Lipschitz near 0.",
    "reciprocal": "1/x is not Lipschitz near 0.",
}


# Functional spellings of the same ops (torchvision's LayerNorm2d calls F.layer_norm, Swin its
# own window attention).
for _alias, _key in (
    ("layer_norm", "LayerNorm"),
    ("rms_norm", "RMSNorm"),
    ("group_norm", "GroupNorm"),
    ("instance_norm", "InstanceNorm"),
    ("local_response_norm", "LocalResponseNorm"),
    ("multi_head_attention_forward", "MultiheadAttention"),
    ("shifted_window_attention", "scaled_dot_product_attention"),
    ("lstm", "LSTM"),
    ("gru", "GRU"),
):
    NOT_LIPSCHITZ_HINTS[_alias] = NOT_LIPSCHITZ_HINTS[_key]


def refusal_hint(target: Any) -> str | None:
    """Why lipreg refuses ``target`` on purpose (a class, function or method name), if it
    does: matched on the class and its bases, or on the function/method name."""
    if isinstance(target, nn.Module):
        for cls in type(target).__mro__:
            for key, hint in NOT_LIPSCHITZ_HINTS.items():
                if cls.__name__.startswith(key):  # LSTMCell, InstanceNorm2d, TransformerEncoder…
                    return hint
        return None
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    name = name.rstrip("_")
    return NOT_LIPSCHITZ_HINTS.get(name)
