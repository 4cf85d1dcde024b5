"""The spec algebra: what a rule says about one node of a traced network.

Every input-dependent node is described by one of four *specs*; the analysis
(:mod:`lipreg.functional.analysis`) asks the node's rule (:mod:`lipreg.functional.rules`) for it and
the estimators compose them (paper.md §2.3):

* :class:`Affine` — ``f(x) = A x + b`` in its single input-dependent argument. Consecutive affine
  nodes merge into one chain ``A_k … A_1`` whose operator norm is bounded as a whole (tighter
  than the product of the norms).
* :class:`Elementwise` — ``f(x)_i = σ(x_i)`` with ``σ' ∈ [slope_min, slope_max]``:
  ``Lip(f) = max(|slope_min|, |slope_max|)``; SeqLip also uses the interval itself.
* :class:`Nonlinear` — any other map of one input with ``‖f(x) − f(y)‖ ≤ L ‖x − y‖``.
* :class:`Combine` — several input-dependent arguments, combined by ``Σ |w_i| L_i`` (sums) or
  ``sqrt(Σ L_i²)`` (concatenation).

A rule receives a :class:`NodeContext` and returns a spec, or raises
:class:`UnsupportedNodeError` saying why it cannot bound the node. Every number a spec states
is a *promise* the certified bounds rely on: a spec that understates a constant makes every
certified bound above it wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from lipreg.functional.evaluation import call_target, evaluation_mode

__all__ = [
    "Affine",
    "Combine",
    "ConvData",
    "Elementwise",
    "InputArg",
    "NodeContext",
    "Nonlinear",
    "RuleFn",
    "Spec",
    "UnsupportedNodeError",
    "single_input",
]


class UnsupportedNodeError(Exception):
    """Raised by a rule that cannot bound its node; the message says why."""


@dataclass(frozen=True)
class ConvData:
    """The structure of a convolution ``x ↦ conv(x, weight)`` (bias-free, PyTorch's
    cross-correlation), for certificates that need more than a norm (banded Gram matrices,
    Fourier-block LMIs of conv–activation–conv pairs).

    Promise: ``Affine.linear(x) == F.convNd(x, weight, None, stride, padding, dilation,
    groups)`` on samples of shape ``in_shape`` with zero padding. Only zero-padded, forward
    (not transposed) convolutions with integer paddings carry it; the others keep
    ``Affine.conv = None`` (deny by default).
    """

    weight: Tensor  # (c_out, c_in / groups, *kernel)
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    in_shape: tuple[int, ...]  # (c_in, *spatial) of one sample


@dataclass(frozen=True)
class Affine:
    """The node is affine in its one input-dependent argument: ``f(x) = A x + b``.

    ``linear`` must compute ``A`` exactly (it is what the chain's operator norm is taken of);
    each optional field is a *promise* about ``A`` that unlocks a certificate of
    :func:`lipreg.autolip` (``certify=True``), tried in this order for a chain:

    Attributes:
        linear: batched linear part ``(B, *in) -> (B, *out)``, ``x ↦ A x`` (bias removed).
        norm: the exact operator norm ``‖A‖₂`` in closed form, else ``None``. A chain whose
            only non-isometric op has a ``norm`` is certified as that number ("closed-form",
            padded by 4 float64 ulps); in a product bound it is used as is.
        isometry: ``A = norm · Q`` with ``Q`` a bijective isometry (reshape, permutation,
            identity, multiplication by a scalar). Requires ``norm``; in a chain it only scales
            the bound: ``‖A_k … Q … A_1‖ = norm · ‖A_k … A_1‖``.
        nonnegative: every matrix entry of ``A`` is ``≥ 0`` (pooling, padding, indexing).
            Enables the Schur-test certificate ``‖A‖₂ ≤ sqrt(‖A‖₁ ‖A‖_∞)``, computed from two
            products with all-ones vectors, without materialising ``A``.
        certify: a callable returning a certified upper bound on ``‖A‖₂`` (the convolutions'
            FFT/Toeplitz bounds of :mod:`lipreg.functional.conv_bounds`); used in a product
            bound when the chain is too large for a dense certificate.
        weight: for a dense layer on a 1-d sample, the ``(out, in)`` matrix ``A`` itself.
            Enables the exact SVD certificate (``matrix_norm_certificate``, chunked under the
            memory budget) and SeqLip's exact singular vectors.
        conv: for a zero-padded convolution, its kernel and geometry (:class:`ConvData`).
        channel_scale: for a per-channel scaling ``x[:, c] ↦ s_c x[:, c]`` (batch norm in
            evaluation mode), the vector ``s``; lets a chain conv → scale be merged into one
            convolution (:mod:`lipreg.functional.conv_chain`).
        abs_norm: for ops not described by the fields above, a callable returning ``(b, n)``
            with ``b ≥ ‖|A|‖₂`` (the entrywise absolute matrix) and ``n`` the longest inner
            product one output entry takes: what bounds the float64 rounding of a
            materialised chain (:mod:`lipreg.functional.rounding`).
    """

    linear: Callable[[Tensor], Tensor]
    norm: float | None = None
    isometry: bool = False
    nonnegative: bool = False
    certify: Callable[[], float] | None = None
    weight: Tensor | None = None
    conv: ConvData | None = None
    channel_scale: Tensor | None = None
    abs_norm: Callable[[], tuple[float, int]] | None = None


@dataclass(frozen=True)
class Elementwise:
    """A coordinate-wise scalar function ``f(x)_i = σ(x_i)`` with ``σ' ∈ [slope_min, slope_max]``
    wherever ``σ`` is differentiable (and ``σ`` continuous, so the mean value theorem applies).

    Promise: ``|σ(a) − σ(b)| ≤ max(|slope_min|, |slope_max|) |a − b|``, hence the same constant
    for ``f`` in the l2 norm (:attr:`lipschitz`). SeqLip relies on the interval itself: the
    Jacobian is ``diag(d)`` with every ``d_i`` in ``[slope_min, slope_max]``.
    """

    slope_min: float
    slope_max: float

    @property
    def lipschitz(self) -> float:
        """``max(|slope_min|, |slope_max|)``, the l2 Lipschitz constant of ``f``."""
        return max(abs(self.slope_min), abs(self.slope_max))


@dataclass(frozen=True)
class Nonlinear:
    """A non-element-wise map of one input with ``‖f(x) − f(y)‖₂ ≤ lipschitz · ‖x − y‖₂``
    for every pair of samples (max-pool, softmax, split into pieces …).

    The estimators use ``lipschitz`` as a certified constant: it must be a proven upper bound,
    never an estimate. ``description`` says where it comes from (shown in per-layer results).
    """

    lipschitz: float
    description: str = ""


@dataclass(frozen=True)
class Combine:
    """A node with several input-dependent arguments ``f(x) = g(h_1(x), …, h_k(x))``.

    ``mode="sum"``: ``g = Σ_i c_i B_i h_i`` with constants ``c_i`` and broadcasts ``B_i``
    (``‖B_i‖ = sqrt(copies)``), ``weights[i] ≥ |c_i| ‖B_i‖``, so ``L ≤ Σ_i |w_i| L_i`` (sums,
    differences, residuals). ``mode="l2"``:
    ``g`` concatenates or stacks its arguments (orthogonal pieces), so
    ``‖Δf‖² = Σ_i ‖Δh_i‖²`` and ``L ≤ sqrt(Σ_i L_i²)``. An empty ``weights`` means all 1.
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
        differentiable: parameters keep their autograd graph (the penalty's analysis).
        meta: free room for the analysis (e.g. the raw arguments before casting).
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
        """The isometry ``x ↦ x.reshape(B, *out_shape)`` (same entries, new shape)."""
        out_shape = self.out_shape

        def linear(x: Tensor) -> Tensor:
            return x.reshape(x.shape[0], *out_shape)

        return Affine(linear=linear, norm=1.0, isometry=True, nonnegative=True)


RuleFn = Callable[[NodeContext], Spec]


def single_input(ctx: NodeContext, what: str) -> None:
    """Refuse a node with other than one input-dependent argument (``what`` names the op)."""
    if ctx.n_inputs != 1:
        raise UnsupportedNodeError(
            f"{what} with {ctx.n_inputs} input-dependent arguments is not supported."
        )
