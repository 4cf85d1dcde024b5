"""Ops that move, copy, select or sum entries: identity, reshape, permutation, indexing,
upsampling, dropout, split. All are affine; most are isometries or have ``≥ 0`` entries.

The generic rules defined here (:func:`identity`, :func:`reshape`, :func:`generic_nonnegative`,
:func:`generic_linear`) serve the other families too.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lipreg.functional.rules.registry import lookup_rule, register_rule
from lipreg.functional.specs import (
    Affine,
    NodeContext,
    Nonlinear,
    Spec,
    UnsupportedNodeError,
    single_input,
)

__all__ = [
    "generic_linear",
    "generic_nonnegative",
    "identity",
    "reshape",
    "splits_into_pieces",
]


def identity(ctx: NodeContext) -> Affine:
    """``x ↦ x``: norm 1, an isometry with entries ``≥ 0``."""
    single_input(ctx, "an identity-like node")
    return Affine(linear=lambda x: x, norm=1.0, isometry=True, nonnegative=True)


def reshape(ctx: NodeContext) -> Affine:
    """Same entries in a new shape: norm 1, an isometry."""
    single_input(ctx, "a reshape")
    return ctx.reshape_to_output()


def generic_nonnegative(ctx: NodeContext) -> Affine:
    """A linear op whose matrix has entries ``≥ 0`` (pooling by averaging, padding, indexing,
    sums), evaluated by calling the node; certified by the Schur test."""
    single_input(ctx, f"{ctx.node.target}")
    return ctx.generic_affine(nonnegative=True)


def generic_linear(ctx: NodeContext) -> Affine:
    """Any op affine in its input (``f(x) − f(0)`` is its linear part), evaluated by calling
    the node; certified densely when small enough."""
    single_input(ctx, f"{ctx.node.target}")
    return ctx.generic_affine()


for _t in (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
):
    register_rule(_t, identity)
for _t in (nn.Flatten, nn.Unflatten):
    register_rule(_t, reshape)


def _upsample(ctx: NodeContext) -> Affine:
    single_input(ctx, "upsampling")
    mode = getattr(ctx.target, "mode", None) or ctx.kwargs.get("mode", "nearest")
    # nearest / (bi/tri)linear interpolation weights are >= 0; bicubic ones are not.
    return ctx.generic_affine(nonnegative=mode != "bicubic")


register_rule(nn.Upsample, _upsample)
register_rule(nn.UpsamplingNearest2d, generic_nonnegative)
register_rule(nn.UpsamplingBilinear2d, generic_nonnegative)
register_rule(F.interpolate, _upsample)


def _dropout_function(ctx: NodeContext) -> Affine:
    # F.dropout(x, p, training=True, inplace=False): ``training`` defaults to True, so a bare
    # F.dropout(x) drops entries at random even in evaluation mode: no fixed function.
    if ctx.arg(2, "training", True) is not False:
        raise UnsupportedNodeError(
            "dropout called with training=True (F.dropout's default) is random even in "
            "evaluation mode, so there is no fixed function to bound. Pass "
            "training=self.training (or use nn.Dropout)."
        )
    return identity(ctx)


for _t in (
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
):
    register_rule(_t, _dropout_function)
register_rule(torch.detach, identity)
for _t in ("contiguous", "detach", "clone", "float", "double", "to", "type_as", "type"):
    register_rule(_t, identity)
for _t in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze):
    register_rule(_t, reshape)
for _t in ("flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as"):
    register_rule(_t, reshape)


def _permutation(ctx: NodeContext) -> Affine:
    single_input(ctx, "a permutation of axes")
    if ctx.out_shape is None:
        raise UnsupportedNodeError("a permutation must return a tensor.")
    if math.prod(ctx.in_shapes[0]) != math.prod(ctx.out_shape):
        raise UnsupportedNodeError(
            f"a rearrangement from {ctx.in_shapes[0]} to {ctx.out_shape} per sample changes "
            "the number of entries: it is not a permutation."
        )
    affine = ctx.generic_affine()
    return Affine(linear=affine.linear, norm=1.0, isometry=True, nonnegative=True)


# Every rearrangement of entries is a permutation matrix (norm 1, an isometry), and its
# linear map applies the op itself, so a merged chain composes the true permutation.
_PERMUTATION_NAMES = (
    "permute",
    "transpose",
    "movedim",
    "moveaxis",
    "swapaxes",
    "swapdims",
    "roll",
    "flip",
    "fliplr",
    "flipud",
    "rot90",
)
for _t in (
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
    F.pixel_shuffle,
    F.pixel_unshuffle,
    F.channel_shuffle,
    torch.pixel_shuffle,
    torch.pixel_unshuffle,
    torch.channel_shuffle,
    *(getattr(torch, name) for name in _PERMUTATION_NAMES),
    *_PERMUTATION_NAMES,
):
    register_rule(_t, _permutation)

# Indexing, broadcasting copies and sums: matrices of 0/1 entries (1/n for the mean).
for _t in (operator.getitem, torch.narrow, torch.select, torch.index_select, torch.gather):
    register_rule(_t, generic_nonnegative)
for _t in ("narrow", "select", "index_select", "expand", "expand_as", "repeat", "gather"):
    register_rule(_t, generic_nonnegative)
for _t in (torch.sum, torch.mean, torch.repeat_interleave, torch.tile):
    register_rule(_t, generic_nonnegative)
for _t in ("sum", "mean", "repeat_interleave", "tile"):
    register_rule(_t, generic_nonnegative)


def _split(ctx: NodeContext) -> Spec:
    # Returns a tuple of disjoint pieces: each piece (taken by getitem) is a projection of x.
    single_input(ctx, "split/chunk/unbind")
    return Nonlinear(1.0, "split into disjoint pieces (a tuple of projections)")


for _t in (torch.split, torch.chunk, torch.unbind, torch.tensor_split):
    register_rule(_t, _split)
for _t in ("split", "chunk", "unbind", "tensor_split"):
    register_rule(_t, _split)


def splits_into_pieces(node: fx.Node, target: Any) -> bool:
    """Whether the node returns a tuple of disjoint pieces of its input (split/chunk/...)."""
    return node.op != "call_module" and lookup_rule(node, target) is _split
