"""The LipSDP-Neuron LMI in float64 and a verification of any multipliers (no cvxpy).

Network ``f(x) = W_L φ(W_{L-1} ⋯ φ(W_1 x))``, ``W_k`` of shape ``n_k × n_{k-1}``, hidden layer
``k`` slope-restricted in ``[a_k, b_k]``. For diagonal ``T_k ⪰ 0`` the matrix (Fazlyab, Robey,
Hassani, Morari, Pappas, NeurIPS 2019, Thm 2, written as ``P = −M``; block-tridiagonal in
``(x_0, …, x_{L-1})``)::

    P_00        = ρ I + 2 a_1 b_1 W_1ᵀ T_1 W_1
    P_kk        = 2 T_k + 2 a_{k+1} b_{k+1} W_{k+1}ᵀ T_{k+1} W_{k+1}     (1 ≤ k ≤ L−2)
    P_{L-1,L-1} = 2 T_{L-1} − W_Lᵀ W_L
    P_{k,k-1}   = −(a_k + b_k) T_k W_k

satisfies ``P ⪰ 0 ⇒ ‖f(x) − f(y)‖ ≤ √ρ ‖x − y‖`` (sum the per-neuron quadratic constraints
``(Δv − aΔz)(bΔz − Δv) ≥ 0`` with weights ``t``). ``ρ`` appears only in ``P_00``, so with the
lower Schur complements ``S_{L-1} = P_{L-1,L-1}``, ``S_{k-1} = P_{k-1,k-1} − P_{k,k-1}ᵀ S_k⁻¹
P_{k,k-1}`` positive definite, the smallest ``ρ`` is ``ρ*(T) = λ_max(−S_0|_{ρ=0})``.

**Verification.** :func:`verify_lipsdp` forms ``P̂ = fl(P)`` and an entrywise bound on
``|P̂ − P|`` (Higham, ASNA §3.5: ``|fl(AB) − AB| ≤ γ_n |A||B|``), Jacobi-scales it and runs
LAPACK Cholesky on ``S − cI`` with Rump's margin (BIT 46 (2006), Thm 2.3 / Cor. 2.4):
success proves the *exact* ``P`` positive definite. :func:`verified_rho` raises ``ρ``
from a given start (a solver's value) until the test passes and reports by how much.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

U = 2.0**-53  # unit roundoff of float64

Slopes = Sequence[tuple[float, float]]


def gamma(k: int) -> float:
    """Higham's ``γ_k = k u / (1 − k u)``."""
    return k * U / (1.0 - k * U)


def _check_shapes(weights: Sequence[np.ndarray], slopes: Slopes, t: Sequence[np.ndarray]) -> None:
    if len(weights) < 2 or len(slopes) != len(weights) - 1 or len(t) != len(weights) - 1:
        raise ValueError(
            f"expected L ≥ 2 weights, L−1 slope pairs and L−1 multiplier vectors; got "
            f"{len(weights)}, {len(slopes)}, {len(t)}"
        )
    for k, (w, tk) in enumerate(zip(weights[:-1], t, strict=True)):
        if tk.shape != (w.shape[0],):
            raise ValueError(f"multipliers of layer {k + 1}: shape {tk.shape}, want {w.shape[:1]}")


def lmi_blocks(
    weights: Sequence[np.ndarray], slopes: Slopes, t: Sequence[np.ndarray], rho: float
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The diagonal blocks ``P_kk``, the sub-diagonal blocks ``P_{k,k-1}`` and entrywise
    bounds on their rounding errors (same layout), in float64.

    Error bounds: ``2ab WᵀTW`` and ``WᵀW`` as products of ``n``-term sums with a couple of
    extra roundings, ``γ_{n+4}`` times the product of absolute values; every block, once
    formed, another ``γ_3`` of its absolute value (the additions and scalings).
    """
    _check_shapes(weights, slopes, t)
    n_hidden = len(weights) - 1
    diag: list[np.ndarray] = []
    diag_err: list[np.ndarray] = []
    for k in range(n_hidden + 1):  # block k acts on x_k
        n_k = weights[0].shape[1] if k == 0 else weights[k - 1].shape[0]
        block = np.eye(n_k) * rho if k == 0 else np.diag(2.0 * t[k - 1])
        err = np.zeros((n_k, n_k))
        if k < n_hidden:
            a, b = slopes[k]
            w, tk = weights[k], t[k]
            if a * b != 0.0:
                block = block + (2.0 * a * b) * (w.T @ (tk[:, None] * w))
                err += (
                    gamma(w.shape[0] + 4)
                    * abs(2.0 * a * b)
                    * (np.abs(w).T @ (tk[:, None] * np.abs(w)))
                )
        else:
            w = weights[-1]
            block = block - w.T @ w
            err += gamma(w.shape[0] + 4) * (np.abs(w).T @ np.abs(w))
        block = 0.5 * (block + block.T)  # exactly symmetric: both triangles from one number
        diag.append(block)
        diag_err.append(err + gamma(3) * np.abs(block))
    off = [-(a + b) * (tk[:, None] * w) for (a, b), tk, w in zip(slopes, t, weights, strict=False)]
    off_err = [gamma(3) * np.abs(o) for o in off]
    return diag, off, diag_err, off_err


def assemble(blocks: list[np.ndarray], off: list[np.ndarray]) -> np.ndarray:
    """The dense symmetric matrix of a block-tridiagonal layout (``off[k]`` = block
    ``(k+1, k)``)."""
    sizes = [b.shape[0] for b in blocks]
    edges = np.concatenate([[0], np.cumsum(sizes)])
    out = np.zeros((edges[-1], edges[-1]))
    for k, b in enumerate(blocks):
        out[edges[k] : edges[k + 1], edges[k] : edges[k + 1]] = b
    for k, o in enumerate(off):
        out[edges[k + 1] : edges[k + 2], edges[k] : edges[k + 1]] = o
        out[edges[k] : edges[k + 1], edges[k + 1] : edges[k + 2]] = o.T
    return out


def lipsdp_matrix(
    weights: Sequence[np.ndarray], slopes: Slopes, t: Sequence[np.ndarray], rho: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(P̂, R)``: the float64 LMI matrix and an entrywise bound ``|P̂ − P_exact| ≤ R``."""
    diag, off, diag_err, off_err = lmi_blocks(weights, slopes, t, rho)
    return assemble(diag, off), assemble(diag_err, off_err)


def certifies_pd(matrix: np.ndarray, radius: np.ndarray) -> bool:
    """True only if every symmetric ``X`` with ``|X − matrix| ≤ radius`` is positive definite.

    Jacobi scaling ``S = D M D`` (``D = diag(1/√m_ii)``, any positive diagonal preserves
    definiteness), ``|fl(S) − D X D| ≤ D R D + γ_3|S|`` =: ``E``, ``‖E‖₂ ≤ ‖E‖_∞`` (row sums).
    Cholesky of ``S − cI`` succeeding gives ``R̂ᵀR̂ = S − cI + Δ`` with
    ``‖Δ‖₂ ≤ γ_{n+1}/(1−γ_{n+1}) tr(S)`` (Demmel 1989; Higham Thm 10.3; Rump 2006), so
    ``c = 2·γ_{n+1}/(1−γ_{n+1})·tr(S) + ‖E‖_∞ + u·max s_ii + n·2⁻¹⁰⁰⁰`` (factor 2: safety for
    blocked/FMA BLAS; the last terms: the diagonal subtraction and underflow) proves
    ``D X D ⪰ (c − ‖Δ‖ − ‖E‖) I ≻ 0``.
    """
    n = matrix.shape[0]
    dg = np.diag(matrix).copy()
    if not np.all(dg > 0) or not np.all(np.isfinite(matrix)):
        return False
    d = 1.0 / np.sqrt(dg)
    scaled = (d[:, None] * matrix) * d[None, :]
    err = (d[:, None] * radius) * d[None, :] * (1.0 + 4 * U) + gamma(3) * np.abs(scaled)
    g = gamma(n + 1)
    row_sums = float(err.sum(axis=1).max()) * (1.0 + gamma(n + 2))  # the sums' own rounding
    c = 2.0 * g / (1.0 - g) * float(np.trace(scaled)) + row_sums
    c = (c + U * float(np.diag(scaled).max()) + n * 2.0**-1000) * (1.0 + 8 * U)
    try:
        np.linalg.cholesky(scaled - c * np.eye(n))
    except np.linalg.LinAlgError:
        return False
    return True


def verify_lipsdp(
    weights: Sequence[np.ndarray], slopes: Slopes, t: Sequence[np.ndarray], rho: float
) -> bool:
    """True only if the exact LipSDP-Neuron matrix with these float64 ``t ≥ 0`` and ``ρ`` is
    positive definite, which proves ``Lip(f) ≤ √ρ``. Negative multipliers are rejected."""
    if any(np.any(tk < 0) for tk in t) or not rho > 0:
        return False
    return certifies_pd(*lipsdp_matrix(weights, slopes, t, rho))


def rho_star(weights: Sequence[np.ndarray], slopes: Slopes, t: Sequence[np.ndarray]) -> float:
    """``ρ*(T)`` (float64, an approximation): the smallest ``ρ`` with ``P ⪰ 0``, by Schur
    elimination from the output side; ``inf`` if a lower Schur complement is not PD."""
    diag, off, _, _ = lmi_blocks(weights, slopes, t, 0.0)
    schur = diag[-1]
    for k in range(len(off) - 1, -1, -1):  # eliminate block k+1 into block k
        try:
            chol = np.linalg.cholesky(schur)
        except np.linalg.LinAlgError:
            return math.inf
        y = np.linalg.solve(chol, off[k])  # L⁻¹ P_{k+1,k}
        schur = diag[k] - y.T @ y
        schur = 0.5 * (schur + schur.T)
    return max(float(np.linalg.eigvalsh(-schur)[-1]), 0.0)


@dataclass
class VerifiedRho:
    """A verified LipSDP value: ``value = √rho`` (rounded up) when ``passed``.

    ``inflation`` is ``value / √rho_start − 1``: how much the start (a solver's value) had to
    be raised before the float64 test passed (0 when it passed as given; negative is
    impossible). ``reason`` says why verification failed.
    """

    passed: bool
    rho: float
    value: float
    inflation: float
    reason: str = ""


def verified_rho(
    weights: Sequence[np.ndarray],
    slopes: Slopes,
    t: Sequence[np.ndarray],
    rho_start: float,
    *,
    max_relative: float = 1e-2,
) -> VerifiedRho:
    """Raise ``ρ`` from ``rho_start`` minimally until :func:`verify_lipsdp` passes.

    Tries ``rho_start``, then ``max(rho_start, ρ*(T))·(1 + δ)`` for ``δ = 1e-14, 2e-14, …``
    up to ``max_relative``. Multipliers the solver returned slightly negative are clipped
    to 0 first (the clipped ones are what is verified). Fails (``passed=False``) when the
    lower Schur complements are not PD, since no ``ρ`` can help then.
    """
    t = [np.maximum(np.asarray(tk, dtype=np.float64), 0.0) for tk in t]
    start = float(rho_start)
    if start > 0 and verify_lipsdp(weights, slopes, t, start):
        return VerifiedRho(True, start, _sqrt_up(start), 0.0)
    base = rho_star(weights, slopes, t)
    if not math.isfinite(base):
        return VerifiedRho(False, math.nan, math.nan, math.nan, "lower Schur block not PD")
    base = max(base, start)
    delta = 1e-14
    while delta <= max_relative:
        rho = base * (1.0 + delta)
        if verify_lipsdp(weights, slopes, t, rho):
            value = _sqrt_up(rho)
            inflation = value / math.sqrt(start) - 1.0 if start > 0 else math.inf
            return VerifiedRho(True, rho, value, inflation)
        delta *= 2.0
    return VerifiedRho(
        False, math.nan, math.nan, math.nan, f"not PD even at ρ*(T)·(1+{max_relative:g})"
    )


def _sqrt_up(x: float) -> float:
    """``√x`` rounded up (IEEE sqrt is correctly rounded; one ulp up makes it an upper bound)."""
    return math.nextafter(math.sqrt(x), math.inf)
