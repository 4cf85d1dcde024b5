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
``method="exact"`` *and* full (untruncated) SVDs of every map, or with ``certify=True``.
Greedy values are feasible points, so they lie *below* exact SeqLip, and top-``k`` truncation
drops directions: both are estimates (``certified=False``) and can fall below the true
Lipschitz constant.

**certify=True** (any width): every SeqLip chain of several maps is materialised in float64
and bounded by :func:`lipreg.functional.seqlip_certified.certified_seqlip`, one
one-hidden-layer LMI per pair in SeqLip's metrics, each factor proved by a float64 Cholesky
test with an explicit rounding radius (no SVD, no enumeration: ``method``,
``exact_width_limit`` and ``n_restarts`` are not used, and ``top_k`` is refused). The smallest
of its variants is kept (``"merged"``: the certified counterpart of exact SeqLip, within a
few % of it; ``"optimised"``: the inner metrics optimised too, often well below exact
SeqLip, only up to hidden width :data:`METRIC_OPT_WIDTH`; the ``"seqlip"`` ends variant,
never below ``"merged"`` in our measurements, is not computed here). Cost, one core: width
200, ~4 s; 784-1000-1000-10, ~35 s ("merged" only). A chain whose maps or pair LMIs do
not fit ``dense_limit`` or the memory budget (default 1 GiB,
:func:`lipreg.functional.certify.memory_budget`) is refused with a ``ValueError`` before any
work; single-map chains use the certified ladder. As for every dense certificate in lipreg, a
chain of several nodes (e.g. conv → batch norm) is materialised in float64 and that matrix is
the one bounded.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, fx, nn

from lipreg.functional.analysis import Analysis, analyse
from lipreg.functional.analysis_cache import AnalysisCache, check_cache_matches
from lipreg.functional.autolip import check_finite_result
from lipreg.functional.certify import RELATIVE_MARGIN, current_budget, matrix_norm_bound
from lipreg.functional.chains import (
    AffineChain,
    SeqChain,
    chain_linear_map,
    segment_chains,
)
from lipreg.functional.ladder import ChainBounder
from lipreg.functional.power_iteration import top_singular_triplets
from lipreg.functional.results import LayerBound, LipschitzResult
from lipreg.functional.rounding import materialisation_error, perturbed_bound
from lipreg.functional.seqlip_certified import certified_seqlip
from lipreg.functional.seqlip_greedy import pair_norm_greedy
from lipreg.functional.seqlip_pairs import (
    ChainSVD,
    dense_svd,
    ldexp_or_inf,
    pair_matrices,
    pair_name,
    pair_norm_exact,
    pow2_normalise,
    truncate,
)

__all__ = ["seqlip"]


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
) -> ChainSVD:
    specs = [analysis.specs[n] for n in chain.nodes]
    op = chain_linear_map(analysis, chain)
    small = min(op.in_features, op.out_features)
    if len(specs) == 1 and specs[0].weight is not None and small <= dense_limit:
        # The float64 analysis holds the model's own weights (a float64 model analysed in
        # float32 would be rounded: its "exact" SVD would bound another network).
        w64 = analysis64.specs[chain.nodes[0]].weight
        assert w64 is not None
        return truncate(dense_svd(w64.detach().to(torch.float64)), top_k)
    if small <= dense_limit and op.in_features * op.out_features <= 64 * 2**20:
        dense = chain_linear_map(analysis64, chain).to_dense()
        return truncate(dense_svd(dense), top_k)
    k = top_k or 200
    res = top_singular_triplets(op, k, V0=V0, tol=tol, max_iter=max_iter, generator=generator)
    return ChainSVD(
        U=res.U.to(torch.float64),
        S=res.S.to(torch.float64),
        V=res.V.to(torch.float64),
        exact=False,
        n_iter=res.n_iter,
    )


def _maybe_progress(items: list, progress: bool):
    if not progress:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("progress=True needs tqdm (pip install tqdm); no progress bar.", stacklevel=3)
        return items
    return tqdm(items, desc="SeqLip")


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
    certify: bool = False,
    traced: fx.GraphModule | None = None,
    analysis: AnalysisCache | None = None,
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
        certify: certified pair LMIs at any width (module docstring): ``method``,
            ``exact_width_limit`` and ``n_restarts`` are then unused; ``top_k`` must be
            ``None``; ``state`` warm-starts the multipliers.
        traced: a graph from :func:`lipreg.functional.trace.trace` of ``model``, to skip
            re-tracing (the probe and the rules still run on the current weights).
        analysis: an :class:`~lipreg.functional.analysis_cache.AnalysisCache` of this
            ``model`` and ``input_shape`` (e.g. the one :class:`lipreg.AutoLip` holds, which a
            callback also uses for AutoLip): its trace and probe are reused while the model's
            structure is unchanged and every spec re-reads the current weights, so the result
            equals the one without it.

    Returns:
        :class:`~lipreg.functional.results.LipschitzResult`, ``method`` ``"seqlip-exact"``,
        ``"seqlip-greedy"`` or ``"seqlip-certified"``; ``certified`` for exact SeqLip with
        full SVDs and for ``certify=True``.

    Raises:
        ValueError: with ``certify=True``, a SeqLip chain too large to materialise (message
            says which pair, what it needs, and what to do instead).
        ValueError: a non-finite (NaN/Inf) total or layer value (message mentions
            "non-finite"): never reported, certified or not.
        ValueError: ``analysis`` is the cache of another model or input shape, or
            ``traced`` is not its graph.
    """
    start = time.perf_counter()
    _check_options(method, top_k, certify)
    current, analysis64 = _analyses(model, input_shape, dtype, traced, analysis)
    items, notes = segment_chains(current)
    if certify:  # refuse before any heavy work
        _check_certifiable(items, current, dense_limit)
    elif method == "exact":
        _check_exact_widths(items, current, exact_width_limit)
    run = _Run(current, model, method, top_k, dense_limit, n_restarts, tol, max_iter, dtype)
    run.analysis64 = analysis64
    run.certify = certify
    run.state, run.notes = dict(state or {}), notes  # warm starts in, notes out
    run.generator.manual_seed(seed)  # a private generator: the global RNG is untouched
    for item in _maybe_progress(items, progress):
        if isinstance(item, LayerBound):
            run.layers.append(item)
        elif len(item.maps) == 1:
            run.single_map(item.maps[0])
        else:
            run.chain(item)
    return _result(run, start)


def _analyses(
    model: nn.Module,
    input_shape: Sequence[int],
    dtype: torch.dtype,
    traced: fx.GraphModule | None,
    cache: AnalysisCache | None,
) -> tuple[Analysis, Analysis | None]:
    """The analysis at ``dtype`` and its float64 twin (exact SVDs, certificates): both from
    ``cache`` when given (the float64 one read right after, as the cache requires), else one
    trace (or ``traced``) and one probe, the float64 twin then derived on demand (``None``)."""
    if cache is None:
        return analyse(model, input_shape, dtype=dtype, traced=traced), None
    check_cache_matches(cache, model, input_shape, traced)
    current = cache.get(dtype)
    return current, cache.also_at(torch.float64)


def _check_options(method: str, top_k: int | None, certify: bool = False) -> None:
    if method not in ("greedy", "exact"):
        raise ValueError(f"method must be 'greedy' or 'exact', got {method!r}.")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}.")
    if certify and top_k is not None:
        raise ValueError(
            "certify=True bounds every pair from the full maps (no SVD): top_k truncation "
            f"would make it an estimate. Pass top_k=None (got {top_k!r})."
        )


#: Largest inner hidden width whose metric is optimised by ``seqlip(certify=True)``.
METRIC_OPT_WIDTH = 512

#: Float64 matrices of size ``(m + n)²`` alive at once in a pair certificate (the LMI, its
#: radius, the shifted copy and its Cholesky factor, plus workspace).
_PAIR_MATRICES = 6


def _check_certifiable(
    items: list[SeqChain | LayerBound], analysis: Analysis, dense_limit: int
) -> None:
    """``certify=True`` materialises each map of a chain and an ``(m + n)²`` LMI per pair:
    refuse (before any work) a chain whose sizes exceed ``dense_limit`` or the memory budget."""
    limit = current_budget().limit_bytes
    for item in items:
        if not isinstance(item, SeqChain) or len(item.maps) < 2:
            continue
        for i, m in enumerate(item.maps):
            n_in = math.prod(analysis.shapes[m.source])
            n_out = math.prod(analysis.shapes[m.nodes[-1]])
            side = n_in + (n_out if i < len(item.maps) - 1 else 0)
            need = _PAIR_MATRICES * 8 * side * side
            if max(n_in, n_out) > dense_limit or need > limit:
                raise ValueError(
                    f"seqlip(certify=True) materialises every map of a SeqLip chain and a dense "
                    f"LMI of side m + n per pair; map {m.name!r} is {n_out} x {n_in} (expected "
                    f"both sides <= dense_limit = {dense_limit} and ~{need / 2**20:.0f} MiB <= "
                    f"the memory budget of {limit / 2**20:.0f} MiB). Use lipreg.autolip for a "
                    "certified bound of this network, seqlip(certify=False) for an estimate, or "
                    "raise dense_limit / the budget (lipreg.functional.certify.memory_budget)."
                )


def _check_exact_widths(
    items: list[SeqChain | LayerBound], analysis: Analysis, exact_width_limit: int
) -> None:
    """Exact SeqLip enumerates ``2^n`` patterns per pair: refuse widths above the limit."""
    for item in items:
        if not isinstance(item, SeqChain):
            continue
        for m in item.maps[:-1]:
            width = math.prod(analysis.shapes[m.nodes[-1]])
            if width > exact_width_limit:
                raise ValueError(
                    f"exact SeqLip enumerates 2^n activation patterns per pair; the "
                    f"activation after {m.name!r} has n = {width} > exact_width_limit "
                    f"= {exact_width_limit}. Use method='greedy' (an estimate) or "
                    "raise exact_width_limit (cost doubles with each unit)."
                )


class _Run:
    """One SeqLip computation: its options, and the factors, state and notes collected."""

    def __init__(
        self,
        analysis: Analysis,
        model: nn.Module,
        method: str,
        top_k: int | None,
        dense_limit: int,
        n_restarts: int,
        tol: float,
        max_iter: int,
        dtype: torch.dtype,
    ) -> None:
        self.analysis, self.model, self.method, self.top_k = analysis, model, method, top_k
        self.dense_limit, self.n_restarts, self.tol = dense_limit, n_restarts, tol
        self.max_iter, self.dtype = max_iter, dtype
        self.state: dict[str, Tensor] = {}
        self.notes: list[str] = []
        self.generator = torch.Generator(device=analysis.device)
        self.layers: list[LayerBound] = []
        self.new_state: dict[str, Tensor] = {}
        self.certified = True
        self.certify = False
        self.n_iter = 0
        self.analysis64: Analysis | None = None  # the float64 twin, if the caller has it

    @functools.cached_property
    def bounder(self) -> ChainBounder:
        """The certificate ladder for single-map chains (certified only for exact SeqLip);
        its float64 analysis also gives the exact SVDs."""
        return ChainBounder(
            self.analysis,
            self.model,
            certify=self.method == "exact" or self.certify,
            tol=self.tol,
            max_iter=max(self.max_iter, 500),
            method="lanczos",
            state=self.state,
            generator=self.generator,
            dense_limit=self.dense_limit,
            given_analysis64=self.analysis64,
        )

    def single_map(self, chain: AffineChain) -> None:
        """A SeqLip chain of one map contributes its norm (the certificate ladder)."""
        lb = self.bounder.bound(chain)
        self.layers.append(lb)
        self.certified &= lb.certified
        self.n_iter += lb.n_iter
        if chain.name in self.bounder.new_state:
            self.new_state[chain.name] = self.bounder.new_state[chain.name]

    def svd(self, chain: AffineChain) -> ChainSVD:
        """The SVD of one map of a chain; an iterative one is noted (an estimate)."""
        svd = _svd_of_chain(
            self.bounder.analysis64,  # same nodes, float64 specs: no second probe
            self.analysis,
            chain,
            top_k=self.top_k,
            dense_limit=self.dense_limit,
            tol=self.tol,
            max_iter=self.max_iter,
            generator=self.generator,
            V0=self.state.get(f"seqlip:{chain.name}"),
        )
        self.n_iter += svd.n_iter
        if not svd.exact:
            self.certified = False
            self.new_state[f"seqlip:{chain.name}"] = svd.V.to(self.dtype)
            full = svd.S.numel() >= min(svd.U.shape[0], svd.V.shape[0])
            what = "all" if full else "the top"
            self.notes.append(
                f"{chain.name}: {what} {svd.S.numel()} singular triplets, computed by block "
                "subspace iteration (iterative"
                + ("" if full else ", truncated")
                + "; the result is an estimate, not a bound)."
            )
        return svd

    def chain(self, item: SeqChain) -> None:
        """The pair factors of a SeqLip chain of several maps."""
        if self.certify:
            self.certified_chain(item)
            return
        svds = [self.svd(m) for m in item.maps]
        pairs = pair_matrices([s.factors() for s in svds])
        start = len(self.layers)
        for i, (A, B) in enumerate(pairs):
            lo, hi, act = item.boxes[i]
            name = pair_name(item.maps[i].name, act, item.maps[i + 1].name)
            exact = svds[i].exact and svds[i + 1].exact
            self.layers.append(self.pair(name, A, B, lo, hi, exact))
        if all(lb.certified for lb in self.layers[start:]):  # exact pairs of exact SVDs
            self.widen(item, start, [float(s.S.max()) for s in svds])

    def widen(self, item: SeqChain, start: int, norms: list[float]) -> None:
        """The chain's factors (``self.layers[start:]``) bound the network of the float64
        matrices as computed; a chain of several ops was materialised with a rounding error
        (:func:`~lipreg.functional.rounding.materialisation_error`), so one more factor widens
        the product to the exact maps (:func:`~lipreg.functional.rounding.perturbed_bound`;
        ``norms``: the computed matrices' norms)."""
        a64 = self.bounder.analysis64
        errors = []
        for chain in item.maps:
            specs = [a64.specs[n] for n in chain.nodes]
            lone = len(specs) == 1 and specs[0].weight is not None
            errors.append(0.0 if lone else materialisation_error(a64, chain))
        if not any(errors):
            return
        first, last = item.maps[0].name, item.maps[-1].name
        if any(e is None for e in errors):
            raise ValueError(
                f"SeqLip chain {first} ... {last}: an op's float64 materialisation has no "
                "rounding bound (its rule states neither a weight, a convolution, a scaling, "
                "an isometry nor non-negativity); no certified SeqLip for this network. Use "
                "lipreg.autolip or lipreg.certified_bound."
            )
        value = math.prod(lb.value for lb in self.layers[start:])
        lips = math.prod(max(abs(lo), abs(hi)) for lo, hi, _ in item.boxes)
        widened = perturbed_bound(value, [n * (1 + RELATIVE_MARGIN) for n in norms], errors, lips)
        factor = widened / value * (1 + RELATIVE_MARGIN) if value > 0 else 1.0
        self.layers.append(
            LayerBound(
                name=f"{first} ... {last} (float64 rounding of the materialised maps)",
                kind="rounding",
                value=factor,
                certified=True,
                upper=factor,
                method="rounding",
                extra={"errors": errors},
            )
        )

    def dense_map(self, chain: AffineChain) -> Tensor:
        """The float64 matrix of one map (the model's own weight for a single dense layer)."""
        a64 = self.bounder.analysis64
        specs = [a64.specs[n] for n in chain.nodes]
        if len(specs) == 1 and specs[0].weight is not None:
            return specs[0].weight.detach().to(torch.float64)
        return chain_linear_map(a64, chain).to_dense()

    def certified_chain(self, item: SeqChain) -> None:
        """Certified pair factors of a chain (:func:`certified_seqlip`), warm-started from
        ``state`` (keys ``seqlip-certified:<first map>:<variant>:<index>``)."""
        names = [
            pair_name(item.maps[i].name, act, item.maps[i + 1].name)
            for i, (_, _, act) in enumerate(item.boxes)
        ]
        key = f"seqlip-certified:{item.maps[0].name}"
        # "seqlip" ends: never below "merged" (measured). The metric optimisation has
        # O(width^2) parameters; above METRIC_OPT_WIDTH it gained nothing (width 1000).
        widths = [math.prod(self.analysis.shapes[m.nodes[-1]]) for m in item.maps[:-2]]
        ends = ("merged", "optimised") if max(widths, default=0) <= METRIC_OPT_WIDTH else "merged"
        if ends == "merged":
            self.notes.append(
                f"{item.maps[0].name} ... {item.maps[-1].name}: inner metrics not optimised "
                f"(hidden width {max(widths)} > {METRIC_OPT_WIDTH}: it costs more than the pairs "
                "and gained nothing at width 1000); SeqLip's metrics used."
            )
        warm = {  # multipliers per variant, and the optimised inner metrics
            e: [self.state[f"{key}:{e}:{k}"] for k in range(size)]
            for e, size in (
                ("merged", len(names)),
                ("optimised", len(names)),
                ("optimised:metrics", len(names) - 1),
            )
            if all(f"{key}:{e}:{k}" in self.state for k in range(size))
        }
        maps = [self.dense_map(m) for m in item.maps]
        start = len(self.layers)
        cert = certified_seqlip(
            maps,
            [(lo, hi) for lo, hi, _ in item.boxes],
            names=names,
            end_names=(f"{item.maps[0].name} (input end)", f"{item.maps[-1].name} (output end)"),
            warm=warm,
            ends=ends,
        )
        for f in cert.factors:
            self.layers.append(
                LayerBound(
                    name=f.name,
                    kind="seqlip-pair" if f.kind == "pair" else "seqlip-end",
                    value=f.value,
                    certified=True,
                    upper=f.value,
                    method=cert.method,
                    extra=dict(f.extra),
                )
            )
        for e, ts in cert.multipliers.items():
            for k, t in enumerate(ts):
                self.new_state[f"{key}:{e}:{k}"] = t
        self.widen(item, start, [matrix_norm_bound(w)[0] for w in maps])
        values = ", ".join(f"{e} {v:.6g}" for e, v in cert.values.items())
        self.notes.append(
            f"{item.maps[0].name} ... {item.maps[-1].name}: certified chained pairs ({values}); "
            f"kept {cert.method} ({cert.seconds:.1f} s)."
        )

    def pair(
        self, name: str, A: Tensor, B: Tensor, lo: float, hi: float, exact: bool
    ) -> LayerBound:
        """One pair factor, exact (certified with exact SVDs, padded by RELATIVE_MARGIN) or
        greedy (an estimate)."""
        # Exact power-of-two scalings 2^-a, 2^-b keep the pair's products in range; the
        # value is scaled back by 2^(a+b) (inf beyond float64, rejected as non-finite).
        A, a_exp = pow2_normalise(A)
        B, b_exp = pow2_normalise(B)
        if self.method == "exact":
            value, _ = pair_norm_exact(A, B, lo, hi)
            value = ldexp_or_inf(value, a_exp + b_exp) * (1 + RELATIVE_MARGIN)
            self.certified &= exact
            upper, method = (value if exact else None), "exact"
        else:
            value, _ = pair_norm_greedy(
                A, B, lo, hi, n_restarts=self.n_restarts, generator=self.generator
            )
            value = ldexp_or_inf(value, a_exp + b_exp)
            self.certified, exact, upper, method = False, False, None, "greedy"
        return LayerBound(
            name=name,
            kind="seqlip-pair",
            value=value,
            certified=exact,
            estimate=value,
            upper=upper,
            method=method,
        )


def _result(run: _Run, start: float) -> LipschitzResult:
    method, notes = ("certified" if run.certify else run.method), run.notes
    if method == "greedy":
        notes.append(
            "greedy SeqLip: each pair's value is attained by a feasible activation pattern, so "
            "it lies below exact SeqLip; it is an estimate, not a certified bound."
        )
    kind = "upper" if run.certified and method in ("exact", "certified") else "estimate"
    if method in ("exact", "certified") and not run.certified:
        msg = f"{method} SeqLip used truncated SVDs or uncertified norms: reported as an estimate."
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
    result = LipschitzResult(
        value=math.prod(lb.value for lb in run.layers),
        kind=kind,
        method=f"seqlip-{method}",
        layers=run.layers,
        state=run.new_state,
        n_iter=run.n_iter,
        time_s=time.perf_counter() - start,
        notes=notes,
    )
    check_finite_result(result)  # a NaN/Inf is never reported, certified or not
    return result
