"""Tests of the search strategies of ``lipreg.lower_bound`` (``n_ascent_steps``,
``n_walk_steps``; ``lipreg.functional.lower_bound_search``).

Ground truths, all independent of the code under test:

* the exact Lipschitz constant of small ReLU MLPs by exact enumeration of their linear pieces:
  with a 1-d input (biases included) the pieces are intervals of the line, with a 2-d input
  and no biases they are cones, i.e. arcs of the unit circle. Layer by layer, inside a piece
  every pre-activation is affine in ``x`` (resp. in ``(cos θ, sin θ)``), so its zeros are
  closed forms that split the piece; ``L`` is the largest ``‖W_L D_{L-1} … D_1 W_1‖`` over the
  final pieces (float64 matrix products and SVDs).
* the published exact constant of the LipSDP random network (36.48223), ``‖W‖`` by SVD for
  linear networks, and difference quotients recomputed by plain float64 module calls.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

import lipreg
from lipreg.functional.lower_bound_search import ReluProbe, pattern_walk, smoothed_ascent
from tests.helpers import gen, init_weights
from tests.helpers import spectral_norm as norm2

torch.set_num_threads(1)

F64 = torch.float64
LIPSDP_RANDOM_EXACT = 36.48223
STRATEGIES = dict(n_ascent_steps=60, n_walk_steps=20)


def relu_mlp(widths: list[int], seed: int, *, bias: bool = True, scale: float = 1.0):
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b, bias=bias, dtype=F64))
    return init_weights(nn.Sequential(*layers), seed, scale=scale)


def affine_layers(net: nn.Sequential) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for m in net:
        if isinstance(m, nn.Linear):
            b = m.bias if m.bias is not None else torch.zeros(m.out_features, dtype=F64)
            out.append((m.weight.detach().to(F64), b.detach().to(F64)))
    return out


def piece_jacobian(layers, x: torch.Tensor) -> torch.Tensor:
    """``W_L D_{L-1}(x) … D_1(x) W_1`` at a point strictly inside a piece."""
    h, jac = x, torch.eye(x.shape[0], dtype=F64)
    for i, (w, b) in enumerate(layers):
        z = w @ h + b
        jac = w @ jac
        if i < len(layers) - 1:
            d = (z > 0).to(F64)
            h, jac = d * z, d[:, None] * jac
    return jac


def exact_lipschitz_1d(net: nn.Sequential) -> float:
    """Exact ``L`` of a ReLU MLP with a scalar input: enumerate its linear pieces."""
    layers = affine_layers(net)
    cuts: list[float] = []
    for depth in range(len(layers) - 1):
        bounds = [-math.inf, *sorted(cuts), math.inf]
        new = []
        for lo, hi in itertools.pairwise(bounds):
            mid = _interior(lo, hi)
            # z_depth(x) = α x + β on this piece: the Jacobian and value at mid.
            sub = layers[: depth + 1]
            alpha = piece_jacobian(sub, torch.tensor([mid], dtype=F64))[:, 0]
            beta = _forward(sub, torch.tensor([mid], dtype=F64)) - alpha * mid
            for a, b in zip(alpha.tolist(), beta.tolist(), strict=True):
                if a != 0 and lo < -b / a < hi:
                    new.append(-b / a)
        cuts += new
    bounds = [-math.inf, *sorted(cuts), math.inf]
    return max(
        norm2(piece_jacobian(layers, torch.tensor([_interior(lo, hi)], dtype=F64)))
        for lo, hi in itertools.pairwise(bounds)
    )


def exact_lipschitz_2d_bias_free(net: nn.Sequential) -> float:
    """Exact ``L`` of a bias-free ReLU MLP with a 2-d input: enumerate its cones (arcs)."""
    layers = affine_layers(net)
    assert all(float(b.abs().max()) == 0 for _, b in layers)
    cuts: list[float] = []
    for depth in range(len(layers) - 1):
        bounds = [*sorted(cuts), 2 * math.pi] if cuts else [0.0, 2 * math.pi]
        if cuts:
            bounds = [bounds[-2] - 2 * math.pi, *bounds[:-1]]
        new = []
        for lo, hi in itertools.pairwise(bounds):
            mid = 0.5 * (lo + hi)
            u = torch.tensor([math.cos(mid), math.sin(mid)], dtype=F64)
            a_mat = piece_jacobian(layers[: depth + 1], u)  # z = A (cos θ, sin θ) on the arc
            for a, b in a_mat.tolist():
                theta = math.atan2(-a, b)  # a cos θ + b sin θ = 0
                for t in (theta, theta + math.pi):
                    t = (t - lo) % (2 * math.pi) + lo
                    if lo < t < hi:
                        new.append(t % (2 * math.pi))
        cuts += new
    arcs = sorted(cuts) or [0.0]
    arcs = [*arcs, arcs[0] + 2 * math.pi]
    best = 0.0
    for lo, hi in itertools.pairwise(arcs):
        mid = 0.5 * (lo + hi)
        u = torch.tensor([math.cos(mid), math.sin(mid)], dtype=F64)
        best = max(best, norm2(piece_jacobian(layers, u)))
    return best


def _interior(lo: float, hi: float) -> float:
    if math.isinf(lo) and math.isinf(hi):
        return 0.0
    if math.isinf(lo):
        return hi - 1.0
    if math.isinf(hi):
        return lo + 1.0
    return 0.5 * (lo + hi)


def _forward(layers, x: torch.Tensor) -> torch.Tensor:
    h = x
    for i, (w, b) in enumerate(layers):
        h = w @ h + b
        if i < len(layers) - 1:
            h = h.clamp_min(0)
    return h


def quotient64(model: nn.Module, x: torch.Tensor, z: torch.Tensor) -> tuple[float, float]:
    """``(‖f(z) − f(x)‖ / ‖z − x‖, max(‖f(x)‖, ‖f(z)‖)/‖z − x‖)`` of an eval-mode float64
    copy, by plain module calls."""
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        fz, fx = m(z.to(F64)[None]), m(x.to(F64)[None])
    h = float((z.to(F64) - x.to(F64)).norm())
    return float((fz - fx).norm()) / h, max(float(fz.norm()), float(fx.norm())) / h


def assert_witnessed(model: nn.Module, res) -> None:
    """The value is reproduced by re-evaluating the returned pair in float64: never above the
    quotient, and below it by at most the documented rounding margin (2·1e-10 relative to the
    outputs, doubled for the float32 term, over the step) plus 1e-6 relative."""
    x, z = res.state["argmax"], res.state["witness"]
    q, size = quotient64(model, x, z)
    assert res.value <= q * (1 + 1e-12)
    assert res.value >= q * (1 - 1e-6) - 4e-10 * size


# ---------------------------------------------------------------------------------------------
# The ground truth itself
# ---------------------------------------------------------------------------------------------


def test_enumeration_reproduces_the_published_lipsdp_constant() -> None:
    from lipreg.models import load_lipsdp

    try:
        net, _ = load_lipsdp("random")
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"LipSDP random network not available: {exc}")
    assert exact_lipschitz_2d_bias_free(net) == pytest.approx(LIPSDP_RANDOM_EXACT, abs=1e-5)


def test_enumeration_of_a_1d_net_matches_a_dense_grid() -> None:
    net = relu_mlp([1, 6, 6, 2], 3)
    exact = exact_lipschitz_1d(net)
    x = torch.linspace(-30, 30, 200001, dtype=F64)[:, None]
    with torch.no_grad():
        y = net(x)
    slopes = (y[1:] - y[:-1]).norm(dim=1) / (x[1:, 0] - x[:-1, 0])
    assert float(slopes.max()) <= exact * (1 + 1e-9)
    assert float(slopes.max()) >= exact * (1 - 1e-3)


# ---------------------------------------------------------------------------------------------
# Tight and never above the exact constant
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_1d_relu_nets_reach_the_exact_constant(seed: int) -> None:
    net = relu_mlp([1, 8, 8, 8, 2], 100 + seed)
    exact = exact_lipschitz_1d(net)
    res = lipreg.lower_bound(
        net, (1,), n_random=64, batch_size=64, n_anneal_steps=5, seed=seed, **STRATEGIES
    )
    assert res.value <= exact * (1 + 1e-9)
    assert res.value >= 0.99 * exact
    assert_witnessed(net, res)


@pytest.mark.parametrize("seed", range(4))
def test_2d_bias_free_relu_nets_reach_the_exact_constant(seed: int) -> None:
    net = relu_mlp([2, 10, 12, 6, 3], 200 + seed, bias=False)
    exact = exact_lipschitz_2d_bias_free(net)
    res = lipreg.lower_bound(
        net, (2,), n_random=64, batch_size=64, n_anneal_steps=5, seed=seed, **STRATEGIES
    )
    assert res.value <= exact * (1 + 1e-9)
    assert res.value >= 0.99 * exact
    assert_witnessed(net, res)


def test_lipsdp_random_network_with_the_strategies() -> None:
    from lipreg.models import load_lipsdp

    try:
        net, _ = load_lipsdp("random")
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"LipSDP random network not available: {exc}")
    res = lipreg.lower_bound(net, (2,), n_random=64, batch_size=64, n_anneal_steps=5, **STRATEGIES)
    assert res.value <= LIPSDP_RANDOM_EXACT * (1 + 1e-6)
    assert res.value >= 0.999 * LIPSDP_RANDOM_EXACT
    assert_witnessed(net, res)


@pytest.mark.parametrize("widths", [[5, 7], [6, 4, 3]])
def test_linear_network_equals_the_norm(widths: list[int]) -> None:
    layers = [nn.Linear(a, b, dtype=F64) for a, b in itertools.pairwise(widths)]
    net = init_weights(nn.Sequential(*layers), 7, scale=1.0)
    weight = layers[0].weight.detach()
    for layer in layers[1:]:
        weight = layer.weight.detach() @ weight
    exact = norm2(weight)
    res = lipreg.lower_bound(
        net, (widths[0],), n_random=32, batch_size=32, n_anneal_steps=2, **STRATEGIES
    )
    assert res.value <= exact * (1 + 1e-12)
    assert res.value == pytest.approx(exact, rel=1e-6)
    assert any("pattern walk skipped" in n for n in res.notes)
    assert_witnessed(net, res)


def test_strategies_find_a_narrow_high_slope_piece_the_default_misses() -> None:
    """f(x) = relu(x − 5) − relu(x − 5.001) (+ a gentle slope): slope 1.3 only on [5, 5.001],
    far from the random points N(0, 1); the default search sees slope ~0.3 only."""
    net = nn.Sequential(nn.Linear(1, 3, dtype=F64), nn.ReLU(), nn.Linear(3, 1, dtype=F64))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0], [1.0]], dtype=F64))
        net[0].bias.copy_(torch.tensor([-5.0, -5.001, 100.0], dtype=F64))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0, 0.3]], dtype=F64))
        net[2].bias.zero_()
    exact = exact_lipschitz_1d(net)
    assert exact == pytest.approx(1.3, rel=1e-12)
    fast = dict(n_random=32, batch_size=32, n_anneal_steps=5)
    default = lipreg.lower_bound(net, (1,), **fast)
    assert default.value <= 0.31
    res = lipreg.lower_bound(net, (1,), **fast, **STRATEGIES)
    assert 0.99 * exact <= res.value <= exact * (1 + 1e-12)
    assert_witnessed(net, res)
    assert any("pattern walk" in n or "smoothed ascent" in n for n in res.notes)


def test_float32_relu_model_never_exceeds_its_float64_constant() -> None:
    net = relu_mlp([1, 8, 8, 2], 300)
    exact = exact_lipschitz_1d(net.float().double())
    res = lipreg.lower_bound(
        net.float(), (1,), n_random=64, batch_size=64, n_anneal_steps=2, **STRATEGIES
    )
    assert res.value <= exact * (1 + 1e-9)
    assert res.value >= 0.99 * exact
    assert_witnessed(net.float(), res)


def test_conv_net_stays_below_the_walked_piece_and_is_witnessed() -> None:
    net = init_weights(
        nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1, dtype=F64),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(48, 2, dtype=F64),
        ),
        400,
        scale=0.7,
    )
    res = lipreg.lower_bound(
        net, (1, 4, 4), n_random=32, batch_size=32, n_anneal_steps=2, n_chains=8, **STRATEGIES
    )
    assert_witnessed(net, res)
    # ≤ the product of the conv's and the linear layer's norms (an upper bound of L)
    conv_matrix = torch.autograd.functional.jacobian(
        lambda x: torch.nn.functional.conv2d(x, net[0].weight, padding=1).reshape(-1),
        torch.zeros(1, 1, 4, 4, dtype=F64),
    ).reshape(48, 16)
    assert res.value <= norm2(conv_matrix) * norm2(net[3].weight) * (1 + 1e-12)
    default = lipreg.lower_bound(net, (1, 4, 4), n_random=32, batch_size=32, n_anneal_steps=2)
    assert res.value >= default.value * (1 - 1e-12)


# ---------------------------------------------------------------------------------------------
# Determinism, non-perturbation, options
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_result_and_global_rng_untouched() -> None:
    net = relu_mlp([3, 6, 6, 2], 500)
    rng = torch.get_rng_state()
    kw = dict(n_random=32, batch_size=32, n_anneal_steps=2, seed=4, **STRATEGIES)
    a, b = lipreg.lower_bound(net, (3,), **kw), lipreg.lower_bound(net, (3,), **kw)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.value == b.value
    assert torch.equal(a.state["witness"], b.state["witness"])


def test_the_model_is_not_touched() -> None:
    net = relu_mlp([3, 6, 2], 501)
    net[1] = nn.ReLU(inplace=True)
    net.train()
    state = copy.deepcopy(net.state_dict())
    with torch.inference_mode():
        res = lipreg.lower_bound(
            net, (3,), n_random=16, batch_size=16, n_anneal_steps=1, **STRATEGIES
        )
    assert net.training and net[1].inplace
    assert not net[1]._forward_hooks
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k])
    assert all(p.requires_grad for p in net.parameters())
    assert res.value > 0


def test_negative_budgets_are_refused() -> None:
    net = relu_mlp([3, 4, 2], 502)
    for key in ("n_ascent_steps", "n_walk_steps"):
        with pytest.raises(ValueError, match=key):
            lipreg.lower_bound(net, (3,), **{key: -1})


def test_strategies_pass_every_point_to_the_evaluator() -> None:
    """The strategies only propose points: they return nothing but what ``evaluate`` saw."""
    net = relu_mlp([2, 5, 5, 1], 503)
    seen: list[tuple[torch.Tensor, str]] = []

    def evaluate(x: torch.Tensor, source: str):
        seen.append((x.clone(), source))
        jac = torch.stack([piece_jacobian(affine_layers(net), xi) for xi in x])
        v = torch.linalg.svd(jac).Vh[:, 0, :]
        return torch.linalg.matrix_norm(jac, 2), v

    x0 = torch.randn(4, 2, generator=gen(0), dtype=F64)
    smoothed_ascent(net, x0, evaluate, n_steps=20, lr=0.1, generator=gen(1))
    assert {s for _, s in seen} == {"smoothed ascent"} and len(seen) == 2
    seen.clear()
    assert pattern_walk(net, x0, evaluate, n_steps=5)
    assert seen and {s for _, s in seen} == {"pattern walk"}
    assert not pattern_walk(nn.Linear(2, 1, dtype=F64), x0, evaluate, n_steps=5)


def test_relu_probe_records_and_smooths() -> None:
    net = relu_mlp([2, 3, 1], 504)
    probe = ReluProbe(net, F64)
    x = torch.randn(5, 2, generator=gen(2), dtype=F64)
    y = probe(x, "record")
    w1, b1 = net[0].weight.detach(), net[0].bias.detach()
    assert torch.allclose(probe.pre[0], x @ w1.T + b1)
    assert torch.allclose(y, net(x).detach())
    probe.calibrate(x)
    probe.beta = 1e6  # softplus_β → relu
    assert torch.allclose(probe(x, "smooth"), net(x).detach(), atol=1e-5)
    probe.beta = 1.0
    assert not torch.allclose(probe(x, "smooth"), net(x).detach(), atol=1e-3)


class FunctionalRelu(nn.Module):
    """ReLU as a function call, not an ``nn.ReLU`` module: the strategies cannot see it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(1, 6, dtype=F64), nn.Linear(6, 2, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_functional_relu_is_reported_and_stays_sound() -> None:
    model = init_weights(FunctionalRelu(), 600, scale=1.0)
    exact = exact_lipschitz_1d(nn.Sequential(model.fc1, nn.ReLU(), model.fc2))
    res = lipreg.lower_bound(model, (1,), n_random=64, batch_size=64, **STRATEGIES)
    assert any("pattern walk skipped" in n for n in res.notes)
    assert res.value <= exact * (1 + 1e-9)
    assert_witnessed(model, res)


def test_smooth_activation_net_is_witnessed_and_no_worse_than_the_default() -> None:
    net = init_weights(
        nn.Sequential(nn.Linear(3, 8, dtype=F64), nn.Tanh(), nn.Linear(8, 2, dtype=F64)),
        601,
        scale=1.5,
    )
    fast = dict(n_random=32, batch_size=32, n_anneal_steps=2)
    default = lipreg.lower_bound(net, (3,), **fast)
    res = lipreg.lower_bound(net, (3,), **fast, **STRATEGIES)
    assert res.value >= default.value * (1 - 1e-12)
    # tanh' ≤ 1: ‖W2‖‖W1‖ bounds L from above
    assert res.value <= norm2(net[0].weight) * norm2(net[2].weight) * (1 + 1e-12)
    assert_witnessed(net, res)


class NoDeepCopy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def __deepcopy__(self, memo: dict) -> NoDeepCopy:
        raise TypeError("cannot copy this module")


def test_a_model_that_cannot_be_copied_raises_clearly() -> None:
    x0 = torch.zeros(2, 3, dtype=F64)

    def evaluate(x: torch.Tensor, source: str):
        raise AssertionError("never reached")

    with pytest.raises(RuntimeError, match="deepcopy"):
        pattern_walk(NoDeepCopy(), x0, evaluate, n_steps=1)
    with pytest.raises(RuntimeError, match="deepcopy"):
        smoothed_ascent(NoDeepCopy(), x0, evaluate, n_steps=1, lr=0.1, generator=gen(0))
