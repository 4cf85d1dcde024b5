"""ECLipsE-Fast (Xu & Sivaranjani, NeurIPS 2024): a closed-form sequential bound for dense
chains, certified by the LipSDP-Neuron LMI test of :mod:`lipreg.functional.chain_lmi`.

Design note ``docs/design/issue9/eclipse.md`` (re-derived from the authors' code
``YuezhuXu/ECLipsE``; the PyPI ``eclipse-nn`` ≤ 0.1.5 has a layer-recurrence bug and must not be
used as a reference). Here the recursion is written for per-layer slopes ``[a_k, b_k]`` with
``a_k b_k ≥ 0`` (the "CF" form of ECLipsE-Gen-Local)::

    M_0 = I,   σ_k = (a_k + b_k)² λ_max(W_k M_{k−1}⁻¹ W_kᵀ),   λ_k = 2/σ_k,
    X_{k−1} = M_{k−1} + λ_k a_k b_k W_kᵀW_k,
    M_k = λ_k I − ¼ λ_k² (a_k + b_k)² W_k X_{k−1}⁻¹ W_kᵀ        (⪰ I/σ_k: never singular)
    Lip² ≤ ρ_E = λ_max(W_L M_{L−1}⁻¹ W_Lᵀ).

**Why it is a bound, and how it is certified.** Each stage is the Schur complement of a 2×2
block LMI; chaining them is exactly the block elimination of the LipSDP-Neuron LMI with the
scalar multipliers ``T_k = (ρ_E λ_k / 2) I``. So ECLipsE-Fast is a feasible point of that LMI
(checked numerically in the design note: ``ρ*(T_E) = ρ_E``), and the returned value is
:func:`~lipreg.functional.chain_lmi.certify_multipliers` of ``T_E``: a float64 proof with an
explicit rounding margin, not the closed form's own float output. The same ``T_E`` warm-starts
:func:`lipreg.functional.lipsdp.lipsdp_neuron`, which is therefore never looser.

With ``a_k b_k < 0`` (GELU/SiLU-like slopes) ``X_{k−1}`` can be indefinite; the closed form does
not apply and :func:`eclipse_fast` refuses (use ``lipsdp_neuron``, which handles any ``a ≤ b``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor

from lipreg.functional.chain_lmi import (
    DenseChain,
    SequenceCertificate,
    certify_multipliers,
    dense_chain,
    rho_star,
)

__all__ = ["eclipse_fast", "eclipse_fast_multipliers"]

_F64 = torch.float64


def eclipse_fast_multipliers(chain: DenseChain) -> tuple[float, list[Tensor]]:
    """The ECLipsE-Fast value ``ρ_E`` (uncertified float64) and the LipSDP-Neuron multipliers
    ``T_k = (ρ_E λ_k / 2) 1`` it corresponds to (module docstring).

    Raises:
        ValueError: a slope interval with ``a b < 0`` or ``a = b = 0``, or a weight with
            ``W_k M_{k−1}⁻¹ W_kᵀ = 0`` (a zero layer: the chain is constant).
    """
    ws, sl = chain.weights, chain.slopes
    for k, (a, b) in enumerate(sl):
        if a * b < 0 or a + b == 0:
            raise ValueError(
                f"ECLipsE-Fast needs slopes of one sign and not both zero; slopes[{k}] = "
                f"{(a, b)}. Use lipsdp_neuron, which handles any a <= b."
            )
    lams: list[float] = []
    chol_m: Tensor | None = None  # Cholesky factor of M_{k-1}; None means M_0 = I
    for k, W in enumerate(ws):
        Y = W.T if chol_m is None else torch.linalg.solve_triangular(chol_m, W.T, upper=False)
        K = Y.T @ Y  # W M^{-1} W^T
        sigma_max = float(torch.linalg.eigvalsh(0.5 * (K + K.T))[-1])
        if k == len(ws) - 1:
            rho = sigma_max
            break
        a, b = sl[k]
        sigma = (a + b) ** 2 * sigma_max
        if not sigma > 0:
            raise ValueError(f"weights[{k}] maps everything to zero: the chain is constant")
        lam = 2.0 / sigma
        if a * b != 0.0:
            M = torch.eye(W.shape[1], dtype=_F64) if chol_m is None else chol_m @ chol_m.T
            X = M + lam * a * b * (W.T @ W)
            Y = torch.linalg.solve_triangular(
                torch.linalg.cholesky(0.5 * (X + X.T)), W.T, upper=False
            )
            K = Y.T @ Y
        Mk = lam * torch.eye(W.shape[0], dtype=_F64) - 0.25 * lam**2 * (a + b) ** 2 * K
        chol_m = torch.linalg.cholesky(0.5 * (Mk + Mk.T))
        lams.append(lam)
    ts = [
        torch.full((W.shape[0],), 0.5 * rho * lam, dtype=_F64)
        for W, lam in zip(ws[:-1], lams, strict=True)
    ]
    return rho, ts


def eclipse_fast(
    weights: Sequence[Tensor], slopes: Sequence[tuple[float, float]]
) -> SequenceCertificate:
    """Certified ECLipsE-Fast bound of ``x ↦ W_L φ(… φ(W_1 x))`` (slopes ``a_k b_k ≥ 0``).

    Args:
        weights: ``out × in`` matrices of any float dtype (converted exactly to float64).
        slopes: One interval ``(a_k, b_k)`` per hidden layer (``len(weights) − 1``).

    Returns:
        A :class:`~lipreg.functional.chain_lmi.SequenceCertificate` with ``method
        "eclipse-fast"``, ``value`` the certified bound, ``estimate = √ρ_E`` and the
        multipliers ``T_E``.

    Raises:
        ValueError: invalid chain (see :func:`~lipreg.functional.chain_lmi.dense_chain`),
            ``a b < 0`` slopes, or (never observed: ``cond(M_k) ≤ 2``) a closed form whose
            multipliers fail the float64 certificate.
    """
    start = time.process_time()
    chain = dense_chain(weights, slopes)
    if len(chain.weights) == 1:
        rho, ts = rho_star(chain, [])[0], []
    else:
        rho, ts = eclipse_fast_multipliers(chain)
    value = certify_multipliers(chain, ts, rho_star(chain, ts)[0])
    if value is None:
        raise ValueError(
            "the ECLipsE-Fast multipliers did not pass the float64 LMI certificate (expected "
            "never to happen); use lipsdp_neuron, which falls back to product-of-norms multipliers"
        )
    return SequenceCertificate(
        value=value,
        method="eclipse-fast",
        multipliers=tuple(ts),
        estimate=rho**0.5,
        seconds=time.process_time() - start,
    )
