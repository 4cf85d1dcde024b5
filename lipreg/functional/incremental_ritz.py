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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lipreg.functional.lmi import ETA, UNIT_ROUNDOFF, certify_psd, gamma, product_radius, sqrt_up

__all__ = [
    "RITZ_MAX_SIDE",
    "RitzAnchor",
    "deflated_top",
    "ritz_anchor",
    "ritz_bound",
    "top_eigenpairs",
]

#: Gram sides up to this get a Ritz anchor (top eigenvectors and a Cholesky test of the side).
RITZ_MAX_SIDE = 2048
#: Gram sides up to this get a full eigendecomposition, larger ones block Krylov. Measured on
#: the MLP 784-1000x3-10 (h5_ritz_krylov.py): Krylov matches the eigendecomposition's slack
#: only with 20 blocks of 24 (0.0034 % after 50 SGD steps; 10 blocks: 0.9 %), and then costs
#: about as much (1.3 s vs 1.1 s per anchor), so the default keeps the eigendecomposition.
DENSE_EIGH_SIDE = RITZ_MAX_SIDE
#: Extra columns of the Krylov block beyond the ``k`` wanted vectors.
OVERSAMPLE = 8
#: Krylov blocks from a random start, and from the previous anchor's ``V``.
KRYLOV_BLOCKS = 20
WARM_KRYLOV_BLOCKS = 12


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


def _block_krylov(
    apply: Callable[[Tensor], Tensor], X: Tensor, blocks: int
) -> tuple[Tensor, Tensor]:
    """Rayleigh–Ritz of the symmetric operator ``apply`` on ``span[X, AX, …, A^{q−1}X]``
    (``q = blocks``, each block orthogonalised twice against the previous ones, at most half
    the dimension in all): ``(values ascending, vectors)``."""
    p, width = X.shape
    basis = [torch.linalg.qr(X).Q]
    for _ in range(blocks - 1):
        if sum(b.shape[1] for b in basis) + width > p // 2:
            break
        Z = apply(basis[-1])
        B = torch.cat(basis, 1)
        for _ in range(2):  # classical Gram–Schmidt, twice: orthogonal to working precision
            Z = Z - B @ (B.T @ Z)
        basis.append(torch.linalg.qr(Z).Q)
    B = torch.cat(basis, 1)
    T = B.T @ apply(B)
    values, U = torch.linalg.eigh((T + T.T) / 2)
    return values, B @ U


def _gaussian(p: int, width: int) -> Tensor:
    return torch.randn(p, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def top_eigenpairs(
    G: Tensor,
    k: int,
    start: Tensor | None = None,
    blocks: int | None = None,
    dense_side: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Estimates ``(values, vectors)`` (ascending) of at least the top ``k + 1`` eigenpairs of
    the symmetric float64 ``G`` (``p × p``): a full eigendecomposition when
    ``p ≤ dense_side`` (default :data:`DENSE_EIGH_SIDE`), else block Krylov (Rayleigh–Ritz on
    ``span[X, GX, …, G^{q−1}X]``): ``X`` is ``k +`` :data:`OVERSAMPLE` columns, the first ones
    ``start`` (the previous anchor's ``V``) when given and of the right height, the rest
    seeded Gaussian; ``q = blocks`` (default :data:`KRYLOV_BLOCKS`, or
    :data:`WARM_KRYLOV_BLOCKS` with ``start``).

    An estimate only: nothing certified relies on it (the anchor's ``ε`` and ``b_s`` are
    certified for whatever ``V`` this returns); it costs ``q`` products ``G X`` instead of
    an ``O(p³)`` eigendecomposition."""
    p = G.shape[0]
    width = k + OVERSAMPLE
    if dense_side is None:
        dense_side = DENSE_EIGH_SIDE
    if p <= dense_side or p <= 4 * width:
        return torch.linalg.eigh(G)
    if blocks is None:
        blocks = KRYLOV_BLOCKS if start is None else WARM_KRYLOV_BLOCKS
    X = _gaussian(p, width)
    if start is not None and start.dim() == 2 and start.shape[0] == p:
        m = min(start.shape[1], width)
        X[:, :m] = start[:, :m].to(torch.float64)
    return _block_krylov(lambda Y: G @ Y, X, blocks)


def deflated_top(G: Tensor, V: Tensor, blocks: int = 16) -> float:
    """An estimate (from below) of ``λ_max`` of ``G`` on ``span(V)⊥``: block Krylov on
    ``Y ↦ PGPY``, ``P = I − VVᵀ`` (``V`` nearly orthonormal), from a seeded Gaussian block of
    :data:`OVERSAMPLE` columns. Where ``b_s`` of the Cholesky test starts when ``V`` is not
    an exact eigenbasis (the next Ritz value of :func:`top_eigenpairs` can be far below it)."""

    def apply(Y: Tensor) -> Tensor:
        Y = Y - V @ (V.T @ Y)
        Y = G @ Y
        return Y - V @ (V.T @ Y)

    values, _ = _block_krylov(apply, apply(_gaussian(G.shape[0], OVERSAMPLE)), blocks)
    return float(values[-1])


def ritz_anchor(
    W: Tensor,
    norm_s: float,
    k: int = 16,
    start: Tensor | None = None,
    dense_side: int | None = None,
) -> RitzAnchor | None:
    """The anchor data of bound (5) for the float64 weight ``W`` with ``‖W‖ ≤ norm_s``
    (module docstring), with ``min(k, p − 1)`` Ritz vectors for the smaller side ``p``
    (:func:`top_eigenpairs` with ``dense_side``, warm-started from ``start``, e.g. the
    previous anchor's ``V``, when it runs block Krylov);
    or ``None`` when ``p < 2`` or ``p >`` :data:`RITZ_MAX_SIDE`, or the Cholesky test fails
    for ``b_s`` up to 10 % above the estimated next eigenvalue plus ``1e-3 λ_max``.

    The radius of the test is a scalar: ``|fl(MᵀM) − MᵀM| ≤ γ_{n+2} |M|ᵀ|M| + 2(n+1)η`` and
    ``(|M|ᵀ|M|)_ij ≤ max_i ‖M_{:,i}‖²`` (Cauchy–Schwarz), likewise for ``V̂V̂ᵀ`` with the rows of
    ``V``; plus the rounding of forming ``b I − Ĝ + τ V̂V̂ᵀ`` (entrywise)."""
    M = gram_side(W)
    n, p = M.shape
    k = min(k, p - 1)
    if k < 1 or p > RITZ_MAX_SIDE:
        return None
    G = _symmetric_upper(M.T @ M)
    dense_side = DENSE_EIGH_SIDE if dense_side is None else dense_side
    evals, evecs = top_eigenpairs(G, k, start, dense_side=dense_side)
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
    if p > dense_side:  # V is a Krylov estimate: λ_max on V⊥ may be above the next Ritz value
        gap = max(gap, deflated_top(G, V))
    for slack in (1e-6, 1e-4, 1e-2, 1e-1):  # Krylov estimates of the gap can be a % low
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
