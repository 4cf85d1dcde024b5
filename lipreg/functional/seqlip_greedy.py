"""Greedy SeqLip for one pair, on the Gram matrix of the pair's smaller side.

The search maximises ``σ ↦ ‖M(σ)‖₂`` with ``M(σ) = A diag(σ) B`` (``A`` is ``r1 × n``, ``B``
is ``n × r2``) over the vertices ``σ ∈ {lo, hi}^n`` of the slope box. Every quantity the search
compares is a norm of ``M`` or of a rank-one update ``M_j = M + d_j a_j b_jᵀ`` (``a_j = A[:, j]``,
``b_j = B[j]``, ``d_j`` the change of ``σ_j`` if it is flipped), so it only needs the Gram
matrix of the smaller side, ``G = MᵀM`` (``r2 ≤ r1``) or ``H = MMᵀ`` (``r1 < r2``):

* ``M_jᵀM_j = G + d_j (c_j b_jᵀ + b_j c_jᵀ) + d_j² ‖a_j‖² b_j b_jᵀ`` with ``c_j = Mᵀa_j``;
* ``M_jM_jᵀ = H + d_j (e_j a_jᵀ + a_j e_jᵀ) + d_j² ‖b_j‖² a_j a_jᵀ`` with ``e_j = M b_j``.

A power step then costs ``r_s²`` (the smaller side squared) per vector instead of
``2 r1 r2``, and the candidate flips of a local-search step are evaluated together as one
``(c × r_s) @ (r_s × r_s)`` product plus rank-two corrections. The Gram matrix follows the
accepted moves by low-rank updates (``M' = M + ΔM``: ``G' = G + MᵀΔM + ΔMᵀM'``), or is
recomputed when that is cheaper.

**Same search as before.** The iterates are, in exact arithmetic, the ones of the former
implementation (kept in ``benchmarks/references/greedy_seqlip_v1.py``): the same starts, the
same power iteration for the top singular pair (right vectors ``v``, warm starts, tolerance
and cap), the same candidate set, the same 8 batched power steps per candidate, the same
thresholds and the same tie-breaking (``argsort`` of the same scores, first ``argmax``);
``M`` itself is updated by the same rank-one and low-rank terms. Only rounding differs
(Gram products instead of products with ``M``, start matrices without their exact-zero
terms, other BLAS kernels for other memory layouts, ``addr_`` for single flips): the chosen
patterns are the same unless two compared quantities agree to ~1e-15, and the values agree to
rounding (``benchmarks/results/greedy_seqlip.md``). On large pairs the sweeps' gain signs come
from float32 products with a rigorous error bound, and float64 where the bound leaves the sign
open (:class:`SweepGains`): the same signs as the float64 gains.

**Guarantee.** None beyond feasibility: the value is ``‖A diag(σ) B‖₂`` (from the top
eigenvalue of the pattern's Gram matrix) for a feasible ``σ``, a *lower* value than the
exact pair maximum, an estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SweepGains", "pair_norm_greedy"]


#: ``Tensor.norm`` without its Python dispatch (the same kernel): the power steps call it ~10^4
#: times per pair on CNN-4, at ~15 µs of overhead each
_vnorm = torch.linalg.vector_norm


def _f64(value: float, like: Tensor) -> Tensor:
    """A float64 scalar tensor: ``torch.where`` on Python floats would round to float32."""
    return torch.tensor(value, dtype=torch.float64, device=like.device)


def _sym(X: Tensor) -> Tensor:
    """Exactly symmetric copy: the Gram updates are symmetric only up to rounding."""
    return 0.5 * (X + X.T)


#: Gram matrices whose side is at most this are kept up to date at every move: computing one
#: costs at most this many products of ``M`` with a vector.
ALWAYS_GRAM = 64


@dataclass
class _Pair:
    """A pattern's matrix ``M = A diag(σ) B`` and, when it pays, the Gram matrix of its smaller
    side (``left``: ``H = MMᵀ``, else ``G = MᵀM``; ``None`` while stale)."""

    A: Tensor  # (r1, n), stored by columns (a view of a contiguous (n, r1)): fast gathers
    B: Tensor  # (n, r2)
    M: Tensor  # (r1, r2)
    gram: Tensor | None  # (r1, r1) if left else (r2, r2)

    @property
    def left(self) -> bool:
        return self.M.shape[0] < self.M.shape[1]

    @property
    def small(self) -> int:
        return min(self.M.shape)

    @classmethod
    def of(cls, A: Tensor, B: Tensor, sigma: Tensor) -> _Pair:
        """The pair of pattern ``σ``: ``M = (A·σ) @ B``, leaving out the columns with
        ``σ_j = 0`` (half of a random ReLU start) when at least a quarter are: they add exact
        zeros to ``M``, and the product of the others costs proportionally less."""
        nz = sigma.nonzero()[:, 0]
        if 4 * nz.numel() > 3 * sigma.numel():
            M = (A * sigma) @ B
        else:  # A is stored by columns: its columns are gathered as rows of Aᵀ
            M = (A.T.index_select(0, nz) * sigma[nz, None]).T @ B.index_select(0, nz)
        P = cls(A, B, M, None)
        return P.with_gram() if P.small <= ALWAYS_GRAM else P

    def with_gram(self) -> _Pair:
        """This pair with its Gram matrix (computed from ``M`` if stale)."""
        if self.gram is not None:
            return self
        M = self.M
        return _Pair(self.A, self.B, M, _sym(M @ M.T) if self.left else _sym(M.T @ M))

    def moved(self, cols: Tensor, steps: Tensor) -> _Pair:
        """The pair after ``σ[cols] += steps``: ``M`` by the former search's own expressions
        (one flip: an outer product; several: a product of the changed columns and rows).

        The Gram matrix follows by the low-rank update of the module docstring while that
        costs less than half a recomputation (``2k(r1 r2 + r_s²)`` against ``r_s² r_l``
        multiply-adds for ``k`` changes); otherwise it goes stale (recomputed when needed).
        """
        # ΔM = Ac @ Bc; Ac = A[:, cols] * steps, gathered as rows of the contiguous Aᵀ
        Ac, Bc = (self.A.T.index_select(0, cols) * steps[:, None]).T, self.B[cols]
        if cols.numel() == 1:
            M = self.M + steps[0] * torch.outer(self.A[:, cols[0]], self.B[cols[0]])
        else:
            M = self.M + Ac @ Bc
        r1, r2 = M.shape
        small, cost = self.small, 2 * cols.numel() * (r1 * r2 + self.small**2)
        if self.gram is None or 2 * cost > small * r1 * r2:
            moved = _Pair(self.A, self.B, M, None)
            return moved.with_gram() if small <= ALWAYS_GRAM else moved
        if self.left:  # H' = H + M ΔMᵀ + ΔM M'ᵀ
            up = (self.M @ Bc.T) @ Ac.T + Ac @ (Bc @ M.T)
        else:  # G' = G + Mᵀ ΔM + ΔMᵀ M'
            up = (self.M.T @ Ac) @ Bc + Bc.T @ (Ac.T @ M)
        return _Pair(self.A, self.B, M, self.gram + up)  # symmetric up to rounding

    def flip_(self, j: int, step: float) -> _Pair:
        """This pair after the single flip ``σ_j += step``, updated in place (a single flip is
        always taken, so the former matrices are not needed): ``M += step a_j b_jᵀ`` and the
        Gram matrix by the rank-two update of :meth:`moved` (``H += step (e a_jᵀ + a_j e'ᵀ)``
        with ``e = M b_j``, ``e' = M' b_j``; ``G`` likewise). ``addr_`` writes no new
        ``r1 × r2`` or ``r_s²`` tensor: at CNN-4's sizes the former out-of-place update (an
        outer product, then a sum, for ``M`` and the Gram matrix) cost more than the products.
        """
        a, b = self.A[:, j], self.B[j]
        r1, r2 = self.M.shape
        if self.gram is None or 4 * (r1 * r2 + self.small**2) > self.small * r1 * r2:
            self.M.addr_(a, b, alpha=step)  # the same rule as moved(): recompute if cheaper
            self.gram = None
            return self.with_gram() if self.small <= ALWAYS_GRAM else self
        if self.left:  # H' = H + M ΔMᵀ + ΔM M'ᵀ with ΔM = step a bᵀ
            e = self.M @ b
            self.M.addr_(a, b, alpha=step)
            self.gram.addr_(e, a, alpha=step).addr_(a, self.M @ b, alpha=step)
        else:  # G' = G + Mᵀ ΔM + ΔMᵀ M'
            c = a @ self.M
            self.M.addr_(a, b, alpha=step)
            self.gram.addr_(c, b, alpha=step).addr_(b, a @ self.M, alpha=step)
        return self

    def norm(self) -> float:
        """``‖M‖₂``, the root of the top eigenvalue of the Gram matrix."""
        top = float(torch.linalg.eigvalsh(self.with_gram().gram)[-1])
        return math.sqrt(max(top, 0.0))


def _top_pair(
    P: _Pair, v0: Tensor | None = None, tol: float = 1e-10, max_iter: int = 500
) -> tuple[float, Tensor, Tensor]:
    """Top singular pair ``(s, u, v)`` of ``M`` by warm-started power iteration on the right
    vectors: ``v ← MᵀM v / ‖MᵀM v‖`` with ``s = ‖M v‖``, until ``s`` changes by at most
    ``tol·s`` (or ``max_iter`` steps); start ``v0``, else ``M``'s column sums, else ones.

    Inside the search only comparisons need it, and consecutive matrices differ by a few
    rank-one terms, so a warm start converges in a few steps. ``s = ‖M v‖ ≤ ‖M‖``.
    """
    M = P.M
    v = M.sum(0) if v0 is None else v0
    if float(v.norm()) == 0:
        v = torch.ones(M.shape[1], dtype=M.dtype, device=M.device)
    v = v / v.norm()
    if P.gram is None:  # stale: a few products with M cost less than a new Gram matrix
        v, zero = _power_direct(M, v, tol, max_iter)
    else:
        v, zero = (_power_left if P.left else _power_right)(P.gram, M, v, tol, max_iter)
    u = M @ v
    if zero:  # M v = 0: the former search returned (0, M v, v) too
        return 0.0, u, v
    s = float(u.norm())
    return s, u / max(s, 1e-300), v


def _power_direct(M: Tensor, v: Tensor, tol: float, max_iter: int) -> tuple[Tensor, bool]:
    """The power iteration on ``M`` itself: ``s_k = ‖M v_k‖``, ``v_{k+1} ∝ Mᵀ M v_k``."""
    s_prev = 0.0
    for _ in range(max_iter):
        u = M @ v
        s = float(_vnorm(u))
        if s == 0:
            return v, True
        v = M.T @ (u / s)
        v = v / _vnorm(v)
        if abs(s - s_prev) <= tol * s:
            break
        s_prev = s
    return v, False


def _power_right(G: Tensor, M: Tensor, v: Tensor, tol: float, max_iter: int) -> tuple[Tensor, bool]:
    """The power iteration on ``G = MᵀM``: ``s_k = √(v_kᵀ G v_k)``, ``v_{k+1} ∝ G v_k``;
    returns the last ``v`` and whether ``s`` was zero."""
    s_prev = 0.0
    for _ in range(max_iter):
        w = G @ v
        s = math.sqrt(max(float(v @ w), 0.0))
        if s == 0:
            return v, True
        v = w / _vnorm(w)
        if abs(s - s_prev) <= tol * s:
            break
        s_prev = s
    return v, False


def _power_left(H: Tensor, M: Tensor, v: Tensor, tol: float, max_iter: int) -> tuple[Tensor, bool]:
    """The same iterates through ``H = MMᵀ``: with ``u_k = M v_k / s_k``,
    ``v_{k+1} ∝ Mᵀu_k``, ``u_{k+1} ∝ H u_k`` and ``s_{k+1} = ‖H u_k‖ / √(u_kᵀ H u_k)``; only
    the last ``v`` is formed."""
    u = M @ v
    s = float(u.norm())
    if s == 0 or max_iter <= 0:
        return v, s == 0
    u, s_prev = u / s, 0.0
    for k in range(max_iter):
        if abs(s - s_prev) <= tol * s or k == max_iter - 1:
            break
        w = H @ u
        norm_w = _vnorm(w)
        s_prev, s = s, float(norm_w) / math.sqrt(max(float(u @ w), 1e-300))
        u = w / norm_w
    v = M.T @ u
    return v / v.norm(), False


def _best_single_flip(
    P: _Pair,
    lo: float,
    hi: float,
    sigma: Tensor,
    s: float,
    v: Tensor,
    gain: Tensor,
    n_cand: int,
    n_power: int = 8,
) -> int | None:
    """Index of the single flip that most increases ``‖M‖`` (if any), among the ``n_cand``
    coordinates of largest first-order gain ``δ_j·gain_j``.

    Each candidate's value is ``n_power`` power steps on ``M_jᵀM_j`` from ``v`` (as before),
    all candidates at once through the Gram identities of the module docstring: the flip is
    taken if the best value exceeds ``s·(1 + 1e-10)``.
    """
    if n_cand <= 0 or lo == hi:
        return None
    delta = torch.where(sigma == hi, _f64(lo - hi, P.A), _f64(hi - lo, P.A))
    cand = torch.argsort(delta * gain, descending=True)[:n_cand]
    a, b, d = P.A.T[cand], P.B[cand], delta[cand]  # (c, r1), (c, r2), (c,)
    if P.gram is None:
        raise ValueError("_best_single_flip needs the pair's Gram matrix (P.with_gram()).")
    flip_values = _flip_values_left if P.left else _flip_values_right
    values = flip_values(P.gram, P.M, a, b, d, v, n_power)
    j = int(torch.argmax(values))
    if float(values[j]) <= s * (1 + 1e-10):
        return None
    return int(cand[j])


def _rank_two(x: Tensor, gram: Tensor, p: Tensor, q: Tensor, d: Tensor, pp: Tensor) -> Tensor:
    """Rows ``x_j`` times ``gram + d_j (q_j p_jᵀ + p_j q_jᵀ) + d_j² pp_j p_j p_jᵀ``."""
    dpx = d * (p * x).sum(1)
    out = torch.addcmul(x @ gram, q, dpx[:, None])
    return out.addcmul_(p, (d * (q * x).sum(1) + d * pp * dpx)[:, None])


def _flip_values_right(
    G: Tensor, M: Tensor, a: Tensor, b: Tensor, d: Tensor, v: Tensor, n_power: int
) -> Tensor:
    """``‖M_j x_j‖`` after ``n_power`` steps ``x ← M_jᵀM_j x / ‖·‖`` from ``v``, on ``G``."""
    c = a @ M  # rows c_j = Mᵀ a_j
    na2 = (a * a).sum(1)
    x = v.expand(len(d), -1)
    for _ in range(n_power):
        x = _rank_two(x, G, b, c, d, na2)
        x = x / _vnorm(x, dim=1, keepdim=True).clamp_min(1e-300)
    return (x * _rank_two(x, G, b, c, d, na2)).sum(1).clamp_min(0).sqrt()


def _flip_values_left(
    H: Tensor, M: Tensor, a: Tensor, b: Tensor, d: Tensor, v: Tensor, n_power: int
) -> Tensor:
    """The same values on ``H``: the last iterate is ``x ∝ M_jᵀ z`` with
    ``z ∝ (M_jM_jᵀ)^{n_power-1} M_j v``, so ``‖M_j x‖ = ‖H_j z‖ / √(zᵀ H_j z)``."""
    e = b @ M.T  # rows e_j = M b_j
    nb2 = (b * b).sum(1)
    z = (M @ v)[None, :] + (d * (b @ v))[:, None] * a  # M_j v
    for _ in range(n_power - 1):
        z = _rank_two(z, H, a, e, d, nb2)
        z = z / _vnorm(z, dim=1, keepdim=True).clamp_min(1e-300)
    w = _rank_two(z, H, a, e, d, nb2)
    zw = (z * w).sum(1)
    # zw = ‖M_jᵀ z‖² = 0 only if M_j v = 0 (the former search's value was then 0 too)
    return torch.where(zw > 0, w.norm(dim=1) / zw.clamp_min(1e-300).sqrt(), torch.zeros_like(zw))


#: Pairs whose factors hold at least this many entries (``n (r1 + r2)``; 4M float64 = 32 MB,
#: beyond the caches) and whose sides are at most ``LOW_PRECISION_MAX_SIDE`` take the sweep's
#: gain signs from float32 copies (:class:`SweepGains`). The error bound grows with the side
#: ``r``: at ``r = 200`` (AlexNet top-200) 17 of 64,896 coordinates per product were left open
#: (median over a search), at ``r1 = 1600`` (CNN-4's pair 0) 444 of 4,608, with no saving.
LOW_PRECISION_GAINS = 4_000_000
LOW_PRECISION_MAX_SIDE = 512


class SweepGains:
    """The sweep's gains ``g = (Aᵀu) ⊙ (Bv)`` (``∂/∂σ_j`` of ``uᵀ A diag(σ) B v``).

    :meth:`positive` returns ``g > 0`` as the float64 gains decide it. On large pairs the two
    products stream ``A`` and ``B`` (memory-bound: 2 x 104 MB per sweep on AlexNet's top-200
    pair 0, at the 50-sweep cap) and float32 copies halve that: ``α̂ = fl32(A32ᵀ u32)`` differs
    from ``α = Aᵀu`` by at most ``δ_j = c ‖a_j‖ ‖u‖ + t``, with ``c = 1.1 (r + 2) ε / (1 -
    (r + 2) ε)``, ``ε = 2⁻²⁴`` (the ``γ_r`` bound of a dot product of length ``r`` in any
    order, plus the rounding of ``A`` and ``u`` to float32) and ``t`` a term for underflow.
    Where ``|α̂_j| > 2 δ_j`` the sign of ``α_j`` is certain, and so is the sign of its float64
    value (``|α_j| > δ_j``, far above float64 rounding); the other coordinates are recomputed
    in float64 from gathered rows. The same for ``Bv``. So the proposals are those of the
    float64 gains, not an approximation of them.
    :meth:`exact` gives the float64 gains themselves (the single-flip candidates are ranked by
    their size), for the last ``(u, v)``.
    """

    def __init__(self, A: Tensor, B: Tensor) -> None:
        self.A_t, self.B = A.T, B  # (n, r1) and (n, r2): rows gathered for the recomputations
        self._last: tuple[Tensor, Tensor, Tensor] | None = None
        n, (r1, r2) = B.shape[0], (A.shape[0], B.shape[1])
        self.low: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self.A_rows: Tensor | None = None
        big = n * (r1 + r2) >= LOW_PRECISION_GAINS and max(r1, r2) <= LOW_PRECISION_MAX_SIDE
        if big and _float32_dots_are_plain(A):
            # finite norms below 1e30: every entry is finite and far inside float32's range
            na, nb = A.norm(dim=0), B.norm(dim=1)
            if max(float(na.max()), float(nb.max())) < 1e30:
                # the layouts of the fast products: Aᵀu from A by rows, Bv from seqlip's B
                self.low = (A.to(torch.float32).contiguous(), B.to(torch.float32), na, nb)
                # float64 B by rows: the moves and recomputations gather rows of B (4.5x
                # faster than from seqlip's column layout); its own Bv is then rarely needed
                self.B = B.contiguous()
        if self.low is None:  # A by rows: Aᵀu 1.7x faster than from seqlip's column layout
            self.A_rows = A.contiguous()

    def exact(self, u: Tensor, v: Tensor) -> Tensor:
        """The float64 gains ``(Aᵀu) ⊙ (Bv)``."""
        if self._last is not None and self._last[0] is u and self._last[1] is v:
            return self._last[2]
        At_u = self.A_rows.T @ u if self.A_rows is not None else self.A_t @ u
        gain = At_u * (self.B @ v)
        self._last = (u, v, gain)
        return gain

    def positive(self, u: Tensor, v: Tensor) -> Tensor:
        """``exact(u, v) > 0``, from float32 products where their sign is certain."""
        if self.low is None:
            return self.exact(u, v) > 0
        A32, B32, na, nb = self.low
        alpha = _settled((A32.T @ u.to(torch.float32)).to(u.dtype), na, u, self.A_t)
        beta = _settled((B32 @ v.to(torch.float32)).to(v.dtype), nb, v, self.B)
        return alpha * beta > 0


def _float32_dots_are_plain(A: Tensor) -> bool:
    """float32 products round as IEEE float32 (no TF32 on CUDA): the error bound holds."""
    return not (A.is_cuda and torch.backends.cuda.matmul.allow_tf32)


def _settled(approx: Tensor, norms: Tensor, x: Tensor, rows: Tensor) -> Tensor:
    """``approx`` (``fl32(R x)`` for the rows ``r_j`` of ``rows``) with every entry whose sign
    the float32 error bound leaves open replaced by its float64 value ``r_j·x``."""
    r, size = x.numel(), float(x.norm())
    eps = 2.0**-24  # float32's unit roundoff
    c = 1.1 * (r + 2) * eps / (1 - (r + 2) * eps)  # γ_{r+2}, with 10 % to spare
    # underflow (absolute): at most 2⁻¹⁵⁰ per product and per rounded entry of x, times |r_ji|
    # (covered by the relative term) or |x_i| <= ‖x‖
    tiny = (r + 2) * 2.0**-148 * (1 + size)
    bound = norms * (c * 1.01 * size) + tiny
    open_ = (approx.abs() <= 2 * bound).nonzero()[:, 0]
    if open_.numel():
        approx[open_] = rows.index_select(0, open_) @ x
    return approx


def pair_norm_greedy(
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
    candidate; module docstring). Starts from ``σ = hi`` (the paper's all-ones) and
    ``n_restarts`` random patterns; returns the best value and pattern. The value is
    ``‖A diag(σ) B‖`` for a feasible ``σ``: a lower bound on the exact pair maximum, **not**
    an upper bound.

    Every sweep streams ``A`` and ``B`` for the gains and gathers the moved columns of ``A``
    and rows of ``B``, so each is held in the layout of its use (:class:`SweepGains`): ``A``
    by columns for the gathers (18x faster than by rows on AlexNet's top-200 factors, ``n =
    64,896``) and by rows for ``Aᵀu`` (2.8x faster), or, on large pairs, float32 copies for
    the gains (half the bytes: the sweep's signs are those of the float64 gains, see
    :class:`SweepGains`) and ``B`` by rows for the gathers. Memory: on AlexNet's pair 0
    (``A``, ``B`` of 104 MB each) 208 MB besides the caller's ``A`` and ``B``.
    """
    A, B = A.to(torch.float64), B.to(torch.float64)
    A = A.T.contiguous().T  # by columns (seqlip's layout): fast gathers of columns
    gains = SweepGains(A, B)
    B, n = gains.B, A.shape[1]  # the layout of B that the search gathers from
    starts = [torch.full((n,), hi, dtype=torch.float64, device=A.device)]
    for _ in range(n_restarts):
        coin = torch.rand(n, generator=generator, device=A.device) < 0.5
        starts.append(torch.where(coin, _f64(hi, A), _f64(lo, A)))
    best, best_sigma = -1.0, starts[0]
    for sigma in starts:
        value, sigma = _greedy_from(A, B, gains, lo, hi, sigma, max_sweeps, refine_candidates)
        if value > best:
            best, best_sigma = value, sigma
    return best, best_sigma


def _greedy_from(
    A: Tensor,
    B: Tensor,
    gains: SweepGains,
    lo: float,
    hi: float,
    sigma: Tensor,
    max_sweeps: int,
    n_cand: int,
) -> tuple[float, Tensor]:
    """The local search from one start; returns ``(‖M(σ)‖₂, σ)`` of the pattern reached
    (``A`` stored by columns; ``gains`` of this ``(A, B)``)."""
    # The cold start takes hundreds of power steps: matrix-vector products with M are
    # memory-bound, one Gram product (a matrix-matrix product) is worth it here.
    P = _Pair.of(A, B, sigma).with_gram()
    s, u, v = _top_pair(P)
    for _ in range(max_sweeps):
        proposal = torch.where(gains.positive(u, v), _f64(hi, A), _f64(lo, A))
        changed = proposal != sigma
        if bool(changed.any()):
            cols = changed.nonzero()[:, 0]
            moved = P.moved(cols, proposal[cols] - sigma[cols])  # only the flipped terms
            s_new, u_new, v_new = _top_pair(moved, v)
            if s_new > s * (1 + 1e-12):
                sigma, P, s, u, v = proposal, moved, s_new, u_new, v_new
                continue
        # Stationary for the linearisation: try single flips by rank-one updates.
        if n_cand <= 0 or lo == hi:  # no flip to try
            break
        P = P.with_gram()  # the flips work on the Gram matrix: bring it up to date
        j = _best_single_flip(P, lo, hi, sigma, s, v, gains.exact(u, v), n_cand)
        if j is None:
            break
        flipped = lo if sigma[j] == hi else hi
        step = flipped - float(sigma[j])
        sigma = sigma.clone()
        # the vertex itself: the former ``σ_j += step`` left e.g. 1 + (-0.3 - 1) ≠ -0.3 (1 ulp
        # off the box, then a spurious change at the next sweep); ``M`` moves by ``step``
        sigma[j] = flipped
        P = P.flip_(j, step)
        s, u, v = _top_pair(P, v)
    return P.norm(), sigma
