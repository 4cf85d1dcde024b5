"""Soundness of certified SeqLip (``lipreg.seqlip(certify=True)``) on random MLPs: the
certified value must be ≥ two independent lower bounds,

* the oracle of ``tests/soundness/oracle.py`` on the real network (biases, the real activation,
  float64 Jacobians, gradient ascent, a certified difference quotient; it imports nothing of
  lipreg);
* the largest ``‖W_L D_{L−1} ⋯ D_1 W_1‖`` over sampled patterns ``D_k`` with entries at the
  extremes of the activation's derivative (values this file states itself): the chained pair
  LMIs certify every diagonal pattern in the slope box, so these are covered too.

Several depths, widths (up to 40, beyond exact SeqLip's enumeration), dtypes, training modes
and activations; the model must be left bit-identical.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch import nn

import lipreg
from tests.soundness.harness import REL_TOL
from tests.soundness.oracle import fingerprint_diff, model_fingerprint, oracle_lower_bound

#: activation and the extremes of its derivative (attained or approached): min σ', max σ'
ACTIVATIONS: list[tuple[str, type[nn.Module], dict, tuple[float, float]]] = [
    ("relu", nn.ReLU, {}, (0.0, 1.0)),
    ("leaky0.1", nn.LeakyReLU, {"negative_slope": 0.1}, (0.1, 1.0)),
    ("tanh", nn.Tanh, {}, (0.0, 1.0)),
    ("sigmoid", nn.Sigmoid, {}, (0.0, 0.25)),
    ("elu", nn.ELU, {}, (0.0, 1.0)),
    ("gelu", nn.GELU, {}, (-0.1289, 1.1289)),
]
N_NETS = 18
N_PATTERNS = 200


def _random_mlp(seed: int) -> tuple[nn.Sequential, list[int], tuple[float, float], str]:
    rng = random.Random(7000 + seed)
    depth = rng.choice([1, 2, 2, 3])  # hidden layers
    sizes = [rng.choice([2, 4, 7])] + [rng.choice([3, 6, 12, 40]) for _ in range(depth)]
    sizes.append(rng.choice([1, 3]))
    name, cls, kwargs, ext = ACTIVATIONS[seed % len(ACTIVATIONS)]
    dtype = torch.float64 if seed % 2 else torch.float32
    layers: list[nn.Module] = []
    g = torch.Generator().manual_seed(seed)
    for k, (n, m) in enumerate(itertools.pairwise(sizes)):
        if k:
            layers.append(cls(**kwargs))
        lin = nn.Linear(n, m, dtype=dtype)
        with torch.no_grad():  # varied scales: some layers dominate
            lin.weight.copy_(torch.randn(m, n, generator=g, dtype=dtype) * rng.uniform(0.3, 2))
            lin.bias.copy_(torch.randn(m, generator=g, dtype=dtype))
        layers.append(lin)
    return nn.Sequential(*layers).train(seed % 3 == 0), sizes, ext, name


def _pattern_lower_bound(model: nn.Sequential, ext: tuple[float, float], seed: int) -> float:
    """Largest ``‖W_L D ⋯ D W_1‖`` over random vertex patterns (and the all-high one)."""
    Ws = [m.weight.detach().double() for m in model if isinstance(m, nn.Linear)]
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    for i in range(N_PATTERNS):
        M = Ws[0]
        for W in Ws[1:]:
            hi = torch.ones(M.shape[0], dtype=torch.bool) if i == 0 else None
            pick = hi if hi is not None else torch.rand(M.shape[0], generator=g) < 0.5
            d = torch.where(pick, ext[1], ext[0]).double()
            M = W @ (d[:, None] * M)
        best = max(best, float(torch.linalg.matrix_norm(M, 2)))
    return best


@pytest.mark.parametrize("seed", range(N_NETS))
def test_certified_seqlip_is_sound(seed: int) -> None:
    model, sizes, ext, name = _random_mlp(seed)
    before = model_fingerprint(model)
    res = lipreg.seqlip(model, (sizes[0],), certify=True)
    assert not fingerprint_diff(before, model_fingerprint(model))
    assert res.certified and res.kind == "upper" and math.isfinite(res.value)
    oracle = oracle_lower_bound(model, (sizes[0],), seed=seed)
    patterns = _pattern_lower_bound(model, ext, seed)
    label = f"{name} {sizes}"
    assert res.value >= oracle.lower * (1 - REL_TOL), (label, res.value, oracle.lower)
    assert res.value >= patterns * (1 - REL_TOL), (label, res.value, patterns)


@pytest.mark.slow
def test_certified_seqlip_small_cnn_is_sound() -> None:
    """Convolutions are materialised (zero padding, a flatten merged into the linear layer)."""
    g = torch.Generator().manual_seed(11)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 6 * 6, 3),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    res = lipreg.seqlip(model, (1, 6, 6), certify=True)
    assert res.certified and res.kind == "upper"
    oracle = oracle_lower_bound(model, (1, 6, 6), seed=11)
    assert res.value >= oracle.lower * (1 - REL_TOL), (res.value, oracle.lower)
