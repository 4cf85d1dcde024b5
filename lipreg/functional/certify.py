"""Certified upper bounds on operator norms.

Power iteration and Lanczos approach ``‖A‖_2`` from below, so a product of their values is
an *estimate* of AutoLip, not a bound. This module supplies numbers that are guaranteed to be
``≥ ‖A‖_2`` (up to the explicit floating-point margin below):

* :func:`dense_norm_bound` — materialise ``A`` in float64 and take the largest eigenvalue of
  the smaller Gram matrix with LAPACK (``eigvalsh``). Symmetric eigensolvers are backward
  stable: the computed eigenvalues are exact for ``G + E`` with ``‖E‖ ≤ c·n·ε·‖G‖``, so
  ``λ_max(G) ≤ λ̂_max + c·n·ε·‖G‖``. We add ``RELATIVE_MARGIN`` (1e-9), far above
  ``n·ε ≈ 1e-12`` for the sizes allowed here.
* :func:`schur_bound` — for a matrix with non-negative entries (pooling, padding, indexing,
  nearest/bilinear upsampling): ``‖A‖_2 ≤ sqrt(‖A‖_1 ‖A‖_∞) = sqrt(max_j (Aᵀ1)_j · max_i
  (A1)_i)``, two passes. Exact for non-overlapping average pooling (``1/k``) and reshapes.
* convolutions: :func:`lipreg.functional.conv_bounds.conv_operator_norm_bound` (FFT,
  polyphase for strides).

The float64 evaluation bounds the exact-arithmetic network; the rounding of the float32
network itself is not modelled.
"""

from __future__ import annotations

import math

import torch

from lipreg.functional.linear_map import LinearMap
from lipreg.functional.power_iteration import operator_norm

__all__ = ["RELATIVE_MARGIN", "dense_norm_bound", "matrix_norm_bound", "schur_bound"]

RELATIVE_MARGIN = 1e-9


def matrix_norm_bound(W: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Certified ``‖W‖_2`` of an explicit matrix, and its top right singular vector.

    Works on the smaller Gram matrix ``G`` in float64. Up to 1024 on that side: the top
    eigenvalue from ``eigh`` (LAPACK, backward stable). Larger (AlexNet's 4096-wide dense
    layers, where ``eigh`` takes ~10 s on one core and ``svdvals`` far longer): Lanczos gives
    an estimate ``λ̂``, and a successful Cholesky factorisation of ``μI − G`` with
    ``μ = λ̂ (1 + δ)`` proves ``λ_max(G) < μ`` (Cholesky is backward stable: success means
    ``μI − G + E ≻ 0`` with ``‖E‖ ≤ c·n·ε·μ``, covered by ``RELATIVE_MARGIN``); ``δ`` starts
    at 1e-9 and grows tenfold until the factorisation succeeds.
    """
    W = W.detach().to(torch.float64)
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(W.shape)}.")
    if W.numel() == 0:
        return 0.0, torch.zeros(W.shape[1], dtype=torch.float64, device=W.device)
    out_f, in_f = W.shape
    right = in_f <= out_f  # Gram on the input side: its eigenvectors are right vectors
    G = W.T @ W if right else W @ W.T
    if G.shape[0] <= 1024:
        evals, evecs = torch.linalg.eigh(G)
        lam, top = max(float(evals[-1]), 0.0), evecs[:, -1]
    else:
        lam, top = _cholesky_certified_top(G)
    v = top if right else W.T @ top
    v = v / v.norm().clamp_min(1e-300)
    return math.sqrt(lam) * (1 + RELATIVE_MARGIN), v


def _cholesky_certified_top(G: torch.Tensor) -> tuple[float, torch.Tensor]:
    """A proven upper bound ``μ ≥ λ_max(G)`` of a PSD matrix, and an approximate top vector."""
    n = G.shape[0]
    op = LinearMap(lambda x: x @ G, (n,), (n,), G.dtype, G.device, "Gram")
    est = operator_norm(op, tol=1e-12, max_iter=300)  # σ_max(G) = λ_max(G)
    lam, eye = est.sigma, torch.eye(n, dtype=G.dtype, device=G.device)
    delta = 1e-9
    while delta < 1e3:
        mu = lam * (1 + delta) + torch.finfo(G.dtype).tiny
        _, info = torch.linalg.cholesky_ex(mu * eye - G)
        if int(info) == 0:
            return mu, est.v
        delta *= 10
    evals, evecs = torch.linalg.eigh(G)  # unreachable in practice: λ̂ ≤ λ_max ≤ ‖G‖
    return max(float(evals[-1]), 0.0), evecs[:, -1]


def dense_norm_bound(op: LinearMap) -> tuple[float, torch.Tensor]:
    """Certified ``‖A‖_2`` by materialising ``A`` (``op`` must compute in float64)."""
    if op.dtype != torch.float64:
        raise ValueError(f"dense_norm_bound needs a float64 operator, got {op.dtype}.")
    return matrix_norm_bound(op.to_dense())


def schur_bound(op: LinearMap) -> float:
    """``sqrt(‖A‖_1 ‖A‖_∞)`` for an operator whose matrix entries are all ``≥ 0``.

    The caller guarantees non-negativity (a property of the op, e.g. average pooling).
    """
    ones_in = torch.ones(1, op.in_features, dtype=op.dtype, device=op.device)
    ones_out = torch.ones(1, op.out_features, dtype=op.dtype, device=op.device)
    with torch.no_grad():
        row = op.matvec(ones_in)
    col = op.rmatvec(ones_out)
    if float(row.min()) < -1e-12 or float(col.min()) < -1e-12:
        raise ValueError(
            f"{op.name!r} was declared non-negative but A·1 or Aᵀ·1 has negative entries; "
            "its rule must not set nonnegative=True."
        )
    bound = math.sqrt(float(row.max()) * float(col.max()))
    return bound * (1 + RELATIVE_MARGIN)
