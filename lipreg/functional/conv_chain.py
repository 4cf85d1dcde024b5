"""An affine chain seen as ONE convolution: per-channel scalings folded into the kernel.

Batch norm in evaluation mode is a per-channel scaling ``x[:, c] ↦ s_c x[:, c]``
(:attr:`~lipreg.functional.specs.Affine.channel_scale`). Around a zero-padded convolution it
folds into the kernel exactly:

* after the convolution, ``s_o · conv(x, w)[o] = conv(x, w')[o]`` with ``w'[o] = s_o w[o]``;
* before it, ``conv(s ⊙ x, w) = conv(x, w')`` with ``w'[o, j] = w[o, j] · s_{g(o) c_g + j}``
  (``c_g`` input channels per group, ``g(o)`` the group of output channel ``o``).

So a chain ``[scale]* conv [scale]*`` is the convolution :func:`merged_conv` returns, and its
operator norm is that convolution's, not the product ``max|s| · ‖conv‖`` (which can be far
looser). Anything else in the chain (a reshape, a pooling, a second convolution, an isometry
whose nature the spec does not state) makes :func:`merged_conv` return ``None``: deny by
default, the caller falls back to the other certificates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from lipreg.functional.specs import Affine, ConvData

__all__ = ["merged_conv"]


def merged_conv(specs: Sequence[Affine]) -> ConvData | None:
    """The chain ``A_m ⋯ A_1`` (``specs`` in application order) as one :class:`ConvData`
    whose kernel has the chain's channel scalings folded in (exact algebra; float64 when the
    specs are), or ``None`` when the chain is not ``[scale]* conv [scale]*``."""
    convs = [i for i, s in enumerate(specs) if s.conv is not None]
    if len(convs) != 1:
        return None
    k = convs[0]
    if any(s.channel_scale is None for i, s in enumerate(specs) if i != k):
        return None
    conv = specs[k].conv
    assert conv is not None
    weight = conv.weight.detach()
    c_out, c_in_group = weight.shape[:2]
    c_in = conv.in_shape[0]
    for s in specs[:k]:
        scale = _channel_vector(s, c_in)
        if scale is None:
            return None
        # input channel of weight[o, j]: (o // (c_out / groups)) * c_in_group + j
        group_of_out = torch.arange(c_out, device=weight.device) // (c_out // conv.groups)
        index = group_of_out[:, None] * c_in_group + torch.arange(c_in_group)[None, :]
        weight = weight * _broadcast(scale[index], weight)
    for s in specs[k + 1 :]:
        scale = _channel_vector(s, c_out)
        if scale is None:
            return None
        weight = weight * _broadcast(scale, weight)
    return replace(conv, weight=weight)


def _channel_vector(spec: Affine, channels: int) -> Tensor | None:
    scale = spec.channel_scale
    if scale is None or scale.dim() != 1 or scale.shape[0] != channels:
        return None
    return scale.detach()


def _broadcast(values: Tensor, weight: Tensor) -> Tensor:
    """``values`` indexed by the leading dimensions of ``weight``, broadcast over the rest."""
    return values.reshape(*values.shape, *([1] * (weight.dim() - values.dim()))).to(weight.dtype)
