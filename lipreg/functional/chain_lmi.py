"""The LipSDP-Neuron LMI of a dense chain: validation, its value function, and its certificate.

Shared by :mod:`lipreg.functional.lipsdp` (optimised multipliers) and
:mod:`lipreg.functional.eclipse` (closed-form multipliers); design note
``docs/design/issue9/lipsdp_first_order.md``.

**Setting.** ``f(x) = W_L φ_{L−1}(W_{L−1} ⋯ φ_1(W_1 x))`` with ``W_k`` of shape ``n_k × n_{k−1}``
and every scalar ``φ_k`` slope-restricted in ``[a_k, b_k]`` (``a_k ≤ b_k``, any signs). Biases
do not matter. With diagonal ``T_k = diag(t_k) ⪰ 0``, ``s_k = a_k + b_k``, ``p_k = a_k b_k``,
the symmetric block-tridiagonal matrix over ``(x_0, …, x_{L−1})``::

    P_00 = ρ I + 2p_1 W_1ᵀT_1W_1          P_kk = 2T_k + 2p_{k+1} W_{k+1}ᵀT_{k+1}W_{k+1}
    P_{L−1,L−1} gets − W_LᵀW_L            P_{k,k−1} = −s_k T_k W_k

**Theorem** (Fazlyab et al., NeurIPS 2019, Thm 2). If ``P(T, ρ) ⪰ 0`` then
``‖W_L D_{L−1} W_{L−1} ⋯ D_1 W_1‖_2 ≤ √ρ`` for all diagonal ``D_k`` with entries in
``[a_k, b_k]``, hence ``Lip_2(f) ≤ √ρ`` for every such ``φ``. *Proof:* the quadratic form at
``(Δx_0, …, Δx_{L−1})`` is ``ρ‖Δx_0‖² − ‖W_LΔx_{L−1}‖² − Σ_{k,i} t_{k,i} · 2(Δv − a Δz)(b Δz −
Δv)`` and each neuron term is ``≥ 0`` by the slope restriction.

**Value function.** ``ρ*(T) = min{ρ : P(T, ρ) ⪰ 0}`` by eliminating blocks from the output
side: ``S_{L−1} = 2T_{L−1} − W_LᵀW_L``, ``S_{k−1} = 2T_{k−1} + 2p_k W_kᵀT_kW_k − s_k² W_kᵀT_k
S_k⁻¹T_kW_k`` (each must be ``≻ 0``), ``ρ* = λ_max(s_1² W_1ᵀT_1S_1⁻¹T_1W_1 − 2p_1 W_1ᵀT_1W_1)``.
It is convex in ``T``; its gradient (a subgradient at multiple ``λ_max``) comes from the null
vector ``z`` of ``P(T, ρ*)`` (``‖z_0‖ = 1``, ``y_k = W_k z_{k−1}``, ``z_k = s_k S_k⁻¹T_k y_k``):
``∂ρ*/∂t_{k,i} = −2 (z_{k,i} − a_k y_{k,i})(z_{k,i} − b_k y_{k,i})`` (envelope theorem).

**Certificate** (:func:`certify_multipliers`): the blocks are formed in float64 from the given
float64 multipliers (taken as exact data) with an entrywise rounding radius, and
:func:`lipreg.functional.lmi.certify_block_tridiagonal_psd` proves ``P(T, ρ_c) ≻ 0`` for the
smallest tried ``ρ_c = ρ̂ (1 + δ)``. Nothing the optimiser did is trusted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lipreg.functional.lmi import (
    ETA,
    certify_block_tridiagonal_psd,
    gamma,
    product_radius,
    sqrt_up,
)

__all__ = [
    "DenseChain",
    "SequenceCertificate",
    "certify_multipliers",
    "dense_chain",
    "eliminate",
    "lipsdp_value",
    "norm_multipliers",
    "reduced_first",
    "rho_star",
    "smoothed_rho_star",
]

_F64 = torch.float64


@dataclass(frozen=True)
class SequenceCertificate:
    """A certified upper bound on the Lipschitz constant of a dense chain.

    Attributes:
        value: Certified upper bound on ``Lip_2(x ↦ W_m φ(… φ(W_1 x)))`` for every ``φ`` with
            slopes in ``[a_i, b_i]`` (also on ``‖W_m D ⋯ D W_1‖`` for every diagonal pattern
            ``D`` with entries in ``[a_i, b_i]``).
        method: What produced the multipliers that were certified (``"lipsdp-neuron"``,
            ``"eclipse-fast"``, ``"lipsdp-neuron (fallback: eclipse-fast)"``, ...).
        multipliers: The float64 diagonal multipliers ``t_k`` per hidden layer that were
            certified (a warm start for the next call).
        estimate: The optimiser's own (uncertified) value ``√ρ*(T)``.
        seconds: CPU time of the call (``time.process_time``).
        steps: Optimiser iterations (0 for closed forms).
    """

    value: float
    method: str
    multipliers: tuple[Tensor, ...]
    estimate: float
    seconds: float
    steps: int = 0


@dataclass(frozen=True)
class DenseChain:
    """A validated dense chain: float64 CPU weights and one slope interval per hidden layer.

    ``reduced_first`` is ``W_1`` itself, or ``Rᵀ`` from ``W_1ᵀ = QR`` when ``n_0 > n_1``
    (``W_1ᵀGW_1 = Q RGRᵀ Qᵀ`` has the same non-zero spectrum: an ``n_1 × n_1`` eigenproblem).
    It is used only by the (uncertified) value function, never by the certificate.
    """

    weights: tuple[Tensor, ...]
    slopes: tuple[tuple[float, float], ...]
    reduced_first: Tensor

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        """``(n_1, …, n_{L−1})``: the sizes of the multipliers."""
        return tuple(int(W.shape[0]) for W in self.weights[:-1])


def dense_chain(weights: Sequence[Tensor], slopes: Sequence[tuple[float, float]]) -> DenseChain:
    """Validate and convert a chain (``out × in`` weights of any float dtype; exact in float64).

    Raises:
        ValueError: no weights, a non-2-D or non-finite weight, shapes that do not chain,
            ``len(slopes) != len(weights) − 1``, or a slope interval that is not finite with
            ``a ≤ b``.
        TypeError: a non-floating weight.
    """
    if len(weights) == 0:
        raise ValueError("a dense chain needs at least one weight matrix")
    ws: list[Tensor] = []
    for i, W in enumerate(weights):
        if not isinstance(W, Tensor) or not W.is_floating_point():
            raise TypeError(f"weights[{i}] must be a floating-point tensor, got {type(W)}")
        if W.dim() != 2 or 0 in W.shape:
            raise ValueError(f"weights[{i}] must be a non-empty out x in matrix, got {W.shape}")
        W64 = W.detach().to(device="cpu", dtype=_F64)  # exact from every float dtype
        if not bool(torch.isfinite(W64).all()):
            raise ValueError(f"weights[{i}] has non-finite entries")
        if ws and ws[-1].shape[0] != W64.shape[1]:
            raise ValueError(
                f"weights do not chain: weights[{i - 1}] has {ws[-1].shape[0]} outputs but "
                f"weights[{i}] has {W64.shape[1]} inputs (weights are out x in)"
            )
        ws.append(W64)
    if len(slopes) != len(ws) - 1:
        raise ValueError(
            f"need one slope interval per hidden layer: {len(ws) - 1} for {len(ws)} weights, "
            f"got {len(slopes)}"
        )
    sl: list[tuple[float, float]] = []
    for i, pair in enumerate(slopes):
        a, b = (float(v) for v in pair)
        if not (math.isfinite(a) and math.isfinite(b) and a <= b):
            raise ValueError(f"slopes[{i}] must be a finite interval (a, b) with a <= b: {pair}")
        sl.append((a, b))
    return DenseChain(tuple(ws), tuple(sl), reduced_first(ws))


def norm_multipliers(chain: DenseChain, theta: float = 1.0) -> list[Tensor]:
    """Scalar multipliers ``t_k = τ_k 1`` that are feasible for any slopes (a product-of-norms
    start), keeping ``S_k ⪰ θ τ_k I`` with ``0 < θ < 2``.

    Backwards: if ``S_k ⪰ θτ_k I`` then ``S_{k−1} ⪰ (2τ_{k−1} − c_k) I`` with ``c_k = (2
    max(−p_k, 0) τ_k + s_k² τ_k / θ) ‖W_k‖²``, so ``τ_{k−1} = c_k / (2 − θ)`` keeps ``S_{k−1} ⪰
    θτ_{k−1} I``; ``τ_{L−1} = ‖W_L‖² / (2 − θ)``. ``θ = 1`` reproduces ``Π ‖W_k‖`` for ReLU;
    a small ``θ`` reproduces it when ``a_k + b_k = 0`` (e.g. slopes ``[−1, 1]``). Norms are
    inflated by 1e-4 so the start is strictly feasible despite their rounding.
    """
    if not 0.0 < theta < 2.0:
        raise ValueError(f"theta must be in (0, 2), got {theta}")
    ws = chain.weights
    ts: list[Tensor] = [torch.empty(0)] * (len(ws) - 1)
    tau = float(torch.linalg.matrix_norm(ws[-1], 2)) ** 2 * 1.0001 / (2.0 - theta)
    for k in range(len(ws) - 1, 0, -1):
        ts[k - 1] = torch.full((ws[k - 1].shape[0],), max(tau, 1e-300), dtype=_F64)
        a, b = chain.slopes[k - 1]
        factor = 2.0 * max(-a * b, 0.0) + (a + b) ** 2 / theta
        tau = factor * tau * float(torch.linalg.matrix_norm(ws[k - 1], 2)) ** 2 * 1.0001
        tau /= 2.0 - theta
    return ts


def _check_multipliers(chain: DenseChain, ts: Sequence[Tensor]) -> list[Tensor]:
    sizes = chain.hidden_sizes
    if len(ts) != len(sizes):
        raise ValueError(f"need {len(sizes)} multiplier vectors, got {len(ts)}")
    out = []
    for k, (t, n) in enumerate(zip(ts, sizes, strict=True)):
        t64 = t.detach().to(device="cpu", dtype=_F64).reshape(-1)
        if t64.numel() != n:
            raise ValueError(f"multipliers[{k}] must have {n} entries, got {t64.numel()}")
        out.append(t64)
    return out


def rho_star(
    chain: DenseChain, ts: Sequence[Tensor], *, gradient: bool = False
) -> tuple[float, list[Tensor] | None]:
    """``ρ*(T)`` (module docstring) and, if asked, ``∂ρ*/∂t_k`` per hidden layer.

    Returns ``(inf, None)`` when ``T`` is outside the domain (a Schur complement ``S_k`` is not
    positive definite, or a ``t`` is not positive and finite). Float64, not certified.
    """
    rho, _, grads = smoothed_rho_star(chain, ts, 0.0, gradient=gradient)
    return rho, grads


def smoothed_rho_star(
    chain: DenseChain, ts: Sequence[Tensor], mu: float, *, gradient: bool = True
) -> tuple[float, float, list[Tensor] | None]:
    """``(ρ*(T), f_μ(T), ∇f_μ)`` with the log-sum-exp smoothing of the top eigenvalue.

    ``ρ*(T) = λ_1`` of ``M(T) = s_1² W_1ᵀT_1S_1⁻¹T_1W_1 − 2p_1W_1ᵀT_1W_1``;
    ``f_μ = λ_1 + μ log Σ_i exp((λ_i − λ_1)/μ)`` (``λ_1 ≤ f_μ ≤ λ_1 + μ log n``, smooth where
    ``λ_max`` is not; ``μ = 0`` gives ``f = ρ*``). Each ``λ_i`` has gradient ``−q(z(v_i))`` with
    ``z(v)`` the back-substitution of the eigenvector ``v`` (the envelope argument of the module
    docstring holds for any ``v``), and ``∇f_μ = Σ_i softmax_i · ∇λ_i``. Outside the domain:
    ``(inf, inf, None)``. Float64, not certified.
    """
    ws, sl = chain.weights, chain.slopes
    if len(ws) == 1:
        rho = float(torch.linalg.eigvalsh(ws[0].T @ ws[0])[-1])
        return rho, rho, []
    ts = _check_multipliers(chain, ts)
    allt = torch.cat(ts)
    if not bool((allt > 0).all() and torch.isfinite(allt).all()):
        return math.inf, math.inf, None
    eliminated = eliminate(ws, chain.reduced_first, sl, ts)
    if eliminated is None:
        return math.inf, math.inf, None
    S, factors = eliminated
    if not gradient:
        top = float(torch.linalg.eigvalsh(0.5 * (S + S.T))[-1])
        return max(top, 0.0), max(top, 0.0), None
    evals, evecs = torch.linalg.eigh(0.5 * (S + S.T))
    top = float(evals[-1])
    if mu > 0:
        e = torch.exp((evals - top) / mu)  # ascending; the top one is 1
        total = float(e.sum())
        m = int((e > 1e-12).sum())  # eigenvalues that matter: the last m (slices are cheap)
        w, Z = e[-m:] / total, evecs[:, -m:]
        f = top + mu * math.log(total)
    else:
        w, Z, f = evals.new_ones(1), evecs[:, -1:], top
    grads: list[Tensor] = []
    for k in range(1, len(ws)):
        (a, b), t = sl[k - 1], ts[k - 1]
        Yk = (ws[k - 1] if k >= 2 else chain.reduced_first) @ Z
        Z = (a + b) * torch.cholesky_solve(t[:, None] * Yk, factors[k - 1])
        grads.append(-2.0 * ((Z - a * Yk) * (Z - b * Yk)) @ w)
    return max(top, 0.0), f, grads


def reduced_first(weights: Sequence[Tensor]) -> Tensor:
    """``W_1``, or ``Rᵀ`` from ``W_1ᵀ = QR`` when ``W_1`` is wide (``n_0 > n_1``, chains of
    two or more layers): ``W_1ᵀGW_1 = Q(RGRᵀ)Qᵀ`` has the spectrum of ``RGRᵀ`` plus zeros, so
    the top eigenvalue is an ``n_1 × n_1`` problem. Differentiable."""
    first = weights[0]
    if len(weights) > 1 and first.shape[1] > first.shape[0]:
        first = torch.linalg.qr(first.T, mode="reduced").R.T
    return first


def eliminate(
    weights: Sequence[Tensor],
    first: Tensor,
    slopes: Sequence[tuple[float, float]],
    ts: Sequence[Tensor],
) -> tuple[Tensor, list[Tensor]] | None:
    """The block elimination of the module docstring, from the output side: returns
    ``M = s_1² F_1ᵀT_1S_1⁻¹T_1F_1 − 2p_1 F_1ᵀT_1F_1`` (so ``ρ*(T) = λ_max(M)``) and the Cholesky
    factors of ``S_{L−1}, …, S_1`` (by hidden layer), or ``None`` when some ``S_k`` is not
    positive definite. ``F_1`` is ``first``: ``W_1`` or any ``F`` with ``FᵀGF`` and
    ``W_1ᵀGW_1`` of equal spectra. Plain torch operations: differentiable in the weights and
    multipliers (:func:`lipsdp_value` uses that), float64 or not as given. Not certified.
    """
    S = torch.diag(2.0 * ts[-1]) - weights[-1].T @ weights[-1]
    factors: list[Tensor] = [torch.empty(0)] * len(ts)
    for k in range(len(weights) - 1, 0, -1):  # hidden layer k (1-based), multipliers ts[k-1]
        C, info = torch.linalg.cholesky_ex(S)
        if int(info) != 0:
            return None
        factors[k - 1] = C
        (a, b), t = slopes[k - 1], ts[k - 1]
        Wk = weights[k - 1] if k >= 2 else first
        TW = t[:, None] * Wk
        Y = torch.linalg.solve_triangular(C, (a + b) * TW, upper=False)
        S = Y.T @ Y
        if a * b != 0.0:
            S = S - 2.0 * a * b * (Wk.T @ TW)
        if k >= 2:
            S = torch.diag(2.0 * ts[k - 2]) - S
    return S, factors


def lipsdp_value(
    weights: Sequence[Tensor], slopes: Sequence[tuple[float, float]], ts: Sequence[Tensor]
) -> Tensor | None:
    """``√ρ*(T)`` for FIXED multipliers ``ts`` as a differentiable function of the weights (a
    training penalty: :class:`lipreg.LipschitzPenalty` with ``method="lipsdp"``). At the
    weights where ``ts`` was certified it is the certified bound up to rounding; elsewhere it
    is ``√ρ*(T)`` of the new weights — still an upper bound of the exact-arithmetic Lipschitz
    constant while every ``S_k ≻ 0`` (the theorem holds for any feasible ``T``), but not
    checked in float64 (not a certificate). ``None`` when ``T`` is infeasible for these
    weights (some ``S_k`` not positive definite): refresh the multipliers.
    """
    ws = list(weights)
    first = reduced_first(ws)
    ts = [t.detach().to(dtype=first.dtype, device=first.device) for t in ts]
    if len(ws) == 1:
        return torch.linalg.matrix_norm(first, 2)
    eliminated = eliminate(ws, first, slopes, ts)
    if eliminated is None:
        return None
    M = eliminated[0]
    return torch.linalg.eigvalsh(0.5 * (M + M.T))[-1].clamp_min(0).sqrt()


def _symmetric(G: Tensor) -> Tensor:
    """Both triangles from the upper one: exactly symmetric (the exact matrix is symmetric)."""
    return torch.triu(G) + torch.triu(G, 1).T


def _lmi_blocks(
    chain: DenseChain, ts: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Float64 blocks of ``P(T, 0)`` and entrywise bounds on their formation errors.

    The certified matrix is the one with the *exact* coefficients ``a_k + b_k`` and ``2a_kb_k``
    of the given float64 slopes; their float64 rounding is part of the radii (``u = 2⁻⁵³``):

    * sub-diagonal: ``fl(a_k + b_k)``, ``fl(T_kW_k)`` and ``fl(−s_k · T_kW_k)`` are three
      roundings, so the radius is ``γ_4 |block| + 4η``;
    * a Gram term ``Ĝ = fl(Wᵀ fl(TW))`` is within ``product_radius(Wᵀ, TW)`` of ``WᵀTW`` for
      the gemm, plus ``u|W|ᵀ|TW|`` for the first rounding: twice ``product_radius`` covers both;
    * scaling by ``fl(2p)`` and each block addition add ``γ_1`` of the result:
      ``γ_3(|2pĜ| + |Ĝ_L| + |D̂|)`` covers them.

    The upper triangle of every Gram matrix is mirrored (the exact matrices are symmetric), and
    its radius is the entrywise maximum of the radius and its transpose.
    """
    ws, sl = chain.weights, chain.slopes
    L = len(ws)
    sizes = [ws[0].shape[1], *chain.hidden_sizes]
    diag = [torch.zeros(n, n, dtype=_F64) for n in sizes]
    rdiag = [torch.zeros(n, n, dtype=_F64) for n in sizes]
    lower, rlower = [], []
    for k in range(1, L):
        (a, b), t, W = sl[k - 1], ts[k - 1], ws[k - 1]
        TW = t[:, None] * W
        B = -(a + b) * TW
        lower.append(B)
        rlower.append(gamma(4) * B.abs() + 4.0 * ETA)
        diag[k] += torch.diag(2.0 * t)
        if a * b != 0.0:
            G = 2.0 * a * b * _symmetric(W.T @ TW)
            R = 2.0 * product_radius(W.T, TW)
            diag[k - 1] += G
            rdiag[k - 1] += abs(2.0 * a * b) * torch.maximum(R, R.T) + gamma(3) * G.abs()
    GL = _symmetric(ws[-1].T @ ws[-1])
    RL = product_radius(ws[-1].T, ws[-1])
    diag[-1] -= GL
    rdiag[-1] += torch.maximum(RL, RL.T) + gamma(3) * GL.abs()
    for k in range(L):
        rdiag[k] += gamma(3) * diag[k].abs()
    return diag, lower, rdiag, rlower


def certify_multipliers(
    chain: DenseChain,
    ts: Sequence[Tensor],
    rho_hat: float | None = None,
    *,
    max_inflation: float = 1e-3,
) -> float | None:
    """Certified ``√ρ_c`` with ``P(T, ρ_c) ≻ 0`` proved in float64, or ``None``.

    Tries ``ρ_c = ρ̂ (1 + δ)`` for ``δ = 1e-13, 4e-13, …`` up to ``max_inflation``; the first
    ``ρ_c`` whose LMI passes :func:`~lipreg.functional.lmi.certify_block_tridiagonal_psd` (with
    the radii of :func:`_lmi_blocks`; ``ρ I`` is exact) is returned as ``sqrt_up(ρ_c)``.
    ``None`` when no tried ``ρ_c`` passes: typically the lower Schur complements have less
    margin than the rounding shift (raising ``ρ`` cannot help); blend ``T`` towards a
    strictly feasible point and retry.

    Args:
        chain: The validated chain.
        ts: Positive multipliers per hidden layer (any float dtype; their float64 values are the
            certified data).
        rho_hat: Starting value (``ρ*(T)`` is computed if ``None``).
    """
    ts = _check_multipliers(chain, ts)
    if not all(bool((t >= 0).all() and torch.isfinite(t).all()) for t in ts):
        return None
    if rho_hat is None:
        rho_hat, _ = rho_star(chain, ts)
    if not math.isfinite(rho_hat):
        return None
    diag, lower, rdiag, rlower = _lmi_blocks(chain, ts)
    n0 = diag[0].shape[0]
    # first block exactly ρI (p_1 = 0, hidden layers): pass it as a vector, radius 0
    rho_only = len(chain.weights) > 1 and not bool(diag[0].any()) and not bool(rdiag[0].any())
    base = rho_hat if rho_hat > 0 else 1e-300
    delta = 1e-13
    while delta <= max_inflation:
        rho_c = base * (1.0 + delta)
        if rho_only:
            d0, r0 = torch.full((n0,), rho_c, dtype=_F64), torch.zeros(n0, dtype=_F64)
        else:
            d0 = diag[0] + rho_c * torch.eye(n0, dtype=_F64)
            r0 = rdiag[0] + gamma(1) * d0.abs()  # the addition of ρI
        if certify_block_tridiagonal_psd([d0, *diag[1:]], lower, [r0, *rdiag[1:]], rlower):
            return sqrt_up(rho_c)
        delta *= 4.0
    return None
