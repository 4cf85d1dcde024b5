"""The ratio bound of incremental certificates for chains ``[scale]* K [scale]*`` (batch norms
folded around ONE convolution or dense weight ``K``; ``docs/design/issue10/incremental.md`` §2
"Folded batch norm", generalised to scales on both sides).

Write the chain's core as ``A = D_out A_K D_in`` with ``D = diag(d)`` per-channel scales (the
product of the chain's batch-norm scales on each side of ``K``) and ``A_K`` the convolution or
matrix of the raw weight. Let ``P = diag(1[d_s ≠ 0])`` and ``D_s⁺`` the pseudo-inverse
(``1/d_{s,c}`` where ``d_{s,c} ≠ 0``, else 0), so ``D_s⁺ D_s = P``. Zeroing the kernel entries
that connect a channel with ``d_s = 0`` (on either side) is ``A_{K_s ⊙ m} = P_out A_{K_s} P_in``
(entry ``(o, j, τ)`` of a kernel connects output channel ``o`` to one input channel), hence

.. math::
    A_t = D_{out,t} A_{K_t} D_{in,t}
        = (D_{out,t} D_{out,s}^+) A_s (D_{in,s}^+ D_{in,t})
          + D_{out,t} A_{K_t − K_s ⊙ m} D_{in,t}

because ``D_{out,t} D_{out,s}⁺ D_{out,s} A_{K_s} D_{in,s} D_{in,s}⁺ D_{in,t} =
D_{out,t} P_out A_{K_s} P_in D_{in,t} = D_{out,t} A_{K_s ⊙ m} D_{in,t}``. Norms of diagonal
maps are their largest entries, so

.. math::
    ‖A_t‖ ≤ r_{out} r_{in} ‖A_s‖ + \\max_c|d_{out,t,c}| \\max_c|d_{in,t,c}| ‖A_{K_t − K_s ⊙ m}‖,
    \\qquad r = \\max_{c: d_{s,c} ≠ 0} |d_{t,c} / d_{s,c}|.                              (2')

The second term is bounded more tightly with the scales kept per channel: a per-channel
scaling on each side of a convolution (or matrix) is the convolution with the scaled kernel,
``D_out A_Δ D_in = A_{Δ'}`` with ``Δ'[o, j, τ] = d_out,o · Δ[o, j, τ] · d_in,in(o, j)``
(exact algebra), so

.. math::
    ‖A_t‖ ≤ r_{out} r_{in} ‖A_s‖ + β(D_{out,t} ⊙ (K_t − K_s ⊙ m) ⊙ D_{in,t})          (2'')

with ``β`` any certified bound of :mod:`lipreg.functional.incremental_bounds` (with the
convolution's live taps). ``β(Δ') ≤ max|d_out| max|d_in| β(Δ)`` up to the bounds' own
looseness, and much smaller when the scales differ across channels: batch norms trained in
train mode give a few channels large scales (small running variances), and ``max|d|`` charged
the whole kernel change at that rate (docs/design/issue10/incremental.md §9: 2–5× on
resnet18). With the chain's isometries of closed-form scale ``c`` around the core and the
anchor's certificate ``σ_s ≥ c ‖A_s‖``, the chain's norm at ``t`` is at most
``r_out r_in σ_s + c · β(Δ')``; the first term is also bounded per output channel,
``r_in · min_t sqrt(t²σ_s² + c² Σ_o (r_o² − t²)₊ ‖A_{s,o}‖²)``
(:mod:`lipreg.functional.incremental_channels`, bound (2r)), and the smaller is used. It is
exact when only the statistics move, by a common factor per side, and the kernel does not,
whatever the size of that move, where the difference of merged kernels
(:mod:`lipreg.functional.incremental`) grows with it.

**Rounding.** The weights are float32 copied exactly into float64; ``K_t − K_s ⊙ m`` is one
float64 subtraction per entry (relative error ``u``, covered by ``1 + 2u``). The scales ``d̂``
are computed in float64 (each batch-norm scale ``γ/√(v + ε)`` with at most 4 roundings, a
product of ``n`` of them with ``n − 1`` more): ``|d − d̂| ≤ κ|d̂|`` with
``κ = 2γ_{5n}`` (:func:`~lipreg.functional.rounding.folded_kernel_error`), valid while no scale
underflows (checked: every non-zero ``|d̂| ≥ 2⁻⁹⁰⁰``, else no ratio bound); so
``|d_t/d_s| ≤ fl(|d̂_t/d̂_s|)(1 + κ_t)/((1 − κ_s)(1 − u))`` and ``max|d_t| ≤ max|d̂_t|(1 + κ_t)``,
every product rounded up with ``nextafter``. ``d_s = 0`` exactly iff ``d̂_s = 0`` (relative
error), so the mask is the exact one. The computed ``Δ̂' = fl(fl(d̂_out Δ̂) d̂_in)`` (``Δ̂`` the
float64 difference) is within ``ρ|Δ̂'|`` entrywise of the exact ``Δ'``, ``ρ = 2(κ_out + κ_in)
+ 8u ≥ (1 + κ_out)(1 + κ_in)(1 + u)/(1 − u)² − 1`` (three roundings, κ ≤ 1e-6), and an
entrywise-dominated kernel has a dominated operator (``|A_E x| ≤ A_{|E|}|x|``), so
``‖A_{Δ'}‖ ≤ β(Δ̂') + ρ · ‖A_{|Δ̂'|}‖`` with the last norm bounded by the Young/Schur test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lipreg.functional.incremental_bounds import (
    conv_increment_bound,
    dense_increment_bound,
    schur_bound_matrix,
    young_bound,
)
from lipreg.functional.incremental_channels import channel_norms_squared, threshold_ratio_bound
from lipreg.functional.lmi import UNIT_ROUNDOFF
from lipreg.functional.rounding import folded_kernel_error
from lipreg.functional.specs import Affine

__all__ = [
    "ScaledCore",
    "channel_ratios_up",
    "ratio_up",
    "scaled_core",
    "scaled_increment_bound",
    "scaled_kernel",
]

_TINY = 2.0**-900  # below this a computed scale may have lost relative accuracy
_MAX_KAPPA = 1e-6  # the first-order expansions of the rounding factors need κ ≪ 1


@dataclass(frozen=True)
class ScaledCore:
    """``A = D_out A_K D_in`` (module docstring): ``kernel`` the raw float64 weight (conv
    kernel ``(c_out, c_in/groups, *k)`` or dense ``(out, in)`` matrix), ``d_in`` / ``d_out``
    the computed float64 products of the scales on each side (ones without scales) with
    relative radii ``kappa_in`` / ``kappa_out``; ``conv`` ``(stride, dilation, groups,
    padding, in_spatial)`` for a convolution (or ``(stride, dilation, groups)``: every tap
    counted live), ``None`` for a dense weight."""

    kernel: Tensor
    d_in: Tensor
    d_out: Tensor
    kappa_in: float
    kappa_out: float
    conv: tuple | None = None

    def copy(self, compact) -> ScaledCore:
        """A private copy (``compact`` copies the kernel, the scales are cloned)."""
        return ScaledCore(
            compact(self.kernel),
            self.d_in.clone(),
            self.d_out.clone(),
            self.kappa_in,
            self.kappa_out,
            self.conv,
        )


def _side(specs: Sequence[Affine], size: int) -> tuple[Tensor, float] | None:
    """The float64 product of the ``channel_scale`` vectors of ``specs`` (each of length
    ``size``) and its relative radius, or ``None``."""
    d = torch.ones(size, dtype=torch.float64)
    for spec in specs:
        scale = spec.channel_scale
        if scale is None or scale.dim() != 1 or scale.shape[0] != size:
            return None
        d = d * scale.detach().to(torch.float64)
    return d, folded_kernel_error(len(specs))


def scaled_core(span: Sequence[Affine]) -> ScaledCore | None:
    """The chain span ``[scale]* K [scale]*`` (float64 specs in application order, from the
    first to the last non-isometric op) as a :class:`ScaledCore`, or ``None`` when it has
    not that form or has no scale at all (the plain increment is then exact)."""
    kernels = [i for i, s in enumerate(span) if s.weight is not None or s.conv is not None]
    if len(kernels) != 1 or len(span) < 2:
        return None
    k = kernels[0]
    spec = span[k]
    if spec.conv is not None:
        data = spec.conv
        kernel = data.weight.detach().to(torch.float64)
        c_in, c_out = data.in_shape[0], kernel.shape[0]
        conv = (data.stride, data.dilation, data.groups, data.padding, data.in_shape[1:])
    else:
        assert spec.weight is not None
        kernel = spec.weight.detach().to(torch.float64)
        if kernel.dim() != 2:
            return None
        c_out, c_in = kernel.shape
        conv = None
    before, after = _side(span[:k], c_in), _side(span[k + 1 :], c_out)
    if before is None or after is None:
        return None
    return ScaledCore(kernel, before[0], after[0], before[1], after[1], conv)


def _input_index(core: ScaledCore) -> Tensor:
    """Per kernel entry ``(o, j)``, the input channel it reads (grouped convolutions: group
    of ``o`` times ``c_in/groups`` plus ``j``)."""
    c_out, c_in_group = core.kernel.shape[:2]
    groups = 1 if core.conv is None else core.conv[2]
    group_of_out = torch.arange(c_out) // (c_out // groups)
    return group_of_out[:, None] * c_in_group + torch.arange(c_in_group)[None, :]


def _well_scaled(d: Tensor, kappa: float) -> bool:
    nonzero = d[d != 0].abs()
    finite = bool(torch.isfinite(d).all())
    return finite and kappa < _MAX_KAPPA and (nonzero.numel() == 0 or float(nonzero.min()) >= _TINY)


def _up(x: float) -> float:
    return math.nextafter(x, math.inf)


def ratio_up(d_s: Tensor, k_s: float, d_t: Tensor, k_t: float) -> float:
    """An upper bound on ``max_{c: d_s,c ≠ 0} |d_t,c / d_s,c|`` for the exact scales within
    relative radii ``k_s``, ``k_t`` of the computed ``d_s``, ``d_t`` (module docstring);
    0 when every ``d_s`` is zero."""
    ratios = channel_ratios_up(d_s, k_s, d_t, k_t)
    return _up(float(ratios.max())) if ratios.numel() else 0.0


def channel_ratios_up(d_s: Tensor, k_s: float, d_t: Tensor, k_t: float) -> Tensor:
    """Per channel an upper bound on ``|d_t,c / d_s,c|`` (0 where ``d_s,c = 0``: those rows
    are masked, module docstring) for the exact scales within relative radii ``k_s``, ``k_t``
    of the computed ``d_s``, ``d_t``."""
    live = d_s != 0
    q = torch.zeros_like(d_s)
    q[live] = (d_t[live] / d_s[live]).abs()
    # (1 + κ_t)/((1 − κ_s)(1 − u)) ≤ 1 + 2(κ_t + κ_s) + 4u for κ ≤ 1e-6; +4u for its rounding
    factor = 1.0 + 2.0 * (k_t + k_s) + 8.0 * UNIT_ROUNDOFF
    return q * factor * (1.0 + 2.0 * UNIT_ROUNDOFF)  # the product's own rounding


def scaled_kernel(core: ScaledCore, kernel: Tensor) -> tuple[Tensor, float]:
    """``(d_out ⊙ kernel ⊙ d_in, ρ)``: the float64 kernel of ``D_out A_kernel D_in`` with the
    core's scales (each entry within relative ``ρ`` of the exact one, module docstring)."""
    kernel = kernel.to(torch.float64)
    d_in = core.d_in[_input_index(core)] if core.conv is not None else core.d_in[None, :]
    shape = (*d_in.shape, *[1] * (kernel.dim() - 2))
    weighted = core.d_out.reshape(-1, *[1] * (kernel.dim() - 1)) * kernel * d_in.reshape(shape)
    return weighted, 2.0 * (core.kappa_in + core.kappa_out) + 8.0 * UNIT_ROUNDOFF


def _weighted_increment(now: ScaledCore, delta: Tensor, gram_flops: float) -> tuple[float, str]:
    """``(β ≥ ‖D_out,t A_Δ D_in,t‖₂, which)`` for the float64 difference ``delta`` (bound (2''),
    module docstring: the scales folded into the kernel, its rounding ``ρ`` added through the
    Young/Schur test of ``|Δ̂'|``, the subtraction's ``1 + 2u``)."""
    weighted, rho = scaled_kernel(now, delta)
    if now.conv is None:
        beta, which = dense_increment_bound(weighted, gram_flops=gram_flops)
        absolute = schur_bound_matrix(weighted)
    else:
        stride, dilation, groups = now.conv[:3]
        padding, spatial = now.conv[3:] if len(now.conv) == 5 else (None, None)
        beta, which = conv_increment_bound(
            weighted,
            stride,
            dilation,
            groups,
            padding=padding,
            in_spatial=spatial,
            gram_flops=gram_flops,
        )
        absolute = young_bound(weighted.abs(), stride, dilation, groups)
    if beta == 0.0:
        return 0.0, which
    beta = _up(beta + _up(rho * absolute))
    return _up(beta * (1.0 + 2.0 * UNIT_ROUNDOFF)), which  # the float64 subtraction


def _per_channel(
    anchor: ScaledCore, now: ScaledCore, sigma: float, scale: float, r_in: float
) -> float:
    """``r_in ×`` the per-channel bound (2r) on ``c‖R_out A_s‖``
    (:mod:`lipreg.functional.incremental_channels`): ``‖R_out A_s R_in‖ ≤ r_in ‖R_out A_s‖``."""
    if anchor.d_out.numel() < 2:
        return math.inf
    ratios = channel_ratios_up(anchor.d_out, anchor.kappa_out, now.d_out, now.kappa_out)
    weighted, rho = scaled_kernel(anchor, anchor.kernel)
    norms2 = channel_norms_squared(weighted, anchor.conv, rho)
    return _up(r_in * threshold_ratio_bound(sigma, ratios, norms2, scale))


def scaled_increment_bound(
    anchor: ScaledCore, now: ScaledCore, sigma: float, scale: float, gram_flops: float
) -> tuple[float, float, str] | None:
    """``(value, c·β(Δ'), which)`` with ``value`` the certified bound (2'') on the chain's
    norm at ``t`` (module docstring): ``sigma ≥ c‖A_s‖`` the anchor's
    certificate, ``scale ≥ c`` the isometries' padded scale; ``None`` when the cores'
    shapes or geometry differ or a scale is too small or not finite for the rounding model."""
    if anchor.kernel.shape != now.kernel.shape or anchor.conv != now.conv:
        return None
    if anchor.d_in.shape != now.d_in.shape or anchor.d_out.shape != now.d_out.shape:
        return None
    sides = ((anchor.d_in, anchor.kappa_in), (anchor.d_out, anchor.kappa_out))
    sides += ((now.d_in, now.kappa_in), (now.d_out, now.kappa_out))
    if not all(_well_scaled(d, kappa) for d, kappa in sides):
        return None
    r_in = ratio_up(anchor.d_in, anchor.kappa_in, now.d_in, now.kappa_in)
    r_out = ratio_up(anchor.d_out, anchor.kappa_out, now.d_out, now.kappa_out)
    live_out = (anchor.d_out != 0).to(torch.float64)
    live_in = (anchor.d_in != 0).to(torch.float64)[_input_index(anchor)]
    mask = (live_out[:, None] * live_in).reshape(*live_in.shape, *[1] * (anchor.kernel.dim() - 2))
    delta = now.kernel - anchor.kernel.to(torch.float64) * mask
    beta, which = _weighted_increment(now, delta, gram_flops)
    increment = _up(scale * beta) if beta else 0.0
    anchored = min(_up(_up(r_out * r_in) * sigma), _per_channel(anchor, now, sigma, scale, r_in))
    value = _up((anchored + increment) * (1.0 + 2.0 * UNIT_ROUNDOFF))
    return value, increment, f"ratio-{which}"
