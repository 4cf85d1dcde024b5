"""rounding.py: the float64 rounding bounds hold against exact rational arithmetic."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch
from torch import nn

from lipreg.functional.analysis import analyse
from lipreg.functional.chains import chain_linear_map, find_affine_chains
from lipreg.functional.conv_chain import merged_conv
from lipreg.functional.rounding import (
    materialisation_error,
    merged_kernel_error,
    perturbed_bound,
)
from tests.helpers import init_weights

F64 = torch.float64


def _exact_product(mats: list[torch.Tensor]) -> list[list[Fraction]]:
    """``mats[-1] @ … @ mats[0]`` in exact rationals (float64 entries are exact rationals)."""
    result = [[Fraction(float(v)) for v in row] for row in mats[0].tolist()]
    for m in mats[1:]:
        rows = [[Fraction(float(v)) for v in row] for row in m.tolist()]
        result = [
            [
                sum((r[k] * result[k][j] for k in range(len(result))), Fraction(0))
                for j in range(len(result[0]))
            ]
            for r in rows
        ]
    return result


@pytest.mark.parametrize("seed", range(3))
def test_materialised_linear_bn_linear_chain_error_is_bounded(seed: int) -> None:
    net = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 4)).to(F64)
    init_weights(net, seed, scale=3.0, batchnorm_stats=True)
    analysis = analyse(net, (5,), dtype=F64)
    (chain,) = find_affine_chains(analysis).values()
    computed = chain_linear_map(analysis, chain).to_dense()
    bn = net[1]
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    exact = _exact_product([net[0].weight.detach(), torch.diag(scale), net[2].weight.detach()])
    # the BN scale itself is computed in float64 by the rule: compare with the same scale
    diff = torch.tensor(
        [
            [float(Fraction(float(c)) - e) for c, e in zip(cr, er, strict=True)]
            for cr, er in zip(computed.tolist(), exact, strict=True)
        ],
        dtype=F64,
    )
    actual = float(torch.linalg.matrix_norm(diff, 2))
    bound = materialisation_error(analysis, chain)
    assert bound is not None and actual <= bound
    assert bound < 1e-12 * float(torch.linalg.matrix_norm(computed, 2)) * 100


def test_merged_kernel_error_bounds_the_folded_scales() -> None:
    net = nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3))
    net = init_weights(net.to(F64), 4, scale=2.0, batchnorm_stats=True)
    analysis = analyse(net, (2, 5, 5), dtype=F64)
    (chain,) = find_affine_chains(analysis).values()
    data = merged_conv([analysis.specs[n] for n in chain.nodes])
    assert data is not None
    s_in = (net[0].weight / torch.sqrt(net[0].running_var + net[0].eps)).detach()
    s_out = (net[2].weight / torch.sqrt(net[2].running_var + net[2].eps)).detach()
    w = net[1].weight.detach()
    worst = 0.0
    for o, c, i, j in itertools.product(range(3), range(2), range(3), range(3)):
        exact = (
            Fraction(float(w[o, c, i, j])) * Fraction(float(s_in[c])) * Fraction(float(s_out[o]))
        )
        err = abs(Fraction(float(data.weight[o, c, i, j])) - exact)
        worst = max(worst, float(err) / abs(float(exact)) if exact else 0.0)
    assert 0 < worst <= 2 * 2.0**-53 * 1.01  # two roundings of every entry
    bound = merged_kernel_error(data, n_scalings=2)
    # an error kernel of relative size `worst` has norm at most worst * ‖|A|‖, below the bound
    abs_conv = nn.Conv2d(2, 3, 3, padding=1, bias=False).to(F64)
    with torch.no_grad():
        abs_conv.weight.copy_(data.weight.abs() * worst)
    eye = torch.eye(50, dtype=F64).reshape(50, 2, 5, 5)
    dense = abs_conv(eye).reshape(50, -1).T
    assert float(torch.linalg.matrix_norm(dense, 2)) <= bound


@pytest.mark.parametrize("seed", range(5))
def test_perturbed_bound_covers_the_exact_network(seed: int) -> None:
    """Computed matrices Â_k = A_k − E_k: the widened value of the pattern maximum of the Â
    network is above the pattern maximum of the A network (brute force over patterns)."""
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(4, 3, generator=g, dtype=F64), torch.randn(2, 4, generator=g, dtype=F64)]
    E = [1e-3 * torch.randn(a.shape, generator=g, dtype=F64) for a in A]
    hat = [a - e for a, e in zip(A, E, strict=True)]

    def pattern_max(ms: list[torch.Tensor]) -> float:
        best = 0.0
        for bits in itertools.product([0.0, 1.0], repeat=4):
            J = ms[1] @ torch.diag(torch.tensor(bits, dtype=F64)) @ ms[0]
            best = max(best, float(torch.linalg.matrix_norm(J, 2)))
        return best

    norms = [float(torch.linalg.matrix_norm(h, 2)) for h in hat]
    errors = [float(torch.linalg.matrix_norm(e, 2)) for e in E]
    widened = perturbed_bound(pattern_max(hat), norms, errors, lipschitz=1.0)
    assert pattern_max(A) <= widened
    assert widened > pattern_max(hat)
