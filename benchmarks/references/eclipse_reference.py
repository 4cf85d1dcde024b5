"""ECLipsE-Fast (Xu & Sivaranjani, NeurIPS 2024, arXiv 2404.04375), re-derived in numpy.

Not the PyPI package ``eclipse-nn``: its releases ≤ 0.1.5 reset the layer recurrence to the
identity at stage 2 (``i > 1`` instead of ``i > 0``), which on ≥ 2 hidden layers returns the
value of the network without its first layer — not a bound (see
``docs/design/issue9/eclipse.md``). The package is not used here at all.

**Recursion** (uniform slope ``[a, b]`` per hidden layer, ``ab ≥ 0``; ``M_0 = I``)::

    σ_i   = λ_max((a+b)² W_i M_{i-1}⁻¹ W_iᵀ),        λ_i = 2 / σ_i
    X     = M_{i-1} + λ_i a b W_iᵀ W_i
    M_i   = λ_i I − ¼ λ_i² (a+b)² W_i X⁻¹ W_iᵀ
    L     = √λ_max(W_L M_{L-1}⁻¹ W_Lᵀ)

(ReLU: ``a = 0, b = 1``, ``λ_i = 2/σ_i``, ``M_i = λ_i I − ¼λ_i² W_i M_{i-1}⁻¹ W_iᵀ``.)
**Why it is a bound:** the stage matrices ``[[M_{i-1} + ab WᵀΛW, −½(a+b)WᵀΛ], [−½(a+b)ΛW,
Λ − M_i]]`` are PSD (their Schur complement is zero by construction), so with ``Δv_0 = Δx``
and ``Λ_i = λ_i I`` the slope constraints give ``Δv_{i-1}ᵀM_{i-1}Δv_{i-1} ≥ Δv_iᵀM_iΔv_i``,
and ``ρM_{L-1} ⪰ W_LᵀW_L`` closes the chain. Equivalently, ``T_k = (ρ λ_k / 2) I`` is a
feasible point of the LipSDP-Neuron LMI with ``ρ = L²``, which is how
:func:`eclipse_fast_reference` *verifies* its value (:mod:`references.lipsdp_lmi`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from references.lipsdp_lmi import Slopes, VerifiedRho, verified_rho


@dataclass
class EclipseFast:
    """ECLipsE-Fast of a chain: ``value`` (float64 closed form, not verified), the scalar
    multipliers ``lambdas`` and ``verified`` (the same multipliers re-checked as a
    LipSDP-Neuron point with an explicit rounding margin)."""

    value: float
    lambdas: list[float]
    verified: VerifiedRho


def _lambda_max_sym(a: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(0.5 * (a + a.T))[-1])


def eclipse_fast_value(weights: Sequence[np.ndarray], slopes: Slopes) -> tuple[float, list[float]]:
    """The closed form above: ``(L, [λ_1, …, λ_{L-1}])``, float64, no verification."""
    if len(slopes) != len(weights) - 1:
        raise ValueError(f"{len(weights)} weights need {len(weights) - 1} slope pairs")
    m_inv_wt = None  # M_{i-1}⁻¹ W_iᵀ; M_0 = I, so the first stage needs no solve
    m = np.eye(weights[0].shape[1])
    lambdas: list[float] = []
    for w, (a, b) in zip(weights[:-1], slopes, strict=True):
        if a * b < 0:
            raise ValueError(f"ECLipsE-Fast needs a·b ≥ 0 (got slopes [{a}, {b}])")
        m_inv_wt = w.T if not lambdas else np.linalg.solve(m, w.T)
        sigma = (a + b) ** 2 * _lambda_max_sym(w @ m_inv_wt)
        if not sigma > 0:
            raise ValueError("ECLipsE-Fast: a zero layer (σ = 0) has no finite multiplier")
        lam = 2.0 / sigma
        # X = M_{i-1} + λ ab WᵀW; for ab = 0 it is M_{i-1}, so reuse the solve above
        x_inv_wt = m_inv_wt if a * b == 0.0 else np.linalg.solve(m + lam * a * b * (w.T @ w), w.T)
        k = w @ x_inv_wt
        m = lam * np.eye(w.shape[0]) - 0.25 * lam**2 * (a + b) ** 2 * k
        m = 0.5 * (m + m.T)
        lambdas.append(lam)
    w_last = weights[-1]
    rho = _lambda_max_sym(w_last @ np.linalg.solve(m, w_last.T))
    return math.sqrt(rho), lambdas


def eclipse_fast_reference(weights: Sequence[np.ndarray], slopes: Slopes) -> EclipseFast:
    """ECLipsE-Fast value and its verification as the LipSDP-Neuron point
    ``T_k = (ρ λ_k / 2) I``, ``ρ = L²``; the verified value is ``≥`` the true constant."""
    weights = [np.asarray(w, dtype=np.float64) for w in weights]
    value, lambdas = eclipse_fast_value(weights, slopes)
    rho = value * value
    t = [np.full(w.shape[0], rho * lam / 2.0) for w, lam in zip(weights, lambdas, strict=False)]
    return EclipseFast(value, lambdas, verified_rho(weights, slopes, t, rho))
