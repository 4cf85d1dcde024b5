"""SeqLip (Scaman & Virmaux 2018, eq. 8) for chains of affine maps and element-wise activations.

For ``f = M_K ∘ ρ_{K-1} ∘ … ∘ ρ_1 ∘ M_1`` with activations whose derivatives lie in
``[a_i, b_i]`` and SVDs ``M_i = U_i Σ_i V_iᵀ``,

.. math::

    L(f) \\le \\hat L_{SL} = \\prod_{i=1}^{K-1} \\max_{\\sigma \\in \\{a_i, b_i\\}^{n_i}}
        \\big\\lVert \\tilde\\Sigma_{i+1} V_{i+1}^\\top \\operatorname{diag}(\\sigma)
        U_i \\tilde\\Sigma_i \\big\\rVert_2 ,

with ``Σ̃_i = Σ_i`` for ``i ∈ {1, K}`` and ``Σ_i^{1/2}`` otherwise. The paper states it for
``[0, 1]``; the same proof holds for any slope interval, since the pair norm is convex in each
``σ_j`` and its maximum over a box is attained at a vertex. A pooling layer or any other
non-element-wise node ends one SeqLip chain and starts the next, multiplying the bound by its
own Lipschitz constant; a chain of one affine map contributes its norm.

Per pair, ``method="exact"`` enumerates all ``2^{n_i}`` activation patterns (vectorised;
refused beyond ``exact_width_limit``), and ``method="greedy"`` runs a monotone local search:
alternate the best pattern for the current top singular pair (a linear problem solved in
closed form) with the top singular pair for the current pattern, then try single flips
evaluated by rank-one updates.

**Guarantee.** The result is a certified upper bound (``kind="upper"``) only with
``method="exact"`` *and* full (untruncated) SVDs of every map. Greedy values are feasible
points, so they lie *below* exact SeqLip, and top-``k`` truncation drops directions: both are
estimates (``certified=False``) and can fall below the true Lipschitz constant.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from lipreg.functional.autolip import (
    AffineChain,
    ChainBounder,
    chain_linear_map,
    check_finite_result,
    find_affine_chains,
)
from lipreg.functional.certify import RELATIVE_MARGIN
from lipreg.functional.graph import Analysis, analyse
from lipreg.functional.power_iteration import top_singular_triplets
from lipreg.functional.results import LayerBound, LipschitzResult
from lipreg.functional.rules import Affine, Combine, Elementwise, Nonlinear

__all__ = [
    "NotSequentialError",
    "SeqChain",
    "pair_norm_exact",
    "pair_norm_greedy",
    "segment_chains",
    "seqlip",
]


class NotSequentialError(ValueError):
    """SeqLip needs a network whose graph is a single path."""


@dataclass
class SeqChain:
    """Affine chains ``maps[0..K-1]`` separated by activation slope boxes ``boxes[0..K-2]``."""

    maps: list[AffineChain] = field(default_factory=list)
    boxes: list[tuple[float, float, str]] = field(default_factory=list)


def _compose_box(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    prods = [x * y for x in a for y in b]
    return min(prods), max(prods)


def segment_chains(analysis: Analysis) -> tuple[list[SeqChain | LayerBound], list[str]]:
    """Split a sequential graph into SeqLip chains and breaker factors, in order."""
    chains = find_affine_chains(analysis)
    problems = [
        analysis.label(n)
        for n in analysis.order[1:]
        if isinstance(analysis.specs[n], Combine) or len(analysis.inputs[n]) != 1
    ]
    problems += [
        analysis.label(n)
        for n in analysis.order
        if n is not analysis.output_node and len(analysis.users(n)) > 1
    ]
    if problems:
        raise NotSequentialError(
            f"SeqLip applies to sequential networks (one path from input to output); nodes "
            f"{sorted(set(problems))} branch or merge (residual additions, concatenations, "
            "shared inputs). Use lipreg.autolip for such graphs."
        )
    items: list[SeqChain | LayerBound] = []
    notes: list[str] = []
    current: SeqChain | None = None
    pending: tuple[float, float, str] | None = None

    def close() -> None:
        nonlocal current, pending
        if current is not None:
            items.append(current)
        if pending is not None:
            lip = max(abs(pending[0]), abs(pending[1]))
            items.append(LayerBound(pending[2], "activation", lip, True, lip, lip, "rule"))
        current, pending = None, None

    for node in analysis.order[1:]:
        spec = analysis.specs[node]
        if isinstance(spec, Affine):
            if node not in chains:
                continue
            if current is not None and pending is not None:
                current.boxes.append(pending)
                current.maps.append(chains[node])
                pending = None
            else:
                close()
                current = SeqChain(maps=[chains[node]])
        elif isinstance(spec, Elementwise):
            box = (spec.slope_min, spec.slope_max, analysis.label(node))
            if current is None:
                lip = spec.lipschitz
                items.append(LayerBound(box[2], "activation", lip, True, lip, lip, "rule"))
            elif pending is None:
                pending = box
            else:
                lo, hi = _compose_box(pending[:2], box[:2])
                pending = (lo, hi, f"{pending[2]} -> {box[2]}")
        elif isinstance(spec, Nonlinear):
            close()
            lip = spec.lipschitz
            items.append(LayerBound(analysis.label(node), "nonlinear", lip, True, lip, lip, "rule"))
    close()
    return items, notes


@dataclass
class _SVD:
    U: Tensor  # (out, r)
    S: Tensor  # (r,)
    V: Tensor  # (in, r)
    exact: bool  # full SVD of the materialised map
    n_iter: int = 0


def _svd_of_chain(
    analysis64: Analysis,
    analysis: Analysis,
    chain: AffineChain,
    *,
    top_k: int | None,
    dense_limit: int,
    tol: float,
    max_iter: int,
    generator: torch.Generator,
    V0: Tensor | None,
) -> _SVD:
    specs = [analysis.specs[n] for n in chain.nodes]
    op = chain_linear_map(analysis, chain)
    small = min(op.in_features, op.out_features)
    if len(specs) == 1 and specs[0].weight is not None and small <= dense_limit:
        # The float64 analysis holds the model's own weights (a float64 model analysed in
        # float32 would be rounded: its "exact" SVD would bound another network).
        w64 = analysis64.specs[chain.nodes[0]].weight
        assert w64 is not None
        return _truncate(_dense_svd(w64.detach().to(torch.float64)), top_k)
    if small <= dense_limit and op.in_features * op.out_features <= 64 * 2**20:
        dense = chain_linear_map(analysis64, chain).to_dense()
        return _truncate(_dense_svd(dense), top_k)
    k = top_k or 200
    res = top_singular_triplets(op, k, V0=V0, tol=tol, max_iter=max_iter, generator=generator)
    return _SVD(
        U=res.U.to(torch.float64),
        S=res.S.to(torch.float64),
        V=res.V.to(torch.float64),
        exact=False,
        n_iter=res.n_iter,
    )


def _dense_svd(W: Tensor) -> _SVD:
    """Full thin SVD of an explicit float64 matrix.

    LAPACK's SVD (backward stable: ``U S Vᵀ = W + E`` with ``‖E‖ ≈ ε‖W‖``) for matrices up to
    1024 on the smaller side, which covers every case where exact SeqLip is feasible. Larger
    matrices go through the eigen-decomposition of the smaller Gram matrix, several times
    faster on this hardware and accurate for the top singular triplets that greedy SeqLip
    relies on (small singular values lose relative accuracy; greedy is an estimate anyway).
    """
    if not bool(torch.isfinite(W).all()):
        raise ValueError(
            "a SeqLip layer matrix has non-finite (NaN/Inf) entries: no bound is reported. "
            "Check the weights."
        )
    peak = float(W.abs().max()) if W.numel() else 0.0
    if peak == 0:
        return _dense_svd_scaled(W)
    # An exact power-of-two scaling 2^-e keeps the Gram matrix and the SVD in range (two
    # steps: 2^-e alone may overflow for subnormal peaks); S·2^e beyond float64 becomes inf,
    # which the final check rejects as non-finite.
    exponent = math.frexp(peak)[1]
    half = -exponent // 2
    svd = _dense_svd_scaled(W * 2.0**half * 2.0 ** (-exponent - half))
    S = svd.S * 2.0 ** (exponent // 2) * 2.0 ** (exponent - exponent // 2)
    return _SVD(U=svd.U, S=S, V=svd.V, exact=svd.exact)


def _dense_svd_scaled(W: Tensor) -> _SVD:
    if min(W.shape) <= 1024:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return _SVD(U=U, S=S, V=Vh.T, exact=True)
    flip = W.shape[1] > W.shape[0]
    G = W @ W.T if flip else W.T @ W
    evals, vecs = torch.linalg.eigh(G)
    S = evals.flip(0).clamp_min(0).sqrt()
    vecs = vecs.flip(1)
    keep = S > 0
    S, vecs = S[keep], vecs[:, keep]
    if flip:
        return _SVD(U=vecs, S=S, V=(W.T @ vecs) / S, exact=True)
    return _SVD(U=(W @ vecs) / S, S=S, V=vecs, exact=True)


def _pow2_normalise(M: Tensor) -> tuple[Tensor, int]:
    """``(M·2^-e, e)`` with the largest entry of the result in ``[0.5, 1)`` (exact scaling);
    raises ``ValueError`` ("non-finite") on NaN/Inf entries."""
    if not bool(torch.isfinite(M).all()):
        raise ValueError(
            "a SeqLip pair matrix has non-finite (NaN/Inf) entries: the layer norms overflow "
            "float64; no bound is reported. Check the weights."
        )
    peak = float(M.abs().max()) if M.numel() else 0.0
    if peak == 0:
        return M, 0
    e = math.frexp(peak)[1]
    half = -e // 2
    return M * 2.0**half * 2.0 ** (-e - half), e


def _ldexp(value: float, e: int) -> float:
    try:
        return math.ldexp(value, e)
    except OverflowError:
        return math.inf


def _truncate(svd: _SVD, top_k: int | None) -> _SVD:
    if top_k is None or top_k >= svd.S.numel():
        return svd
    return _SVD(svd.U[:, :top_k], svd.S[:top_k], svd.V[:, :top_k], exact=False)


def _f64(value: float, like: Tensor) -> Tensor:
    """A float64 scalar tensor: ``torch.where`` on Python floats would round to float32."""
    return torch.tensor(value, dtype=torch.float64, device=like.device)


def _maybe_progress(items: list, progress: bool):
    if not progress:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("progress=True needs tqdm (pip install tqdm); no progress bar.", stacklevel=3)
        return items
    return tqdm(items, desc="SeqLip")


def pair_norm_exact(
    A: Tensor, B: Tensor, lo: float, hi: float, *, chunk: int = 8192
) -> tuple[float, Tensor]:
    """``max_{σ ∈ {lo, hi}^n} ‖A diag(σ) B‖_2`` by enumeration of all ``2^n`` patterns.

    ``A`` is ``(r1, n)``, ``B`` is ``(n, r2)``. The norm of each pattern is the root of the top
    eigenvalue of the smaller Gram matrix, in float64 and in batches of ``chunk`` patterns.
    """
    A, B = A.to(torch.float64), B.to(torch.float64)
    n = A.shape[1]
    hi_t, lo_t = _f64(hi, A), _f64(lo, A)
    bits = 2 ** torch.arange(n, device=A.device)
    best, best_sigma = -1.0, None
    left = A.shape[0] <= B.shape[1]
    for start in range(0, 2**n, chunk):
        idx = torch.arange(start, min(2**n, start + chunk), device=A.device)
        mask = (idx[:, None] & bits) > 0
        sigma = torch.where(mask, hi_t, lo_t)  # (p, n), float64 (no float32 rounding)
        M = (A[None] * sigma[:, None, :]) @ B  # (p, r1, r2)
        G = M @ M.transpose(1, 2) if left else M.transpose(1, 2) @ M
        if not bool(torch.isfinite(G).all()):
            raise ValueError(
                "a SeqLip pair's Gram matrices are non-finite (NaN/Inf): the layer norms "
                "overflow float64; no bound is reported. Check the weights."
            )
        top = torch.linalg.eigvalsh(G)[:, -1]
        i = int(torch.argmax(top))
        if float(top[i]) > best:
            best, best_sigma = float(top[i]), sigma[i].clone()
    return math.sqrt(max(best, 0.0)), best_sigma


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


def seqlip(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    method: Literal["greedy", "exact"] = "greedy",
    top_k: int | None = None,
    exact_width_limit: int = 20,
    dense_limit: int = 4096,
    n_restarts: int = 2,
    tol: float = 1e-4,
    max_iter: int = 100,
    dtype: torch.dtype = torch.float32,
    state: dict[str, Tensor] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> LipschitzResult:
    """SeqLip bound (``method="exact"``) or estimate (``method="greedy"``) of ``model``.

    Args:
        model: a sequential network (one path from input to output) in any mode; it is
            bounded in evaluation mode and never modified.
        input_shape: shape of ONE input, without the batch dimension.
        method: ``"exact"`` (enumerate activation patterns; certified with full SVDs) or
            ``"greedy"`` (local search; an estimate).
        top_k: keep only the top-``k`` singular triplets of every map (an estimate). ``None``:
            full SVDs for maps whose smaller side is at most ``dense_limit``, top-200 (the
            paper's value) for larger ones, with a note.
        exact_width_limit: largest activation width enumerated by ``method="exact"``.
        dense_limit: maps whose smaller side is at most this are materialised for a full SVD.
        n_restarts: random restarts of the greedy search per pair (plus the all-ones start).
        tol, max_iter: tolerance and cap of the block subspace iteration (top-``k`` SVDs) and
            of the power iteration of single-map chains.
        dtype: dtype of the iterations on large maps (dense SVDs are always float64).
        state: warm-start subspaces from a previous result's ``.state``.
        seed: seed of the private generator.
        progress: show a tqdm progress bar over the SeqLip chains (large networks take
            minutes: AlexNet's top-k SVDs).

    Returns:
        :class:`~lipreg.functional.results.LipschitzResult`, ``method`` ``"seqlip-exact"`` or
        ``"seqlip-greedy"``, ``certified`` only for exact SeqLip with full SVDs.

    Raises:
        ValueError: a non-finite (NaN/Inf) total or layer value (message mentions
            "non-finite"): never reported, certified or not.
    """
    start = time.perf_counter()
    if method not in ("greedy", "exact"):
        raise ValueError(f"method must be 'greedy' or 'exact', got {method!r}.")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}.")
    analysis = analyse(model, input_shape, dtype=dtype)
    generator = torch.Generator(device=analysis.device).manual_seed(seed)
    state = dict(state or {})
    items, notes = segment_chains(analysis)
    bounder = ChainBounder(
        analysis,
        model,
        certify=method == "exact",
        tol=tol,
        max_iter=max(max_iter, 500),
        method="lanczos",
        state=state,
        generator=generator,
        dense_limit=dense_limit,
    )
    analysis64 = bounder.analysis64  # same nodes, float64 specs: no second probe
    layers: list[LayerBound] = []
    new_state: dict[str, Tensor] = {}
    certified = True
    n_iter = 0
    # Pre-compute the exact pair widths so that "exact" refuses before any heavy work.
    if method == "exact":
        for item in items:
            if isinstance(item, SeqChain):
                for m in item.maps[:-1]:
                    width = math.prod(analysis.shapes[m.nodes[-1]])
                    if width > exact_width_limit:
                        raise ValueError(
                            f"exact SeqLip enumerates 2^n activation patterns per pair; the "
                            f"activation after {m.name!r} has n = {width} > exact_width_limit "
                            f"= {exact_width_limit}. Use method='greedy' (an estimate) or "
                            "raise exact_width_limit (cost doubles with each unit)."
                        )
    for item in _maybe_progress(items, progress):
        if isinstance(item, LayerBound):
            layers.append(item)
            continue
        if len(item.maps) == 1:
            lb = bounder.bound(item.maps[0])
            layers.append(lb)
            certified &= lb.certified
            n_iter += lb.n_iter
            if item.maps[0].name in bounder.new_state:
                new_state[item.maps[0].name] = bounder.new_state[item.maps[0].name]
            continue
        svds = []
        for m in item.maps:
            svd = _svd_of_chain(
                analysis64,
                analysis,
                m,
                top_k=top_k,
                dense_limit=dense_limit,
                tol=tol,
                max_iter=max_iter,
                generator=generator,
                V0=state.get(f"seqlip:{m.name}"),
            )
            n_iter += svd.n_iter
            if not svd.exact:
                certified = False
                new_state[f"seqlip:{m.name}"] = svd.V.to(dtype)
                full = svd.S.numel() >= min(svd.U.shape[0], svd.V.shape[0])
                what = "all" if full else "the top"
                notes.append(
                    f"{m.name}: {what} {svd.S.numel()} singular triplets, computed by block "
                    "subspace iteration (iterative"
                    + ("" if full else ", truncated")
                    + "; the result is an estimate, not a bound)."
                )
            svds.append(svd)
        K = len(svds)
        tilde = [s.S if i in (0, K - 1) else s.S.sqrt() for i, s in enumerate(svds)]
        for i in range(K - 1):
            # Exact power-of-two scalings 2^-a, 2^-b keep the pair's products in range; the
            # value is scaled back by 2^(a+b) (inf beyond float64, rejected as non-finite).
            A, a_exp = _pow2_normalise(tilde[i + 1][:, None] * svds[i + 1].V.T)  # (r_{i+1}, n_i)
            Bm, b_exp = _pow2_normalise(svds[i].U * tilde[i][None, :])  # (n_i, r_i)
            lo, hi, act = item.boxes[i]
            name = f"{item.maps[i].name} | {act} | {item.maps[i + 1].name}"
            if method == "exact":
                value, _ = pair_norm_exact(A, Bm, lo, hi)
                value = _ldexp(value, a_exp + b_exp) * (1 + RELATIVE_MARGIN)
                ok = svds[i].exact and svds[i + 1].exact
                layers.append(
                    LayerBound(
                        name, "seqlip-pair", value, ok, value, value if ok else None, "exact"
                    )
                )
                certified &= ok
            else:
                value, _ = pair_norm_greedy(
                    A, Bm, lo, hi, n_restarts=n_restarts, generator=generator
                )
                value = _ldexp(value, a_exp + b_exp)
                layers.append(LayerBound(name, "seqlip-pair", value, False, value, None, "greedy"))
                certified = False
    total = math.prod(lb.value for lb in layers)
    if method == "greedy":
        notes.append(
            "greedy SeqLip: each pair's value is attained by a feasible activation pattern, so "
            "it lies below exact SeqLip; it is an estimate, not a certified bound."
        )
    kind = "upper" if certified and method == "exact" else "estimate"
    if method == "exact" and not certified:
        msg = "exact SeqLip used truncated SVDs or uncertified norms: reported as an estimate."
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
    result = LipschitzResult(
        value=total,
        kind=kind,
        method=f"seqlip-{method}",
        layers=layers,
        state=new_state,
        n_iter=n_iter,
        time_s=time.perf_counter() - start,
        notes=notes,
    )
    check_finite_result(result)  # a NaN/Inf is never reported, certified or not
    return result
