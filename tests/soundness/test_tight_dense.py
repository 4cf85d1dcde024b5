"""Soundness of the tight dense-chain certificates (certified LipSDP-Neuron, ECLipsE-Fast) on
random MLPs: every certified value must be ≥ two independent lower bounds,

* the oracle of ``tests/soundness/oracle.py`` on the real network (biases, the real activation):
  dense float64 Jacobian norms at random points, gradient ascent, and a certified difference
  quotient (nothing there imports lipreg);
* the largest ``‖W_L D_{L−1} ⋯ D_1 W_1‖`` over sampled vertex patterns ``D_k ∈ {a_k, b_k}^{n_k}``:
  the LMI certifies every diagonal pattern in the slope box, so this must be covered too.

Several depths, widths and slope intervals (ReLU, leaky, tanh/ELU-like ``[0, 1]``, sigmoid
``[0, ¼]``, GELU/SiLU with a negative lower slope).
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch import nn

from lipreg.functional.eclipse import eclipse_fast
from lipreg.functional.lipsdp import lipsdp_neuron
from tests.soundness.oracle import oracle_lower_bound

#: activation, its slope interval (the GELU/SiLU extremes of σ' are ±0.12890/1.12890 and
#: −0.09984/1.09984, padded outwards)
ACTIVATIONS: list[tuple[str, nn.Module, tuple[float, float]]] = [
    ("relu", nn.ReLU(), (0.0, 1.0)),
    ("leaky0.1", nn.LeakyReLU(0.1), (0.1, 1.0)),
    ("leaky0.3", nn.LeakyReLU(0.3), (0.3, 1.0)),
    ("tanh", nn.Tanh(), (0.0, 1.0)),
    ("elu", nn.ELU(), (0.0, 1.0)),
    ("sigmoid", nn.Sigmoid(), (0.0, 0.25)),
    ("gelu", nn.GELU(), (-0.129, 1.129)),
    ("silu", nn.SiLU(), (-0.0999, 1.0999)),
]
N_NETS = 24
N_PATTERNS = 300


def _random_mlp(seed: int) -> tuple[nn.Sequential, list[int], str, tuple[float, float]]:
    rng = random.Random(seed)
    depth = rng.choice([1, 2, 2, 3, 4])  # hidden layers
    sizes = [rng.choice([2, 3, 5, 8])] + [rng.choice([3, 6, 10, 16]) for _ in range(depth)]
    sizes.append(rng.choice([1, 2, 4]))
    name, act, slopes = ACTIVATIONS[seed % len(ACTIVATIONS)]
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for k, (n, m) in enumerate(itertools.pairwise(sizes)):
        if k:
            layers.append(act)
        lin = nn.Linear(n, m, dtype=torch.float64)
        with torch.no_grad():
            # varied scales so that some layers dominate (the multipliers matter then)
            lin.weight.copy_(
                torch.randn(m, n, generator=g, dtype=torch.float64) * rng.uniform(0.3, 2)
            )
            lin.bias.copy_(torch.randn(m, generator=g, dtype=torch.float64))
        layers.append(lin)
    return nn.Sequential(*layers), sizes, name, slopes


def _sampled_patterns(ws: list[torch.Tensor], slopes: tuple[float, float], seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    a, b = slopes
    best = 0.0
    for _ in range(N_PATTERNS):
        J = ws[0]
        for W in ws[1:]:
            d = torch.where(torch.rand(J.shape[0], generator=g) < 0.5, a, b).double()
            J = W @ (d[:, None] * J)
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    return best


@pytest.mark.parametrize("seed", range(N_NETS))
def test_certified_dense_bounds_are_sound(seed: int) -> None:
    model, sizes, name, slopes = _random_mlp(seed)
    ws = [m.weight.detach() for m in model if isinstance(m, nn.Linear)]
    sl = [slopes] * (len(ws) - 1)
    oracle = oracle_lower_bound(model, (sizes[0],), seed=seed)
    lower = max(oracle.lower, _sampled_patterns(ws, slopes, seed))
    label = f"seed {seed}: {name} {sizes}"
    cert = lipsdp_neuron(ws, sl)
    assert cert.value >= lower, f"{label}: lipsdp {cert.value} < lower bound {lower}"
    assert cert.value >= cert.estimate * (1 - 1e-12), label  # certified is never below ρ*
    if slopes[0] * slopes[1] >= 0:
        fast = eclipse_fast(ws, sl)
        assert fast.value >= lower, f"{label}: eclipse-fast {fast.value} < lower bound {lower}"
        assert cert.value <= fast.value, f"{label}: lipsdp looser than eclipse-fast"
    prod = math.prod(float(torch.linalg.matrix_norm(W, 2)) for W in ws)
    prod *= max(abs(slopes[0]), abs(slopes[1])) ** (len(ws) - 1)
    assert lower <= prod * (1 + 1e-9), label  # sanity of the lower bound itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_weights_are_certified_exactly(dtype: torch.dtype) -> None:
    """Weights stored in a low precision are converted exactly; the bound is on those weights."""
    model, _, _, slopes = _random_mlp(3)
    ws = [m.weight.detach().to(dtype) for m in model if isinstance(m, nn.Linear)]
    cert = lipsdp_neuron(ws, [slopes] * (len(ws) - 1))
    ws64 = [W.double() for W in ws]
    assert cert.value >= _sampled_patterns(ws64, slopes, 0)
