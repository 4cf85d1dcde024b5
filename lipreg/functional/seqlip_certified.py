"""Certified SeqLip at any width: metric-chained one-hidden-layer LipSDP pairs.

For a dense chain ``f = W_L ∘ φ_{L-1} ∘ W_{L-1} ∘ … ∘ φ_1 ∘ W_1`` with ``W_k ∈ R^{n_k×n_{k-1}}``
and activations whose slopes lie in ``[a_k, b_k]``, pick symmetric positive definite float
matrices ``G_0, …, G_{L-1}`` (a *metric* on each activation space, ``G_k`` on ``x_k``). Pair
``k`` (around ``φ_k``) is the one-hidden-layer LipSDP-Neuron LMI in these metrics, with a
diagonal multiplier ``T = diag(t) ⪰ 0``, ``s = a + b``, ``p = 2ab``:

.. math::

    P_k(ρ, T) = \\begin{pmatrix} ρ G_{k-1} + p W_k^\\top T W_k & -s W_k^\\top T \\\\
        -s T W_k & 2T - G_k \\end{pmatrix} \\succeq 0
    \\;\\Rightarrow\\; Δx_k^\\top G_k Δx_k \\le ρ \\, Δx_{k-1}^\\top G_{k-1} Δx_{k-1}

for every slope-``[a, b]`` activation (evaluate the form at ``(Δx_{k-1}, Δx_k)``: the neuron
terms ``t_i (Δv_i − aΔz_i)(bΔz_i − Δv_i)`` are ≥ 0). Chaining the pairs,

.. math::

    L(f)^2 \\le λ_{\\max}(G_0) \\prod_k ρ_k \\; λ_{\\max}(G_{L-1}^{-1/2} W_L^\\top W_L
        G_{L-1}^{-1/2}).

Three choices of metrics (``ends``, :data:`VARIANTS`):

* ``"merged"``: ``G_0 = I``, ``G_k = |W_{k+1}| + εI`` inside, ``G_{L-1} = W_L^\\top W_L + εI``
  (``|W| = (W^\\top W)^{1/2}``). If every pair LMI were tight, pair ``k`` would be exactly the
  pair factor of SeqLip (Scaman & Virmaux 2018, eq. 8, ``Σ̃ = Σ`` at the ends), which is what
  ``lipreg.seqlip(method="exact")`` enumerates: this is the certified counterpart of exact
  SeqLip (for one hidden layer, it is LipSDP-Neuron). Measured on 36 random nets of widths
  ≤ 16: 1.000–1.03 × exact SeqLip.
* ``"seqlip"``: ``G_k = |W_{k+1}| + εI`` everywhere, i.e. ``Σ̃ = Σ^{1/2}`` at every pair and the
  ends ``‖W_1‖, ‖W_L‖`` as separate factors; never tighter than ``"merged"`` in exact
  arithmetic for exact pairs, kept for comparison (design note §4).
* ``"optimised"``: ``"merged"``, then the inner metrics ``G_1 … G_{L-2}`` optimised jointly with
  the multipliers (:func:`~lipreg.functional.seqlip_optimise.optimise_metrics`): the chain is
  then no longer SeqLip's split of the network, and is often far below exact SeqLip
  (0.61–1.0 ×, measured) and close to LipSDP-Neuron on deep nets.

Cost per pair: Adam steps of one ``n × n`` Cholesky and a few products (``n`` the hidden width),
then one ``eigvalsh`` (``m × m``) and a few Cholesky tests of the ``(m + n)²`` LMI.

**Guarantee.** The metrics, multipliers and ``ρ`` are any float64 numbers, treated as exact data
(the same float metric is used on both sides of each link, so SVD rounding costs tightness only).
Each factor is certified by :func:`lipreg.functional.lmi.certify_psd` (Rump 2006, Cor. 2.4/2.7)
on the float64 matrix built here, with an explicit entrywise radius covering the rounding of its
formation (module :func:`pair_lmi`); ``ρ`` is inflated (``δ`` from ``1e-14 ρ̂``, ×4 per failure)
until the test passes. A factor's value is ``√ρ_c · (1 + RELATIVE_MARGIN)``, which absorbs the
rounding of the square roots and of the final product. The optimiser (Adam on ``log t`` with the
closed form ``ρ*(T) = λ_max(M^\\top [s² T S^{-1} T − p T] M)``, ``S = 2T − G_k``, ``M = W_k
L^{-\\top}``, ``G_{k-1} = L L^\\top``) only decides the tightness.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lipreg.functional.certify import RELATIVE_MARGIN
from lipreg.functional.lmi import ETA, certify_psd, gamma, product_radius
from lipreg.functional.seqlip_optimise import (
    PairProblem,
    optimise_metrics,
    optimise_pair,
    sym,
    top_eig,
)
from lipreg.functional.seqlip_pairs import ldexp_or_inf, pow2_normalise

__all__ = [
    "VARIANTS",
    "CertifiedFactor",
    "ChainedPairsCertificate",
    "certified_seqlip",
    "certify_lmax",
    "certify_pair",
    "metric_abs",
    "metric_gram",
    "pair_lmi",
]

#: Relative shift that keeps every metric positive definite (``|W|`` is singular for wide ``W``).
METRIC_EPS = 1e-9
#: The choices of metrics, in the order they are computed ("optimised" starts from "merged").
VARIANTS = ("merged", "seqlip", "optimised")


@dataclass
class CertifiedFactor:
    """One certified factor of a chained-pairs bound.

    Attributes:
        name: the pair (``"<map> | <activation> | <map>"``) or end it covers.
        kind: ``"pair"``, ``"input-end"`` or ``"output-end"``.
        value: certified factor on the Lipschitz constant, ``√ρ_c (1 + RELATIVE_MARGIN)``.
        rho: the certified ``ρ_c`` (squared scale, of the power-of-two normalised weights).
        rho_hat: the float estimate ``ρ*(T)`` before inflation.
        extra: details (``steps``, ``inflation``, ``fallback`` ...).
    """

    name: str
    kind: str
    value: float
    rho: float
    rho_hat: float
    extra: dict = field(default_factory=dict)


@dataclass
class ChainedPairsCertificate:
    """The result of :func:`certified_seqlip`.

    Attributes:
        value: the certified bound, the smaller of ``values``.
        method: ``"pairs-merged"`` or ``"pairs-seqlip"``, the ends that gave ``value``.
        values: certified value per choice of ends computed.
        factors: the factors of ``value`` (their product, rounded, is ``value``).
        factors_by_ends: the factors of every choice of ends.
        multipliers: the multipliers ``t`` of every pair per variant, and the optimised inner
            metrics under ``"optimised:metrics"`` (pass the dict back as ``warm=``).
        seconds: wall time.
    """

    value: float
    method: str
    values: dict[str, float]
    factors: list[CertifiedFactor]
    factors_by_ends: dict[str, list[CertifiedFactor]]
    multipliers: dict[str, list[Tensor]]
    seconds: float


# ---------------------------------------------------------------- metrics
def metric_abs(W: Tensor, eps: float = METRIC_EPS) -> Tensor:
    """``|W| + ε‖W‖ I`` with ``|W| = (WᵀW)^{1/2} = V Σ Vᵀ`` from a float64 SVD (any float SPD
    matrix is a valid metric; the SVD's rounding only affects tightness)."""
    _, S, Vh = torch.linalg.svd(W, full_matrices=False)
    G = (Vh.T * S) @ Vh
    shift = eps * float(S.max()) if S.numel() else 1.0
    return sym(G) + torch.eye(W.shape[1], dtype=W.dtype) * max(shift, 1e-300)


def metric_gram(W: Tensor, eps: float = METRIC_EPS) -> Tensor:
    """``WᵀW + ε‖W‖² I`` (the output-end metric of ``"merged"``)."""
    G = W.T @ W
    shift = eps * float(torch.linalg.matrix_norm(W, 2)) ** 2
    return sym(G) + torch.eye(W.shape[1], dtype=W.dtype) * max(shift, 1e-300)


# ---------------------------------------------------------------- the LMIs
def pair_lmi(
    W: Tensor, G_in: Tensor | None, G_out: Tensor, t: Tensor, rho: float, a: float, b: float
) -> tuple[Tensor, Tensor]:
    """The float64 pair matrix ``P̂ = fl(P(ρ, T))`` and an entrywise radius ``≥ |P̂ − P|``.

    ``P`` is the exact matrix for the float data ``W, G_in, G_out, t, ρ`` and the exact slopes
    ``a, b``. Errors: ``X̂ = fl(t∘W)`` (``u|X|``), ``Ŷ = fl(WᵀX̂)`` (``γ_{n+2}|W|ᵀ|X̂|`` by
    :func:`product_radius`, plus ``γ_2|W|ᵀ|X̂|`` for ``X̂ ≠ TW``), ``s̃ = fl(a+b)`` and
    ``p̃ = fl(2ab)`` (``u`` relative), one rounding per scalar product and per sum; each term's
    radius is taken with a few extra ``u`` of slack. ``P̂`` is exactly symmetric (the upper
    triangle is the transpose of the computed lower one).
    """
    m = W.shape[1]
    s, p = a + b, 2.0 * a * b
    X = t[:, None] * W
    G_in = torch.eye(m, dtype=W.dtype) if G_in is None else G_in
    P11 = rho * G_in
    R11 = gamma(3) * P11.abs()
    if p != 0.0:
        Y = W.T @ X
        absWX = W.abs().T @ X.abs()
        P11 = P11 + p * Y
        R11 = (
            R11
            + gamma(3) * abs(p) * Y.abs()
            + 1.01 * abs(p) * (product_radius(W.T.contiguous(), X) + gamma(3) * absWX)
        )
    P21 = -s * X
    P22 = 2.0 * torch.diag(t) - G_out
    P = torch.cat([torch.cat([P11, P21.T], 1), torch.cat([P21, P22], 1)], 0)
    low = torch.tril(P)
    P = low + torch.tril(P, -1).T
    R21 = gamma(6) * P21.abs() + 4.0 * ETA
    R22 = torch.diag(gamma(3) * torch.diagonal(P22).abs())
    R = torch.cat([torch.cat([R11, R21.T], 1), torch.cat([R21, R22], 1)], 0)
    # Symmetric entrywise bound (covers either triangle of P11); 4η: any underflow.
    R = torch.maximum(R, R.T) + 4.0 * ETA
    return P, R


def _inflate(
    build: Callable[[float], tuple[Tensor, Tensor]], value_hat: float, floor: float
) -> tuple[float, int]:
    """Smallest tried ``v = v̂ + δ`` (``δ = 1e-14 max(v̂, floor)``, ×4 per failure) whose
    LMI ``build(v)`` passes :func:`certify_psd`; ``(inf, tries)`` if ``δ`` exceeds 100× the
    scale without success (the fixed blocks are not certifiably definite)."""
    scale = max(value_hat, floor)
    delta = 1e-14 * scale
    tries = 0
    while delta <= 100.0 * scale:
        v = value_hat + delta
        tries += 1
        if certify_psd(*build(v)):
            return v, tries
        delta *= 4.0
    return math.inf, tries


def certify_lmax(G: Tensor | None, A_factor: Tensor | None = None) -> tuple[float, float]:
    """Certified ``c ≥ λ_max(G^{-1/2} A G^{-1/2})`` with ``A = FᵀF`` (``F = A_factor``), or
    ``c ≥ λ_max(G)`` when ``A_factor`` is ``None``; returns ``(c, ĉ)``.

    Certificate: ``cG − FᵀF ≻ 0`` (resp. ``cI − G``) by :func:`certify_psd` with the radius
    ``γ_3(|cG| + |fl(FᵀF)|) + 1.01 · product_radius(Fᵀ, F)`` (resp. ``γ_3(c + |G|)``).
    ``G = None`` means ``I``: then ``λ_max(I) = 1`` exactly.
    """
    if A_factor is None:
        if G is None:
            return 1.0, 1.0
        c_hat = float(torch.linalg.eigvalsh(G)[-1])

        def build(c: float) -> tuple[Tensor, Tensor]:
            eye = torch.eye(G.shape[0], dtype=G.dtype)
            return c * eye - G, gamma(3) * (c * eye + G.abs())

        return _inflate(build, c_hat, c_hat)[0], c_hat
    F = A_factor
    A = sym(F.T @ F)
    RA = 1.01 * product_radius(F.T.contiguous(), F) + gamma(3) * A.abs()
    if G is None:
        c_hat = float(torch.linalg.eigvalsh(A)[-1])
        G = torch.eye(A.shape[0], dtype=A.dtype)
    else:
        Lg = torch.linalg.cholesky(G)
        c_hat = (
            float(torch.linalg.matrix_norm(torch.linalg.solve_triangular(Lg, F.T, upper=False), 2))
            ** 2
        )

    def build_pencil(c: float) -> tuple[Tensor, Tensor]:
        cG = c * G
        return cG - A, gamma(3) * cG.abs() + RA

    return _inflate(build_pencil, c_hat, c_hat)[0], c_hat


# ---------------------------------------------------------------- one pair
def _exact_rho(pr: PairProblem, t: Tensor) -> float:
    """A float ``ρ*(T)``: ``eigvalsh`` of the dense ``X`` up to 2048, else a converged subspace
    iteration (a slight underestimate only costs a few more inflation steps)."""
    C = torch.linalg.cholesky(2.0 * torch.diag(t) - pr.G_out)
    m = pr.M.shape[1]
    if m <= 2048:
        return max(float(torch.linalg.eigvalsh(pr.dense_x(t, C))[-1]), 0.0)
    V = torch.linalg.qr(
        torch.randn(m, 8, dtype=t.dtype, generator=torch.Generator().manual_seed(1))
    ).Q
    return max(top_eig(pr, t, C, V, 200)[0], 0.0)


def _certifiable_s(t: Tensor, G_out: Tensor) -> Tensor:
    """``t`` scaled up by ``1 + 2^j 1e-9`` until ``S = 2T − G_out`` passes the certificate on
    its own (``ρ`` only raises the other diagonal block, so this margin must come from ``T``)."""
    for j in range(60):
        tj = t * (1.0 + 1e-9 * 2.0**j) if j else t
        S = 2.0 * torch.diag(tj) - G_out
        if certify_psd(S, torch.diag(gamma(3) * torch.diagonal(S).abs()) + 4.0 * ETA):
            return tj
    raise ValueError("the pair multipliers cannot be made certifiably feasible (S = 2T - G_out).")


def certify_pair(
    W: Tensor, G_in: Tensor | None, G_out: Tensor, t: Tensor, a: float, b: float
) -> tuple[float, float, Tensor]:
    """Certified ``ρ_c`` with ``P(ρ_c, T) ≻ 0`` for the exact data: ``(ρ_c, ρ̂, t')``.

    ``t'`` is ``t``, scaled up slightly if ``S = 2T − G_out`` needed a certifiable margin.
    ``ρ̂ = ρ*(T')`` in float64, then ``ρ_c = ρ̂ + δ`` with the first ``δ`` (from ``1e-14``
    relative, ×4 per failure) for which :func:`certify_psd` accepts :func:`pair_lmi`.
    ``ρ_c = inf`` if none does.
    """
    t = _certifiable_s(t, G_out)
    rho_hat = _exact_rho(PairProblem.from_metrics(W, G_in, G_out, a, b), t)
    rho_c, _ = _inflate(lambda r: pair_lmi(W, G_in, G_out, t, r, a, b), rho_hat, 1e-12)
    return rho_c, rho_hat, t


# ---------------------------------------------------------------- chains
def _factor(
    name: str, kind: str, rho: float, rho_hat: float, exponent: int, **extra
) -> CertifiedFactor:
    """A factor ``√ρ_c (1 + RELATIVE_MARGIN) 2^exponent`` (the margin covers the rounding of the
    square root and of the product of all factors)."""
    value = ldexp_or_inf(math.sqrt(rho) * (1.0 + RELATIVE_MARGIN), exponent)
    return CertifiedFactor(name=name, kind=kind, value=value, rho=rho, rho_hat=rho_hat, extra=extra)


def _solve_pair(
    W: Tensor,
    G_in: Tensor | None,
    G_out: Tensor,
    box: tuple[float, float],
    warm: Tensor | None,
    steps: int,
) -> tuple[float, float, Tensor, dict]:
    """Optimise then certify one pair; if the optimised multipliers do not certify, the
    product-of-norms point ``t = 2 λ_max(G_out)`` is certified instead (noted in ``extra``)."""
    a, b = box
    start = time.perf_counter()
    t, _ = optimise_pair(W, G_in, G_out, a, b, t0=warm, steps=steps)
    rho_c, rho_hat, t = certify_pair(W, G_in, G_out, t, a, b)
    extra: dict = {"steps": steps, "warm": warm is not None}
    if not math.isfinite(rho_c):
        t = torch.full_like(t, 2.0 * float(torch.linalg.eigvalsh(G_out)[-1]))
        rho_c, rho_hat, t = certify_pair(W, G_in, G_out, t, a, b)
        extra["fallback"] = "optimised multipliers not certified; product-of-norms point used"
    if not math.isfinite(rho_c):
        raise ValueError(
            "certified SeqLip: no multiplier of this pair passed the LMI certificate (expected "
            "the product-of-norms point to pass); the weights may be non-finite or degenerate."
        )
    extra["inflation"] = rho_c / rho_hat - 1.0 if rho_hat > 0 else rho_c
    extra["seconds"] = time.perf_counter() - start
    return rho_c, rho_hat, t, extra


def _chain(
    Ws: list[Tensor],
    exps: list[int],
    slopes: Sequence[tuple[float, float]],
    Gs: list[Tensor | None],
    names: tuple[list[str], str, str],
    warm: list[Tensor] | None,
    steps: int,
    cache: dict,
) -> tuple[list[CertifiedFactor], list[Tensor]]:
    """The certified factors of one choice of metrics ``Gs`` (pairs shared between choices of
    ends, same ``G`` objects, are solved once through ``cache``)."""
    pair_names, in_name, out_name = names
    factors: list[CertifiedFactor] = []
    if Gs[0] is not None:
        c, c_hat = certify_lmax(Gs[0])
        factors.append(_factor(in_name, "input-end", c, c_hat, 0))
    ts = []
    for k in range(len(Ws) - 1):
        key = (k, id(Gs[k]), id(Gs[k + 1]))
        if key not in cache:
            w = warm[k] if warm is not None and k < len(warm) else None
            if w is not None and w.shape != (Ws[k].shape[0],):
                w = None
            cache[key] = _solve_pair(Ws[k], Gs[k], Gs[k + 1], tuple(slopes[k]), w, steps)
        rho_c, rho_hat, t, extra = cache[key]
        factors.append(_factor(pair_names[k], "pair", rho_c, rho_hat, exps[k], **extra))
        ts.append(t)
    c, c_hat = certify_lmax(Gs[-1], Ws[-1])
    if not math.isfinite(c):
        raise ValueError("certified SeqLip: the output-end factor did not pass the certificate.")
    factors.append(_factor(out_name, "output-end", c, c_hat, exps[-1]))
    return factors, ts


def certified_seqlip(
    weights: Sequence[Tensor],
    slopes: Sequence[tuple[float, float]],
    *,
    ends: str | Sequence[str] = "all",
    names: Sequence[str] | None = None,
    end_names: tuple[str, str] = ("input", "output"),
    warm: dict[str, list[Tensor]] | None = None,
    steps: int = 300,
) -> ChainedPairsCertificate:
    """Certified SeqLip bound of the dense chain ``W_L φ_{L-1} W_{L-1} ⋯ φ_1 W_1`` (module
    docstring): ``L(f) ≤ value`` for all activations with slopes in ``slopes[k] = (a, b)``.

    Args:
        weights: ``W_1, …, W_L`` (``out × in``, at least two); converted to float64 (exact
            from lower precisions) and scaled by exact powers of two.
        slopes: ``L − 1`` slope intervals ``(a, b)``, ``a ≤ b``.
        ends: one variant, several, or ``"all"``: ``"merged"`` (SeqLip's metrics, the
            certified counterpart of exact SeqLip), ``"seqlip"`` (``|W|`` at the ends too),
            ``"optimised"`` (``"merged"`` then the inner metrics optimised jointly with the
            multipliers, see :func:`~lipreg.functional.seqlip_optimise.optimise_metrics`);
            the smallest certified value is returned.
        names: ``L − 1`` pair names (default ``"pair k"``); ``end_names``: the end factors.
        warm: ``multipliers`` of a previous certificate (tightness only: every value is
            re-certified; entries whose shapes do not match are ignored).
        steps: optimiser steps per pair (and for the joint metric optimisation).

    Returns:
        :class:`ChainedPairsCertificate`; every factor certified by
        :func:`lipreg.functional.lmi.certify_psd`.

    Raises:
        ValueError: fewer than two maps, mismatched shapes or slopes, non-finite weights, or a
            factor that no multiplier certifies.
    """
    start = time.perf_counter()
    Ws, exps = _prepare(weights, slopes)
    K = len(Ws) - 1
    pair_names = list(names) if names is not None else [f"pair {k + 1}" for k in range(K)]
    names3 = (pair_names, *end_names)
    chosen = list(VARIANTS) if ends == "all" else [ends] if isinstance(ends, str) else list(ends)
    if not chosen or any(e not in VARIANTS for e in chosen):
        raise ValueError(f"ends must be 'all' or among {VARIANTS}, got {ends!r}.")
    if "optimised" in chosen and K < 2:
        chosen.remove("optimised")  # no inner metric: "merged" is already LipSDP-Neuron
        chosen += [] if "merged" in chosen else ["merged"]
    inner = [metric_abs(W) for W in Ws[1:]]
    metrics = {
        "merged": [None, *inner[:-1], metric_gram(Ws[-1])],
        "seqlip": [metric_abs(Ws[0]), *inner],
    }
    cache: dict = {}
    by_ends, mults = {}, {}
    for e in sorted(set(chosen), key=VARIANTS.index):
        w = (warm or {}).get(e)
        if e == "optimised":
            start_metrics, start_ts = _optimised_start(
                Ws, exps, slopes, metrics["merged"], mults, warm or {}, (names3, steps, cache)
            )
            metrics[e], w, _ = optimise_metrics(Ws, slopes, start_metrics, start_ts, steps=steps)
            by_ends[e], mults[e] = _chain(Ws, exps, slopes, metrics[e], names3, w, 0, cache)
            mults["optimised:metrics"] = list(metrics[e][1:-1])
        else:
            by_ends[e], mults[e] = _chain(Ws, exps, slopes, metrics[e], names3, w, steps, cache)
    values = {e: math.prod(x.value for x in f) for e, f in by_ends.items()}
    best = min(values, key=lambda e: values[e])
    return ChainedPairsCertificate(
        value=values[best],
        method=f"pairs-{best}",
        values=values,
        factors=by_ends[best],
        factors_by_ends=by_ends,
        multipliers=mults,
        seconds=time.perf_counter() - start,
    )


def _optimised_start(
    Ws: list[Tensor],
    exps: list[int],
    slopes: Sequence[tuple[float, float]],
    merged: list[Tensor | None],
    mults: dict[str, list[Tensor]],
    warm: dict[str, list[Tensor]],
    run: tuple[tuple[list[str], str, str], int, dict],
) -> tuple[list[Tensor | None], list[Tensor]]:
    """Start of the metric optimisation: the previous optimised metrics and multipliers when
    ``warm`` holds them with matching shapes, else the ``"merged"`` point (solved if needed)."""
    inner, ts = warm.get("optimised:metrics"), warm.get("optimised")
    sizes = [W.shape[0] for W in Ws[:-1]]
    if (
        inner is not None
        and ts is not None
        and [G.shape for G in inner] == [(n, n) for n in sizes[:-1]]
        and [t.shape for t in ts] == [(n,) for n in sizes]
    ):
        return [merged[0], *[G.to(torch.float64) for G in inner], merged[-1]], list(ts)
    if "merged" not in mults:
        names3, steps, cache = run
        mults["merged"] = _chain(
            Ws, exps, slopes, merged, names3, warm.get("merged"), steps, cache
        )[1]
    return merged, mults["merged"]


def _prepare(
    weights: Sequence[Tensor], slopes: Sequence[tuple[float, float]]
) -> tuple[list[Tensor], list[int]]:
    """Float64 copies scaled by ``2^-e`` (exact), and the exponents; validates the chain."""
    if len(weights) < 2:
        raise ValueError(
            f"certified SeqLip needs a chain of at least two maps, got {len(weights)}."
        )
    if len(slopes) != len(weights) - 1:
        raise ValueError(f"expected {len(weights) - 1} slope intervals, got {len(slopes)}.")
    Ws, exps = [], []
    for k, W in enumerate(weights):
        W = W.detach().to(device="cpu", dtype=torch.float64)
        if W.ndim != 2 or (k and W.shape[1] != Ws[-1].shape[0]):
            raise ValueError(f"weight {k} has shape {tuple(W.shape)}, which does not chain.")
        W, e = pow2_normalise(
            W, f"weight {k} has non-finite (NaN/Inf) entries: no bound is reported."
        )
        Ws.append(W)
        exps.append(e)
    for a, b in slopes:
        if not (math.isfinite(a) and math.isfinite(b) and a <= b):
            raise ValueError(f"slope interval ({a}, {b}) must be finite with a <= b.")
    return Ws, exps
