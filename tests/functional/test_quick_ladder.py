"""``quick_ladder``: AutoLip's ladder with its dense certificates limited by cost (the
callback's first anchor). As certified as the default ladder, never tighter, equal to it when
nothing is left out; checked against the exact operator norms of the chains (float64
Jacobians of each affine map, independent of lipreg)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

import lipreg
from lipreg.functional.ladder import (
    LADDER,
    QUICK_DENSE_FLOPS,
    DenseWithinCost,
    dense_chain,
    quick_ladder,
)

SHAPE = (2, 6, 6)


def small_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 5),
    ).eval()


def exact_autolip(net: nn.Sequential, shape: tuple[int, ...]) -> float:
    """Product of the float64 operator norms of the affine layers (each one's Jacobian at
    zero, bias-free by linearity): AutoLip's exact value for a ReLU network."""
    x = torch.zeros(1, *shape, dtype=torch.float64)
    product = 1.0
    for layer in net.double():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            J = jacobian(layer, x).reshape(-1, x.numel())
            product *= float(torch.linalg.matrix_norm(J, 2))
        x = layer(x)
    net.float()
    return product


def test_the_entry_replaces_dense_chain_and_reads_the_constant_at_call_time(monkeypatch):
    ladder = quick_ladder()
    (entry,) = [e for e in ladder if isinstance(e, DenseWithinCost)]
    assert entry.max_flops == QUICK_DENSE_FLOPS
    assert dense_chain not in ladder and len(ladder) == len(LADDER)
    monkeypatch.setattr("lipreg.functional.ladder.QUICK_DENSE_FLOPS", 7.0)
    assert [e.max_flops for e in quick_ladder() if isinstance(e, DenseWithinCost)] == [7.0]


@pytest.mark.parametrize("seed", range(3))
def test_without_a_limit_it_is_the_default_ladder(seed):
    net = small_cnn(seed)
    ladder = quick_ladder(math.inf)
    quick = lipreg.autolip(net, SHAPE, ladder=ladder)
    default = lipreg.autolip(net, SHAPE)
    assert quick.value == default.value
    assert [e.skipped for e in ladder if isinstance(e, DenseWithinCost)] == [[]]


@pytest.mark.parametrize("seed", range(3))
def test_a_zero_limit_skips_every_materialised_chain_and_stays_certified(seed):
    net = small_cnn(seed)
    ladder = quick_ladder(0.0)
    quick = lipreg.autolip(net, SHAPE, ladder=ladder)
    default = lipreg.autolip(net, SHAPE)
    (entry,) = [e for e in ladder if isinstance(e, DenseWithinCost)]
    # the convolutions were left to cheaper certificates; the lone Linear never reaches it
    assert entry.skipped == ["0", "2"]
    methods = {lb.name: lb.method for lb in quick.layers if lb.kind == "affine"}
    assert methods["0"] != "dense" and methods["2"] != "dense"
    assert {lb.name: lb.method for lb in default.layers}["0"] == "dense"
    truth = exact_autolip(net, SHAPE)
    assert quick.certified and default.certified
    assert quick.value >= default.value * (1 - 1e-12)
    assert default.value >= truth * (1 - 1e-12)
    assert quick.value <= truth * 1.01  # the Gram test of the convolutions: nearly exact here
