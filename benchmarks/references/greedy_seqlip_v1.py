"""Greedy SeqLip's pair search as it was before issue 10 (item 5): the reference that
``benchmarks/greedy_seqlip.py`` times the vectorised search against and compares values with.

A verbatim copy of ``_f64``, ``_top_pair``, ``pair_norm_greedy``, ``_greedy_from`` and
``_best_single_flip`` from ``lipreg/functional/seqlip_pairs.py`` at commit c1e07f4 (our own
code), renamed ``pair_norm_greedy_v1``. Nothing in lipreg imports it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pair_norm_greedy_v1"]


def _f64(value: float, like: Tensor) -> Tensor:
    """A float64 scalar tensor: ``torch.where`` on Python floats would round to float32."""
    return torch.tensor(value, dtype=torch.float64, device=like.device)


def _top_pair(
    M: Tensor, v0: Tensor | None = None, tol: float = 1e-10, max_iter: int = 500
) -> tuple[float, Tensor, Tensor]:
    """Top singular pair of a small dense matrix by warm-started power iteration.

    Inside the greedy search only comparisons need it, and consecutive matrices differ by a
    few rank-one terms, so a warm start converges in a few steps (an SVD each time dominated
    the run time). ``s = ‖M v‖ ≤ ‖M‖``.
    """
    v = M.sum(0) if v0 is None else v0
    if float(v.norm()) == 0:
        v = torch.ones(M.shape[1], dtype=M.dtype, device=M.device)
    v = v / v.norm()
    s_prev = 0.0
    for _ in range(max_iter):
        u = M @ v
        s = float(u.norm())
        if s == 0:
            return 0.0, u, v
        u = u / s
        v = M.T @ u
        v = v / v.norm()
        if abs(s - s_prev) <= tol * s:
            break
        s_prev = s
    u = M @ v
    s = float(u.norm())
    return s, u / max(s, 1e-300), v


def pair_norm_greedy_v1(
    A: Tensor,
    B: Tensor,
    lo: float,
    hi: float,
    *,
    n_restarts: int = 2,
    max_sweeps: int = 50,
    refine_candidates: int = 64,
    generator: torch.Generator | None = None,
) -> tuple[float, Tensor]:
    """Greedy SeqLip for one pair: a local maximum of ``σ ↦ ‖A diag(σ) B‖`` on ``{lo, hi}^n``.

    Each sweep (i) sets ``σ_j = hi`` where ``(Aᵀu)_j (Bv)_j > 0`` and ``lo`` elsewhere, which
    maximises ``uᵀ A diag(σ) B v`` for the current top singular pair ``(u, v)`` and so never
    decreases the norm; (ii) recomputes ``(u, v)``; and when (i) is stationary, (iii) tries
    single flips among the ``refine_candidates`` most promising coordinates, evaluating each
    as a rank-one update ``M + δ a_j b_jᵀ`` with a few batched power steps (no SVD per
    candidate). Starts from ``σ = hi`` (the paper's all-ones) and ``n_restarts`` random
    patterns; returns the best value and pattern. The value is ``‖A diag(σ) B‖`` for a
    feasible ``σ``: a lower bound on the exact pair maximum, **not** an upper bound.
    """
    A, B = A.to(torch.float64), B.to(torch.float64)
    n = A.shape[1]
    starts = [torch.full((n,), hi, dtype=torch.float64, device=A.device)]
    for _ in range(n_restarts):
        coin = torch.rand(n, generator=generator, device=A.device) < 0.5
        starts.append(torch.where(coin, _f64(hi, A), _f64(lo, A)))
    best, best_sigma = -1.0, starts[0]
    for sigma in starts:
        value, sigma = _greedy_from(A, B, lo, hi, sigma, max_sweeps, refine_candidates)
        if value > best:
            best, best_sigma = value, sigma
    return best, best_sigma


def _greedy_from(
    A: Tensor, B: Tensor, lo: float, hi: float, sigma: Tensor, max_sweeps: int, n_cand: int
) -> tuple[float, Tensor]:
    M = (A * sigma) @ B
    s, u, v = _top_pair(M)
    for _ in range(max_sweeps):
        gain = (A.T @ u) * (B @ v)  # d/dσ_j of uᵀ A diag(σ) B v
        proposal = torch.where(gain > 0, _f64(hi, A), _f64(lo, A))
        changed = proposal != sigma
        if bool(changed.any()):
            step = proposal[changed] - sigma[changed]
            M_new = M + (A[:, changed] * step) @ B[changed]  # update only the flipped terms
            s_new, u_new, v_new = _top_pair(M_new, v)
            if s_new > s * (1 + 1e-12):
                sigma, M, s, u, v = proposal, M_new, s_new, u_new, v_new
                continue
        # Stationary for the linearisation: try single flips by rank-one updates.
        j = _best_single_flip(A, B, lo, hi, sigma, M, s, v, gain, n_cand)
        if j is None:
            break
        step = (lo if sigma[j] == hi else hi) - float(sigma[j])
        sigma = sigma.clone()
        sigma[j] += step
        M = M + step * torch.outer(A[:, j], B[j])
        s, u, v = _top_pair(M, v)
    # Exact value of the final (feasible) pattern.
    return float(torch.linalg.matrix_norm(M, 2)), sigma


def _best_single_flip(
    A: Tensor,
    B: Tensor,
    lo: float,
    hi: float,
    sigma: Tensor,
    M: Tensor,
    s: float,
    v: Tensor,
    gain: Tensor,
    n_cand: int,
    n_power: int = 8,
) -> int | None:
    """Index of the single flip that most increases ``‖M‖`` (if any), by rank-one updates."""
    if n_cand <= 0 or lo == hi:
        return None
    delta = torch.where(sigma == hi, _f64(lo - hi, A), _f64(hi - lo, A))  # σ_j change if flipped
    cand = torch.argsort(delta * gain, descending=True)[:n_cand]
    a, b, d = A[:, cand].T, B[cand], delta[cand]  # (c, r1), (c, r2), (c,)
    # Batched power iteration on each M_j = M + d_j a_j b_jᵀ, started from the current v.
    x = v.expand(len(cand), -1).clone()
    for _ in range(n_power):
        y = x @ M.T + (d * (b * x).sum(1))[:, None] * a  # M_j x
        x = y @ M + (d * (a * y).sum(1))[:, None] * b  # M_jᵀ y
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    values = (x @ M.T + (d * (b * x).sum(1))[:, None] * a).norm(dim=1)
    j = int(torch.argmax(values))
    if float(values[j]) <= s * (1 + 1e-10):
        return None
    return int(cand[j])
