"""Certified LipSDP-Neuron for dense chains, optimised in PyTorch and proved in float64.

Issue 9, item 1; design note ``docs/design/issue9/lipsdp_first_order.md`` §2a/§3/§7. The LMI,
its value function ``ρ*(T)`` and the certificate are in :mod:`lipreg.functional.chain_lmi`.

**Algorithm.**

1. Starts: the ECLipsE-Fast multipliers ``T_E`` (when every ``a_k b_k ≥ 0``), product-of-norms
   multipliers (always feasible, three margins) and the caller's ``warm`` multipliers; the one
   with the smallest ``ρ*`` is the start ``T_0`` (the fallback and the blend target below).
2. Optimisation. On small LMIs (side ``N ≤ 400``) a primal-dual interior-point method on the
   SDP ``min ρ s.t. P(T, ρ) ⪰ 0, T ≥ 0``
   (:func:`~lipreg.functional.lipsdp_ipm.interior_point_multipliers`), from the warm start if
   it is ``T_0``, else from the best-centred product-of-norms start (``θ = 1``): it reaches
   the optimum to the relative gap ``tol`` in 7–15 Newton steps on the benchmark MLPs where
   L-BFGS stalled (9 % above cvxpy's optimum on the paper's 2-20-20-20-20-1 MLP: ``ρ*`` has
   a multiple top eigenvalue at the optimum). Measured at ``N = 300``: 13 steps, 0.6 s, vs
   0.4 s for L-BFGS 1e-4 looser. On larger LMIs, or if that method breaks down: L-BFGS on
   ``θ = log t`` minimising ``log f_μ(e^θ)``, where ``f_μ ≥ ρ*`` is the
   log-sum-exp smoothing of the top eigenvalue (``ρ*`` is convex in ``t`` but not smooth where
   ``λ_max`` is multiple, which stalls quasi-Newton steps), with ``μ = 1e-3 ρ`` then
   ``1e-5 ρ``; the point with the smallest true ``ρ*`` is kept. Few variables (``Σ n_k``).
   The gradient is the closed form of ``chain_lmi`` (null vectors of the LMI, one Cholesky per
   layer: linear in depth, no autograd). Points outside the domain (a Schur complement not
   positive definite) have value ``+∞`` and the backtracking line search retreats from them.
   A stage stops when ``log f_μ`` improves by less than ``max(tol, μ/(10ρ))`` over 5
   iterations (a relative improvement), or when ``max_steps`` (over all stages) is reached.
3. Certificate: :func:`~lipreg.functional.chain_lmi.certify_multipliers` of the best ``T``. If
   it fails (the optimum sits too close to the domain boundary for the rounding margin), ``T``
   is blended towards the start, ``(1 − s)T + sT_0`` for ``s = 1e-6, 1e-4, 1e-2, 0.1, 0.5``
   (``ρ*`` is convex, so the blend loses at most ``s`` of the gap), and the label says so.
4. The result is the smallest *certified* value among the optimised ``T`` and ``T_E``: never
   looser than :func:`lipreg.functional.eclipse.eclipse_fast` (same certificate, same ``T_E``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from lipreg.functional.chain_lmi import (
    DenseChain,
    SequenceCertificate,
    certify_multipliers,
    dense_chain,
    norm_multipliers,
    rho_star,
    smoothed_rho_star,
)
from lipreg.functional.eclipse import eclipse_fast_multipliers
from lipreg.functional.lipsdp_ipm import interior_point_multipliers

__all__ = ["SequenceCertificate", "lipsdp_neuron"]

_THETAS = (1.0, 0.1, 1e-3)  # margins of the product-of-norms starts
_BLENDS = (1e-6, 1e-4, 1e-2, 0.1, 0.5)
_MEMORY = 10  # L-BFGS pairs
_WINDOW = 5  # iterations over which the relative improvement is measured
_DENSE_SIDE = 400  # largest LMI side given to the dense interior-point method (N³ per step)
_IPM_MAX_STEPS = 100  # worst-case bound on its time (measured: 7-31 steps on every test net)
_COLD_SLACK, _WARM_SLACK = 1.5, 1.02  # the interior-point method's first ρ, relative to ρ*(T_0)
_SMOOTHING = (1e-3, 1e-5)  # log-sum-exp temperatures, relative to ρ (measured: 4 stages
# 1e-3..1e-6 are 20 % slower for the same values on the benchmark MLPs)


def _objective(
    chain: DenseChain, sizes: list[int], x: Tensor, mu: float
) -> tuple[float, float, Tensor | None]:
    """``(ρ*, log f_μ, ∇_x log f_μ)`` at ``t = e^x``; ``(inf, inf, None)`` outside the domain."""
    t = torch.exp(x)
    rho, f, grads = smoothed_rho_star(chain, list(torch.split(t, sizes)), mu)
    if not (math.isfinite(f) and f > 0) or grads is None:
        return math.inf, math.inf, None
    return rho, math.log(f), torch.cat(grads) * t / f


def _direction(g: Tensor, pairs: list[tuple[Tensor, Tensor, float]]) -> Tensor:
    """L-BFGS two-loop recursion: ``−H g`` from the stored ``(s, y, 1/yᵀs)``."""
    q = g.clone()
    alphas = []
    for s, y, r in reversed(pairs):
        alpha = r * float(s @ q)
        q -= alpha * y
        alphas.append(alpha)
    if pairs:
        s, y, _ = pairs[-1]
        q *= float(s @ y) / float(y @ y)
    for (s, y, r), alpha in zip(pairs, reversed(alphas), strict=True):
        q += (alpha - r * float(y @ q)) * s
    return -q


class _Best:
    """The point with the smallest true ``ρ*`` evaluated so far."""

    def __init__(self, rho: float, x: Tensor) -> None:
        self.rho, self.x = rho, x

    def offer(self, rho: float, x: Tensor) -> None:
        if rho < self.rho:
            self.rho, self.x = rho, x


def _lbfgs(
    chain: DenseChain, x: Tensor, mu: float, budget: int, tol: float, best: _Best
) -> tuple[Tensor, int]:
    """L-BFGS on ``log f_μ(e^x)`` from a feasible ``x``; returns the last iterate and the
    number of iterations. Stops when ``log f_μ`` improves by less than ``tol`` over
    ``_WINDOW`` iterations, when the line search fails along ``−∇``, or after ``budget``."""
    sizes = [int(n) for n in chain.hidden_sizes]
    rho, fx, g = _objective(chain, sizes, x, mu)
    assert g is not None  # x is feasible
    best.offer(rho, x)
    pairs: list[tuple[Tensor, Tensor, float]] = []
    history = [fx]
    steps = 0
    while steps < budget:
        steps += 1
        d = _direction(g, pairs)
        slope = float(g @ d)
        if not slope < 0:
            pairs, d = [], -g
            slope = float(g @ d)
        step = 1.0 if pairs else min(1.0, 0.5 / max(float(d.abs().max()), 1e-300))
        for _ in range(40):
            rho, fn, gn = _objective(chain, sizes, x + step * d, mu)
            if gn is not None and fn <= fx + 1e-4 * step * slope:
                break
            step *= 0.5 if gn is not None else 0.2
        else:
            if not pairs:
                break  # no descent even along −∇: converged to machine precision
            pairs = []
            continue
        sv, yv = step * d, gn - g
        sy = float(sv @ yv)
        if sy > 1e-12 * float(sv @ sv) ** 0.5 * float(yv @ yv) ** 0.5:
            pairs = [*pairs[-(_MEMORY - 1) :], (sv, yv, 1.0 / sy)]
        x, fx, g = x + sv, fn, gn
        best.offer(rho, x)
        history.append(fx)
        if len(history) > _WINDOW and history[-_WINDOW - 1] - fx < tol:
            break
    return x, steps


def _minimise(
    chain: DenseChain,
    start: list[Tensor],
    max_steps: int,
    tol: float,
    smoothing: tuple[float, ...] = _SMOOTHING,
) -> tuple[list[Tensor], int]:
    """Continuation over the smoothing ``μ = ρ · (1e-3, 1e-5)``; each stage is an
    L-BFGS run warm-started from the previous one. Returns the best ``t`` (true ``ρ*``)."""
    x = torch.log(torch.cat(start))
    best = _Best(math.inf, x)
    total = 0
    for rel in smoothing:
        rho = rho_star(chain, list(torch.split(torch.exp(x), list(chain.hidden_sizes))))[0]
        x, steps = _lbfgs(chain, x, rel * rho, max_steps - total, max(tol, 0.1 * rel), best)
        total += steps
        if total >= max_steps:
            break
    return list(torch.split(torch.exp(best.x), list(chain.hidden_sizes))), total


def _optimise(
    chain: DenseChain,
    cands: list[tuple[float, list[Tensor], str]],
    best: tuple[float, list[Tensor], str],
    max_steps: int,
    tol: float,
) -> tuple[list[Tensor], int]:
    """The interior-point method on small LMIs (side ``≤ _DENSE_SIDE``, every ``a_k < b_k``);
    L-BFGS from the best start otherwise, or (with a warning) if it broke down.

    The interior-point method starts from the warm start when it is the best candidate (near
    the optimum: its first ``ρ`` gets less slack, ``1.02 ρ*`` rather than ``1.5 ρ*``, 7 steps
    instead of 9 on FNN-3, fresh or after a weight update), otherwise from the uniform
    product-of-norms multipliers (``θ = 1``): better centred than the smaller-``ρ*``
    ECLipsE-Fast start (14–15 steps instead of 20–28 on the paper MLPs, 12 for both on FNN-3).
    """
    rho0, start, label = best
    side = min(chain.weights[0].shape) + sum(chain.hidden_sizes)
    # a = b (a linear layer): A_i = 2u_iu_iᵀ ⪰ 0, the optimum is at t_i → ∞ and the primal
    # SDP has no interior point, so the interior-point method breaks down (measured)
    if side <= _DENSE_SIDE and all(a < b for a, b in chain.slopes):
        if label == "warm":
            slack = _WARM_SLACK
        else:
            rho0, start, label = next(c for c in cands if c[2] == "product-of-norms")
            slack = _COLD_SLACK
        steps = min(max_steps, _IPM_MAX_STEPS)
        found = interior_point_multipliers(
            chain, start, rho0, max_steps=steps, gap=tol, slack=slack
        )
        if found is not None:
            return found
        warnings.warn(
            f"lipsdp_neuron: the interior-point method broke down (a Cholesky factorisation "
            f"or the Schur solve failed) on an LMI of side {side}; falling back to L-BFGS. "
            "The bound is still certified but may be looser (up to 9 % on deep nets); "
            "please report this network.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _minimise(chain, best[1], max_steps, tol)


def _starts(
    chain: DenseChain, warm: Sequence[Tensor] | None
) -> tuple[list[Tensor] | None, list[tuple[float, list[Tensor], str]]]:
    """Candidate starts ``(ρ*, T, label)`` and the ECLipsE-Fast multipliers (or ``None``)."""
    cands: list[tuple[float, list[Tensor], str]] = []
    eclipse_ts = None
    if all(a * b >= 0 and a + b != 0 for a, b in chain.slopes):
        _, eclipse_ts = eclipse_fast_multipliers(chain)
        cands.append((rho_star(chain, eclipse_ts)[0], eclipse_ts, "eclipse-fast"))
    for theta in _THETAS:
        norm_ts = norm_multipliers(chain, theta)
        cands.append((rho_star(chain, norm_ts)[0], norm_ts, "product-of-norms"))
    if warm is not None:
        sizes = chain.hidden_sizes
        if len(warm) != len(sizes) or any(
            w.numel() != n for w, n in zip(warm, sizes, strict=False)
        ):
            raise ValueError(
                f"warm multipliers must have sizes {sizes}, got {[w.numel() for w in warm]}"
            )
        warm_ts = [w.detach().to(device="cpu", dtype=torch.float64).reshape(-1) for w in warm]
        cands.append((rho_star(chain, warm_ts)[0], warm_ts, "warm"))
    return eclipse_ts, cands


def _certify_or_blend(
    chain: DenseChain, ts: list[Tensor], start: list[Tensor]
) -> tuple[float | None, list[Tensor], str]:
    """Certify ``ts``; if that fails, blend towards the (strictly feasible) start."""
    value = certify_multipliers(chain, ts)
    if value is not None:
        return value, ts, ""
    for s in _BLENDS:
        blend = [(1.0 - s) * t + s * t0 for t, t0 in zip(ts, start, strict=True)]
        value = certify_multipliers(chain, blend)
        if value is not None:
            return value, blend, f" (blended {s:g} towards the start to certify)"
    return None, ts, ""


def lipsdp_neuron(
    weights: Sequence[Tensor],
    slopes: Sequence[tuple[float, float]],
    *,
    warm: Sequence[Tensor] | None = None,
    max_steps: int = 500,
    tol: float = 1e-6,
) -> SequenceCertificate:
    """Certified LipSDP-Neuron bound of ``x ↦ W_L φ_{L−1}(… φ_1(W_1 x))`` (module docstring).

    The value bounds ``Lip_2`` for every activation with slopes in ``[a_k, b_k]`` (any signs,
    ``a_k ≤ b_k``), and also ``‖W_L D_{L−1} ⋯ D_1 W_1‖`` for every diagonal ``D_k`` with entries
    in ``[a_k, b_k]``. It is the smallest value that passed the float64 certificate, and never
    above the certified ECLipsE-Fast value when that applies (``a_k b_k ≥ 0``).

    Args:
        weights: ``out × in`` matrices of any float dtype (converted exactly to float64).
        slopes: One interval ``(a_k, b_k)`` per hidden layer (``len(weights) − 1``).
        warm: Multipliers of a previous call (``SequenceCertificate.multipliers``) to start
            from; used only if better than the built-in starts. A stale warm start can only
            cost tightness, never soundness.
        max_steps: Iteration cap (interior-point steps, or L-BFGS iterations).
        tol: Interior-point method: stop at this relative duality gap; L-BFGS: stop when
            ``ρ*`` improves by less than this relative amount over 5 iterations.

    Returns:
        A :class:`~lipreg.functional.chain_lmi.SequenceCertificate`; ``method`` is
        ``"lipsdp-neuron"`` (or ``"spectral-norm"`` for a single layer), with a suffix when a
        blend or a fallback produced the certified value.

    Raises:
        ValueError: invalid chain, slopes or warm multipliers; or no multipliers at all passed
            the certificate (never observed: the product-of-norms start is strictly feasible).
    """
    begin = time.process_time()
    chain = dense_chain(weights, slopes)
    if len(chain.weights) == 1:
        rho, _ = rho_star(chain, [])
        value = certify_multipliers(chain, [], rho)
        return _result(chain, value, "spectral-norm", [], rho, begin, 0)
    eclipse_ts, cands = _starts(chain, warm)
    rho0, start, label = min(cands, key=lambda c: c[0])
    if not math.isfinite(rho0):
        raise ValueError("no start is feasible (unexpected: the product-of-norms start is)")
    ts, steps = _optimise(chain, cands, (rho0, start, label), max_steps, tol)
    rho_opt = rho_star(chain, ts)[0]
    if not rho_opt <= rho0:
        ts, rho_opt = start, rho0
    value, ts, note = _certify_or_blend(chain, ts, start)
    method = "lipsdp-neuron" + note
    if eclipse_ts is not None and (value is None or value > rho_star(chain, eclipse_ts)[0] ** 0.5):
        fallback = certify_multipliers(chain, eclipse_ts)
        if fallback is not None and (value is None or fallback < value):
            value, ts = fallback, eclipse_ts
            method = "lipsdp-neuron (fallback: eclipse-fast, the optimum did not certify)"
    if value is None:
        value = certify_multipliers(chain, start)
        ts, method = start, f"lipsdp-neuron (fallback: {label} start, the optimum did not certify)"
    return _result(chain, value, method, ts, rho_opt, begin, steps)


def _result(
    chain: DenseChain,
    value: float | None,
    method: str,
    ts: list[Tensor],
    rho: float,
    begin: float,
    steps: int,
) -> SequenceCertificate:
    if value is None:
        raise ValueError(
            f"no multipliers passed the float64 LMI certificate for layer sizes "
            f"{[int(chain.weights[0].shape[1]), *chain.hidden_sizes]}; report this network"
        )
    return SequenceCertificate(
        value=value,
        method=method,
        multipliers=tuple(ts),
        estimate=math.sqrt(rho),
        seconds=time.process_time() - begin,
        steps=steps,
    )
