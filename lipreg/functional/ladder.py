"""The certificate ladder: how the norm of one affine chain is bounded.

An affine chain ``A = A_m ⋯ A_1`` (:mod:`lipreg.functional.chains`) gets its factor from the
first entry of :data:`LADDER` that answers. Each entry is a function
``(ChainContext) -> LayerBound | None``: ``None`` means "not applicable, try the next one". The
entries, in order:

1. :func:`lone_weight_at_model_precision` — one dense layer whose weight is exact at the
   analysis precision: the chunked float64 matrix certificate of the weight.
2. :func:`closed_form` — every op is an isometry times a scalar, or all but one are and that
   one has a closed-form norm: the product of the closed forms.
3. :func:`lone_weight` — isometries around one dense weight: scalars × the weight certificate.
4. :func:`pointwise_conv_chain` — batch norms around one 1×1 convolution on a map of side at
   least :data:`POINTWISE_MIN_SIDE`: the exact ``max_g ‖W_g‖`` of its kernel matrices (side
   ``C``, not the materialised map's ``C · H · W``).
5. :func:`dense_chain` — the whole chain is small enough to materialise: its float64 matrix
   (for a merged convolution, its kernel scattered into the matrix: exact, no float64
   convolution of identity batches) and the dense certificate (tighter than any product).
6. :func:`merged_conv_chain` — ``[batch norm]* conv [batch norm]*``: the scales folded into
   the kernel (:func:`~lipreg.functional.conv_chain.merged_conv`), then the exact-up-to-rounding
   Gram test of the zero-padded convolution (:mod:`lipreg.functional.banded_gram`), or the
   merged kernel's torus bound when that is already within 0.1 % of the estimate, or when the
   Gram test exceeds the cost budget (:data:`GRAM_COST_RATIO`, :data:`GRAM_FREE_COST`) or the
   memory budget (both said in ``method``); several 1×1 convolutions with batch norms: the
   certified norm of the product of their kernel matrices. :data:`TIGHTEST_LADDER` runs the
   Gram test whatever its cost (for the tightest value).
7. :func:`~lipreg.functional.ladder_ops.product_of_op_certificates` — ``‖A‖ ≤ Π_i ‖A_i‖``
   with each ``‖A_i‖`` certified by the first entry of
   :data:`~lipreg.functional.ladder_ops.OP_LADDER` that answers (closed form, dense weight,
   the rule's own ``certify`` (FFT for convolutions), Schur test for non-negative maps,
   materialised op).
8. :func:`estimate` — the Lanczos/power-iteration value, **not** certified (``certified=False``,
   and AutoLip then reports an estimate).

Entries 1 and 3–7 run only with ``certify=True``; 2 and 8 also without.

**Contract of an entry.** It returns a :class:`LayerBound` whose ``value`` is the chain's
factor, with ``certified=True`` only if ``value ≥ ‖A‖_2`` is guaranteed (float64 evaluation
with explicit rounding margins, :mod:`lipreg.functional.certify`); ``estimate`` an iterative
(lower) value when one was computed; and it may store a warm-start vector in
``ctx.bounder.new_state[chain.name]``. To add a certificate, write such a function and insert
it in :data:`LADDER` (or an op-level one in :data:`~lipreg.functional.ladder_ops.OP_LADDER`)
before the entries it should pre-empt. ``estimate`` may be ``None`` when the bounder asks for
certificates only (``ChainBounder.estimates=False``) and the certificate did not need one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field

import torch
from torch import Tensor, nn

from lipreg.functional.analysis import Analysis
from lipreg.functional.banded_gram import (
    ConvNormCertificate,
    GramPlan,
    abs_norm_bound,
    certify_conv_norm,
    conv_matrix,
    conv_pass_flops,
    gram_plan,
    output_spatial,
    pointwise_product_bound,
)
from lipreg.functional.certify import (
    RELATIVE_MARGIN,
    current_budget,
    dense_bytes,
    matrix_norm_certificate,
)
from lipreg.functional.chains import AffineChain, chain_linear_map
from lipreg.functional.conv_bounds import conv_operator_norm_bound
from lipreg.functional.conv_chain import merged_conv
from lipreg.functional.ladder_context import (
    CLOSED_FORM_PAD,
    ChainContext,
    affine_bound,
    warm_vector,
    with_iterative,
)
from lipreg.functional.ladder_ops import product_of_op_certificates
from lipreg.functional.linear_map import LinearMap
from lipreg.functional.results import LayerBound
from lipreg.functional.rounding import folded_kernel_error, materialisation_error
from lipreg.functional.sharding import gathered_agreed, refreshed_specs
from lipreg.functional.specs import Affine, ConvData

__all__ = [
    "AS_TIGHT_AS_DENSE",
    "CLOSED_FORM_PAD",
    "GRAM_COST_RATIO",
    "GRAM_FREE_COST",
    "LADDER",
    "POINTWISE_MIN_SIDE",
    "QUICK_DENSE_FLOPS",
    "TIGHTEST_LADDER",
    "ChainBounder",
    "ChainContext",
    "DenseWithinCost",
    "closed_form",
    "dense_chain",
    "estimate",
    "lone_weight",
    "lone_weight_at_model_precision",
    "merged_conv_chain",
    "merged_conv_chain_tightest",
    "merged_conv_value",
    "pointwise_conv_chain",
    "pointwise_factors",
    "pointwise_reading_inputs",
    "product_of_op_certificates",
    "quick_ladder",
]

# A merged kernel's torus bound this close to the estimate is kept (no Gram test).
TORUS_ACCEPT = 1e-3
# The cost budget of the Gram test (banded_gram.certify_conv_norm) in the default ladder: it
# runs when its predicted cost (GramPlan.cost) is at most GRAM_FREE_COST + GRAM_COST_RATIO ×
# the flops of one forward+backward of the convolution (conv_pass_flops); otherwise the merged
# torus bound is kept, method "fft-merged (cost budget)". Measured (prototypes/h1b_gram_cost.py):
# the test takes about (cost / pass flops) forward+backward passes of the convolution, 170 to
# 2,700 on the layers of real CNNs (16-256 channels on 4×4 to 32×32 maps), and ~4 ms at least
# (Python overhead); GRAM_FREE_COST ≈ 3-5 ms of test, about the Lanczos estimate's own
# overhead on one chain, so small convolutions always get the exact-up-to-rounding value.
# Raise GRAM_COST_RATIO (or ChainBounder.gram_cost_ratio, or use TIGHTEST_LADDER) for the
# tightest certificate whatever it costs.
GRAM_COST_RATIO = 20.0
GRAM_FREE_COST = 1e8
# 1×1 convolution chains whose materialised map has at least this smaller side skip the
# dense certificate (pointwise_conv_chain): same exact norm from the C_out × C_in kernel.
POINTWISE_MIN_SIDE = 256
# quick_ladder: the dense certificate of a chain runs when its Gram product costs at most this
# many multiply-adds (n · m · min(n, m), about 0.05-0.1 s of float64 BLAS on one core).
# Measured (prototypes/cheap_anchor.py, cold certificates): MNIST CNN-4 0.06 s instead of
# 0.63 s at +2.6 %, resnet18 3×32×32 0.59 s instead of 2.5 s at +38 % (its 4×4 maps get the
# torus bound); 4e9: CNN-4 0.16 s, resnet18 0.65 s at +28 %.
QUICK_DENSE_FLOPS = 2e9


def _weight_bound(ctx: ChainContext, weight: Tensor, scale: float) -> LayerBound:
    """``scale × certified ‖W‖`` (:func:`~lipreg.functional.certify.matrix_norm_certificate`,
    within the memory budget: dense Gram eigenvalue, else row blocks / Frobenius / Schur)."""
    cert = matrix_norm_certificate(
        weight, name=ctx.chain.name, v0=warm_vector(ctx, weight.shape[1])
    )
    # scale * bound rounds to nearest (and scale is itself a rounded product of the
    # isometries' scales): pad as the closed forms are, so the product never rounds down.
    value = cert.bound if scale == 1.0 else scale * cert.bound * CLOSED_FORM_PAD
    ctx.bounder.new_state[ctx.chain.name] = cert.v.to(ctx.bounder.analysis.dtype)
    method = cert.method if cert.method == "dense" else f"{cert.method} (memory budget)"
    extra = {"blocks": cert.blocks} if cert.method == "row-blocks" else {}
    return affine_bound(
        ctx,
        value,
        certified=True,
        estimate=scale * cert.estimate,
        upper=value,
        method=method,
        extra=extra,
    )


# ---------------------------------------------------------------- the chain ladder
def lone_weight_at_model_precision(ctx: ChainContext) -> LayerBound | None:
    """One dense layer ``W`` (not an isometry) whose weight at the analysis precision equals
    the model's: ``‖W‖ ≤ sqrt(λ̂_max(WᵀW) + rounding terms)·(1 + 1e-9)``, computed chunk by
    chunk in float64 (exact conversion), so no float64 copy of the network is made.
    Certified."""
    b = ctx.bounder
    if not b.certify or len(ctx.specs) != 1:
        return None
    spec = ctx.specs[0]
    if spec.weight is None or spec.isometry or not b.weight_is_exact():
        return None
    return _weight_bound(ctx, spec.weight, 1.0)


def closed_form(ctx: ChainContext) -> LayerBound | None:
    """Isometries only (``‖A‖ = Π c_i``), or isometries and one op with a closed-form norm
    (``‖A‖ = Π c_i · ‖A_j‖``). Evaluated in float64 when certifying and padded by 4 ulps:
    certified (exact up to rounding)."""
    pad = CLOSED_FORM_PAD if ctx.bounder.certify else 1.0
    if not ctx.core:
        value = ctx.scale * pad
        return affine_bound(
            ctx, value, certified=True, estimate=ctx.scale, upper=value, method="closed-form"
        )
    if len(ctx.core) == 1 and ctx.core[0][1].norm is not None:
        value = ctx.scale * ctx.core[0][1].norm * pad
        return affine_bound(
            ctx, value, certified=True, estimate=value, upper=value, method="closed-form"
        )
    return None


def lone_weight(ctx: ChainContext) -> LayerBound | None:
    """Isometries and one dense weight ``W`` (float64, the model's own values):
    ``‖A‖ = Π c_i · ‖W‖`` with ``‖W‖`` certified as in
    :func:`lone_weight_at_model_precision`. Certified."""
    if not ctx.bounder.certify or len(ctx.core) != 1 or ctx.core[0][1].weight is None:
        return None
    return _weight_bound(ctx, ctx.core[0][1].weight, ctx.scale)


def pointwise_conv_chain(ctx: ChainContext) -> LayerBound | None:
    """A chain ``[isometry]* [scale]* conv [scale]* [isometry]*`` whose merged convolution has
    a 1×1 kernel and some output reading an input on every axis
    (:func:`pointwise_reading_inputs`): ``‖A‖ = Π c_i · max_g ‖W_g‖`` **exactly** (a 1×1
    convolution is ``W ⊗ S`` with ``S`` a position map of at most one 1 per row and column,
    ``‖S‖ = 1``), each group's ``C_out/G × C_in/G`` kernel matrix certified densely
    (:func:`~lipreg.functional.banded_gram.certify_conv_norm`, method ``"conv-pointwise"``), the
    folded scales' error added. Its estimate is the certificate's own ``‖Ŵ v‖``: no Lanczos.

    It runs before :func:`dense_chain` when the materialised map's smaller side is at least
    :data:`POINTWISE_MIN_SIDE`: materialising it (side ``C · H · W``) would cost a Gram
    product of that side for the same value (measured: 0.3–0.7 s per chain on mobilenet_v2's
    4×4 maps, ~2 ms this way). Smaller maps keep the dense certificate (a few ms either way).
    Certified."""
    if not ctx.bounder.certify or not ctx.core or ctx.merged is None:
        return None
    if min(ctx.op.in_features, ctx.op.out_features) < POINTWISE_MIN_SIDE:
        return None
    return _pointwise_bound(ctx)


def _pointwise_bound(ctx: ChainContext) -> LayerBound | None:
    """:func:`pointwise_conv_chain` whatever the map's size (``None`` when not pointwise)."""
    if ctx.merged is None:
        return None
    conv, kernel_error, _ = ctx.merged
    scale = ctx.scale * CLOSED_FORM_PAD if ctx.scale != 1.0 else 1.0
    if not scale > 0 or not pointwise_reading_inputs(conv):  # 0: closed form answered
        return None
    cert = certify_conv_norm(conv, 0.0, kernel_error=kernel_error)
    assert cert is not None  # pointwise always answers
    value, estimate = cert.bound * scale, cert.estimate * ctx.scale
    return affine_bound(
        ctx, value, certified=True, estimate=estimate, upper=value, method=cert.method
    )


def dense_chain(ctx: ChainContext) -> LayerBound | None:
    """The chain materialised as a float64 matrix ``Â`` (when its smaller side is at most
    ``dense_limit`` and the matrix, its Gram certificate and the basis batches fit the memory
    budget), then the dense certificate of ``Â`` (its ``estimate`` is the certificate's own
    ``‖Â v‖``: no iterative run) plus a bound on ``‖Â − A‖``:

    * a merged convolution (``ctx.merged``): ``Â`` is its kernel scattered into the matrix
      (:func:`~lipreg.functional.banded_gram.conv_matrix`, exact: no arithmetic), so the only
      error is that of the folded batch-norm scales, ``kernel_error · ‖|Â|‖``
      (:func:`~lipreg.functional.banded_gram.abs_norm_bound`); isometries contribute their
      scalar;
    * any other chain: applied in float64 to the identity, with the bound of
      :func:`~lipreg.functional.rounding.materialisation_error` (not applicable when an op's
      rounding is not described by its spec).

    Certified."""
    b = ctx.bounder
    if not b.certify or not b.dense_ok(ctx.op, scattered=ctx.merged is not None):
        return None
    scale, factor, v_in_chain_basis = 1.0, 1.0, True
    if ctx.merged is not None:
        conv, kernel_error, v_in_chain_basis = ctx.merged
        matrix = conv_matrix(conv)
        error = kernel_error * abs_norm_bound(conv.weight, conv.groups) if kernel_error else 0.0
        factor = ctx.scale
        scale = ctx.scale * CLOSED_FORM_PAD if ctx.scale != 1.0 else 1.0
    else:
        # ‖A‖ ≤ ‖Â‖ + ‖Â − A‖: the matrix is computed in float64 (rounding.py)
        error = materialisation_error(b.analysis64, ctx.chain)
        if error is None:
            ctx.refusal = "an op's float64 materialisation has no rounding bound"
            return None
        op64 = chain_linear_map(b.analysis64, ctx.chain)
        matrix = op64.to_dense(batch_size=b.dense_batch(op64))
    v0 = warm_vector(ctx, matrix.shape[1]) if v_in_chain_basis else None
    cert = matrix_norm_certificate(matrix, name=ctx.chain.name, v0=v0)
    del matrix
    upper = cert.bound
    if error:
        upper = (upper + error) * (1 + RELATIVE_MARGIN)
    upper *= scale
    if v_in_chain_basis:  # a warm start in the chain's input basis
        b.new_state[ctx.chain.name] = cert.v.to(b.analysis.dtype)
    method = "dense" if cert.method == "dense" else f"{cert.method} (memory budget)"
    estimate = cert.estimate * factor
    return affine_bound(ctx, upper, certified=True, estimate=estimate, upper=upper, method=method)


def merged_conv_chain(ctx: ChainContext) -> LayerBound | None:
    """A chain ``[isometry]* [scale]* conv [scale]* [isometry]*`` (batch norms around one
    zero-padded convolution, reshapes at the ends): the isometries contribute their scalar
    (``‖Q A‖ = ‖A Q‖ = ‖A‖``), the rest is ONE convolution ``Â`` with the scales folded into
    its float64 kernel (:func:`~lipreg.functional.conv_chain.merged_conv`), certified by
    :func:`merged_conv_value` within the Gram test's cost budget
    (:attr:`ChainBounder.gram_cost_ratio`). Or, between the isometries, several 1×1
    convolutions with scales (:func:`pointwise_factors`): ``"conv-pointwise-product"``, the
    certified norm of the product of their kernel matrices
    (:func:`~lipreg.functional.banded_gram.pointwise_product_bound`). Certified."""
    return _merged_conv_chain(ctx, ctx.bounder.gram_cost_ratio)


def merged_conv_chain_tightest(ctx: ChainContext) -> LayerBound | None:
    """:func:`merged_conv_chain` with no cost budget: the Gram test runs whatever it costs
    (the memory budget still applies). Used by :data:`TIGHTEST_LADDER`."""
    return _merged_conv_chain(ctx, math.inf)


def _merged_conv_chain(ctx: ChainContext, cost_ratio: float | None) -> LayerBound | None:
    b = ctx.bounder
    if not b.certify or not ctx.core:
        return None
    specs = ctx.bound_specs
    inner = [i for i, spec in enumerate(specs) if not spec.isometry]
    factors = pointwise_factors(specs[inner[0] : inner[-1] + 1]) if ctx.merged is None else None
    scale = ctx.scale * CLOSED_FORM_PAD if ctx.scale != 1.0 else 1.0
    if (ctx.merged is None and factors is None) or not scale > 0:  # 0: closed form answered
        return None
    if (pointwise := _pointwise_bound(ctx)) is not None:
        return pointwise
    if factors is not None:
        value = pointwise_product_bound(*factors) * scale
        if not b.estimates:
            return affine_bound(
                ctx, value, certified=True, upper=value, method="conv-pointwise-product"
            )
        res = ctx.iterative()
        return with_iterative(ctx, res, value, upper=value, method="conv-pointwise-product")
    assert ctx.merged is not None
    conv, kernel_error, _ = ctx.merged
    torus = None
    if not b.estimates and any(k != 1 for k in conv.weight.shape[2:]):
        # certificates only: the torus bound answers without an estimate when the Gram test
        # is over its cost budget (the value merged_conv_value returns there too)
        torus = merged_torus_bound(conv, kernel_error)
        if (cost := gram_over_budget(ctx, conv, cost_ratio)) is not None:
            value = torus * scale
            method = "fft-merged (cost budget)"
            extra = {"torus": torus, "gram_cost": cost}
            return affine_bound(ctx, value, certified=True, upper=value, method=method, extra=extra)
    res = ctx.iterative()
    estimate = res.sigma / ctx.scale
    core, method, details = merged_conv_value(
        ctx, conv, estimate, kernel_error, res.v, cost_ratio=cost_ratio, torus=torus
    )
    bound = with_iterative(ctx, res, core * scale, upper=core * scale, method=method)
    bound.extra.update(details)
    return bound


def pointwise_reading_inputs(conv: ConvData) -> bool:
    """A 1×1 convolution some output of which reads an input entry on every axis (then its
    norm is exactly ``max_g ‖W_g‖``, not 0): ``0 ≤ q s − p < n`` for some output ``q``."""
    if any(k != 1 for k in conv.weight.shape[2:]):
        return False
    for n, n_out, s, p in zip(
        conv.in_shape[1:], output_spatial(conv), conv.stride, conv.padding, strict=True
    ):
        first = -(-p // s)  # the first output whose position q s − p is not left of the input
        if first >= n_out or first * s - p > n - 1:
            return False
    return True


def pointwise_factors(specs: Sequence[Affine]) -> tuple[list[Tensor], list[float]] | None:
    """A chain of several ``[scale]* conv1×1 [scale]*`` pieces (``groups = 1``; e.g. a
    MobileNet projection followed by the next expansion) as its float64 kernel matrices and
    their folding errors (:func:`~lipreg.functional.rounding.folded_kernel_error`), or
    ``None``."""
    convs = [i for i, spec in enumerate(specs) if spec.conv is not None]
    if len(convs) < 2:
        return None
    starts = [0, *convs[1:]]
    weights, errors = [], []
    for start, stop in zip(starts, [*convs[1:], len(specs)], strict=True):
        conv = merged_conv(specs[start:stop])
        if conv is None or conv.groups != 1 or any(k != 1 for k in conv.weight.shape[2:]):
            return None
        weights.append(conv.weight.flatten(1))
        errors.append(folded_kernel_error(stop - start - 1))
    return weights, errors


def merged_conv_value(
    ctx: ChainContext,
    conv: ConvData,
    estimate: float,
    kernel_error: float,
    v0: Tensor,
    *,
    cost_ratio: float | None = None,
    torus: float | None = None,
) -> tuple[float, str, dict]:
    """Certified ``‖A‖`` of the merged convolution (``estimate``: its Lanczos value), the
    method and details (``gram_delta``, ``gram_side``, ``torus``, ``gram_cost``), by the first
    that applies:

    * ``"conv-pointwise"``: a 1×1 kernel, ``max_g ‖W_g‖`` (dense certificate, exact);
    * ``"fft-merged"``: the torus bound of the merged kernel
      (:func:`~lipreg.functional.conv_bounds.conv_operator_norm_bound`, never above
      ``max|s| · torus(w)``), kept when within :data:`TORUS_ACCEPT` of the estimate;
    * ``"fft-merged (cost budget)"``: the same bound when the Gram test's predicted cost
      exceeds :data:`GRAM_FREE_COST` + ``cost_ratio`` × one forward+backward of the
      convolution (``cost_ratio``: default ``ctx.bounder.gram_cost_ratio``; ``math.inf``
      never falls back);
    * ``"conv-gram"``: the block-banded Gram test (:mod:`lipreg.functional.banded_gram`),
      ``σ̂ sqrt(1 + δ)``: first with the estimate at the chain's last successful ``δ``
      (``state[f"{name}#gram_delta"]``, else 1e-6), then, if that fails, with ``σ̂`` sharpened
      by a float64 Lanczos run warm-started from ``state[f"{name}#gram_v"]`` (else ``v0``);
      the ``δ`` and the refined vector go to ``new_state`` under the same keys. When it needs
      more than the memory budget or no ``δ ≤ 1e-2`` succeeds, the torus bound with the reason
      in the method (and a budget event).

    Folding ``m`` computed scales into the kernel: ``|w' − ŵ| ≤ kernel_error · |ŵ|``
    (:func:`~lipreg.functional.rounding.folded_kernel_error`), so ``kernel_error · ‖|Â|‖``
    (:func:`~lipreg.functional.banded_gram.abs_norm_bound`) is added to every value.
    ``torus``: :func:`merged_torus_bound` when the caller computed it already.
    """
    if all(k == 1 for k in conv.weight.shape[2:]):
        cert = certify_conv_norm(conv, estimate, kernel_error=kernel_error)
        assert cert is not None  # pointwise always answers
        return cert.bound, cert.method, {}
    if torus is None:
        torus = merged_torus_bound(conv, kernel_error)
    if torus <= estimate * (1 + TORUS_ACCEPT):
        return torus, "fft-merged", {"torus": torus}
    plan = gram_plan(conv)
    if (cost := gram_over_budget(ctx, conv, cost_ratio, plan)) is not None:
        return torus, "fft-merged (cost budget)", {"torus": torus, "gram_cost": cost}
    budget = current_budget()
    if plan.bytes > budget.limit_bytes:
        budget.record(
            f"{ctx.chain.name}: the Gram test of this convolution needs "
            f"~{plan.bytes / 2**20:.0f} MiB, over the memory budget of "
            f"{budget.limit_bytes / 2**20:.0f} MiB; used the merged torus bound ({torus:.6g}, "
            f"estimate {estimate:.6g}). Raise memory_limit_bytes for a tighter certificate."
        )
        return torus, "fft-merged (memory budget)", {"torus": torus}
    cert = _warm_gram_test(ctx, conv, estimate, kernel_error, v0)
    if cert is None:
        warnings.warn(
            f"{ctx.chain.name}: the Gram test could not certify sqrt(1 + delta) x the estimate "
            f"{estimate:.6g} for any delta <= 1e-2 (the estimate is far below the norm); used "
            f"the merged torus bound {torus:.6g}. Lower tol or raise max_iter.",
            stacklevel=2,
        )
        failed = "fft-merged (Gram test failed up to delta=1e-2: estimate not converged?)"
        return torus, failed, {"torus": torus}
    details = {"gram_delta": cert.delta, "gram_side": cert.side, "torus": torus}
    if cert.bound <= torus:
        return cert.bound, cert.method, details
    return torus, "fft-merged", details


def merged_torus_bound(conv: ConvData, kernel_error: float) -> float:
    """The torus bound of the merged convolution
    (:func:`~lipreg.functional.conv_bounds.conv_operator_norm_bound`) plus the folded scales'
    error ``kernel_error · ‖|Â|‖``, padded as a closed form: certified."""
    extra = kernel_error * abs_norm_bound(conv.weight, conv.groups)
    torus = conv_operator_norm_bound(
        conv.weight, conv.in_shape[1:], conv.stride, conv.padding, conv.dilation, conv.groups
    )
    return (torus + extra) * CLOSED_FORM_PAD


def gram_over_budget(
    ctx: ChainContext, conv: ConvData, cost_ratio: float | None, plan: GramPlan | None = None
) -> float | None:
    """The Gram test's predicted cost (multiply-adds; ``plan``: its :func:`gram_plan`, when
    the caller has it) when it exceeds :data:`GRAM_FREE_COST` + ``cost_ratio`` (default
    ``ctx.bounder.gram_cost_ratio``) × one forward+backward of the convolution, else ``None``
    (the test is affordable)."""
    cost = (gram_plan(conv) if plan is None else plan).cost * conv.groups
    ratio = ctx.bounder.gram_cost_ratio if cost_ratio is None else cost_ratio
    return cost if cost > GRAM_FREE_COST + ratio * conv_pass_flops(conv) else None


def _warm_gram_test(
    ctx: ChainContext, conv: ConvData, estimate: float, kernel_error: float, v0: Tensor
) -> ConvNormCertificate | None:
    """:func:`~lipreg.functional.banded_gram.certify_conv_norm` started from the chain's last
    successful ``δ`` and refined vector (``state``), which it updates in ``new_state``."""
    b, name = ctx.bounder, ctx.chain.name
    last_delta, last_v = b.state.get(f"{name}#gram_delta"), b.state.get(f"{name}#gram_v")
    delta0 = min(max(float(last_delta), 1e-6), 1e-2) if last_delta is not None else 1e-6
    start = last_v if last_v is not None and last_v.numel() == math.prod(conv.in_shape) else v0
    cert = certify_conv_norm(conv, estimate, kernel_error=kernel_error, v0=start, delta0=delta0)
    if cert is not None:
        b.new_state[f"{name}#gram_delta"] = torch.tensor(cert.delta, dtype=torch.float64)
        if cert.v is not None:
            b.new_state[f"{name}#gram_v"] = cert.v
        elif last_v is not None:
            b.new_state[f"{name}#gram_v"] = last_v
    return cert


def estimate(ctx: ChainContext) -> LayerBound:
    """The Lanczos/power-iteration value of the whole chain: it approaches ``‖A‖`` from
    below, so it is an **estimate** (``certified=False``, ``upper=None``); with
    ``certify=True`` the method names why no certificate applied. Always answers."""
    b, res = ctx.bounder, ctx.iterative()
    method = f"{b.method} ({ctx.refusal})" if b.certify else b.method
    return with_iterative(ctx, res, res.sigma, upper=None, method=method)


LadderEntry = Callable[[ChainContext], LayerBound | None]
LADDER: list[LadderEntry] = [
    lone_weight_at_model_precision,
    closed_form,
    lone_weight,
    pointwise_conv_chain,
    dense_chain,
    merged_conv_chain,
    product_of_op_certificates,
    estimate,
]
"""The chain certificates, tried in order (module docstring); the last always answers."""

TIGHTEST_LADDER: list[LadderEntry] = [
    merged_conv_chain_tightest if entry is merged_conv_chain else entry for entry in LADDER
]
""":data:`LADDER` with the Gram test of merged convolutions run whatever its cost
(``lipreg.autolip(..., ladder=TIGHTEST_LADDER)``): the tightest certified AutoLip, at up to
thousands of forward+backward passes on CNNs (docs/design/issue10/profile.md)."""


@dataclass
class DenseWithinCost:
    """:func:`dense_chain` for the chains whose dense certificate costs at most
    ``max_flops`` multiply-adds (its Gram product, ``n · m · min(n, m)`` for an ``m × n``
    map); the others go on to the next entries (a cheaper certificate, possibly looser: for
    a convolution the Gram test or the torus bound of :func:`merged_conv_chain`). ``skipped``
    names the chains it passed on although :func:`dense_chain` would have materialised them
    (empty: the ladder's result equals :data:`LADDER`'s)."""

    max_flops: float
    skipped: list[str] = field(default_factory=list)

    def __call__(self, ctx: ChainContext) -> LayerBound | None:
        b = ctx.bounder
        if not b.certify or not b.dense_ok(ctx.op, scattered=ctx.merged is not None):
            return None
        n, m = ctx.op.in_features, ctx.op.out_features
        if n * m * min(n, m) > self.max_flops:
            self.skipped.append(ctx.chain.name)
            return None
        return dense_chain(ctx)


#: Methods of a chain certificate as tight as its dense certificate: exact up to rounding (the
#: Gram test of a merged convolution, the kernel matrices of 1×1 convolutions, the dense
#: certificate itself) or within 0.1 % of the estimate (the torus bound kept by
#: TORUS_ACCEPT). A chain that :class:`DenseWithinCost` skipped and that ended on another
#: method (a torus bound kept for cost, a product of per-op certificates) is looser.
AS_TIGHT_AS_DENSE = frozenset(
    {"dense", "conv-gram", "conv-pointwise", "conv-pointwise-product", "fft-merged"}
)


def quick_ladder(max_dense_flops: float | None = None) -> list[LadderEntry]:
    """:data:`LADDER` with its dense certificates limited by cost (:class:`DenseWithinCost`
    with ``max_dense_flops``, default :data:`QUICK_DENSE_FLOPS`, in place of
    :func:`dense_chain`; its ``skipped`` says which chains it left to cheaper certificates).
    As certified as :data:`LADDER`, at most as tight: the callback's first anchor
    (``lipreg.callback_methods``), replaced by one of :data:`LADDER` when its budget affords
    it."""
    limit = QUICK_DENSE_FLOPS if max_dense_flops is None else max_dense_flops
    return [DenseWithinCost(limit) if e is dense_chain else e for e in LADDER]


@dataclass
class ChainBounder:
    """Computes the factor of each affine chain by the first :data:`LADDER` entry that answers.

    ``bound(chain)`` returns a :class:`LayerBound`; warm-start vectors computed on the way are
    collected in ``new_state`` (keyed by chain name), starting from ``state``. ``certify=False``
    skips the certified entries (closed forms still apply); ``ladder=`` replaces
    :data:`LADDER`. ``tol``, ``max_iter``, ``method`` and ``generator`` drive the iterative
    estimate; ``dense_limit`` caps the smaller side of a materialised map;
    ``gram_cost_ratio`` is the Gram test's cost budget in forward+backward passes of the
    convolution (:func:`merged_conv_value`; default :data:`GRAM_COST_RATIO`, ``math.inf`` for
    the tightest value whatever it costs). ``estimates=False`` (certificates only) skips the
    chains' iterative estimates wherever the certificate does not need one (their factors then
    have ``estimate=None``): a merged convolution whose Gram test is over the cost budget (the
    torus bound answers whatever the estimate), a product of per-op certificates.
    """

    analysis: Analysis
    model: nn.Module
    _: KW_ONLY
    certify: bool
    tol: float
    max_iter: int
    method: str
    state: dict[str, Tensor]
    generator: torch.Generator
    dense_limit: int
    ladder: Sequence[LadderEntry] | None = None
    # a float64 analysis of the same graph made by the caller (reused across calls), else
    # derived on first use
    given_analysis64: Analysis | None = None
    gram_cost_ratio: float = field(default_factory=lambda: GRAM_COST_RATIO)
    estimates: bool = True
    new_state: dict[str, Tensor] = field(default_factory=dict, init=False)
    _analysis64: Analysis | None = field(default=None, init=False, repr=False)
    _positions: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.ladder = list(LADDER if self.ladder is None else self.ladder)
        self._analysis64 = self.given_analysis64

    @property
    def analysis64(self) -> Analysis:
        """The same analysis (same nodes) with float64 specs, for the certificates."""
        if self._analysis64 is None:
            self._analysis64 = self.analysis.at_dtype(torch.float64)
        return self._analysis64

    def bound(self, chain: AffineChain) -> LayerBound:
        """The chain's factor from the first ladder entry that answers (sharded: with its FSDP
        units gathered, its specs re-read, the ranks agreeing: lipreg.functional.sharding)."""
        if not self.analysis.sharded:
            return self._bound(chain)
        nodes, root = list(chain.nodes), self.analysis.root
        with (  # float64 specs: read by closed forms even without certify
            gathered_agreed(root, self.analysis.modules_of(nodes), f"bounding {chain.name!r}"),
            refreshed_specs((self.analysis, self.analysis64), nodes),
        ):
            return self._bound(chain)

    def cold_start_generator(self, name: str) -> torch.Generator:
        """A private generator for the cold start of chain ``name``, seeded by the call's seed
        and the chain's position among the chains bounded (graph order): a chain's draws do
        not depend on which chains before it ran an iteration (``estimates=False`` skips
        some, and a Gram test's value depends on its estimate), and two calls on the same
        graph draw alike."""
        position = self._positions.setdefault(name, len(self._positions))
        seed = (self.generator.initial_seed() + 0x9E3779B97F4A7C15 * (position + 1)) % 2**63
        return torch.Generator(device=self.generator.device).manual_seed(seed)

    def _bound(self, chain: AffineChain) -> LayerBound:
        self._positions.setdefault(chain.name, len(self._positions))
        ctx = ChainContext(self, chain)
        for entry in self.ladder:
            answer = entry(ctx)
            if answer is not None:
                return answer
        raise RuntimeError(
            f"no entry of the certificate ladder answered for {chain.name!r}; a ladder must "
            "end with an entry that always answers (lipreg.functional.ladder.estimate)."
        )

    def weight_is_exact(self) -> bool:
        """Weights of ``self.analysis`` equal the model's (no float64 tensor was rounded)."""
        if self.analysis.dtype == torch.float64:
            return True
        return not any(
            t.dtype == torch.float64 for t in (*self.model.parameters(), *self.model.buffers())
        )

    def dense_ok(self, op: LinearMap, *, scattered: bool = False) -> bool:
        """The map may be materialised: small enough a side, and the dense matrix (twice,
        while it is assembled), its Gram certificate and the basis batches (none when a
        convolution's kernel is ``scattered`` into the matrix) fit the budget."""
        n, m = op.in_features, op.out_features
        if min(n, m) > self.dense_limit:
            return False
        needed = 16 * n * m + dense_bytes(min(n, m)) if scattered else self.dense_bytes(op)
        return needed <= current_budget().limit_bytes

    def dense_batch(self, op: LinearMap) -> int:
        """Basis vectors per pass of ``to_dense``: autograd keeps about three activations of
        the map's size per vector; a quarter of the budget goes to them."""
        per_vector = 8 * 3 * (op.in_features + op.out_features)
        return int(min(256, max(1, current_budget().limit_bytes // 4 // per_vector)))

    def dense_bytes(self, op: LinearMap) -> int:
        """Peak bytes of materialising ``op`` and certifying its matrix."""
        n, m = op.in_features, op.out_features
        activations = self.dense_batch(op) * 8 * 3 * (n + m)
        return 16 * n * m + dense_bytes(min(n, m)) + activations
