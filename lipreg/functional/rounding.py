"""The rounding of float64 data that certificates take as exact: materialised chains and
merged kernels.

A certificate proves a bound for the float64 matrix (or kernel) it is given. When that matrix
was *computed* — an affine chain ``A = A_m ⋯ A_1`` applied in float64 to the identity, or a
convolution kernel with batch-norm scales folded in — it differs from the exact map by a
rounding error ``E``, and the certificate must be widened by a bound on ``‖E‖₂``.

**Materialised chains** (:func:`materialisation_error`). Each op computes inner products of
length at most ``n_j`` (a dense layer: its input width; a convolution: ``c_in/groups · Πk``;
a scaling or a data movement: 1), so entrywise ``|fl(A_j x) − A_j x| ≤ γ_{n_j} |A_j| |x|`` in
any summation order (Higham, ASNA §3.5). By induction over the chain, entrywise

.. math:: |\\hat A - A| \\le \\Big(\\prod_j (1 + γ_{n_j}) - 1\\Big) |A_m| ⋯ |A_1| ,

hence ``‖Â − A‖₂ ≤ (Π(1 + γ_{n_j}) − 1) · Π_j ‖|A_j|‖₂`` with ``‖|A_j|‖₂`` bounded by the
Schur test on ``|A_j|``: exact for a diagonal scaling (``max|s|``) and for an isometry of the
documented kind (a permutation or reshape times a scalar: ``|c|``), ``sqrt(‖W‖₁‖W‖_∞)`` for a
dense weight, the kernel's absolute sums for a convolution, :func:`schur_bound` for a
non-negative op. An op of any other kind makes the function return ``None`` (deny by default:
the caller does not materialise that chain).

**Perturbed chains** (:func:`perturbed_bound`). If ``L̂`` is certified for the network with
the computed matrices ``Â_k = A_k − E_k`` and activations of slopes bounded by ``λ_k``, then
for every diagonal pattern ``‖Π (A_k) D‖ ≤ ‖Π(Â_k) D‖ + Σ_k ‖E_k‖ Π_{j≠k} (‖Â_j‖ + ‖E_j‖)
Π λ`` (expand the product and bound every term with at least one ``E``), so
``L ≤ L̂ + Σ_k ‖E_k‖ Π_{j≠k}(‖Â_j‖ + ‖E_j‖) Π_k λ_k``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lipreg.functional.analysis import Analysis
from lipreg.functional.banded_gram import abs_norm_bound as conv_abs_norm
from lipreg.functional.certify import RELATIVE_MARGIN, schur_bound
from lipreg.functional.chains import AffineChain, node_linear_map
from lipreg.functional.specs import Affine, ConvData

__all__ = [
    "abs_norm_bound",
    "folded_kernel_error",
    "materialisation_error",
    "merged_kernel_error",
    "perturbed_bound",
]

_U = 2.0**-53
_PAD = 1 + 1e-6  # covers the float64 rounding of the few products and sums below
# A batch-norm scale γ/sqrt(var + ε) is itself computed: at most 4 roundings (add, sqrt,
# divide, multiply), counted as that many more terms of the scaling's "inner product".
_SCALE_ROUNDINGS = 4


def _gamma(n: int) -> float:
    return n * _U / (1 - n * _U) * _PAD


def abs_norm_bound(analysis64: Analysis, node) -> tuple[float, int] | None:
    """``(bound on ‖|A_j|‖₂, inner-product length n_j)`` of one affine node, or ``None`` for
    an op whose absolute matrix the specs do not describe (module docstring)."""
    spec = analysis64.specs[node]
    assert isinstance(spec, Affine)
    if spec.channel_scale is not None:  # the scale is itself computed (γ/sqrt(var + ε))
        return float(spec.channel_scale.detach().abs().max()) * _PAD, 1 + _SCALE_ROUNDINGS
    if spec.isometry and spec.norm is not None:
        return spec.norm * _PAD, 1
    if spec.weight is not None:
        w = spec.weight.detach().to(torch.float64).abs()
        norm = math.sqrt(float(w.sum(0).max()) * float(w.sum(1).max())) * _PAD
        return norm, int(w.shape[1])
    if spec.conv is not None:
        k = math.prod(spec.conv.weight.shape[1:])
        return conv_abs_norm(spec.conv.weight, spec.conv.groups), int(k)
    if spec.nonnegative:
        op = node_linear_map(analysis64, node)
        return schur_bound(op) * _PAD, op.in_features
    if spec.abs_norm is not None:
        return spec.abs_norm()
    return None


def materialisation_error(analysis64: Analysis, chain: AffineChain) -> float | None:
    """A bound on ``‖Â − A‖₂`` for the chain materialised in float64 (module docstring), or
    ``None`` when an op's absolute matrix is not described by its spec."""
    growth, product = 1.0, 1.0
    for node in chain.nodes:
        answer = abs_norm_bound(analysis64, node)
        if answer is None:
            return None
        norm, n = answer
        growth *= 1 + _gamma(n)
        product *= norm
    return (growth - 1) * product * _PAD


def folded_kernel_error(n_scalings: int) -> float:
    """``κ`` with ``|w − ŵ| ≤ κ |ŵ|`` entrywise for a kernel ``ŵ`` computed by folding
    ``n_scalings`` computed batch-norm scales into it (see :func:`merged_kernel_error`)."""
    return 2 * _gamma(n_scalings * (1 + _SCALE_ROUNDINGS)) if n_scalings else 0.0


def merged_kernel_error(data: ConvData, n_scalings: int) -> float:
    """A bound on ``‖A_exact − A_ŵ‖₂`` for a kernel ``ŵ`` computed by ``n_scalings``
    float64 multiplications of every entry by computed batch-norm scales (each scale itself
    ≤ 4 roundings; :func:`lipreg.functional.conv_chain.merged_conv`): with ``k`` the number of
    roundings, ``|ŵ − w| ≤ γ_k |w| ≤ γ_k/(1−γ_k) |ŵ|`` entrywise, so the error is a
    convolution with a kernel bounded by that, of norm at most ``2γ_k ‖|A_ŵ|‖₂``."""
    if n_scalings == 0:
        return 0.0
    return folded_kernel_error(n_scalings) * conv_abs_norm(data.weight, data.groups)


def perturbed_bound(
    value: float, norms: Sequence[float], errors: Sequence[float], lipschitz: float
) -> float:
    """``value + Σ_k e_k Π_{j≠k}(n_j + e_j) · lipschitz`` (module docstring): a certified
    bound ``value`` for computed matrices of norms ``≤ norms`` widened to the exact ones,
    which differ by at most ``errors``; ``lipschitz`` is the product of the activations'
    Lipschitz constants in the chain."""
    total = 0.0
    for k, e in enumerate(errors):
        if e == 0.0:
            continue
        others = math.prod(
            n + x for j, (n, x) in enumerate(zip(norms, errors, strict=True)) if j != k
        )
        total += e * others
    return (value + total * lipschitz) * (1 + RELATIVE_MARGIN) if total else value
