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

Lanczos (with full re-orthogonalisation, :mod:`lipreg.functional.lanczos`) reaches a relative
tolerance of 1e-4 in far fewer Gram products than the power method when the top singular values
are clustered, which is the common case for randomly initialised layers. It stops on a
residual bound that involves no spectral gap, so it does not "converge" on ``σ_2`` because the
gap to ``σ_3`` looks wide.
Like any Krylov method it can still be misled by a start vector (nearly) orthogonal to the
top singular vector, which a random start makes unlikely (the residual exposes a component
of ``|c|`` on a top vector ``δ`` away once ``|c| δ`` exceeds about ``2 tol σ̂²``). Both
accept a warm-start vector ``v0`` (the ``v`` of a previous call) and return the new one.

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

from lipreg.functional.lanczos import lanczos_top, non_finite_message
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
        converged: Lanczos: whether the gap-free residual estimate of ``(σ_max − σ̂)/σ̂``
            fell to ``tol`` (or the Krylov space filled the whole input space); power: whether
            the relative change of ``σ̂`` fell below ``tol``.
        rel_change: relative change of ``σ̂`` over the last iteration.
        residual: ``‖AᵀA v − σ̂² v‖ / σ̂²`` of the returned vector (0 for an exact singular
            vector). It measures how far ``v`` is from a singular vector; it is *not* a bound
            on ``σ_max − σ̂``.
        gap: Lanczos's Ritz estimate of the relative gap ``(σ_1² − σ_2²)/σ_1²`` (it can
            overestimate the true gap: the second Ritz value is below ``σ_2²``). Informative
            only; no stopping decision uses it.
    """

    sigma: float
    v: Tensor
    u: Tensor
    n_iter: int
    converged: bool
    rel_change: float
    residual: float
    gap: float = math.nan


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
    gap0: float | None = None,
    tol: float = 1e-4,
    max_iter: int = 500,
    method: Literal["lanczos", "power"] = "lanczos",
    generator: torch.Generator | None = None,
) -> OperatorNormResult:
    """Estimate ``‖A‖_2`` from below by Lanczos or power iteration on ``AᵀA``.

    Args:
        op: the linear map.
        v0: optional warm-start right vector (any shape with ``in_features`` entries).
        gap0: accepted for compatibility with callers (and saved states) that pass back the
            ``gap`` of the previous call; not used. A warm start is judged like a cold one,
            by its residual: a gap measured before a weight update cannot rule out a cluster
            of top singular values that the update has split.
        tol: relative tolerance on ``σ̂``. Lanczos (default) stops when the gap-free residual
            estimate ``r/(2θ)`` of the remaining error (:func:`_error_estimate`; ``θ = σ̂²``
            is the top Ritz value and ``r = ‖AᵀA x − θ x‖``) is ``≤ tol``, or when the
            Krylov space spans all ``in_features`` directions (the Ritz values are then the
            exact ones). A tolerance below 4 units of roundoff of ``op.dtype`` acts as 4
            units of roundoff. The power method stops when ``σ̂`` changes by ``≤ tol`` in one
            iteration (the paper's rule), which can stop far from the norm when the top
            singular values are clustered.
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


def _gram(op: LinearMap, v: Tensor) -> tuple[Tensor, Tensor]:
    """``op.gram_matvec(v)``, raising ``ValueError`` ("non-finite") on NaN/Inf results."""
    g, a = op.gram_matvec(v)
    if not (bool(torch.isfinite(g).all()) and bool(torch.isfinite(a).all())):
        raise ValueError(non_finite_message(op.name, op.dtype))
    return g, a


def _error_estimate(theta: float, residual: float) -> float:
    """Gap-free estimate of the relative error ``(σ_1 − σ̂)/σ̂`` of ``σ̂ = sqrt(θ)``.

    ``θ`` is the top Ritz value and ``residual`` is ``r = ‖AᵀA x − θ x‖`` for its unit Ritz
    vector ``x``. For a top eigenpair ``(λ_1, v_1)`` of ``AᵀA``,
    ``v_1ᵀ(AᵀA x − θ x) = (λ_1 − θ) v_1ᵀx``, so ``(λ_1 − θ) |v_1ᵀx| ≤ r``: as soon as ``x`` has
    a non-negligible component on a top singular vector, ``λ_1 − θ ≲ r`` and the error is
    ``≲ r/(2θ)``, whatever the rest of the spectrum.

    No spectral gap enters. A Kato–Temple estimate ``r²/(2θ(θ − λ_2))`` is sharper but needs
    the true ``λ_2``, and the second Ritz value only bounds it from *below*: while the top
    Ritz vector still mixes several close singular vectors, or sits on ``σ_2`` because
    ``σ_1`` is not yet in the Krylov space, the gap it measures is fictitious and the estimate
    accepts a value up to ``σ_1 − σ_2`` too low. A gap carried over from an earlier call is no
    better: a cluster narrower than that call's residual is invisible to it, and a later
    weight update splits it.
    """
    if theta <= 0:
        return math.inf
    return residual / (2.0 * theta)


def _power(op: LinearMap, v: Tensor, tol: float, max_iter: int) -> OperatorNormResult:
    prev = 0.0
    rel = math.inf
    converged = False
    n_iter = 0
    gv, av = _gram(op, v[None])
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
        gv, av = _gram(op, v[None])
    sigma = float(av.norm())
    residual = float((gv - sigma**2 * v).norm()) / max(sigma**2, 1e-300)
    u = av / sigma if sigma > 0 else av
    return OperatorNormResult(sigma, v, u, n_iter, converged, rel, residual)


def _lanczos(op: LinearMap, q: Tensor, tol: float, max_iter: int) -> OperatorNormResult:
    """Lanczos on ``AᵀA`` (:func:`lipreg.functional.lanczos.lanczos_top`: preallocated basis,
    bounded re-orthogonalisation, one host sync per step) with the gap-free rule
    ``r/(2θ) ≤ tol`` of :func:`_error_estimate`, i.e. ``r ≤ 2 tol θ``."""
    # Below a few units of roundoff the residual is rounding noise: a finer tolerance is met
    # at working precision.
    tol = max(tol, 4.0 * torch.finfo(op.dtype).eps)

    def apply(v: Tensor) -> tuple[Tensor, Tensor]:
        g, a = op.gram_matvec(v[None])
        return g[0], a[0]

    run = lanczos_top(
        apply, q, rtol=2.0 * tol, max_iter=max_iter, image_features=op.out_features, name=op.name
    )
    ax = run.image
    assert ax is not None  # image_features > 0
    sigma = float(ax.norm())
    if not math.isfinite(sigma):  # the images were not checked step by step
        raise ValueError(non_finite_message(op.name, op.dtype))
    residual = run.residual / max(sigma**2, 1e-300)
    u = ax / sigma if sigma > 0 else ax
    return OperatorNormResult(
        sigma, run.x, u, run.n_iter, run.converged, run.rel_change, residual, run.gap
    )


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
            BX, AX = _gram(op, X)
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
