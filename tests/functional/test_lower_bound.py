"""Tests of ``lipreg.lower_bound`` and ``lipreg.jacobian_norms``.

Ground truths, all independent of the code under test: spectral norms of float64 weights
(``torch.linalg.matrix_norm``), dense Jacobians from ``torch.autograd.functional.jacobian`` and
their SVDs, the brute-force max over activation patterns of ``||W2 diag(σ) W1||`` (equal to
L(f) for one hidden ReLU layer with a full-row-rank first layer, paper.md §5 fact 7), and the
published exact constant of the LipSDP random network (36.48223), exact rational products
(``fractions``) for a cancelling network, closed forms (``|x|``, networks that are identically
zero), and difference quotients recomputed by plain float64 module calls.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lipreg
from tests.helpers import gen, init_weights, per_sample_jacobians
from tests.helpers import spectral_norm as norm2

torch.set_num_threads(1)

F64 = torch.float64
LIPSDP_RANDOM_EXACT = 36.48223


def init_(model: nn.Module, seed: int, scale: float = 0.7) -> nn.Module:
    return init_weights(model, seed, scale=scale)


def local_norms(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(per_sample_jacobians(model, X), 2)


def relu_mlp(widths: list[int], seed: int, bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b, bias=bias, dtype=F64))
    return init_(nn.Sequential(*layers), seed, scale=1.0)


def brute_k2(W1: torch.Tensor, W2: torch.Tensor) -> float:
    S = torch.tensor(list(itertools.product([0.0, 1.0], repeat=W1.shape[0])), dtype=F64)
    M = (W2.to(F64)[None] * S[:, None, :]) @ W1.to(F64)
    return float(torch.linalg.matrix_norm(M, 2).max())


FAST = dict(n_random=256, batch_size=256, n_anneal_steps=5, n_iter=40)


# ---------------------------------------------------------------------------------------------
# 10. Lower bound <= true L on nets where L is known
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 5), (3, 9), (6, 6)])
def test_single_linear_reaches_its_norm(shape: tuple[int, int]) -> None:
    out_f, in_f = shape
    net = init_(nn.Linear(in_f, out_f, dtype=F64), sum(shape))
    exact = norm2(net.weight)
    res = lipreg.lower_bound(net, (in_f,), n_random=64, batch_size=64, n_anneal_steps=2)
    assert res.value <= exact * (1 + 1e-12)
    assert res.value == pytest.approx(exact, rel=1e-6)
    assert res.kind == "lower" and not res.certified
    assert res.method == "lower_bound"


@pytest.mark.parametrize("seed", range(3))
def test_k2_full_row_rank_relu(seed: int) -> None:
    net = relu_mlp([8, 6, 3], 10 + seed)
    W1, W2 = net[0].weight.detach(), net[2].weight.detach()
    assert int(torch.linalg.matrix_rank(W1)) == 6
    exact = brute_k2(W1, W2)  # = L(f)
    res = lipreg.lower_bound(net, (8,), scale=3.0, seed=seed, **FAST)
    assert res.value <= exact * (1 + 1e-9)
    assert res.value >= 0.9 * exact
    # the argmax is a real witness: the dense Jacobian norm there equals the value
    x = res.state["argmax"]
    assert local_norms(net, x[None])[0] == pytest.approx(res.value, rel=1e-5)


def test_lipsdp_random_network() -> None:
    from lipreg.models import load_lipsdp

    try:
        net, meta = load_lipsdp("random")
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"LipSDP random network not available: {exc}")
    assert meta["input_shape"] == (2,)
    res = lipreg.lower_bound(net, (2,), **FAST)
    print(
        f"lower bound on LipSDP random net: {res.value:.8f} / {LIPSDP_RANDOM_EXACT} "
        f"= {res.value / LIPSDP_RANDOM_EXACT:.10f}"
    )
    assert res.value <= LIPSDP_RANDOM_EXACT * (1 + 1e-6)
    assert res.value >= 0.99 * LIPSDP_RANDOM_EXACT
    x = res.state["argmax"]
    assert local_norms(net, x[None])[0] == pytest.approx(res.value, rel=1e-5)
    # bias-free: the Jacobian is constant on rays, so a dense angular sweep of the unit circle
    # gives an independent estimate of L from below.
    theta = torch.linspace(0, 2 * math.pi, 4001, dtype=F64)[:-1]
    sweep = float(local_norms(net, torch.stack([theta.cos(), theta.sin()], 1)).max())
    assert sweep <= LIPSDP_RANDOM_EXACT * (1 + 1e-6)
    assert res.value >= sweep * (1 - 1e-6)


def test_float32_model_is_close_to_its_float64_norm() -> None:
    """The float32 search may overshoot ||W|| by rounding; the certified quotient never does."""
    for seed in range(3):
        layer = init_(nn.Linear(20, 15), 70 + seed)
        exact = norm2(layer.weight)
        res = lipreg.lower_bound(layer, (20,), n_random=64, batch_size=64, n_anneal_steps=2)
        assert res.value <= exact * (1 + 1e-12)
        assert res.value >= exact * (1 - 1e-5)


class ScalarHead(nn.Module):
    """A regression network returning one scalar per sample, shape (N,)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).squeeze(-1)


def test_scalar_output_per_sample() -> None:
    model = init_(ScalarHead(), 80)
    res = lipreg.lower_bound(model, (4,), n_random=32, batch_size=32, n_anneal_steps=1)
    assert res.value == pytest.approx(norm2(model.lin.weight), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# 11. jacobian_norms against dense Jacobian SVDs
# ---------------------------------------------------------------------------------------------


def tanh_net() -> nn.Module:
    return init_(
        nn.Sequential(nn.Linear(5, 7, dtype=F64), nn.Tanh(), nn.Linear(7, 4, dtype=F64)), 20
    )


def relu_net() -> nn.Module:
    return relu_mlp([6, 8, 5, 3], 21)


def conv_net() -> nn.Module:
    return init_(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, dtype=F64),
            nn.ReLU(),
            nn.Conv2d(3, 2, 3, stride=2, dtype=F64),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(8, 3, dtype=F64),
        ),
        22,
    )


def conv_map_net() -> nn.Module:
    """Output is a feature map (N, C, H, W), not a vector."""
    return init_(
        nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1, dtype=F64), nn.ReLU(), nn.Conv2d(2, 2, 2, dtype=F64)
        ),
        23,
    )


NETS = {
    "tanh": (tanh_net, (5,)),
    "relu": (relu_net, (6,)),
    "conv": (conv_net, (2, 5, 5)),
    "conv-map": (conv_map_net, (1, 4, 4)),
}


@pytest.mark.parametrize("make,shape", NETS.values(), ids=NETS.keys())
def test_jacobian_norms_match_dense_svd(make, shape) -> None:
    net = make()
    X = torch.randn(7, *shape, generator=gen(30), dtype=F64)
    expected = local_norms(net, X)
    sigma, v = lipreg.jacobian_norms(net, X, n_iter=1000, tol=1e-13, generator=gen(31))
    assert sigma.shape == (7,)
    assert v.shape == X.shape
    assert torch.all(sigma <= expected * (1 + 1e-12))
    assert torch.allclose(sigma, expected, rtol=1e-6, atol=0)
    v_norms = v.flatten(1).norm(dim=1)
    assert torch.allclose(v_norms, torch.ones(7, dtype=F64), atol=1e-12)
    Jv = torch.einsum("noi,ni->no", per_sample_jacobians(net, X), v.flatten(1)).norm(dim=1)
    assert torch.all(Jv >= sigma * (1 - 1e-9))


@pytest.mark.parametrize("make,shape", NETS.values(), ids=NETS.keys())
def test_jacobian_norms_never_exceed_the_norm_even_unconverged(make, shape) -> None:
    net = make()
    X = torch.randn(16, *shape, generator=gen(32), dtype=F64)
    expected = local_norms(net, X)
    for n_iter in (1, 2, 5):
        sigma, _ = lipreg.jacobian_norms(net, X, n_iter=n_iter, generator=gen(n_iter))
        assert torch.all(sigma <= expected * (1 + 1e-12))
        assert torch.all(sigma > 0)


def test_jacobian_norms_zero_jacobian() -> None:
    net = nn.Sequential(nn.Linear(3, 4, dtype=F64), nn.ReLU(), nn.Linear(4, 2, dtype=F64))
    with torch.no_grad():
        net[0].bias.fill_(-100.0)  # every unit dead near the origin
    sigma, v = lipreg.jacobian_norms(net, torch.zeros(3, 3, dtype=F64), generator=gen(0))
    assert torch.equal(sigma, torch.zeros(3, dtype=F64))
    assert torch.isfinite(v).all()


# ---------------------------------------------------------------------------------------------
# 12. inputs=, errors, result fields
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_net():
    net = relu_mlp([5, 7, 3], 40)
    X = torch.randn(40, 5, generator=gen(41), dtype=F64)
    y = torch.randint(0, 3, (40,), generator=gen(42))
    return net, X, y


def data_only(**kw):
    return dict(n_random=0, n_anneal_steps=0, **kw)


def test_inputs_as_tensor_list_and_dataloader(data_net) -> None:
    net, X, y = data_net
    expected = float(local_norms(net, X).max())
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=False)
    for inputs in (X, [X[:13], X[13:]], loader, iter([X[:20], X[20:]])):
        res = lipreg.lower_bound(net, (5,), inputs=inputs, **data_only())
        assert res.value == pytest.approx(expected, rel=1e-7)
        assert res.kind == "lower" and not res.certified
        x = res.state["argmax"]
        assert x.shape == (5,)
        assert local_norms(net, x[None])[0] == pytest.approx(res.value, rel=1e-5)
        # the argmax is one of the data points
        assert bool((x[None] == X).all(dim=1).any())


def test_small_batches_give_the_same_maximum(data_net) -> None:
    net, X, _ = data_net
    res = lipreg.lower_bound(net, (5,), inputs=X, batch_size=7, **data_only())
    assert res.value == pytest.approx(float(local_norms(net, X).max()), rel=1e-7)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_under_no_grad_and_inference_mode(data_net, context) -> None:
    net, X, _ = data_net
    with context():
        res = lipreg.lower_bound(net, (5,), inputs=X, **data_only())
    assert res.value == pytest.approx(float(local_norms(net, X).max()), rel=1e-7)


def test_inputs_float32_are_cast_to_the_model_dtype(data_net) -> None:
    net, X, _ = data_net
    res = lipreg.lower_bound(net, (5,), inputs=X.float(), **data_only())
    expected = float(local_norms(net, X.float().double()).max())
    assert res.value == pytest.approx(expected, rel=1e-7)


def test_single_sample_input(data_net) -> None:
    net, X, _ = data_net
    res = lipreg.lower_bound(net, (5,), inputs=X[3], **data_only())
    assert res.value == pytest.approx(float(local_norms(net, X[3:4])[0]), rel=1e-7)


def test_max_batches_caps_the_data_read(data_net) -> None:
    net, X, y = data_net
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=False)
    res = lipreg.lower_bound(net, (5,), inputs=loader, max_batches=2, **data_only())
    assert res.value == pytest.approx(float(local_norms(net, X[:16]).max()), rel=1e-7)


def test_inputs_and_random_search_stay_below_true_constant(data_net) -> None:
    net, X, _ = data_net
    exact = brute_k2(net[0].weight.detach(), net[2].weight.detach())  # ≥ L(f)
    data_max = float(local_norms(net, X).max())
    res = lipreg.lower_bound(net, (5,), inputs=X, n_random=128, batch_size=128, n_anneal_steps=5)
    assert data_max * (1 - 1e-7) <= res.value <= exact * (1 + 1e-9)
    assert local_norms(net, res.state["argmax"][None])[0] == pytest.approx(res.value, rel=1e-5)
    d = res.state["direction"]
    assert d.shape == (5,)
    assert float(d.norm()) == pytest.approx(1.0, abs=1e-9)
    Jd = per_sample_jacobians(net, res.state["argmax"][None])[0] @ d
    assert float(Jd.norm()) >= res.value * (1 - 1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        torch.randn(10, 4, dtype=F64),
        [torch.randn(4, 5, dtype=F64), torch.randn(3, 6, dtype=F64)],
        DataLoader(TensorDataset(torch.randn(8, 6), torch.zeros(8)), batch_size=4),
        torch.randn(2, 5, 1, dtype=F64),
    ],
    ids=["tensor", "list", "dataloader", "extra-dim"],
)
def test_wrong_input_shapes_raise(data_net, bad) -> None:
    net, _, _ = data_net
    with pytest.raises(ValueError, match="shape"):
        lipreg.lower_bound(net, (5,), inputs=bad, **data_only())


def test_nothing_to_search_raises(data_net) -> None:
    net, _, _ = data_net
    with pytest.raises(ValueError):
        lipreg.lower_bound(net, (5,), n_random=0)
    with pytest.raises(ValueError):
        lipreg.lower_bound(net, (5,), inputs=[], n_random=0)
    with pytest.raises(TypeError):
        lipreg.lower_bound(net, (5,), inputs=["not a tensor"])
    with pytest.raises(ValueError):
        lipreg.lower_bound(net, (0,))


# ---------------------------------------------------------------------------------------------
# 13. Non-perturbation
# ---------------------------------------------------------------------------------------------


def bn_dropout_net() -> nn.Sequential:
    net = nn.Sequential(
        nn.Linear(6, 5, dtype=F64),
        nn.BatchNorm1d(5, dtype=F64),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(5, 3, dtype=F64),
    )
    init_(net, 50)
    with torch.no_grad():
        net[1].running_mean.copy_(torch.randn(5, generator=gen(51), dtype=F64))
        net[1].running_var.copy_(torch.rand(5, generator=gen(52), dtype=F64) + 0.5)
    return net


def snapshot(net: nn.Module):
    return (
        copy.deepcopy(net.state_dict()),
        [m.training for m in net.modules()],
        [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        torch.get_rng_state(),
    )


def assert_unchanged(net: nn.Module, snap) -> None:
    state, modes, grads, rng = snap
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in net.modules()] == modes
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, g in zip(net.parameters(), grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


def test_lower_bound_does_not_perturb_a_training_model() -> None:
    torch.manual_seed(99)
    net = bn_dropout_net()
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=gen(53), dtype=F64)
    net.train()
    snap = snapshot(net)
    res = lipreg.lower_bound(net, (6,), **FAST)
    assert_unchanged(net, snap)

    eval_net = copy.deepcopy(net).eval()
    # the value is the eval-mode Jacobian norm at the returned point
    x = res.state["argmax"]
    assert local_norms(eval_net, x[None])[0] == pytest.approx(res.value, rel=1e-5)
    # and it bounds the eval-mode network from below: BN folded into the first layer
    bn = net[1]
    d = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    exact = brute_k2(d[:, None] * net[0].weight.detach(), net[4].weight.detach())
    assert res.value <= exact * (1 + 1e-9)
    assert res.value == pytest.approx(lipreg.lower_bound(eval_net, (6,), **FAST).value, rel=1e-9)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it (fallback path)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = bn_dropout_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 1e9):  # never true, but not traceable
            return x
        return self.body(x)


def test_lower_bound_fallback_path_restores_modes_and_rng() -> None:
    model = Untraceable()
    model.train()
    model.body[3].eval()  # mixed modes must be restored exactly
    snap = snapshot(model)
    res = lipreg.lower_bound(model, (6,), **FAST)
    assert_unchanged(model, snap)
    assert any("eval-mode call" in n for n in res.notes)
    eval_body = copy.deepcopy(model.body).eval()
    x = res.state["argmax"]
    assert local_norms(eval_body, x[None])[0] == pytest.approx(res.value, rel=1e-5)


def test_same_seed_same_value_and_global_rng_untouched() -> None:
    net = relu_mlp([4, 6, 2], 60)
    rng = torch.get_rng_state()
    a = lipreg.lower_bound(net, (4,), seed=3, **FAST)
    b = lipreg.lower_bound(net, (4,), seed=3, **FAST)
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.value == b.value
    assert torch.equal(a.state["argmax"], b.state["argmax"])


# ---------------------------------------------------------------------------------------------
# 14. Certified by definition: difference quotients, kinks, cancellation, non-finite values
# ---------------------------------------------------------------------------------------------


def quotient64(model: nn.Module, x: torch.Tensor, z: torch.Tensor) -> float:
    """``‖f(z) − f(x)‖ / ‖z − x‖`` of an eval-mode float64 copy, by a plain module call."""
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        fz, fx = m(z.to(F64)[None]), m(x.to(F64)[None])
    return float((fz - fx).norm() / (z.to(F64) - x.to(F64)).norm())


class KinkZero(nn.Module):
    """``relu(x) − relu(−x) − x ≡ 0``, whose autograd Jacobian at 0 is ``−I`` (norm 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) - torch.relu(-x) - x


class Abs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


def test_identically_zero_network_at_a_kink_gives_zero_not_one() -> None:
    net = KinkZero()
    zeros = torch.zeros(3, 4, dtype=F64)
    sigma, _ = lipreg.jacobian_norms(net, zeros, generator=gen(0))
    assert torch.allclose(sigma, torch.ones(3, dtype=F64))  # the trap: autograd says 1
    res = lipreg.lower_bound(net, (4,), inputs=zeros, **data_only())
    assert res.value == 0.0
    assert res.kind == "lower"
    assert res.estimate == pytest.approx(1.0)  # the uncertified autograd value, reported as such
    assert any("kink" in n for n in res.notes)
    # away from the kink too
    assert lipreg.lower_bound(net, (4,), **FAST).value == 0.0


def test_identically_zero_sequential_gives_zero() -> None:
    net = nn.Sequential(nn.Linear(4, 4, dtype=F64), nn.ReLU(), nn.Linear(4, 4, dtype=F64))
    init_(net, 5)
    with torch.no_grad():
        net[2].weight.zero_()  # output ≡ bias
    assert lipreg.lower_bound(net, (4,), **FAST).value == 0.0


def test_abs_at_its_kink_reaches_one_and_never_exceeds_it() -> None:
    # L(|x|) = 1 exactly; autograd's Jacobian at 0 is 0.
    res = lipreg.lower_bound(Abs(), (5,), inputs=torch.zeros(2, 5, dtype=F64), **data_only())
    assert 1 - 1e-9 <= res.value <= 1.0
    res = lipreg.lower_bound(Abs(), (5,), **FAST)
    assert 1 - 1e-6 <= res.value <= 1.0


def test_relu_net_at_a_kink_bias_free_origin() -> None:
    """At 0 every unit of a bias-free ReLU net sits on its kink (autograd: J = 0)."""
    net = relu_mlp([8, 6, 3], 11, bias=False)
    W1, W2 = net[0].weight.detach(), net[2].weight.detach()
    exact = brute_k2(W1, W2)
    zeros = torch.zeros(1, 8, dtype=F64)
    sigma, _ = lipreg.jacobian_norms(net, zeros, generator=gen(0))
    assert float(sigma[0]) == 0.0
    res = lipreg.lower_bound(net, (8,), inputs=zeros, **data_only())
    assert 0 < res.value <= exact * (1 + 1e-12)
    z = res.state["witness"]
    assert res.value <= quotient64(net, res.state["argmax"], z) * (1 + 1e-12)
    # positively homogeneous: the quotient along ±v is ‖f(±v)‖, one of them is the value
    v = res.state["direction"].to(F64)
    v = v / v.norm()
    with torch.no_grad():
        best = max(float(net(v[None]).norm()), float(net(-v[None]).norm()))
    assert res.value == pytest.approx(best, rel=1e-9)


def test_relu_net_at_a_kink_of_one_unit() -> None:
    """One unit exactly on its kink: the certified value still covers the off-side piece."""
    net = relu_mlp([5, 6, 3], 12)
    with torch.no_grad():
        net[0].weight[0] = torch.tensor([1.0, 0, 0, 0, 0], dtype=F64)
        net[0].bias[0] = 0.0
    x = torch.randn(1, 5, generator=gen(13), dtype=F64)
    x[0, 0] = 0.0  # unit 0's pre-activation is exactly 0
    exact = brute_k2(net[0].weight.detach(), net[2].weight.detach())
    autograd_norm = float(local_norms(net, x)[0])
    res = lipreg.lower_bound(net, (5,), inputs=x, n_iter=200, **data_only())
    assert res.value <= exact * (1 + 1e-12)
    assert res.value >= autograd_norm * (1 - 1e-6)  # both sides of the kink were tried
    assert res.value <= quotient64(net, res.state["argmax"], res.state["witness"]) * (1 + 1e-12)


def exact_product_norm(W2: torch.Tensor, W1: torch.Tensor) -> float:
    """``‖W2 W1‖_2`` with the product computed exactly in rational arithmetic."""
    from fractions import Fraction

    a = [[Fraction(float(w)) for w in row] for row in W2.tolist()]
    b = [[Fraction(float(w)) for w in row] for row in W1.tolist()]
    prod = [
        [float(sum(a[i][k] * b[k][j] for k in range(len(b)))) for j in range(len(b[0]))]
        for i in range(len(a))
    ]
    return norm2(torch.tensor(prod, dtype=F64))


def test_cancellation_below_the_rounding_noise_is_not_certified() -> None:
    """W2 W1 ≈ 3e-14 exactly, while float64 rounding noise in the output is ~1e-14: a margin
    relative to the (tiny) output would certify ~1e-7 here, 10⁶ times the true constant."""
    g = gen(0)
    W1 = (
        torch.randn(6, 2, generator=g, dtype=F64) @ torch.randn(2, 6, generator=g, dtype=F64)
    ) * 10
    U = torch.linalg.svd(W1).U
    W2 = torch.cat([U[:, 2:].T, 3 * U[:, 2:4].T])  # rows ⟂ the range of W1
    net = nn.Sequential(
        nn.Linear(6, 6, bias=False, dtype=F64), nn.Linear(6, 6, bias=False, dtype=F64)
    )
    with torch.no_grad():
        net[0].weight.copy_(W1)
        net[1].weight.copy_(W2)
    exact = exact_product_norm(W2, W1)
    assert 0 < exact < 1e-12
    for model in (net, copy.deepcopy(net).float()):
        exact_m = exact_product_norm(model[1].weight.detach(), model[0].weight.detach())
        res = lipreg.lower_bound(model, (6,), **FAST)
        assert res.value <= exact_m * (1 + 1e-9)


def test_certified_value_is_a_real_quotient_of_the_witness_pair() -> None:
    net = tanh_net()
    res = lipreg.lower_bound(net, (5,), **FAST)
    x, z = res.state["argmax"], res.state["witness"]
    assert not torch.equal(x.to(F64), z)
    assert res.value <= quotient64(net, x, z) * (1 + 1e-12)
    assert res.value >= quotient64(net, x, z) * (1 - 1e-6)  # the margin is small


@pytest.mark.parametrize("make,shape", NETS.values(), ids=NETS.keys())
def test_tight_against_the_best_jacobian_norm(make, shape) -> None:
    net = make()
    res = lipreg.lower_bound(net, shape, **FAST)
    assert res.kind == "lower"
    assert res.value >= 0.97 * res.estimate
    assert res.value >= 0.97 * float(local_norms(net, res.state["argmax"][None])[0])


class NaNScale(nn.Module):
    def __init__(self, value: float, where: str) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = torch.tensor(value)  # a plain attribute, not a buffer or parameter
        self.where = where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.where == "mul":
            return self.lin(x) * self.scale
        return self.lin(x) + self.scale  # finite Jacobian, non-finite output


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["mul", "add"])
def test_non_finite_outputs_raise_never_a_finite_number(value: float, where: str) -> None:
    with pytest.raises(ValueError, match="non-finite"):
        lipreg.lower_bound(NaNScale(value, where), (3,), **FAST)


class BatchCoupled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x - x.mean(0, keepdim=True))


def test_batch_coupled_models_are_refused() -> None:
    with pytest.raises(ValueError, match="per-sample"):
        lipreg.lower_bound(BatchCoupled(), (4,), **FAST)
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats"):
        lipreg.lower_bound(bn, (4,), **FAST)


class NoDeepCopy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def __deepcopy__(self, memo: dict) -> NoDeepCopy:
        raise TypeError("cannot copy this module")


def test_a_model_that_cannot_be_copied_to_float64_raises_clearly() -> None:
    with pytest.raises(RuntimeError, match="deepcopy"):
        lipreg.lower_bound(NoDeepCopy(), (3,), **FAST)


# ---------------------------------------------------------------------------------------------
# 15. Models without forward-mode AD: reverse-mode fallback (LSTM, fused attention)
# ---------------------------------------------------------------------------------------------


class LSTMOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


def segment_sup(model: nn.Module, x: torch.Tensor, z: torch.Tensor, n: int = 41) -> float:
    """max of the dense float64 Jacobian norm on points of the segment [x, z] (mean value
    theorem: the quotient is at most the sup over the segment)."""
    m = copy.deepcopy(model).double().eval()
    t = torch.linspace(0, 1, n, dtype=F64).reshape(-1, *([1] * x.ndim))
    pts = x.to(F64)[None] + t * (z.to(F64) - x.to(F64))[None]
    return float(local_norms(m, pts).max())


@pytest.mark.parametrize(
    "make,shape", [(LSTMOut, (5, 3)), (Attention, (5, 4))], ids=["lstm", "mha"]
)
def test_models_without_forward_ad(make, shape) -> None:
    model = init_(make(), 90, scale=0.5).eval()
    X = torch.randn(6, *shape, generator=gen(91))
    with torch.no_grad():  # the fused attention kernel runs under no_grad
        sigma, _ = lipreg.jacobian_norms(model, X, n_iter=300, tol=1e-10, generator=gen(92))
    expected = local_norms(copy.deepcopy(model).double(), X)
    assert torch.allclose(sigma.double(), expected, rtol=1e-4)
    with torch.no_grad():
        res = lipreg.lower_bound(model, shape, n_random=32, batch_size=32, n_anneal_steps=2)
    assert res.kind == "lower"
    x, z = res.state["argmax"], res.state["witness"]
    assert res.value <= quotient64(model, x, z) * (1 + 1e-12)
    assert res.value <= segment_sup(model, x, z) * (1 + 1e-3)
    assert res.value >= 0.97 * float(local_norms(copy.deepcopy(model).double(), x[None])[0])


class ReluInplace(nn.Module):
    """In-place ReLUs on a tensor autograd saved: reverse mode fails without functionalize."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6, dtype=F64), nn.Linear(6, 3, dtype=F64)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x)
        torch.nn.functional.relu(y, inplace=True)
        return self.fc2(self.act(y)) + y.sum(dim=1, keepdim=True)


def test_in_place_relu_model() -> None:
    model = init_(ReluInplace(), 95)
    # f = (W2 + 1 1ᵀ) relu(W1 x + b1) + b2: one hidden layer, L by brute force over patterns
    W1 = model.fc1.weight.detach()
    assert int(torch.linalg.matrix_rank(W1)) == 6
    exact = brute_k2(W1, model.fc2.weight.detach() + 1.0)
    res = lipreg.lower_bound(model, (6,), **FAST)
    assert 0.9 * exact <= res.value <= exact * (1 + 1e-9)
    assert res.value <= quotient64(model, res.state["argmax"], res.state["witness"]) * (1 + 1e-12)
