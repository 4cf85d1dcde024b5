"""Largest singular values of matrix-free linear maps (the paper's Algorithm 2, accelerated).

:func:`operator_norm` estimates ``σ_max(A) = ‖A‖_2`` with Lanczos on the Gram operator
``AᵀA`` (default) or with the plain autograd power method of Scaman & Virmaux (2018):

.. math::

    v_{t+1} = \\frac{A^\\top A v_t}{\\lVert A^\\top A v_t \\rVert}, \\qquad
    \\hat\\sigma_t = \\lVert A v_t \\rVert .

**Guarantee.** Both methods return ``σ̂ = ‖A v‖`` for an explicit unit vector ``v``, so
``σ̂ ≤ σ_max(A)`` always: the value is a certified *lower* bound on the norm and approaches it
from below. It is an *estimate* of the norm, not an upper bound; see
:mod:`lipreg.functional.certify` for certified upper bounds.

Lanczos (with full re-orthogonalisation) reaches a relative tolerance of 1e-4 in far fewer
Gram products than the power method when the top singular values are clustered, which is the
common case for randomly initialised layers. Both accept a warm-start vector ``v0`` (the
``v`` of a previous call) and return the new one.

:func:`top_singular_triplets` computes the top-``k`` singular triplets by block subspace
iteration with Rayleigh–Ritz extraction (one batched forward+backward per iteration for the
whole block), as needed by SeqLip on large or convolutional layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lipreg.functional.linear_map import LinearMap

__all__ = [
    "OperatorNormResult",
    "TopSingularResult",
    "operator_norm",
    "top_singular_triplets",
]


@dataclass
class OperatorNormResult:
    """Result of :func:`operator_norm`.

    Attributes:
        sigma: ``‖A v‖`` for the returned unit ``v``: a certified lower bound on ``σ_max``.
        v: unit right vector, flat ``(in_features,)``; pass it back as ``v0`` to warm-start.
        u: unit left vector ``A v / ‖A v‖``, flat ``(out_features,)``.
        n_iter: number of products with ``AᵀA`` (each one forward + one backward pass).
        converged: whether the relative change of ``σ̂`` fell below ``tol``.
        rel_change: relative change of ``σ̂`` over the last iteration.
        residual: ``‖AᵀA v − σ̂² v‖ / σ̂²`` of the returned vector (0 for an exact singular
            vector). It measures how far ``v`` is from a singular vector; it is *not* a bound
            on ``σ_max − σ̂``.
    """

    sigma: float
    v: Tensor
    u: Tensor
    n_iter: int
    converged: bool
    rel_change: float
    residual: float


def check_iteration_options(tol: float, max_iter: int, method: str) -> None:
    """Validate the options shared by every iterative estimator."""
    if not isinstance(tol, int | float) or tol <= 0 or not math.isfinite(tol):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}.")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}.")
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}.")


def _random_unit(n: int, like: LinearMap, generator: torch.Generator | None) -> Tensor:
    v = torch.randn(n, generator=generator, dtype=like.dtype, device=like.device)
    return v / v.norm()


def _prepare_start(op: LinearMap, v0: Tensor | None, generator: torch.Generator | None) -> Tensor:
    n = op.in_features
    if v0 is None:
        return _random_unit(n, op, generator)
    v0 = v0.detach().reshape(-1).to(dtype=op.dtype, device=op.device)
    if v0.numel() != n:
        raise ValueError(
            f"warm-start vector for {op.name!r} has {v0.numel()} entries, expected {n} "
            f"(input shape {op.in_shape}); pass v0=None to start cold."
        )
    norm = v0.norm()
    if not torch.isfinite(norm) or norm == 0:
        return _random_unit(n, op, generator)
    return v0 / norm


def operator_norm(
    op: LinearMap,
    *,
    v0: Tensor | None = None,
    tol: float = 1e-4,
    max_iter: int = 500,
    method: Literal["lanczos", "power"] = "lanczos",
    generator: torch.Generator | None = None,
) -> OperatorNormResult:
    """Estimate ``‖A‖_2`` from below by Lanczos or power iteration on ``AᵀA``.

    Args:
        op: the linear map.
        v0: optional warm-start right vector (any shape with ``in_features`` entries).
        tol: relative tolerance. Power method: stop when ``σ̂`` changes by ``≤ tol`` in one
            iteration (the paper's rule). Lanczos: stop when the extrapolated remaining error
            of ``σ̂`` is ``≤ tol`` (see :func:`_lanczos_converged`), which tracks the true
            error far better on clustered spectra.
        max_iter: cap on the number of ``AᵀA`` products.
        method: ``"lanczos"`` (default, fast on clustered spectra) or ``"power"`` (the
            paper's Algorithm 2).
        generator: private random generator for the cold start (default: a fresh one seeded
            with 0; the global RNG is never used).

    Returns:
        :class:`OperatorNormResult` whose ``sigma`` never exceeds the true norm.
    """
    check_iteration_options(tol, max_iter, method)
    if generator is None:  # never touch the global RNG
        generator = torch.Generator(device=op.device).manual_seed(0)
    q = _prepare_start(op, v0, generator)
    with torch.no_grad():
        if method == "power":
            return _power(op, q, tol, max_iter)
        return _lanczos(op, q, tol, max_iter)


def _lanczos_converged(history: list[float], tol: float) -> bool:
    """Stop when the extrapolated remaining error of the Ritz value is ``≤ tol`` (relative).

    Lanczos Ritz values increase towards ``σ_max``. With the last two increments
    ``Δ_j ≤ Δ_{j−1}`` and their ratio ``ρ``, a geometric tail leaves ``Δ_j ρ / (1 − ρ)`` to
    go; requiring that (and ``Δ_j`` itself) to be ``≤ tol·σ`` guards against the slow,
    clustered-spectrum case where single increments are small long before convergence.
    """
    if len(history) < 3:
        return False
    s, d1, d2 = history[-1], history[-1] - history[-2], history[-2] - history[-3]
    if d1 <= 0 and d2 <= 0:
        return True
    if d1 > tol * s:
        return False
    rho = min(max(d1 / d2, 0.0), 0.99) if d2 > 0 else 0.99
    return d1 * rho / (1.0 - rho) <= tol * s


def _power(op: LinearMap, v: Tensor, tol: float, max_iter: int) -> OperatorNormResult:
    prev = 0.0
    rel = math.inf
    converged = False
    n_iter = 0
    gv, av = op.gram_matvec(v[None])
    for n_iter in range(1, max_iter + 1):
        gv, av = gv[0], av[0]
        sigma = float(av.norm())
        rel = abs(sigma - prev) / max(sigma, 1e-300)
        gnorm = gv.norm()
        if sigma == 0.0 or gnorm == 0:
            converged = True
            break
        if rel <= tol:
            converged = True
            break
        prev = sigma
        if n_iter == max_iter:
            break
        v = gv / gnorm
        gv, av = op.gram_matvec(v[None])
    sigma = float(av.norm())
    residual = float((gv - sigma**2 * v).norm()) / max(sigma**2, 1e-300)
    u = av / sigma if sigma > 0 else av
    return OperatorNormResult(sigma, v, u, n_iter, converged, rel, residual)


def _lanczos(op: LinearMap, q: Tensor, tol: float, max_iter: int) -> OperatorNormResult:
    n = op.in_features
    max_iter = min(max_iter, n)  # the Krylov space cannot grow beyond n
    basis: list[Tensor] = []
    images: list[Tensor] = []  # A q_j, so that A x for the Ritz vector x needs no extra pass
    alphas: list[float] = []
    betas: list[float] = []
    prev = 0.0
    rel = math.inf
    converged = False
    theta_vec = None
    n_iter = 0
    history: list[float] = []
    for n_iter in range(1, max_iter + 1):
        basis.append(q)
        w, aq = op.gram_matvec(q[None])
        w, aq = w[0], aq[0]
        images.append(aq)
        alpha = float(torch.dot(q, w))
        alphas.append(alpha)
        # Full re-orthogonalisation (twice is enough, "twice is enough" of Kahan/Parlett):
        # keeps the Ritz values honest Rayleigh quotients in finite precision.
        Q = torch.stack(basis)
        w = w - Q.T @ (Q @ w)
        w = w - Q.T @ (Q @ w)
        beta = float(w.norm())
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        theta = max(float(evals[-1]), 0.0)
        theta_vec = evecs[:, -1]
        sigma = math.sqrt(theta)
        rel = abs(sigma - prev) / max(sigma, 1e-300)
        scale = max(abs(a) for a in alphas) or 1.0
        history.append(sigma)
        if sigma == 0.0 or beta <= 1e-12 * scale or _lanczos_converged(history, tol):
            converged = True
            break
        prev = sigma
        if n_iter == max_iter:
            break
        betas.append(beta)
        q = w / beta
    assert theta_vec is not None
    s = theta_vec.to(dtype=op.dtype, device=op.device)
    Q = torch.stack(basis)
    x = s @ Q
    xnorm = x.norm()
    ax = (s @ torch.stack(images)) / xnorm
    x = x / xnorm
    sigma = float(ax.norm())
    # Residual of the Ritz pair from the Lanczos relation: ‖B x − θ x‖ = β_j |s_j|.
    residual = (beta * abs(float(theta_vec[-1]))) / max(sigma**2, 1e-300)
    u = ax / sigma if sigma > 0 else ax
    return OperatorNormResult(sigma, x, u, n_iter, converged, rel, residual)


@dataclass
class TopSingularResult:
    """Top-``k`` singular triplets of a linear map (columns of ``U`` and ``V``).

    ``S`` are Ritz values: each is ``‖A v_i‖`` for an orthonormal set ``v_i`` and never exceeds
    the true ``i``-th singular value (Cauchy interlacing); they converge from below.
    """

    S: Tensor  # (k,)
    U: Tensor  # (out_features, k)
    V: Tensor  # (in_features, k)
    n_iter: int
    converged: bool
    exact: bool  # True when computed by a dense SVD of the materialised operator


def top_singular_triplets(
    op: LinearMap,
    k: int,
    *,
    V0: Tensor | None = None,
    tol: float = 1e-4,
    max_iter: int = 200,
    oversample: int = 8,
    generator: torch.Generator | None = None,
) -> TopSingularResult:
    """Top-``k`` singular triplets by block subspace iteration through autograd.

    Each iteration applies ``AᵀA`` to the whole block of ``k + oversample`` vectors in one
    batched forward+backward pass, re-orthonormalises it (QR), and extracts Ritz triplets by
    an SVD of the small projected matrix ``A X``. Stops when the top-``k`` Ritz values change
    by at most ``tol`` (relative) between iterations.

    Args:
        op: the linear map.
        k: number of triplets (clipped to ``min(in_features, out_features)``).
        V0: optional warm start, ``(in_features, j)``; missing columns are random.
        tol: relative tolerance on the top-``k`` singular values.
        max_iter: iteration cap.
        oversample: extra block columns, which speed up convergence of the ``k``-th value.
        generator: private random generator.
    """
    n, m = op.in_features, op.out_features
    k = min(k, n, m)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    b = min(k + max(oversample, 0), n)
    if generator is None:  # never touch the global RNG
        generator = torch.Generator(device=op.device).manual_seed(0)
    X = torch.randn(b, n, generator=generator, dtype=op.dtype, device=op.device)
    if V0 is not None:
        V0 = V0.detach().to(dtype=op.dtype, device=op.device).reshape(n, -1)
        j = min(V0.shape[1], b)
        X[:j] = V0[:, :j].T
    prev = None
    converged = False
    it = 0
    with torch.no_grad():
        X = torch.linalg.qr(X.T).Q.T
        for it in range(1, max_iter + 1):
            BX, AX = op.gram_matvec(X)
            # Rayleigh–Ritz on span(X): the SVD of A X^T gives the Ritz triplets.
            Wl, S, Wr_t = torch.linalg.svd(AX.T, full_matrices=False)  # AX.T: (m, b)
            top = S[:k]
            if prev is not None:
                rel = float(((top - prev).abs() / top.clamp_min(1e-300)).max())
                if rel <= tol:
                    converged = True
                    break
            prev = top
            if it == max_iter:
                break
            X = torch.linalg.qr(BX.T).Q.T
    V = X.T @ Wr_t.T[:, :k]
    U = Wl[:, :k]
    return TopSingularResult(S=S[:k].clone(), U=U, V=V, n_iter=it, converged=converged, exact=False)
