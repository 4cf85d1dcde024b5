"""certified_bound and its split search (lipreg.functional.tight)."""

from __future__ import annotations

import itertools
import math

import pytest

from lipreg.functional.results import LayerBound
from lipreg.functional.tight import best_split


def _lb(name: str, value: float, kind: str = "affine") -> LayerBound:
    return LayerBound(name=name, kind=kind, value=value, certified=True)


def _brute_force(singles, cuts, blocks) -> float:
    """Every split of 0..m-1 into consecutive blocks (2^(m-1) of them), evaluated directly."""
    m = len(singles)
    best = math.inf
    for mask in itertools.product([False, True], repeat=m - 1):
        bounds = [0, *[i + 1 for i, cut in enumerate(mask) if cut], m]
        value, ok = 1.0, True
        for k, (a, b) in enumerate(itertools.pairwise(bounds)):
            block = singles[a] if b - a == 1 else blocks.get((a, b - 1))
            if block is None:
                ok = False
                break
            value *= block.value * (cuts[a - 1].value if k > 0 else 1.0)
        if ok:
            best = min(best, value)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_best_split_matches_brute_force(seed: int) -> None:
    import random

    rng = random.Random(seed)
    m = rng.randint(1, 7)
    singles = [_lb(f"c{i}", rng.uniform(0.5, 3)) for i in range(m)]
    cuts = [_lb(f"a{i}", rng.choice([1.0, 0.5, 2.0]), "activation") for i in range(m - 1)]
    blocks = {
        (i, j): _lb(f"b{i}{j}", rng.uniform(0.1, 10))
        for i in range(m)
        for j in range(i + 1, m)
        if rng.random() < 0.5
    }
    value, factors = best_split(singles, cuts, blocks)
    assert value == pytest.approx(_brute_force(singles, cuts, blocks), rel=1e-12)
    # the returned factors are the split: their product is the value
    assert math.prod(f.value for f in factors) == pytest.approx(value, rel=1e-12)


def test_non_sequential_graph_gets_autolip_with_a_note() -> None:
    import lipreg
    from tests.helpers import Residual, init_weights

    model = init_weights(Residual().double(), 3, scale=0.5)
    result = lipreg.certified_bound(model, (6,))
    base = lipreg.autolip(model, (6,))
    assert result.certified and result.method == "certified_bound (autolip)"
    assert result.value == base.value
    assert any("not one path" in n for n in result.notes)


def test_unknown_method_is_refused_with_the_known_ones() -> None:
    import lipreg

    with pytest.raises(ValueError, match=r"unknown methods \['sdp'\].*lipsdp"):
        lipreg.certified_bound(torch_mlp(), (4,), methods=["sdp"])


def torch_mlp():
    from torch import nn

    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_lipsdp_random_net_is_certified_at_its_exact_constant() -> None:
    """The LipSDP 2-10-30-20-2 net (2-d input): its exact constant 36.48223 is known (max of
    the Jacobian norm over directions, benchmarks/nets/README.md); the certified bound is
    above it and within 0.1 % (AutoLip, the product of norms, is 43.3056)."""
    import lipreg
    from lipreg.models.benchmark_nets import load_lipsdp

    net = load_lipsdp("random").model
    result = lipreg.certified_bound(net, (2,))
    assert result.certified and result.method == "certified_bound (lipsdp-block)"
    assert 36.48223 * (1 - 1e-6) <= result.value <= 36.48223 * 1.001
    assert any(n.startswith("runner-up: autolip 43.30") for n in result.notes)
    # warm start: the multipliers come back in state and give the same certificate
    again = lipreg.certified_bound(net, (2,), state=result.state)
    assert again.value <= result.value * (1 + 1e-9)


def test_mlp_bound_is_above_every_activation_pattern() -> None:
    """Independent lower bound: max over all 2^8 ReLU patterns of ‖W3 D2 W2 D1 W1‖ is ≥ the
    Lipschitz constant of the class; the certificate must be above it."""
    import itertools

    import torch
    from torch import nn

    import lipreg

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    net = net.double()
    W = [m.weight.detach() for m in net if isinstance(m, nn.Linear)]
    best = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=8):
        d1, d2 = (
            torch.tensor(bits[:4], dtype=torch.float64),
            torch.tensor(bits[4:], dtype=torch.float64),
        )
        J = W[2] @ torch.diag(d2) @ W[1] @ torch.diag(d1) @ W[0]
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    result = lipreg.certified_bound(net, (3,))
    assert best <= result.value <= lipreg.autolip(net, (3,)).value
