"""Incremental certificates: a certified AutoLip bound at step ``t`` from the certificate of an
anchor step ``s`` and the weight change (``docs/design/issue10/incremental.md``, item 2 of
issue 10).

For every affine chain ``A`` certified at the anchor (``σ_cert(A_s) ≥ ‖A_s‖₂``, a
``LayerBound`` of a certified :func:`~lipreg.functional.autolip.autolip` result), the triangle
inequality (Weyl)

.. math:: ‖A_t‖_2 \\le ‖A_s‖_2 + ‖A_t − A_s‖_2 \\le σ_{cert}(A_s) + β(A_t − A_s)      \\qquad (1)

is certified as soon as ``β ≥ ‖A_t − A_s‖₂`` is (:mod:`lipreg.functional.incremental_bounds`),
and AutoLip's walk over the per-chain factors stays a certified Lipschitz bound (activations'
constants do not change). Three kinds of chains get an increment, everything else is certified
in full by the normal ladder:

* **dense**: isometries around ONE dense weight ``W`` (``‖A‖ = c · ‖W‖``, ``c`` the product of
  the isometries' closed-form scales): ``value = σ_cert + c · β(W_t − W_s)``;
* **merged-dense**: isometries around ``[scale]* dense [scale]*`` (batch norms on feature
  vectors, :func:`merged_dense`), exactly as merged-conv below with the matrix
  ``M̂ = diag(s_out) W diag(s_in)`` and the Schur test for ``‖|M̂|‖``;
* **merged-conv**: isometries around ``[scale]* conv [scale]*`` (batch norms folded into one
  kernel by :func:`~lipreg.functional.conv_chain.merged_conv`): with the computed float64
  merged kernels ``K̂_s``, ``K̂_t`` and their folding errors ``e_s``, ``e_t``
  (:func:`~lipreg.functional.rounding.folded_kernel_error` × the kernel's absolute norm, as the
  ladder's ``merged_conv_value``),
  ``‖A_t‖ ≤ c (‖M_s‖ + e_s + ‖A_{K̂_t − K̂_s}‖ + e_t)``, so
  ``value = σ_cert + c · (β(K̂_t − K̂_s) + e_s + e_t)``. Differencing the merged kernels
  (incremental.md §3) handles moving running statistics and ``γ = 0`` channels alike.
  Merged chains also get the ratio bound (2'') of :mod:`lipreg.functional.incremental_scaled`
  (``r_out r_in σ_cert + c·β(D_out,t ⊙ (K_t − K_s ⊙ m) ⊙ D_in,t)``, the scales and the raw
  weight kept apart), and the value is the smaller: when the batch-norm statistics move a lot,
  the merged difference grows with them and the ratio bound only by their ratio. Convolution
  increments count only the taps that read real input (small feature maps: a 3 × 3 kernel on
  a 1 × 1 map reads its centre tap only; :func:`~lipreg.functional.incremental_bounds.
  conv_increment_bound`).

With ``refresh_slack`` (:func:`incremental_autolip`), a chain whose incremental value is too
far above its estimate is also certified in full and keeps the smaller value (training that
moves some chains far from the anchor; ``docs/design/issue10/incremental.md`` §9).

For dense weights the anchor may also hold a top-16 Ritz space and a certified bound on the
rest of the spectrum; the value is then the smaller of (1) and the second-order bound (5)
(:mod:`lipreg.functional.incremental_ritz`), whose slack grows like ``‖Δ‖²/gap``.

``c`` is the same at ``s`` and ``t`` only if every isometry's scale is bit-identical: each is
an exact bijective isometry times its scale, so ``‖A‖ = c‖core‖`` at both steps; any change of
a scale, of the chain's ops, shapes, kernel geometry or rule is refused (``None``: the full
certificate answers), never treated as unchanged. ``W_t − W_s`` is formed in float64
(relative error ``u``, covered by a factor ``1 + 2u``); the final sum is rounded up.

**Precondition.** The anchor's certificate must be of the model *at the anchor's weights*:
:func:`make_anchor` copies the weights when it is called, so call it with the result of a
certificate of the current weights (or use :func:`certified_anchor`, which does both).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, fx, nn

from lipreg.functional.analysis import Analysis, analyse
from lipreg.functional.analysis_cache import AnalysisCache
from lipreg.functional.autolip import autolip
from lipreg.functional.banded_gram import abs_norm_bound
from lipreg.functional.chains import AffineChain, find_affine_chains
from lipreg.functional.conv_chain import merged_conv
from lipreg.functional.incremental_bounds import (
    CONV_GRAM_ITERATION_FLOPS,
    GRAM_ITERATION_FLOPS,
    conv_increment_bound,
    dense_increment_bound,
    schur_bound_matrix,
)
from lipreg.functional.incremental_ritz import RitzAnchor, ritz_anchor, ritz_bound
from lipreg.functional.incremental_scaled import (
    ScaledCore,
    scaled_core,
    scaled_increment_bound,
)
from lipreg.functional.ladder import CLOSED_FORM_PAD, LADDER, ChainContext, LadderEntry
from lipreg.functional.lmi import UNIT_ROUNDOFF
from lipreg.functional.results import LayerBound, LipschitzResult
from lipreg.functional.rounding import folded_kernel_error
from lipreg.functional.specs import Affine

__all__ = [
    "ChainAnchor",
    "CoreMap",
    "IncrementalAnchor",
    "certified_anchor",
    "chain_core",
    "chain_signature",
    "incremental_autolip",
    "incremental_entry",
    "make_anchor",
    "merged_dense",
    "slack",
]

# fl(W_t − W_s) = (W_t − W_s)(1 + δ), |δ| ≤ u: a bound on the computed difference, times this,
# bounds the exact one.
_DIFFERENCE_PAD = 1.0 + 2.0 * UNIT_ROUNDOFF
METHOD_PREFIX = "incremental"


@dataclass(frozen=True)
class CoreMap:
    """The non-isometric part of a chain that an increment can be taken of.

    ``rule`` is ``"dense"`` (``weight`` the float64 ``(out, in)`` matrix), ``"merged-dense"``
    (``weight`` the float64 matrix with the batch-norm scales folded in, :func:`merged_dense`)
    or ``"merged-conv"`` (``weight`` the float64 merged kernel, ``geometry`` ``(stride,
    padding, dilation, groups, in_shape)``); ``kernel_error`` the
    :func:`~lipreg.functional.rounding.folded_kernel_error` of the folded scales; ``scaled``
    (merged rules) the raw weight and the scales apart, for the ratio bound
    (:mod:`lipreg.functional.incremental_scaled`).
    """

    rule: str
    weight: Tensor
    geometry: tuple = ()
    kernel_error: float = 0.0
    scaled: ScaledCore | None = None

    def folding_error(self) -> float:
        """``kernel_error · ‖|A_K̂|‖₂`` (0 without folded scales)."""
        if not self.kernel_error:
            return 0.0
        weight = self.weight.to(torch.float64)
        if self.rule == "merged-dense":  # ‖|M̂|‖ ≤ sqrt(‖M̂‖₁‖M̂‖_∞), the Schur test
            return math.nextafter(self.kernel_error * schur_bound_matrix(weight), math.inf)
        groups = self.geometry[3]
        return math.nextafter(self.kernel_error * abs_norm_bound(weight, groups), math.inf)


def chain_core(specs: Sequence[Affine]) -> CoreMap | None:
    """The chain's core (``specs`` float64, in application order) as a :class:`CoreMap`, or
    ``None`` when no increment rule applies (no non-isometric op, a closed-form op, several
    weights, anything :func:`~lipreg.functional.conv_chain.merged_conv` refuses)."""
    inner = [i for i, s in enumerate(specs) if not s.isometry]
    if not inner:
        return None
    core = [specs[i] for i in inner]
    if len(core) == 1 and core[0].norm is not None:
        return None  # closed form: exact, the ladder answers it
    if len(core) == 1 and core[0].weight is not None:
        return CoreMap("dense", core[0].weight.detach().to(torch.float64))
    span = specs[inner[0] : inner[-1] + 1]
    dense = merged_dense(span)
    kappa = folded_kernel_error(len(span) - 1)
    if dense is not None:
        return CoreMap("merged-dense", dense, (), kappa, scaled_core(span))
    conv = merged_conv(span)
    if conv is None:
        return None
    geometry = (conv.stride, conv.padding, conv.dilation, conv.groups, conv.in_shape)
    weight = conv.weight.detach().to(torch.float64)
    return CoreMap("merged-conv", weight, geometry, kappa, scaled_core(span))


def merged_dense(specs: Sequence[Affine]) -> Tensor | None:
    """The chain ``[scale]* dense [scale]*`` (batch norms on feature vectors around one dense
    layer, ``specs`` in application order) as ONE float64 matrix
    ``M̂ = diag(s_out) W diag(s_in)`` (its rounding: ``|M̂ − M| ≤ κ|M̂|`` with ``κ`` the
    :func:`~lipreg.functional.rounding.folded_kernel_error` of the scalings), or ``None``."""
    weights = [i for i, s in enumerate(specs) if s.weight is not None]
    if len(weights) != 1:
        return None
    k = weights[0]
    M = specs[k].weight.detach().to(torch.float64)  # type: ignore[union-attr]
    for i, spec in enumerate(specs):
        if i == k:
            continue
        scale = spec.channel_scale
        side = M.shape[1] if i < k else M.shape[0]
        if scale is None or scale.dim() != 1 or scale.shape[0] != side:
            return None
        scale = scale.detach().to(torch.float64)
        M = M * scale[None, :] if i < k else scale[:, None] * M
    return M


def chain_signature(analysis: Analysis, chain: AffineChain) -> tuple:
    """What must not change between anchor and step for an increment to apply: per node its
    label, shapes and which spec fields are set (an architecture change changes it)."""
    items: list[tuple] = [(analysis.label(chain.source), analysis.shapes[chain.source])]
    for node in chain.nodes:
        spec = analysis.specs[node]
        assert isinstance(spec, Affine)
        fields = (
            spec.isometry,
            spec.norm is not None,
            spec.weight is not None,
            spec.conv is not None,
            spec.channel_scale is not None,
            spec.nonnegative,
        )
        items.append((analysis.label(node), analysis.shapes[node], fields))
    return tuple(items)


def isometry_scales(specs: Sequence[Affine]) -> tuple[float, ...]:
    """The closed-form scales of the chain's isometries, in order (compared bit for bit)."""
    return tuple(float(s.norm) for s in specs if s.isometry)  # type: ignore[arg-type]


@dataclass
class ChainAnchor:
    """One chain at the anchor: its certified factor ``sigma`` and what the increment needs
    (``core``: the weight or merged kernel, stored in float32 when that is exact)."""

    name: str
    sigma: float
    signature: tuple
    scales: tuple[float, ...]
    core: CoreMap
    method: str = ""
    ritz: RitzAnchor | None = None
    folding: float = 0.0  # the anchor's folding error (core units)

    @property
    def nbytes(self) -> int:
        ritz = 0 if self.ritz is None else self.ritz.V.numel() * 8
        tensors = [self.core.weight]
        if self.core.scaled is not None:
            scaled = self.core.scaled
            tensors += [scaled.kernel, scaled.d_in, scaled.d_out]
        return sum(t.numel() * t.element_size() for t in tensors) + ritz


@dataclass
class IncrementalAnchor:
    """The anchor of incremental certificates: per chain name a :class:`ChainAnchor`, the
    network-level certified ``value`` and the training ``step`` (if known). ``skipped``:
    chains of the network without an increment rule, with the reason."""

    chains: dict[str, ChainAnchor]
    value: float
    step: int | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Memory held by the weight copies."""
        return sum(c.nbytes for c in self.chains.values())


def _compact_copy(weight: Tensor) -> Tensor:
    """A private copy of a float64 tensor (never a view of a live parameter), in float32 when
    the conversion is exact (half the memory; the increment converts back exactly)."""
    w = weight.detach().to(torch.float64)
    low = w.to(torch.float32)  # a new tensor: w is float64
    return low if torch.equal(low.to(torch.float64), w) else w.clone()


def make_anchor(
    model: nn.Module,
    input_shape: Sequence[int],
    certified: LipschitzResult,
    *,
    traced: fx.GraphModule | None = None,
    analysis64: Analysis | None = None,
    analysis: AnalysisCache | None = None,
    step: int | None = None,
    ritz: int = 16,
    previous: IncrementalAnchor | None = None,
) -> IncrementalAnchor:
    """Anchor incremental certificates at the model's CURRENT weights, whose certified AutoLip
    result is ``certified`` (module docstring: precondition).

    Every chain whose factor in ``certified.layers`` is certified and which has an increment
    rule (:func:`chain_core`) is kept, with a copy of its weight or merged kernel. A float64
    ``analysis64`` of the current weights may be passed, or an
    :class:`~lipreg.functional.analysis_cache.AnalysisCache` ``analysis`` of the model (its
    float64 analysis, read now), else one is made. With ``ritz > 0``
    dense weights whose smaller side is above ``ritz`` (and at most
    :data:`~lipreg.functional.incremental_ritz.RITZ_MAX_SIDE`) also get the anchor of the
    second-order bound (5) (:func:`~lipreg.functional.incremental_ritz.ritz_anchor`: their top
    ``ritz`` singular vectors and a certified bound on the rest of the spectrum; one
    eigendecomposition, or above :data:`~lipreg.functional.incremental_ritz.DENSE_EIGH_SIDE`
    a block Krylov estimate warm-started from the ``previous`` anchor's Ritz vectors of the
    same chain, and one Cholesky test of the Gram matrix per layer).

    Raises:
        ValueError: ``certified`` is not a certified upper bound.
    """
    if certified.kind != "upper":
        raise ValueError(
            f"make_anchor needs a certified AutoLip result (kind 'upper'), got kind "
            f"{certified.kind!r}; run lipreg.autolip(model, shape, certify=True) first."
        )
    if analysis64 is None and analysis is not None:
        analysis64 = analysis.get(torch.float64)
    if analysis64 is None:
        analysis64 = analyse(model, input_shape, dtype=torch.float64, traced=traced)
    layers = {lb.name: lb for lb in certified.layers if lb.kind == "affine" and lb.certified}
    anchor = IncrementalAnchor(chains={}, value=float(certified.value), step=step)
    for chain in find_affine_chains(analysis64).values():
        lb = layers.get(chain.name)
        specs = [analysis64.specs[n] for n in chain.nodes]
        core = chain_core(specs)  # type: ignore[arg-type]
        if lb is None or core is None:
            why = "not a certified factor of the result" if lb is None else "no increment rule"
            anchor.skipped[chain.name] = why
            continue
        scaled = None if core.scaled is None else core.scaled.copy(_compact_copy)
        stored = CoreMap(
            core.rule, _compact_copy(core.weight), core.geometry, core.kernel_error, scaled
        )
        scales = isometry_scales(specs)  # type: ignore[arg-type]
        anchor.chains[chain.name] = ChainAnchor(
            name=chain.name,
            sigma=float(lb.value),
            signature=chain_signature(analysis64, chain),
            scales=scales,
            core=stored,
            method=lb.method,
            ritz=_ritz_anchor(
                core, float(lb.value), scales, ritz, _previous_v(previous, chain.name)
            ),
            folding=core.folding_error(),
        )
    if not anchor.chains:
        warnings.warn(
            "make_anchor: no chain of this network has an increment rule (dense weight or "
            "merged convolution) and a certified factor; every later certificate is a full one.",
            stacklevel=2,
        )
    return anchor


def _previous_v(previous: IncrementalAnchor | None, name: str) -> Tensor | None:
    """The previous anchor's Ritz vectors of chain ``name`` (a warm start), if any."""
    chain = None if previous is None else previous.chains.get(name)
    return None if chain is None or chain.ritz is None else chain.ritz.V


def _ritz_anchor(
    core: CoreMap, sigma: float, scales: tuple[float, ...], k: int, start: Tensor | None = None
) -> RitzAnchor | None:
    """The anchor of bound (5) for a dense core, with ``‖W_s‖ ≤ σ_cert / c`` (``c`` the
    isometries' scale, its float64 product widened by a few ulps); ``start``: a warm start of
    the Ritz vectors."""
    scale = math.prod(scales)
    if k <= 0 or core.rule != "dense" or not scale > 0:
        return None
    norm_s = math.nextafter(sigma / scale * (1 + 16 * UNIT_ROUNDOFF), math.inf)
    return ritz_anchor(core.weight, norm_s, k, start)


def certified_anchor(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    step: int | None = None,
    ritz: int = 16,
    previous: IncrementalAnchor | None = None,
    **autolip_options,
) -> tuple[IncrementalAnchor, LipschitzResult]:
    """Certify the current weights (:func:`~lipreg.functional.autolip.autolip`,
    ``certify=True``) and anchor at them (:func:`make_anchor`, warm-started from
    ``previous``): the safe way to satisfy the precondition."""
    if not autolip_options.pop("certify", True):
        raise ValueError("certified_anchor certifies: certify=False is not allowed.")
    result = autolip(model, input_shape, certify=True, **autolip_options)
    traced, cache = autolip_options.get("traced"), autolip_options.get("analysis")
    anchor = make_anchor(
        model,
        input_shape,
        result,
        traced=traced,
        analysis=cache,
        step=step,
        ritz=ritz,
        previous=previous,
    )
    return anchor, result


def _increment(
    anchor: ChainAnchor, core: CoreMap, gram_flops: float
) -> tuple[float, float, str] | None:
    """``(β, folding errors, which bound)`` in core units, or ``None`` when the core's rule,
    shape or geometry differs from the anchor's."""
    old = anchor.core
    if core.rule != old.rule or core.weight.shape != old.weight.shape:
        return None
    if core.geometry != old.geometry or core.kernel_error != old.kernel_error:
        return None
    folding = 0.0
    if core.kernel_error:
        folding = math.nextafter(anchor.folding + core.folding_error(), math.inf)
    # float64 (the anchor's float32 copy, when it is one, converts exactly, on the fly)
    delta = core.weight - old.weight
    if core.rule in ("dense", "merged-dense"):
        beta, which = dense_increment_bound(delta, gram_flops=gram_flops)
    else:
        stride, padding, dilation, groups, in_shape = core.geometry
        beta, which = conv_increment_bound(
            delta,
            stride,
            dilation,
            groups,
            padding=padding,
            in_spatial=in_shape[1:],
            gram_flops=gram_flops,
        )
    if which == "zero":
        return 0.0, folding, "unchanged"
    return math.nextafter(beta * _DIFFERENCE_PAD, math.inf), folding, which


def incremental_entry(
    anchor: IncrementalAnchor,
    *,
    estimate: bool = True,
    gram_flops: float = GRAM_ITERATION_FLOPS,
    refresh_slack: float | None = None,
    conv_gram_flops: float = CONV_GRAM_ITERATION_FLOPS,
) -> LadderEntry:
    """A certificate-ladder entry (:mod:`lipreg.functional.ladder`) answering, for the chains
    of ``anchor`` whose structure, isometry scales and rule are unchanged,
    ``σ_cert(A_s) + c·(β + folding errors)`` rounded up (module docstring), or for dense
    weights with a Ritz anchor the smaller of that and ``c ×`` the second-order bound (5)
    (:func:`~lipreg.functional.incremental_ritz.ritz_bound`), with
    ``method="incremental (<rule>: <bound>)"`` and ``extra`` ``anchor`` (σ_s), ``increment``
    (``c·β``), ``folding`` (``c·(e_s + e_t)``), ``first_order`` (bound (1)) and ``ritz``
    (bound (5), when computed); ``None`` for every other chain.

    With ``estimate=True`` (default) the chain's warm Lanczos estimate is also run and reported
    as ``estimate`` (what :func:`slack` compares with); else ``estimate`` is ``None``.
    ``gram_flops``: dense changes get the Gram-iteration bound when it costs at most this
    many multiply-adds (:func:`~lipreg.functional.incremental_bounds.dense_increment_bound`;
    ``math.inf``: always, which tightens ``β`` by 30–60 % and, through the gap, bound (5)
    under Adam, at ≈ 0.15 s per 1000 × 1000 layer).

    ``conv_gram_flops``: the same budget for the changes of convolution kernels (their
    im2col matrices, live taps only): larger by default, measured on resnet18 at 32 × 32
    (incremental.md §9) to halve the slack for ≈ 0.3 s per call.

    ``refresh_slack``: a chain whose incremental value exceeds ``(1 + refresh_slack) ×`` its
    estimate is also certified by the rest of the ladder (in full, its estimate reused) and
    gets the smaller of the two values (``extra["incremental"]`` keeps the incremental one):
    the per-chain refresh of incremental.md §9, for training that moves some chains far from
    the anchor (batch-norm networks in train mode under SGD with momentum). ``None``
    (default): never. Needs ``estimate=True``.

    Raises:
        ValueError: ``refresh_slack`` given with ``estimate=False``, or negative.
    """
    if refresh_slack is not None and (not estimate or not refresh_slack >= 0):
        raise ValueError(
            f"refresh_slack={refresh_slack!r} needs estimate=True and a value >= 0 (it compares "
            "each chain's incremental value with its estimate)."
        )

    def entry(ctx: ChainContext) -> LayerBound | None:
        if not ctx.bounder.certify:
            return None
        chain_anchor = anchor.chains.get(ctx.chain.name)
        if chain_anchor is None:
            return None
        specs = ctx.bound_specs
        if chain_signature(ctx.bounder.analysis64, ctx.chain) != chain_anchor.signature:
            return None
        if isometry_scales(specs) != chain_anchor.scales:
            return None
        core = chain_core(specs)
        flops = conv_gram_flops if core is not None and core.rule == "merged-conv" else gram_flops
        answer = None if core is None else _increment(chain_anchor, core, flops)
        if answer is None:
            return None
        assert core is not None
        second = None
        if chain_anchor.ritz is not None and answer[0] > 0:
            second = ritz_bound(core.weight, chain_anchor.ritz, answer[0])
        ratio = _ratio_bound(chain_anchor, core, flops) if answer[0] > 0 else None
        bound = _incremental_bound(ctx, chain_anchor, answer, (second, ratio), estimate)
        if refresh_slack is not None and _too_loose(bound, refresh_slack):
            return _refreshed(ctx, entry, bound)
        return bound

    entry.__name__ = entry.__qualname__ = "incremental_entry"
    return entry


def _too_loose(bound: LayerBound, refresh_slack: float) -> bool:
    """The incremental value is above ``(1 + refresh_slack) ×`` the chain's estimate."""
    return bound.estimate is not None and bound.value > (1.0 + refresh_slack) * bound.estimate


def _refreshed(ctx: ChainContext, entry: LadderEntry, bound: LayerBound) -> LayerBound:
    """The smaller of ``bound`` and the certificate of the ladder's entries after ``entry``
    (the first that answers with a certified value; its estimate is ``bound``'s, from the same
    cached iteration, when it has none)."""
    ladder = list(ctx.bounder.ladder)
    after = ladder[ladder.index(entry) + 1 :] if entry in ladder else list(LADDER)
    for other in after:
        fresh = other(ctx)
        if fresh is None:
            continue
        if not fresh.certified or not fresh.value < bound.value:
            return bound
        estimate = bound.estimate if fresh.estimate is None else fresh.estimate
        return replace(fresh, estimate=estimate, extra={**fresh.extra, "incremental": bound.value})
    return bound


def _chain_scale(anchor: ChainAnchor) -> float:
    """``≥ c``: the product of the isometries' float64 scales, padded as the ladder pads
    closed forms (it is rounded)."""
    scale = math.prod(anchor.scales)
    return scale * CLOSED_FORM_PAD if scale != 1.0 else 1.0


def _ratio_bound(
    anchor: ChainAnchor, core: CoreMap, gram_flops: float
) -> tuple[float, float, str] | None:
    """The ratio bound (2') of :mod:`lipreg.functional.incremental_scaled` (chain units), for
    merged chains whose anchor kept the scales apart; else ``None``."""
    if anchor.core.scaled is None or core.scaled is None:
        return None
    return scaled_increment_bound(
        anchor.core.scaled, core.scaled, anchor.sigma, _chain_scale(anchor), gram_flops
    )


def _incremental_bound(
    ctx: ChainContext,
    anchor: ChainAnchor,
    answer: tuple[float, float, str],
    others: tuple[float | None, tuple[float, float, str] | None],
    estimate: bool,
) -> LayerBound:
    """The certified factor: the smallest of ``σ_s + c·(β + folding)``, ``c ×`` the Ritz bound
    (5) and the ratio bound (2') (``others``, each when available), as a :class:`LayerBound`."""
    beta, folding, which = answer
    second, ratio = others
    scale = _chain_scale(anchor)
    increment = math.nextafter(scale * beta, math.inf) if beta else 0.0
    widening = math.nextafter(scale * folding, math.inf) if folding else 0.0
    value = anchor.sigma
    if increment or widening:
        value = math.nextafter((value + increment + widening) * (1 + 2 * UNIT_ROUNDOFF), math.inf)
    extra = {"anchor": anchor.sigma, "increment": increment, "folding": widening}
    extra["first_order"] = value
    if second is not None:
        second = math.nextafter(scale * second, math.inf)
        extra["ritz"] = second
        if second < value:
            value, which = second, "ritz"
    if ratio is not None:
        extra["ratio"], extra["ratio_increment"] = ratio[0], ratio[1]
        if ratio[0] < value:
            value, which = ratio[0], ratio[2]
    sigma_est, n_iter = None, 0
    if estimate:
        res = ctx.iterative()
        sigma_est, n_iter = res.sigma, res.n_iter
    return LayerBound(
        name=ctx.chain.name,
        kind="affine",
        value=value,
        certified=True,
        estimate=sigma_est,
        upper=value,
        method=f"{METHOD_PREFIX} ({anchor.core.rule}: {which})",
        n_iter=n_iter,
        extra=extra,
    )


def incremental_autolip(
    model: nn.Module,
    input_shape: Sequence[int],
    anchor: IncrementalAnchor,
    *,
    gram_flops: float = GRAM_ITERATION_FLOPS,
    refresh_slack: float | None = None,
    conv_gram_flops: float = CONV_GRAM_ITERATION_FLOPS,
    **autolip_options,
) -> LipschitzResult:
    """A certified AutoLip bound of the current weights with the anchor's chains certified
    incrementally (:func:`incremental_entry` first, then the full :data:`~lipreg.functional.
    ladder.LADDER` for the others): ``autolip(model, input_shape, certify=True,
    ladder=[incremental_entry(anchor, gram_flops=gram_flops, refresh_slack=refresh_slack),
    *LADDER], **autolip_options)`` (and ``conv_gram_flops``, see there). ``refresh_slack``
    (default ``None``: off) certifies in full the chains whose incremental value is above
    ``(1 + refresh_slack) ×`` their estimate (:func:`incremental_entry`).

    ``notes`` gain one line: the value relative to the anchor's, and the chains certified in
    full (no anchor, or a changed structure / isometry scale / rule). Per-chain increments are
    in each layer's ``extra``.

    Raises:
        ValueError: ``certify=False`` or ``ladder=`` given (this function sets both).
    """
    if not autolip_options.pop("certify", True) or "ladder" in autolip_options:
        raise ValueError(
            "incremental_autolip always certifies with its own ladder: do not pass "
            "certify=False or ladder=."
        )
    entry = incremental_entry(
        anchor,
        gram_flops=gram_flops,
        refresh_slack=refresh_slack,
        conv_gram_flops=conv_gram_flops,
    )
    ladder = [entry, *LADDER]
    result = autolip(model, input_shape, certify=True, ladder=ladder, **autolip_options)
    result.notes.append(_increment_note(result, anchor))
    return result


def _increment_note(result: LipschitzResult, anchor: IncrementalAnchor) -> str:
    """One line: the chains certified incrementally, the value against the anchor's, and
    which chains were certified in full."""
    affine = [lb for lb in result.layers if lb.kind == "affine"]
    incremental = [lb for lb in affine if lb.method.startswith(METHOD_PREFIX)]
    full = [lb.name for lb in affine if not lb.method.startswith(METHOD_PREFIX)]
    step = "" if anchor.step is None else f" (step {anchor.step})"
    change = result.value / anchor.value - 1 if anchor.value > 0 else math.inf
    # the names of at most 10 chains certified in full (their count always)
    more = f" and {len(full) - 10} more" if len(full) > 10 else ""
    full_text = f"; certified in full: {full[:10]}{more}" if full else ""
    return (
        f"incremental certificate: {len(incremental)} of {len(affine)} affine chains from the "
        f"anchor{step} of value {anchor.value:.6g}; value {result.value:.6g} "
        f"({change:+.3%} vs the anchor){full_text}."
    )


def slack(result: LipschitzResult) -> float:
    """``result.value / result.estimate − 1``: the estimate (Lanczos values, below the true
    norms) is from the same call, so this over-states the true slack ``value/L − 1`` and never
    under-states it (the re-anchor trigger of incremental.md §7).

    Raises:
        ValueError: no estimate, or an affine factor without its own estimate (its value would
            stand in for it and hide slack).
    """
    missing = [lb.name for lb in result.layers if lb.kind == "affine" and lb.estimate is None]
    if result.estimate is None or missing:
        raise ValueError(
            f"slack needs a result whose every affine factor has an estimate; missing for "
            f"{missing or 'the total'}. Use incremental_entry(anchor, estimate=True)."
        )
    if result.estimate <= 0:
        return 0.0 if result.value <= 0 else math.inf
    return result.value / result.estimate - 1.0
