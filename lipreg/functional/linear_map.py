"""Matrix-free linear maps evaluated through autograd.

A :class:`LinearMap` wraps a *batched, bias-free, linear* callable ``A`` that maps tensors of
shape ``(B, *in_shape)`` to ``(B, *out_shape)``. Everything the estimators need follows from
autograd, exactly as in Algorithm 2 of Scaman & Virmaux (2018):

.. math::

    A^\\top A v = \\nabla_v \\tfrac12 \\lVert A v \\rVert_2^2 ,

so one product with the Gram operator costs one forward and one backward pass through the
layer, at the layer's real input shape, without ever materialising ``A``. Convolutions with
any stride, padding, dilation or groups, transposed convolutions, pooling and reshapes are all
handled the same way.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LinearMap", "compose"]


@dataclass(frozen=True)
class LinearMap:
    """A linear operator ``R^{in_shape} -> R^{out_shape}`` given by a batched callable.

    Attributes:
        apply: batched linear callable ``(B, *in_shape) -> (B, *out_shape)``. It must be
            linear (no bias) and must not depend on the batch size.
        in_shape: shape of one input, without the batch dimension.
        out_shape: shape of one output, without the batch dimension.
        dtype: floating dtype the callable computes in.
        device: device of the callable's parameters.
        name: a readable name (module path or chain of paths) for reports and errors.
    """

    apply: Callable[[Tensor], Tensor]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    name: str = "linear map"

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a batch of flat vectors ``v`` of shape ``(B, in_features)``."""
        out = self.apply(v.reshape(v.shape[0], *self.in_shape))
        return out.reshape(v.shape[0], -1)

    def rmatvec(self, u: Tensor) -> Tensor:
        """``A^T u`` for a batch of flat vectors ``u`` of shape ``(B, out_features)``.

        The adjoint of a linear map is the vector-Jacobian product at any point; we take it at
        zero so that no activation of the caller's graph is needed.
        """
        with torch.enable_grad():
            x = torch.zeros(
                u.shape[0], *self.in_shape, dtype=self.dtype, device=self.device, requires_grad=True
            )
            y = self.apply(x)
            (g,) = torch.autograd.grad(y, x, grad_outputs=u.reshape(y.shape))
        return g.reshape(u.shape[0], -1)

    def gram_matvec(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(A^T A v, A v)`` for a batch of flat vectors, with one forward + backward."""
        with torch.enable_grad():
            x = v.detach().reshape(v.shape[0], *self.in_shape).requires_grad_(True)
            y = self.apply(x)
            (g,) = torch.autograd.grad(y, x, grad_outputs=y.detach())
        return g.reshape(v.shape[0], -1), y.detach().reshape(v.shape[0], -1)

    def to_dense(self, batch_size: int = 256) -> Tensor:
        """Materialise ``A`` as an ``(out_features, in_features)`` matrix.

        Applies ``A`` to the identity (or ``A^T`` when the output is the smaller side) in
        batches: ``min(in_features, out_features)`` passes in total.
        """
        n, m = self.in_features, self.out_features
        cols = []
        if n <= m:
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                basis = torch.zeros(stop - start, n, dtype=self.dtype, device=self.device)
                basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                with torch.no_grad():
                    cols.append(self.matvec(basis))
            return torch.cat(cols, dim=0).T.contiguous()
        for start in range(0, m, batch_size):
            stop = min(m, start + batch_size)
            basis = torch.zeros(stop - start, m, dtype=self.dtype, device=self.device)
            basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            cols.append(self.rmatvec(basis))
        return torch.cat(cols, dim=0).contiguous()


def compose(maps: Sequence[LinearMap], name: str | None = None) -> LinearMap:
    """The composition ``maps[-1] ∘ … ∘ maps[0]`` as one :class:`LinearMap`."""
    if not maps:
        raise ValueError("compose() needs at least one linear map, got an empty sequence.")
    for prev, nxt in itertools.pairwise(maps):
        if prev.out_shape != nxt.in_shape:
            raise ValueError(
                f"cannot compose {prev.name!r} (output {prev.out_shape}) with {nxt.name!r} "
                f"(input {nxt.in_shape}): shapes differ."
            )
    if len(maps) == 1 and name is None:
        return maps[0]
    fns = [m.apply for m in maps]

    def apply(x: Tensor) -> Tensor:
        for fn in fns:
            x = fn(x)
        return x

    return LinearMap(
        apply=apply,
        in_shape=maps[0].in_shape,
        out_shape=maps[-1].out_shape,
        dtype=maps[0].dtype,
        device=maps[0].device,
        name=name or " -> ".join(m.name for m in maps),
    )
