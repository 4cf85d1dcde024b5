"""Plain helpers shared by the tests: seeded randomness, random weights and brute-force ground
truths (dense matrices, SVD norms, autograd Jacobians), all independent of lipreg's code.

Import them as ``from tests.helpers import ...`` (the suite runs as ``python -m pytest`` from
the repository root, as ``.ci/run`` does).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian

F64 = torch.float64

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_CONV_MODULE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def gen(seed: int) -> torch.Generator:
    """A private CPU generator (never the global RNG)."""
    return torch.Generator().manual_seed(seed)


def spectral_norm(M: torch.Tensor) -> float:
    """``‖M‖_2`` of one matrix by a float64 SVD."""
    return float(torch.linalg.matrix_norm(M.detach().to(F64), 2))


def init_weights(
    model: nn.Module, seed: int, *, scale: float, batchnorm_stats: bool = False
) -> nn.Module:
    """Every parameter (in order) set to ``scale · N(0, 1)``, drawn in float64 from ``gen(seed)``
    and rounded to the parameter's dtype; with ``batchnorm_stats``, BatchNorm running means
    ``N(0, 1)`` and variances ``U(0.2, 2.2)`` drawn next from the same generator. Returns
    ``model``."""
    g = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype) * scale)
        for m in model.modules() if batchnorm_stats else ():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 2 + 0.2)
    return model


class Residual(nn.Module):
    """``out(x + relu(fc(x)))``: not sequential (SeqLip refuses it, AutoLip bounds it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + torch.relu(self.fc(x)))


def per_sample_jacobians(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """Dense per-sample Jacobians ``(N, out, in)`` of a model that treats samples independently
    (``model`` called as is on ``X`` in float64: pass a float64 model)."""
    J = jacobian(lambda z: model(z).sum(0), X.to(F64))  # (*out, N, *in)
    n_out = math.prod(J.shape[: J.ndim - X.ndim])
    J = J.reshape(n_out, X.shape[0], -1)
    return J.transpose(0, 1)


def dense_jacobian_norms(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """Exact per-sample ``‖J_f(x)‖_2`` of an eval-mode float64 copy of ``model`` (one
    ``jacobian`` per sample, so batch-coupled layers cannot mix samples)."""
    m = copy.deepcopy(model).double().eval()
    norms = []
    for x in X.to(F64):
        J = jacobian(lambda z, m=m: m(z[None])[0], x)  # (*out, *in)
        norms.append(torch.linalg.matrix_norm(J.reshape(-1, x.numel()), 2))
    return torch.stack(norms)


def dense_conv_matrix(
    weight: torch.Tensor,
    input_spatial: tuple[int, ...],
    stride: int | tuple[int, ...] = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int | tuple[int, ...] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    transposed: bool = False,
    output_padding: int | tuple[int, ...] = 0,
) -> torch.Tensor:
    """Exact matrix (out_dim x in_dim, float64) of the bias-free layer, built by PyTorch itself.

    Column ``j`` is the flattened layer output for the ``j``-th basis input. Non-zero padding
    modes go through ``torch.nn.ConvNd`` so that PyTorch computes its own padding map.
    """
    w = weight.detach().to(F64)
    dims = len(input_spatial)
    in_channels = w.shape[0] if transposed else w.shape[1] * groups
    in_dim = in_channels * math.prod(input_spatial)
    basis = torch.eye(in_dim, dtype=F64).reshape(in_dim, in_channels, *input_spatial)
    if transposed:
        out = _CONV_T[dims](
            basis,
            w,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
            groups=groups,
            dilation=dilation,
        )
    elif padding_mode == "zeros":
        out = _CONV[dims](
            basis, w, stride=stride, padding=padding, dilation=dilation, groups=groups
        )
    else:
        layer = _CONV_MODULE[dims](
            in_channels,
            w.shape[0],
            tuple(w.shape[2:]),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
            padding_mode=padding_mode,
        ).to(F64)
        with torch.no_grad():
            layer.weight.copy_(w)
            out = layer(basis)
    return out.reshape(in_dim, -1).T


def dense_conv_norm(*args, **kwargs) -> float:
    """The exact l2 operator norm of the layer :func:`dense_conv_matrix` builds (float64 SVD)."""
    return spectral_norm(dense_conv_matrix(*args, **kwargs))


def randn(*shape: int, seed: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``N(0, 1)`` samples from ``gen(seed)`` (the default dtype unless ``dtype`` is given)."""
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)
