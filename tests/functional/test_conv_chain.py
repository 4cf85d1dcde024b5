"""merged_conv: a chain [scale]* conv [scale]* is exactly one convolution (checked against the
chain's own linear map), and anything else is refused (None)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipreg.functional.analysis import analyse
from lipreg.functional.chains import chain_linear_map, find_affine_chains
from lipreg.functional.conv_chain import merged_conv
from tests.helpers import gen, init_weights


def _chains(model: nn.Module, shape: tuple[int, ...]):
    analysis = analyse(model, shape, dtype=torch.float64)
    chains = list(find_affine_chains(analysis).values())
    return analysis, chains


def _check_equal(analysis, chain) -> None:
    specs = [analysis.specs[n] for n in chain.nodes]
    data = merged_conv(specs)
    assert data is not None
    x = torch.randn(3, *data.in_shape, dtype=torch.float64, generator=gen(1))
    expected = chain_linear_map(analysis, chain).matvec(x.flatten(1))
    conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    got = conv(x, data.weight, None, data.stride, data.padding, data.dilation, data.groups)
    torch.testing.assert_close(got.flatten(1), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_bn_conv_bn_merges_exactly(groups: int) -> None:
    model = nn.Sequential(
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1, groups=groups, bias=True),
        nn.BatchNorm2d(8),
        nn.ReLU(),
    ).double()
    init_weights(model, 0, scale=0.5, batchnorm_stats=True)
    analysis, chains = _chains(model, (4, 9, 7))
    assert len(chains) == 1
    _check_equal(analysis, chains[0])


def test_conv1d_with_dilation_merges() -> None:
    model = nn.Sequential(nn.Conv1d(3, 5, 3, padding=2, dilation=2), nn.BatchNorm1d(5)).double()
    init_weights(model, 0, scale=0.5, batchnorm_stats=True)
    analysis, chains = _chains(model, (3, 11))
    _check_equal(analysis, chains[0])


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)),
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular")),
        nn.Sequential(nn.Conv2d(2, 3, 3, padding="same")),
        nn.Sequential(nn.ConvTranspose2d(2, 3, 3)),
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.AvgPool2d(2)),
    ],
    ids=["two-convs", "circular", "same-string", "transposed", "pool"],
)
def test_other_chains_are_refused(model: nn.Module) -> None:
    analysis, chains = _chains(model.double(), (2, 6, 6))
    assert all(merged_conv([analysis.specs[n] for n in c.nodes]) is None for c in chains)
