"""Soundness of the Fourier-block conv-pair certificate against the independent oracle.

For random conv → activation → conv networks (with biases; 1-D, 2-D and 3-D; strides,
paddings, dilations, groups; several activations with their slope intervals) the certified
pair bound must be at least the oracle's certified lower bound on the network's Lipschitz
constant (``tests/soundness/oracle.py``, which does not import lipreg), and at least the
largest ``‖K2 D K1‖`` over sampled activation patterns with entries at the slope ends, the
two convolutions materialised densely by PyTorch.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from lipreg.functional.conv_pairs import conv_pair_certificate
from lipreg.functional.specs import ConvData
from tests.helpers import F64, dense_conv_matrix, gen
from tests.soundness.oracle import oracle_lower_bound

# (module, slope interval) pairs; the intervals are the activations' true slope ranges.
ACTIVATIONS = [
    (nn.ReLU(), (0.0, 1.0)),
    (nn.LeakyReLU(0.2), (0.2, 1.0)),
    (nn.Tanh(), (0.0, 1.0)),
    (nn.Hardtanh(), (0.0, 1.0)),
    (nn.ELU(), (0.0, 1.0)),
]
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _random_pair(seed: int) -> tuple[nn.Module, ConvData, ConvData, tuple[float, float], tuple]:
    rng = random.Random(seed)
    dims = rng.choice([1, 2, 2, 2, 3])
    n = rng.randint(3, 5) if dims == 3 else rng.randint(4, 9)
    groups = rng.choice([1, 1, 2])
    c0, c1, c2 = (groups * rng.randint(1, 2) for _ in range(3))
    convs, shape, datas = [], (c0, *([n] * dims)), []
    for c_in, c_out in ((c0, c1), (c1, c2)):
        k, s, d = rng.choice([1, 2, 3]), rng.choice([1, 1, 2]), rng.choice([1, 1, 2])
        p = rng.randint(0, (d * (k - 1)) // 2 + 1)
        while shape[1] + 2 * p < d * (k - 1) + 1:
            p += 1
        conv = _CONV[dims](c_in, c_out, k, stride=s, padding=p, dilation=d, groups=groups).double()
        with torch.no_grad():
            conv.weight.normal_(generator=gen(seed * 7 + len(convs)))
            conv.bias.normal_(generator=gen(seed * 7 + 5 + len(convs)))
        datas.append(ConvData(conv.weight.detach(), (s,) * dims, (p,) * dims, (d,) * dims,
                              groups, shape))  # fmt: skip
        convs.append(conv)
        with torch.no_grad():
            shape = tuple(conv(torch.zeros(1, *shape, dtype=F64)).shape[1:])
    act, slope = ACTIVATIONS[seed % len(ACTIVATIONS)]
    model = nn.Sequential(convs[0], act, convs[1]).eval()
    return model, datas[0], datas[1], slope, datas[0].in_shape


def _sampled_patterns(first: ConvData, second: ConvData, slope: tuple[float, float]) -> float:
    A = dense_conv_matrix(first.weight, first.in_shape[1:], first.stride, first.padding,
                          first.dilation, first.groups)  # fmt: skip
    B = dense_conv_matrix(second.weight, second.in_shape[1:], second.stride, second.padding,
                          second.dilation, second.groups)  # fmt: skip
    a, b = slope
    d = torch.where(torch.rand(64, A.shape[0], generator=gen(1), dtype=F64) < 0.5, a, b)
    d[0], d[1] = a, b
    return float(torch.linalg.matrix_norm(B[None] @ (d[:, :, None] * A[None]), 2).max())


@pytest.mark.parametrize("seed", range(16))
def test_pair_certificate_is_above_the_oracle(seed: int) -> None:
    model, first, second, slope, in_shape = _random_pair(seed)
    cert = conv_pair_certificate(first, slope, second, max_steps=40)
    lower = oracle_lower_bound(model, in_shape, n_random=4, n_ascent=3, seed=seed).lower
    assert lower <= cert.value * (1 + 1e-9), (seed, lower, cert.value)
    assert _sampled_patterns(first, second, slope) <= cert.value * (1 + 1e-12)
    assert cert.value <= cert.product_bound
