"""The per-op certificate of an affine chain (the :data:`~lipreg.functional.ladder.LADDER`
entry after the chain certificates): ``‖A_m ⋯ A_1‖ ≤ Π_i ‖A_i‖`` with each op's norm
certified by the first :data:`OP_LADDER` entry that answers (a closed form, a dense weight's
certificate, the rule's own certificate, the Schur test of a non-negative op, the op
materialised), the isometries by their scalar.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

from lipreg.functional.certify import dense_norm_bound, matrix_norm_bound, schur_bound
from lipreg.functional.chains import node_linear_map
from lipreg.functional.ladder_context import ChainContext, affine_bound, with_iterative
from lipreg.functional.results import LayerBound
from lipreg.functional.specs import Affine

__all__ = ["OP_LADDER", "OpEntry", "product_of_op_certificates"]


# ---------------------------------------------------------------- the op ladder
def op_closed_form(ctx: ChainContext, node: fx.Node, spec: Affine) -> tuple[float, str] | None:
    """The rule's exact closed-form norm (``Affine.norm``, float64)."""
    return None if spec.norm is None else (spec.norm, "closed-form")


def op_dense_weight(ctx: ChainContext, node: fx.Node, spec: Affine) -> tuple[float, str] | None:
    """A dense weight's certified norm (:func:`~lipreg.functional.certify.matrix_norm_bound`)."""
    return None if spec.weight is None else (matrix_norm_bound(spec.weight)[0], "dense")


def op_rule_certificate(ctx: ChainContext, node: fx.Node, spec: Affine) -> tuple[float, str] | None:
    """The rule's own certified bound (``Affine.certify``: the FFT/polyphase bound of a
    convolution, :mod:`lipreg.functional.conv_bounds`)."""
    return None if spec.certify is None else (spec.certify(), "fft")


def op_schur(ctx: ChainContext, node: fx.Node, spec: Affine) -> tuple[float, str] | None:
    """Non-negative matrix (pooling, padding, indexing): ``‖A‖ ≤ sqrt(‖A‖_1 ‖A‖_∞)``."""
    if not spec.nonnegative:
        return None
    return schur_bound(node_linear_map(ctx.bounder.analysis64, node)), "schur"


def op_dense(ctx: ChainContext, node: fx.Node, spec: Affine) -> tuple[float, str] | None:
    """The op materialised in float64 (if it fits, as :func:`dense_chain`), then the dense
    certificate."""
    b = ctx.bounder
    op64 = node_linear_map(b.analysis64, node)
    if not b.dense_ok(op64):
        return None
    return dense_norm_bound(op64, batch_size=b.dense_batch(op64))[0], "dense"


OpEntry = Callable[[ChainContext, fx.Node, Affine], tuple[float, str] | None]
OP_LADDER: list[OpEntry] = [
    op_closed_form,
    op_dense_weight,
    op_rule_certificate,
    op_schur,
    op_dense,
]
"""Certificates of ONE op inside :func:`product_of_op_certificates`: ``(bound, method)``."""


def product_of_op_certificates(ctx: ChainContext) -> LayerBound | None:
    """``‖A_m ⋯ A_1‖ ≤ Π_i ‖A_i‖`` (submultiplicativity), each ``‖A_i‖`` certified by the
    first :data:`OP_LADDER` entry that answers; isometries contribute their scalar. Also runs
    the iterative estimate (reported as ``estimate``; not with ``estimates=False``). ``None``
    (with the reason kept for :func:`estimate`) when an op has no certificate. Certified."""
    b = ctx.bounder
    if not b.certify:
        return None
    total, methods = ctx.scale, []
    for node, spec in ctx.core:
        answer = next((a for e in OP_LADDER if (a := e(ctx, node, spec)) is not None), None)
        if answer is None:
            op64 = node_linear_map(b.analysis64, node)
            ctx.refusal = (
                f"no certificate for {b.analysis.label(node)}: too large to "
                f"materialise ({op64.in_features}x{op64.out_features}) and no "
                "structured bound; raise dense_limit or register a rule with certify="
            )
            return None
        total *= answer[0]
        methods.append(answer[1])
    how = " x ".join(methods) if len(methods) > 1 else methods[0]
    if not b.estimates:
        return affine_bound(ctx, total, certified=True, upper=total, method=how)
    return with_iterative(ctx, ctx.iterative(), total, upper=total, method=how)
