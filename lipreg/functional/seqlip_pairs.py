"""SeqLip pair algebra and pair solvers, shared by :func:`lipreg.seqlip` and the penalty.

For a SeqLip chain ``M_K ∘ ρ_{K-1} ∘ … ∘ ρ_1 ∘ M_1`` with SVDs ``M_i = U_i Σ_i V_iᵀ``, the
pair ``i`` (between ``M_i`` and ``M_{i+1}``, around the activation ``ρ_i`` whose slopes lie in
``[lo, hi]``) has the factor

.. math::

    \\max_{\\sigma \\in \\{lo, hi\\}^{n_i}} \\big\\lVert A_i \\operatorname{diag}(\\sigma) B_i
    \\big\\rVert_2 , \\qquad A_i = \\tilde\\Sigma_{i+1} V_{i+1}^\\top ,
    \\quad B_i = U_i \\tilde\\Sigma_i ,

with ``Σ̃_i = Σ_i`` for ``i ∈ {1, K}`` and ``Σ_i^{1/2}`` otherwise (:func:`pair_matrices`).
:func:`pair_norm_exact` enumerates the ``2^n`` vertices (the maximum of this convex function
of ``σ`` over the box is at a vertex: an exact value); :func:`pair_norm_greedy` is a monotone
local search whose value is attained by a feasible pattern (a lower value, an estimate),
implemented on Gram matrices in :mod:`lipreg.functional.seqlip_greedy` and re-exported here.

:func:`dense_svd` is the float64 SVD both use (exact power-of-two scaling, LAPACK up to 1024 on
the smaller side, the Gram eigen-decomposition beyond).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lipreg.functional.seqlip_greedy import pair_norm_greedy

__all__ = [
    "ChainSVD",
    "dense_svd",
    "ldexp_or_inf",
    "pair_matrices",
    "pair_name",
    "pair_norm_exact",
    "pair_norm_greedy",
    "pow2_normalise",
    "truncate",
]


@dataclass
class ChainSVD:
    """A thin SVD ``U diag(S) Vᵀ`` of one map (float64)."""

    U: Tensor  # (out, r)
    S: Tensor  # (r,)
    V: Tensor  # (in, r)
    exact: bool  # full SVD of the materialised map
    n_iter: int = 0

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(U, S, Vᵀ)``, the input of :func:`pair_matrices`."""
        return self.U, self.S, self.V.T


def dense_svd(W: Tensor) -> ChainSVD:
    """Full thin SVD of an explicit float64 matrix.

    LAPACK's SVD (backward stable: ``U S Vᵀ = W + E`` with ``‖E‖ ≈ ε‖W‖``) for matrices up to
    1024 on the smaller side, which covers every case where exact SeqLip is feasible. Larger
    matrices go through the eigen-decomposition of the smaller Gram matrix, several times
    faster on this hardware and accurate for the top singular triplets that greedy SeqLip
    relies on (small singular values lose relative accuracy; greedy is an estimate anyway).
    """
    scaled, exponent = pow2_normalise(
        W,
        "a SeqLip layer matrix has non-finite (NaN/Inf) entries: no bound is reported. "
        "Check the weights.",
    )
    # An exact power-of-two scaling 2^-e keeps the Gram matrix and the SVD in range; S·2^e
    # beyond float64 becomes inf, which the final check rejects as non-finite.
    svd = _dense_svd_scaled(scaled)
    S = svd.S * 2.0 ** (exponent // 2) * 2.0 ** (exponent - exponent // 2)
    return ChainSVD(U=svd.U, S=S, V=svd.V, exact=svd.exact)


def _dense_svd_scaled(W: Tensor) -> ChainSVD:
    if min(W.shape) <= 1024:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return ChainSVD(U=U, S=S, V=Vh.T, exact=True)
    flip = W.shape[1] > W.shape[0]
    G = W @ W.T if flip else W.T @ W
    evals, vecs = torch.linalg.eigh(G)
    S = evals.flip(0).clamp_min(0).sqrt()
    vecs = vecs.flip(1)
    keep = S > 0
    S, vecs = S[keep], vecs[:, keep]
    if flip:
        return ChainSVD(U=vecs, S=S, V=(W.T @ vecs) / S, exact=True)
    return ChainSVD(U=(W @ vecs) / S, S=S, V=vecs, exact=True)


def pow2_normalise(
    M: Tensor,
    non_finite: str = "a SeqLip pair matrix has non-finite (NaN/Inf) entries: the layer norms "
    "overflow float64; no bound is reported. Check the weights.",
) -> tuple[Tensor, int]:
    """``(M·2^-e, e)`` with the largest entry of the result in ``[0.5, 1)`` (exact scaling, in
    two steps: ``2^-e`` alone may overflow for subnormal peaks; ``(M, 0)`` for a zero
    matrix); raises ``ValueError(non_finite)`` on NaN/Inf entries."""
    if not bool(torch.isfinite(M).all()):
        raise ValueError(non_finite)
    peak = float(M.abs().max()) if M.numel() else 0.0
    if peak == 0:
        return M, 0
    e = math.frexp(peak)[1]
    half = -e // 2
    return M * 2.0**half * 2.0 ** (-e - half), e


def ldexp_or_inf(value: float, e: int) -> float:
    """``value · 2^e``, ``inf`` beyond float64 (an overflowing bound stays an upper bound, and
    the non-finite check then refuses it)."""
    try:
        return math.ldexp(value, e)
    except OverflowError:
        return math.inf


def truncate(svd: ChainSVD, top_k: int | None) -> ChainSVD:
    """The top-``k`` singular triplets (``exact=False`` if any is dropped)."""
    if top_k is None or top_k >= svd.S.numel():
        return svd
    return ChainSVD(svd.U[:, :top_k], svd.S[:top_k], svd.V[:, :top_k], exact=False)


def _f64(value: float, like: Tensor) -> Tensor:
    """A float64 scalar tensor: ``torch.where`` on Python floats would round to float32."""
    return torch.tensor(value, dtype=torch.float64, device=like.device)


def pair_matrices(
    svds: Sequence[tuple[Tensor, Tensor, Tensor]],
) -> list[tuple[Tensor, Tensor]]:
    """The pair matrices ``(A_i, B_i) = (Σ̃_{i+1} V_{i+1}ᵀ, U_i Σ̃_i)`` of a chain of maps
    given as ``(U, S, Vᵀ)`` (module docstring); differentiable, any dtype."""
    K = len(svds)
    tilde = [S if i in (0, K - 1) else S.clamp_min(0).sqrt() for i, (_, S, _) in enumerate(svds)]
    return [
        (tilde[i + 1][:, None] * svds[i + 1][2], svds[i][0] * tilde[i][None, :])
        for i in range(K - 1)
    ]


def pair_name(before: str, activation: str, after: str) -> str:
    """The name of a SeqLip pair factor: ``"<map> | <activation> | <map>"``."""
    return f"{before} | {activation} | {after}"


def pair_norm_exact(
    A: Tensor, B: Tensor, lo: float, hi: float, *, chunk: int = 8192
) -> tuple[float, Tensor]:
    """``max_{σ ∈ {lo, hi}^n} ‖A diag(σ) B‖_2`` by enumeration of all ``2^n`` patterns.

    ``A`` is ``(r1, n)``, ``B`` is ``(n, r2)``. The norm of each pattern is the root of the top
    eigenvalue of the smaller Gram matrix, in float64 and in batches of ``chunk`` patterns.
    """
    A, B = A.to(torch.float64), B.to(torch.float64)
    n = A.shape[1]
    hi_t, lo_t = _f64(hi, A), _f64(lo, A)
    bits = 2 ** torch.arange(n, device=A.device)
    best, best_sigma = -1.0, None
    left = A.shape[0] <= B.shape[1]
    for start in range(0, 2**n, chunk):
        idx = torch.arange(start, min(2**n, start + chunk), device=A.device)
        mask = (idx[:, None] & bits) > 0
        sigma = torch.where(mask, hi_t, lo_t)  # (p, n), float64 (no float32 rounding)
        M = (A[None] * sigma[:, None, :]) @ B  # (p, r1, r2)
        G = M @ M.transpose(1, 2) if left else M.transpose(1, 2) @ M
        if not bool(torch.isfinite(G).all()):
            raise ValueError(
                "a SeqLip pair's Gram matrices are non-finite (NaN/Inf): the layer norms "
                "overflow float64; no bound is reported. Check the weights."
            )
        top = torch.linalg.eigvalsh(G)[:, -1]
        i = int(torch.argmax(top))
        if float(top[i]) > best:
            best, best_sigma = float(top[i]), sigma[i].clone()
    return math.sqrt(max(best, 0.0)), best_sigma
