"""Optimisers for the chained SeqLip pair LMIs (:mod:`lipreg.functional.seqlip_certified`).

Nothing here is a certificate: these functions only choose multipliers ``t`` and metrics ``G``;
:func:`lipreg.functional.seqlip_certified.certify_pair` decides what is certified.

For pair ``k`` with input metric ``G_in = L Lᵀ``, output metric ``G_out``, ``s = a + b``,
``p = 2ab``, ``M = W L^{-ᵀ}`` and ``S = 2T − G_out ≻ 0``, the smallest feasible ``ρ`` is

.. math:: ρ^*(T, G_{in}, G_{out}) = λ_{\\max}\\big(M^\\top (s^2 T S^{-1} T − p T) M\\big).

With ``v`` a unit top eigenvector, ``w = M v``, ``x = L^{-ᵀ} v`` (``xᵀ G_in x = 1``) and
``z = S^{-1} (t ∘ w)``, Danskin's theorem gives the (sub)gradients

* ``∂ρ/∂t_i = s² (2 w_i z_i − 2 z_i²) − p w_i²``,
* ``∂ρ/∂G_out = s² z zᵀ`` (from ``d(S⁻¹) = S⁻¹ dG_out S⁻¹``),
* ``∂ρ/∂G_in = −ρ x xᵀ`` (a generalised Rayleigh quotient).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PairEval",
    "PairProblem",
    "optimise_metrics",
    "optimise_pair",
    "pair_eval",
    "sym",
    "top_eig",
]

#: Largest side for which the pair value is an exact ``eigh`` at every optimiser step.
DENSE_EIG = 128
#: Early stop: no relative improvement of the best value above ``STALL_TOL`` in ``STALL`` steps.
STALL, STALL_TOL = 40, 1e-7


def sym(G: Tensor) -> Tensor:
    """Exactly symmetric copy (``fl(x + y) = fl(y + x)``)."""
    return 0.5 * (G + G.T)


@dataclass
class PairProblem:
    """Pair data in the metric of its input: ``M = W L^{-ᵀ}`` with ``G_in = L Lᵀ``
    (``L = None``: ``G_in = I``)."""

    W: Tensor  # (n, m)
    L: Tensor | None  # (m, m) lower triangular
    G_out: Tensor  # (n, n)
    s: float
    p: float

    def __post_init__(self) -> None:
        W, L = self.W, self.L
        self.M = W if L is None else torch.linalg.solve_triangular(L, W.T, upper=False).T
        self.norm2 = float(torch.linalg.matrix_norm(self.M, "fro")) ** 2

    @classmethod
    def from_metrics(
        cls, W: Tensor, G_in: Tensor | None, G_out: Tensor, a: float, b: float
    ) -> PairProblem:
        L = None if G_in is None else torch.linalg.cholesky(G_in)
        return cls(W=W, L=L, G_out=G_out, s=a + b, p=2.0 * a * b)

    def dense_x(self, t: Tensor, C: Tensor) -> Tensor:
        """``X = Mᵀ (s² T S⁻¹ T − p T) M`` (``m × m``), ``S = C Cᵀ``."""
        TM = t[:, None] * self.M
        X = self.s**2 * (TM.T @ torch.cholesky_solve(TM, C)) - self.p * (self.M.T @ TM)
        return sym(X)


def top_eig(
    pr: PairProblem, t: Tensor, C: Tensor, V: Tensor, iters: int
) -> tuple[float, Tensor, Tensor]:
    """``(λ̂_max(X), v, V)``: exact ``eigh`` for ``m ≤ DENSE_EIG``, else ``iters`` steps of
    block subspace iteration from ``V`` with Rayleigh–Ritz, shifted by ``p max(t) ‖M‖_F²`` so
    that the top of the spectrum dominates (then ``λ̂`` is a lower estimate)."""
    if pr.M.shape[1] <= DENSE_EIG:
        evals, vecs = torch.linalg.eigh(pr.dense_x(t, C))
        return float(evals[-1]), vecs[:, -1], V
    shift = max(pr.p, 0.0) * float(t.max()) * pr.norm2

    def apply(B: Tensor) -> Tensor:
        Z = t[:, None] * (pr.M @ B)
        return pr.M.T @ (pr.s**2 * t[:, None] * torch.cholesky_solve(Z, C) - pr.p * Z)

    for _ in range(iters):
        V = torch.linalg.qr(apply(V) + shift * V).Q
    evals, vecs = torch.linalg.eigh(sym(V.T @ apply(V)))
    V = V @ vecs.flip(1)
    return float(evals[-1]), V[:, 0], V


@dataclass
class PairEval:
    """``ρ̂`` at one point, its gradient in ``t``, the vectors of the metric gradients (module
    docstring) and the warm subspace ``V``."""

    rho: float
    grad_t: Tensor
    x: Tensor
    z: Tensor
    V: Tensor


def pair_eval(pr: PairProblem, t: Tensor, V: Tensor, iters: int) -> PairEval | None:
    """The pair value and gradients at ``t``; ``None`` outside the domain (``S`` not PD)."""
    C, info = torch.linalg.cholesky_ex(2.0 * torch.diag(t) - pr.G_out)
    if int(info) != 0:
        return None
    rho, v, V = top_eig(pr, t, C, V, iters)
    w = pr.M @ v
    z = torch.cholesky_solve((t * w)[:, None], C)[:, 0]
    grad = pr.s**2 * (2.0 * w * z - 2.0 * z * z) - pr.p * w * w
    x = v if pr.L is None else torch.linalg.solve_triangular(pr.L.T, v[:, None], upper=True)[:, 0]
    return PairEval(rho=rho, grad_t=grad, x=x, z=z, V=V)


def _start_subspace(m: int, dtype: torch.dtype) -> Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.linalg.qr(torch.randn(m, min(4, m), dtype=dtype, generator=g)).Q


class _Adam:
    """Adam on a list of tensors, with a learning rate per tensor decaying linearly to 1/10."""

    def __init__(self, params: list[Tensor], rates: list[float], steps: int) -> None:
        self.params, self.rates, self.steps = params, rates, steps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.it = 0

    def step(self, grads: list[Tensor]) -> list[Tensor]:
        """The next parameters (the current ones are kept in ``params`` until ``accept``)."""
        self.it += 1
        decay = 1.0 - 0.9 * min(self.it / self.steps, 1.0)
        out = []
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            self.m[i] = 0.9 * self.m[i] + 0.1 * g
            self.v[i] = 0.999 * self.v[i] + 0.001 * g * g
            mh = self.m[i] / (1 - 0.9**self.it)
            vh = self.v[i] / (1 - 0.999**self.it)
            out.append(p - self.rates[i] * decay * mh / (vh.sqrt() + 1e-12))
        return out

    def accept(self, params: list[Tensor]) -> None:
        self.params = params

    def back_off(self) -> None:
        self.rates = [r * 0.5 for r in self.rates]


def optimise_pair(
    W: Tensor,
    G_in: Tensor | None,
    G_out: Tensor,
    a: float,
    b: float,
    *,
    t0: Tensor | None = None,
    steps: int = 300,
    lr: float = 0.05,
) -> tuple[Tensor, float]:
    """Multipliers ``t`` (and the estimate ``ρ̂``) approximately minimising ``ρ*(T)`` for fixed
    metrics.

    Adam on ``θ = log t`` minimising ``log ρ*``; leaving the domain restores the last feasible
    ``θ`` and halves the rate; the best ``t`` seen is returned. Start: ``t0`` if feasible (a
    warm start), else ``t = λ_max(G_out) 1`` (then ``S ⪰ tI`` and ``ρ* ≤ s² t ‖M‖²``, the
    product-of-norms point for ReLU).
    """
    pr = PairProblem.from_metrics(W, G_in, G_out, a, b)
    default = torch.full((W.shape[0],), float(torch.linalg.eigvalsh(G_out)[-1]), dtype=W.dtype)
    V = _start_subspace(W.shape[1], W.dtype)
    t, ev = default, None
    if t0 is not None and t0.shape == default.shape and bool((t0 > 0).all()):
        t, ev = t0.to(W.dtype), pair_eval(pr, t0.to(W.dtype), V, 20)
    if ev is None:
        t, ev = default, pair_eval(pr, default, V, 20)
    assert ev is not None  # the default point is strictly feasible
    best_rho, best_t = ev.rho, t
    opt = _Adam([t.log()], [lr], steps)
    # No early stop: λ_max is not smooth at the optimum and progress comes in bursts as the
    # rate decays (stopping after 100 idle steps cost 0.9 % at width 1000).
    for _ in range(steps):
        (theta,) = opt.step([t * ev.grad_t / max(ev.rho, 1e-300)])  # ∇_θ log ρ
        out = pair_eval(pr, theta.exp(), ev.V, 2)
        if out is None:
            opt.back_off()
            continue
        opt.accept([theta])
        t, ev = theta.exp(), out
        if ev.rho < best_rho:
            best_rho, best_t = ev.rho, t
    return best_t, best_rho


def optimise_metrics(
    Ws: Sequence[Tensor],
    slopes: Sequence[tuple[float, float]],
    metrics: Sequence[Tensor | None],
    ts: Sequence[Tensor],
    *,
    steps: int = 300,
    lr: float = 0.02,
) -> tuple[list[Tensor | None], list[Tensor], float]:
    """Jointly optimise the multipliers and the *inner* metrics ``G_1 … G_{L-2}`` of a chain
    (the end metrics ``metrics[0]`` and ``metrics[-1]`` stay fixed) to minimise
    ``Σ_k log ρ*_k``, the log of the chained bound.

    Parameters: ``θ_k = log t_k`` and a lower-triangular factor ``L_k`` of each inner metric
    (``G_k = L_k L_kᵀ``); gradients from the module docstring (``∂/∂L = 2 (∂/∂G) L``). Starts
    from ``(metrics, ts)`` (e.g. SeqLip's metrics and their optimised multipliers); returns the
    best point seen ``(metrics, ts, Σ log ρ̂)``. Any float metrics are valid: the certificate
    is computed afterwards.
    """
    K = len(Ws) - 1  # pairs
    Ls = [torch.linalg.cholesky(G) for G in metrics[1:-1]]
    scale = [float(torch.diagonal(L).abs().mean()) for L in Ls]
    params = [t.log() for t in ts] + Ls
    opt = _Adam(params, [lr] * K + [lr * s_ for s_ in scale], steps)
    Vs = [_start_subspace(W.shape[1], W.dtype) for W in Ws[:-1]]
    L0 = None if metrics[0] is None else torch.linalg.cholesky(metrics[0])

    def evaluate(ps: list[Tensor]) -> tuple[float, list[PairEval]] | None:
        Gm = [sym(L @ L.T) for L in ps[K:]]
        outs = [*Gm, metrics[-1]]
        evs = []
        for k in range(K):
            a, b = slopes[k]
            L_in = ps[K + k - 1] if k else L0
            pr = PairProblem(W=Ws[k], L=L_in, G_out=outs[k], s=a + b, p=2.0 * a * b)
            ev = pair_eval(pr, ps[k].exp(), Vs[k], 2 if evs or opt.it else 20)
            if ev is None or not (0.0 < ev.rho < math.inf):
                return None
            Vs[k] = ev.V
            evs.append(ev)
        return sum(math.log(e.rho) for e in evs), evs

    first = evaluate(params)
    if first is None:
        raise ValueError("optimise_metrics: the starting point is not feasible.")
    best, evs = first[0], first[1]
    best_params = params
    # From a converged multiplier point Adam's first steps go uphill: a longer patience.
    mark, mark_it, patience = best, 0, max(STALL, steps // 2)
    for it in range(steps):
        if best < mark + math.log1p(-STALL_TOL):
            mark, mark_it = best, it
        elif it - mark_it >= patience:
            break
        grads = [ps_t.exp() * e.grad_t / e.rho for ps_t, e in zip(params[:K], evs, strict=True)]
        for j, L in enumerate(params[K:]):
            # G_{j+1} is the output of pair j and the input of pair j + 1.
            e_out, e_in = evs[j], evs[j + 1]
            a, b = slopes[j]
            dG = (a + b) ** 2 * torch.outer(e_out.z, e_out.z) / e_out.rho - torch.outer(
                e_in.x, e_in.x
            )
            grads.append(torch.tril(2.0 * dG @ L))
        cand = opt.step(grads)
        out = evaluate(cand)
        if out is None:
            opt.back_off()
            continue
        opt.accept(cand)
        params, evs = cand, out[1]
        if out[0] < best:
            best, best_params = out[0], cand
    Gs = [metrics[0], *[sym(L @ L.T) for L in best_params[K:]], metrics[-1]]
    return Gs, [p.exp() for p in best_params[:K]], best
