"""Helpers shared by the rule tests (test_rules.py, test_rule_registry.py): seeded parameters,
float64 spectral norms and dense Jacobians, the independent ground truths of those tests."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.functional import jacobian

import lipreg
from tests.helpers import init_weights

F64 = torch.float64
# Certified values carry an explicit relative margin of 1e-9 (certify.RELATIVE_MARGIN).
REL = 1e-8


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def norm2(W: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(W.detach().to(F64), 2))


def init_(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic random parameters (and BN statistics) without the global RNG."""
    return init_weights(model, seed, scale=0.7, batchnorm_stats=True)


def jac(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dense Jacobian of one sample, (out_features, in_features)."""
    J = jacobian(lambda z: model(z), x[None].to(F64))
    out = J.shape[: J.ndim - x.ndim - 1]
    return J.reshape(math.prod(out[1:]), x.numel())


def linear_part_norm(model: nn.Module, in_shape: tuple[int, ...]) -> float:
    """Spectral norm of the Jacobian of an affine model (constant in x)."""
    x = torch.randn(in_shape, generator=gen(123), dtype=F64)
    return norm2(jac(model, x))


def autolip(model, shape, **kw):
    kw.setdefault("dtype", F64)
    return lipreg.autolip(model, shape, **kw)


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def only_layer(r: lipreg.LipschitzResult, kind: str) -> lipreg.LayerBound:
    """The one per-layer bound of ``kind`` in ``r`` (fails if there are none or several)."""
    (lb,) = [lb for lb in r.layers if lb.kind == kind]
    return lb
