"""Float64 Gram matrices and a certified top eigenvalue by one Cholesky test (issue 10, item 4).

:func:`gram_lower` builds ``Ĝ = fl(M Mᵀ)`` of a row block ``M`` (``g × l``, float64, given as
column chunks) by block rows of one triangle (torch has no ``syrk``; block rows ``j ≤ i`` save
about 40 % of the products), then mirrors the lower triangle, so ``Ĝ`` is exactly symmetric.

:func:`certified_top_eigenvalue` proves ``λ_max(G) < μ`` for the exact ``G = M Mᵀ``:

1. ``λ̂``: Lanczos on ``Ĝ`` (:func:`lipreg.functional.lanczos.lanczos_top`), from a warm vector
   when one is given (a previous top eigenvector: a few products), else from a random one
   refined first on a float32 copy of ``Ĝ`` (sides ≥ :data:`FLOAT32_START_SIDE`).
2. ``μ = λ̂ (1 + δ)`` with ``δ = 1e-10 + 2 (c + r)/λ̂`` (twice the margin the test needs, below).
3. Rump's test (S. M. Rump, BIT 46, 2006, Cor. 2.4/2.7; :func:`lipreg.functional.lmi.rump_shift`)
   on ``A = μI − Ĝ`` in place: off the diagonal ``−Ĝ_ij`` (exact), on it ``fl(μ − Ĝ_ii)``,
   shifted down by ``(c + r)(1 + 1e-6)`` and rounded down (``nextafter``), with
   ``c = ½ γ_{2(g+1)} tr(A) + 4ηg(2(g+1) + max A_ii)`` and the radius
   ``r ≥ ‖(μI − G) − A‖_2``:  ``r = γ_l ‖M‖_F² + l g η + u μ`` (the Gram rounding
   ``|Ĝ − G| ≤ γ_l |M||M|ᵀ + lη`` entrywise, ``‖|M||M|ᵀ‖_2 ≤ ‖M‖_F²``, and the rounding of the
   diagonal subtraction). If the float64 Cholesky runs to completion, ``μI − G ≻ 0``: the
   **guarantee** ``λ_max(G) < μ`` comes from this test alone, whatever ``λ̂`` was.
4. On failure ``δ`` grows tenfold (``λ̂`` may have been low, e.g. a start vector blind to the top
   eigenvector); beyond ``δ = 1e3`` (impossible for a PSD ``Ĝ``: ``λ̂ ≤ trace``) the bound
   falls back to ``‖Ĝ‖_F + r`` (``λ_max(G) ≤ ‖Ĝ‖_2 + ‖G − Ĝ‖_2``) with a warning.

The cost is one Gram product, one Cholesky and the Lanczos products (cheap next to both when
warm), instead of a full ``eigh`` (5× a Cholesky at side 1024, 17× at 2048).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from lipreg.functional.lanczos import LanczosTop, lanczos_top
from lipreg.functional.lmi import ETA, UNIT_ROUNDOFF, gamma, rump_shift

__all__ = [
    "FLOAT32_RTOL",
    "FLOAT32_START_SIDE",
    "GRAM_BLOCK_ROWS",
    "KATO_TEMPLE_RTOL",
    "LANCZOS_RTOL",
    "CertifiedEigenvalue",
    "certified_top_eigenvalue",
    "gram_lower",
]

#: Number of block rows of :func:`gram_lower` (8: measured fastest at sides 1024 and 4096).
GRAM_BLOCK_ROWS = 8
#: Relative residual ``‖Ĝx − θx‖/θ`` at which the Lanczos ``λ̂`` stops (gap-free rule).
LANCZOS_RTOL = 1e-12
#: Kato–Temple estimate ``r²/(θ(θ − θ_2))`` at which the first ``λ̂`` stops.
KATO_TEMPLE_RTOL = 1e-10
#: Cold starts of Gram matrices of at least this side first run Lanczos in float32.
FLOAT32_START_SIDE = 512
#: Relative residual at which that float32 run stops.
FLOAT32_RTOL = 1e-5
_MIN_BLOCK = 64
_MAX_DELTA = 1e3


def gram_lower(chunks: Iterable[Tensor], g: int, device: torch.device) -> tuple[Tensor, float]:
    """``Ĝ = fl(M Mᵀ)`` (exactly symmetric) and ``fl(‖M‖_F²)`` from float64 column chunks of
    ``M`` (``g`` rows each; each chunk may be overwritten by the caller afterwards).

    Each chunk adds ``M_i M_{:i}ᵀ`` to the block rows of the lower triangle (one ``addmm`` per
    block row); every entry is still one dot product over ``l`` terms in some order, so the
    rounding bound ``γ_l |M||M|ᵀ`` holds.
    """
    G = torch.zeros(g, g, dtype=torch.float64, device=device)
    b = max(_MIN_BLOCK, -(-g // GRAM_BLOCK_ROWS))
    frob2 = torch.zeros((), dtype=torch.float64, device=device)
    for chunk in chunks:
        for start in range(0, g, b):
            stop = min(g, start + b)
            G[start:stop, :stop].addmm_(chunk[start:stop], chunk[:stop].T)
        flat = chunk.reshape(-1)
        frob2 += torch.dot(flat, flat)
    # mirror the lower triangle (the diagonal blocks of a GEMM are not exactly symmetric)
    for start in range(0, g, b):
        stop = min(g, start + b)
        D = G[start:stop, start:stop]
        D.copy_(D.tril() + D.tril(-1).T)
        G[:start, start:stop].copy_(G[start:stop, :start].T)
    return G, float(frob2)


@dataclass
class CertifiedEigenvalue:
    """``bound > λ_max(M Mᵀ)`` (proved) and the Lanczos data that led to it.

    Attributes:
        bound: the proved upper bound ``μ`` on the exact Gram's top eigenvalue.
        vector: unit approximate top eigenvector (float64, on ``Ĝ``'s device).
        estimate: the Lanczos ``λ̂`` (a Rayleigh quotient of ``Ĝ``).
        delta: the relative margin ``μ/λ̂ − 1`` that passed the test.
        products: number of Lanczos products with ``Ĝ``.
        factorisations: number of Cholesky factorisations.
    """

    bound: float
    vector: Tensor
    estimate: float
    delta: float
    products: int
    factorisations: int


def _start(G: Tensor, v0: Tensor | None) -> Tensor:
    g = G.shape[0]
    if v0 is not None:
        v0 = v0.detach().reshape(-1).to(dtype=torch.float64, device=G.device)
        norm = float(v0.norm())
        if v0.numel() == g and math.isfinite(norm) and norm > 0:
            return v0 / norm
    gen = torch.Generator(device=G.device).manual_seed(0)
    q = torch.randn(g, generator=gen, dtype=torch.float64, device=G.device)
    return q / q.norm()


def _mixed(x: Tensor, noise: Tensor) -> Tensor:
    q = x + 0.01 * noise
    return q / q.norm()


def _rump_passes(G: Tensor, diag: Tensor, mu: float, radius: float) -> bool:
    """Rump's test of ``μI − Ĝ`` (module docstring, step 3); ``G`` holds ``−Ĝ`` off the
    diagonal on entry and on exit (its diagonal is overwritten)."""
    g = G.shape[0]
    d = mu - diag  # fl(μ − Ĝ_ii): its rounding (≤ uμ) is in the radius
    if bool((d <= 0).any()):
        return False  # μ ≤ Ĝ_ii ≤ λ_max(Ĝ): μ is too small
    shift = rump_shift(g, float(d.sum()), float(d.max()), radius)
    shifted = d - shift
    G.diagonal().copy_(torch.nextafter(shifted, torch.full_like(shifted, -math.inf)))
    _, info = torch.linalg.cholesky_ex(G)
    return int(info) == 0


def _lanczos(G: Tensor, start: Tensor, max_iter: int, gap_rtol: float) -> LanczosTop:
    return lanczos_top(
        lambda q: (G @ q, None),
        start,
        rtol=LANCZOS_RTOL,
        max_iter=max_iter,
        name="Gram",
        gap_rtol=gap_rtol,
    )


def _float32_start(G: Tensor, start: Tensor, max_iter: int) -> Tensor:
    """A cold start refined by Lanczos on a float32 copy of ``Ĝ`` (half the memory traffic
    per product) to a relative residual of :data:`FLOAT32_RTOL`; the float64 run then needs
    only a few products. Only a start vector: nothing is proved from float32."""
    G32 = G.to(torch.float32)
    run = lanczos_top(
        lambda q: (G32 @ q, None),
        start.to(torch.float32),
        rtol=FLOAT32_RTOL,
        max_iter=max_iter,
        name="Gram (float32)",
    )
    x = run.x.to(torch.float64)
    return x / x.norm()


def _estimate_error(run: LanczosTop) -> float:
    """Relative error estimate of ``λ̂``: the gap-free ``r/θ``, or Kato–Temple with the Ritz
    gap ``r²/(θ(θ − θ_2))`` when smaller (a heuristic: it only sizes ``δ``)."""
    theta = max(run.theta, 1e-300)
    err = run.residual / theta
    if run.gap > 0:
        err = min(err, run.residual**2 / (theta * theta * run.gap))
    return err


def certified_top_eigenvalue(
    G: Tensor, frob2: float, l: int, *, v0: Tensor | None = None, max_iter: int = 300
) -> CertifiedEigenvalue:
    """A proved ``μ > λ_max(M Mᵀ)`` from ``Ĝ = fl(M Mᵀ)`` (module docstring).

    The first ``λ̂`` stops on the Kato–Temple estimate with the Ritz gap
    (:data:`KATO_TEMPLE_RTOL`, a few products when warm); if the test fails there, Lanczos
    resumes from its vector with the gap-free rule (:data:`LANCZOS_RTOL`) before ``δ`` grows.

    Args:
        G: ``Ĝ`` from :func:`gram_lower` (``g × g`` float64, exactly symmetric); used as
            workspace and left holding ``−Ĝ`` off the diagonal (callers drop it afterwards).
        frob2: an upper bound on ``‖M‖_F²``.
        l: the inner dimension of the product (the number of columns of ``M``).
        v0: optional warm start (an approximate top eigenvector of ``Ĝ``).
        max_iter: cap on the Lanczos products.
    """
    g = G.shape[0]
    radius_gram = gamma(l) * frob2 + l * g * ETA  # ≥ ‖Ĝ − G‖_2
    start = _start(G, v0)
    if v0 is None and g >= FLOAT32_START_SIDE:
        start = _float32_start(G, start, max_iter)
    run = _lanczos(G, start, max_iter, KATO_TEMPLE_RTOL)
    diag = G.diagonal().clone()
    products, tries, strict = run.n_iter, 0, False
    while True:
        lam = max(run.theta, torch.finfo(torch.float64).tiny)
        trace_guess = max(g * lam - float(diag.sum()), lam)
        margin = rump_shift(g, trace_guess, lam, radius_gram + UNIT_ROUNDOFF * lam * 2) / lam
        delta = 1e-10 + 2.0 * margin + 2.0 * _estimate_error(run)
        G.neg_()  # exact; the off-diagonal of A = μI − Ĝ
        while delta <= _MAX_DELTA:
            mu = lam * (1 + delta)
            tries += 1
            if _rump_passes(G, diag, mu, radius_gram + UNIT_ROUNDOFF * mu * 1.01):
                return CertifiedEigenvalue(mu, run.x, run.theta, delta, products, tries)
            if not strict:
                break  # λ̂ may be low: resume Lanczos (gap-free rule) before growing δ
            delta *= 10
        G.neg_()
        G.diagonal().copy_(diag)
        if strict:
            break
        # resume from the Ritz vector plus 1 % of a random one: a warm vector blind to the
        # top eigenvector (orthogonal to it) would keep the Krylov space blind
        run, strict = _lanczos(G, _mixed(run.x, _start(G, None)), max_iter, 0.0), True
        products += run.n_iter
    frob = float(G.norm()) * (1 + (g * g + 8) * 2 * UNIT_ROUNDOFF)  # ≥ ‖Ĝ‖_F ≥ λ_max(Ĝ)
    warnings.warn(
        f"the Cholesky test of a {g}x{g} Gram matrix failed up to μ = 1000 λ̂ (λ̂ = {lam:.6g}); "
        f"used ‖Ĝ‖_F + rounding radius ({frob:.6g}) instead. This should not happen for a "
        "finite matrix: please report it.",
        stacklevel=3,
    )
    return CertifiedEigenvalue(frob + radius_gram, run.x, run.theta, math.nan, products, tries)
