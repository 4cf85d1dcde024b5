"""A second-order incremental bound for dense weights: Rayleigh–Ritz with a certified gap
(``docs/design/issue10/incremental.md`` §5, bound (5)).

Let ``M`` be the weight on its smaller Gram side (``W`` if it has fewer columns than rows, else
``Wᵀ``), ``G = MᵀM`` (``p × p``), ``V`` (``p × k``, float64, full rank) the anchor's top-``k``
eigenvectors of ``G_s`` and ``ε ≥ ‖VᵀV − I‖₂`` (< 1). **Anchor** (:func:`ritz_anchor`):
``b_s ≥ λ_max(G_s)`` restricted to ``V⊥ = span(V)⊥`` is certified by Rump's Cholesky test
(:func:`~lipreg.functional.lmi.certify_psd`) of ``b_s I − G_s + τ VVᵀ`` (on ``V⊥`` the last term
vanishes; the test carries the rounding of ``Ĝ_s`` and ``V̂V̂ᵀ`` as an entrywise radius).
**Step** (:func:`ritz_bound`): any unit ``x = Vy + z`` with ``z ⊥ span(V)`` has
``|Vy|² + |z|² = 1`` and

* ``yᵀVᵀG_tVy ≤ a|Vy|²`` with ``a = ‖M_tV‖₂² / (1 − ε)`` (``|y|² ≤ |Vy|²/(1 − ε)``);
* ``|yᵀVᵀG_t z| ≤ g|Vy||z|`` with ``g = ‖G_tV − VC‖₂ / √(1 − ε)`` for ANY ``k × k`` matrix
  ``C`` (``z ⊥ span(V)`` kills ``VC``), here ``C = fl((M_tV)ᵀ(M_tV))``;
* ``zᵀG_t z ≤ b|z|²`` with ``b = b_s + 2‖M_s‖β + β²`` (``‖G_t − G_s‖ ≤ 2‖M_s‖β + β²`` for
  ``β ≥ ‖M_t − M_s‖``),

so ``σ(M_t)² ≤ λ_max([[a, g], [g, b]]) = (a + b + √((a − b)² + 4g²))/2``. Its excess over
``σ(M_t)²`` is about ``g²/(a − b)``: second order in the rotation of the top singular space.

Rounding: ``Ŷ = fl(M_tV)`` has error ``‖E_1‖_F ≤ r_1 = γ_{n+2}‖M_t‖_F‖V‖_F + (underflow)``
(entrywise ``γ_n|M_t||V|``, and ``‖|A||B|‖_F ≤ ‖A‖_F‖B‖_F``), so ``‖M_tV‖ ≤ ‖Ŷ‖ + r_1`` with
``‖Ŷ‖² ≤ λ`` certified by a Rump test of ``λI − fl(ŶᵀŶ)``; ``G_tV = M_tᵀŶ − M_tᵀE_1`` with
``‖M_tᵀE_1‖ ≤ ‖M_t‖ r_1``, and the products ``fl(M_tᵀŶ)``, ``fl(VC)`` and the difference
carry their own error bounds in the Frobenius norm that bounds ``g``. Any non-finite
intermediate (weights near the float64 range) gives ``None``: the first-order bound stays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lipreg.functional.lmi import ETA, UNIT_ROUNDOFF, certify_psd, gamma, product_radius, sqrt_up

__all__ = ["RITZ_MAX_SIDE", "RitzAnchor", "ritz_anchor", "ritz_bound"]

#: Gram sides up to this get a Ritz anchor (an eigendecomposition of the side at the anchor).
RITZ_MAX_SIDE = 2048


def _up(x: float, relative: float = 8 * UNIT_ROUNDOFF) -> float:
    return math.nextafter(x * (1 + relative), math.inf)


def _fro_up(X: Tensor) -> float:
    """``‖X‖_F`` rounded up (``X`` float64, entries far from under/overflow or exactly 0)."""
    n = X.numel()
    return sqrt_up(_up(float((X * X).sum()), (n + 2) * UNIT_ROUNDOFF * 1.01) + n * 2.0**-1074)


def _product_error(A: Tensor, B: Tensor, fro_a: float, fro_b: float) -> float:
    """``‖fl(AB) − AB‖_F ≤ γ_{n+2} ‖A‖_F ‖B‖_F + 2(n+1)η √(mp)`` (entrywise
    ``|fl(AB) − AB| ≤ γ_n |A||B| + nη`` and ``‖|A||B|‖_F ≤ ‖A‖_F ‖B‖_F``); ``fro_a ≥ ‖A‖_F``,
    ``fro_b ≥ ‖B‖_F``. Cheaper than the entrywise radius (no product of absolute values)."""
    n = A.shape[1]
    cells = sqrt_up(float(A.shape[0] * B.shape[1]))
    return _up(gamma(n + 2) * fro_a * fro_b + 2.0 * (n + 1) * ETA * cells)


def gram_side(W: Tensor) -> Tensor:
    """``M``: ``W`` if it has at most as many columns as rows, else ``Wᵀ`` (so ``MᵀM`` is the
    smaller Gram matrix)."""
    return W if W.shape[1] <= W.shape[0] else W.T


@dataclass(frozen=True)
class RitzAnchor:
    """``V`` (``p × k``), ``eps ≥ ‖VᵀV − I‖₂``, ``b_s ≥ λ_max(G_s|V⊥)`` and ``norm_s ≥ ‖M_s‖``."""

    V: Tensor
    eps: float
    b_s: float
    norm_s: float


def _symmetric_upper(P: Tensor) -> Tensor:
    """The upper triangle of ``P`` mirrored: exactly symmetric (the lower entries are the
    computed upper ones, whose errors the radius already bounds)."""
    upper = torch.triu(P)
    return upper + torch.triu(P, 1).T


def ritz_anchor(W: Tensor, norm_s: float, k: int = 16) -> RitzAnchor | None:
    """The anchor data of bound (5) for the float64 weight ``W`` with ``‖W‖ ≤ norm_s``
    (module docstring), with ``min(k, p − 1)`` Ritz vectors for the smaller side ``p``; or
    ``None`` when ``p < 2`` or ``p >`` :data:`RITZ_MAX_SIDE`, or the Cholesky test fails for
    ``b_s`` up to 1 % above the next eigenvalue plus ``1e-4 λ_max``.

    The radius of the test is a scalar: ``|fl(MᵀM) − MᵀM| ≤ γ_{n+2} |M|ᵀ|M| + 2(n+1)η`` and
    ``(|M|ᵀ|M|)_ij ≤ max_i ‖M_{:,i}‖²`` (Cauchy–Schwarz), likewise for ``V̂V̂ᵀ`` with the rows of
    ``V``; plus the rounding of forming ``b I − Ĝ + τ V̂V̂ᵀ`` (entrywise)."""
    M = gram_side(W)
    n, p = M.shape
    k = min(k, p - 1)
    if k < 1 or p > RITZ_MAX_SIDE:
        return None
    G = _symmetric_upper(M.T @ M)
    evals, evecs = torch.linalg.eigh(G)
    V = evecs[:, -k:].contiguous()
    eps = _orthonormality(V)
    if not eps < 0.5:
        return None
    top = float(evals[-1])
    tau = 2.0 * top + 1.0
    VVt = V @ V.T
    column = _up(float((M * M).sum(0).max()), (n + 2) * UNIT_ROUNDOFF * 1.01)
    row = _up(float((V * V).sum(1).max()), (k + 2) * UNIT_ROUNDOFF * 1.01)
    scalar = gamma(n + 2) * column + 2.0 * (n + 1) * ETA
    scalar += tau * (gamma(k + 2) * row + 2.0 * (k + 1) * ETA) * (1 + 4 * UNIT_ROUNDOFF)
    rounding = 3 * UNIT_ROUNDOFF * (G.abs() + tau * VVt.abs())
    gap = max(float(evals[-k - 1]), 0.0)
    for slack in (1e-6, 1e-4, 1e-2):
        b_s = gap * (1 + slack) + slack * 1e-2 * top
        P = b_s * torch.eye(p, dtype=torch.float64) - G + tau * VVt
        radius = rounding + (_up(scalar) + 3 * UNIT_ROUNDOFF * b_s)
        if certify_psd(_symmetric_upper(P), radius):
            return RitzAnchor(V=V, eps=eps, b_s=_up(b_s), norm_s=norm_s)
    return None


def _orthonormality(V: Tensor) -> float:
    """``ε ≥ ‖VᵀV − I‖₂`` (Frobenius of the computed difference plus the product radius)."""
    k = V.shape[1]
    E = V.T @ V - torch.eye(k, dtype=torch.float64)
    radius = product_radius(V.T.contiguous(), V)
    return _up(_fro_up(E) + _fro_up(radius) + 2 * k * UNIT_ROUNDOFF)


def _certified_top(C: Tensor, radius: Tensor) -> float | None:
    """``λ ≥ λ_max(X)`` for every symmetric ``X`` within ``radius`` of the small symmetric
    ``C`` (Rump test of ``λI − C``), or ``None``."""
    C = _symmetric_upper(C)
    radius = torch.maximum(radius, radius.T)
    top = float(torch.linalg.eigvalsh(C)[-1])
    scale = max(top, float(C.abs().max()), 1e-300)
    eye = torch.eye(C.shape[0], dtype=torch.float64)
    for slack in (1e-12, 1e-9, 1e-6, 1e-3):
        lam = top + slack * scale
        rounding = 2 * UNIT_ROUNDOFF * (lam + C.abs())
        if certify_psd(lam * eye - C, radius + rounding):
            return _up(lam)
    return None


def ritz_bound(W_t: Tensor, anchor: RitzAnchor, beta: float) -> float | None:
    """An upper bound on ``‖W_t‖₂`` by (5) (module docstring), ``beta ≥ ‖W_t − W_s‖₂``; or
    ``None`` when a Cholesky test fails."""
    M = gram_side(W_t)
    V, one_minus = anchor.V, 1.0 - anchor.eps
    Y = M @ V
    fro_m, fro_v = _fro_up(M), _fro_up(V)
    r1 = _product_error(M, V, fro_m, fro_v)  # ‖fl(MV) − MV‖_F
    C = Y.T @ Y
    lam = _certified_top(C, product_radius(Y.T.contiguous(), Y))
    if lam is None:
        return None
    norm_t = _up(anchor.norm_s + beta)  # ≥ ‖M_t‖
    a = _up(_up(sqrt_up(lam) + r1) ** 2 / one_minus)
    GV = M.T @ Y
    VC = V @ C
    residual = GV - VC
    radii = (
        _product_error(M.T, Y, fro_m, _fro_up(Y))  # fl(MᵀŶ)
        + _fro_up(product_radius(V, C))  # fl(VC)
        + UNIT_ROUNDOFF * _fro_up(residual) * 2  # the subtraction
        + _up(norm_t * r1)  # Mᵀ E_1
    )
    g = _up(_up(_fro_up(residual) + _up(radii)) / math.sqrt(one_minus) * (1 + 4 * UNIT_ROUNDOFF))
    b = _up(anchor.b_s + _up(2 * anchor.norm_s * beta) + _up(beta * beta))
    if not all(math.isfinite(x) for x in (a, g, b)):
        return None
    disc = sqrt_up(_up((a - b) ** 2 + 4 * g * g))
    lam_max = _up((a + b + disc) / 2)
    return sqrt_up(lam_max)
