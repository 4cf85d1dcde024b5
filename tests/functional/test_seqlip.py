"""Tests of ``lipreg.seqlip`` and of its pair solvers ``pair_norm_exact`` / ``pair_norm_greedy``.

Every expected value is computed here, independently of the code under test:

* brute force over activation patterns (``itertools.product`` over ``{lo, hi}^n``) with
  ``torch.linalg.matrix_norm(·, 2)`` in float64, both per SeqLip pair (from our own
  ``torch.linalg.svd``) and jointly over all hidden layers (the §2.6 max-σ bound);
* dense Jacobians (``torch.autograd.functional.jacobian``) of the networks and of their
  convolutions, whose SVDs give layer norms and true local Lipschitz constants;
* closed forms from paper.md §2.9 / §5: rank-1 layers (fact 10), Theorem 3 (fact 12), the
  K = 2 identity SeqLip = max-σ bound = L(f) (fact 7), invariances (fact 9).

The pair solvers against brute force, the rank-1 closed forms and Theorem 3 are in
``test_seqlip_pairs.py``; the shared reference computations in ``seqlip_helpers.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lipreg
from tests.functional.seqlip_helpers import (
    F64,
    REL,
    RELU,
    batched_jacobians,
    brute_pair,
    dense,
    gelu_slope_range,
    gen,
    init_,
    joint_max_sigma,
    linear,
    m_abs,
    net_from,
    norm2,
    orthogonal,
    random_mlp,
    ref_factors,
    ref_pairs,
    ref_pairs_all_hi,
    ref_seqlip,
    weights,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# 1. K = 2, full-row-rank first layer: exact SeqLip = max-σ bound = L(f)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_k2_exact_seqlip_equals_brute_force_and_true_constant(seed: int) -> None:
    net = random_mlp([8, 6, 3], seed)
    W1, W2 = weights(net)
    assert int(torch.linalg.matrix_rank(W1)) == 6  # full row rank: every pattern reachable

    res = lipreg.seqlip(net, (8,), method="exact", dtype=F64)
    brute = joint_max_sigma([W1, W2], [RELU])
    assert brute == pytest.approx(ref_seqlip([W1, W2], [RELU]), rel=1e-12)
    assert res.value == pytest.approx(brute, rel=REL)
    assert res.value >= brute * (1 - 1e-12)  # certified: never below the exact value
    assert res.kind == "upper" and res.certified
    assert res.method == "seqlip-exact"
    pairs = [lb for lb in res.layers if lb.kind == "seqlip-pair"]
    assert len(pairs) == 1 and pairs[0].certified

    # L(f) = brute (fact 7): the dense Jacobians at random points approach it from below.
    X = torch.randn(4000, 8, generator=gen(100 + seed), dtype=F64) * 3.0
    local = torch.linalg.matrix_norm(batched_jacobians(net, X), 2)
    assert float(local.max()) <= res.value * (1 + 1e-12)
    assert float(local.max()) >= 0.95 * brute

    autolip = lipreg.autolip(net, (8,), dtype=F64)
    assert autolip.value >= res.value * (1 - 1e-12)
    assert norm2(W1) * norm2(W2) >= res.value * (1 - 1e-8)


# ---------------------------------------------------------------------------------------------
# 3. Chain of inequalities on small random ReLU MLPs
# ---------------------------------------------------------------------------------------------

CHAIN_WIDTHS = [
    [6, 5, 2],
    [2, 5, 6, 5],
    [4, 5, 4, 4, 6],
    [5, 8, 6, 4],
    [3, 4, 3, 4, 8],
    [7, 8, 3],
    [4, 2, 6, 3],
    [6, 4, 2, 6, 5],
    [3, 6, 6, 2],
    [8, 3, 4, 5, 2],
]


@pytest.mark.parametrize("seed,widths", list(enumerate(CHAIN_WIDTHS)))
def test_chain_of_inequalities(seed: int, widths: list[int]) -> None:
    net = random_mlp(widths, 200 + seed)
    Ms = weights(net)
    boxes = [RELU] * (len(Ms) - 1)
    shape = (widths[0],)

    joint = joint_max_sigma(Ms, boxes)  # §2.6 bound, ≥ L(f)
    ref = ref_seqlip(Ms, boxes)
    exact = lipreg.seqlip(net, shape, method="exact", dtype=F64)
    greedy = lipreg.seqlip(net, shape, method="greedy", dtype=F64)
    autolip = lipreg.autolip(net, shape, dtype=F64)
    low = lipreg.lower_bound(
        net, shape, n_random=256, batch_size=256, n_anneal_steps=5, n_iter=30, seed=seed
    )

    assert exact.value == pytest.approx(ref, rel=REL)
    assert joint <= exact.value * (1 + 1e-12)
    assert exact.value <= autolip.value * (1 + 1e-12)
    assert autolip.value >= math.prod(norm2(M) for M in Ms) * (1 - 1e-12)
    assert greedy.value <= exact.value * (1 + 1e-12)
    # fact 6: greedy ≥ product of the pair norms at σ = 1
    assert greedy.value >= math.prod(ref_pairs_all_hi(Ms, boxes)) * (1 - 1e-12)
    assert greedy.kind == "estimate" and not greedy.certified
    assert greedy.method == "seqlip-greedy"
    assert low.value <= joint * (1 + 1e-9)
    assert len([lb for lb in exact.layers if lb.kind == "seqlip-pair"]) == len(Ms) - 1


# ---------------------------------------------------------------------------------------------
# 6. Invariances (fact 9)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_invariances(seed: int) -> None:
    widths = [5, 6, 4, 3]
    net = random_mlp(widths, 400 + seed)
    Ms = weights(net)
    bs = [m.bias.detach() for m in net if isinstance(m, nn.Linear)]
    expected = ref_seqlip(Ms, [RELU, RELU])
    base = lipreg.seqlip(net, (5,), method="exact", dtype=F64).value
    assert base == pytest.approx(expected, rel=REL)
    g = gen(500 + seed)

    # orthogonal transforms of the input and output spaces
    Q, P = orthogonal(5, g), orthogonal(3, g)
    rotated = net_from([Ms[0] @ Q, Ms[1], P @ Ms[2]], biases=[bs[0], bs[1], P @ bs[2]])
    # consistent permutations of both hidden layers
    p1, p2 = torch.randperm(6, generator=g), torch.randperm(4, generator=g)
    permuted = net_from(
        [Ms[0][p1], Ms[1][p2][:, p1], Ms[2][:, p2]], biases=[bs[0][p1], bs[1][p2], bs[2]]
    )
    # other biases, and no biases at all
    rebiased = net_from(
        Ms, biases=[10 * torch.randn(w, generator=g, dtype=F64) for w in widths[1:]]
    )
    unbiased = net_from(Ms)
    for variant in (rotated, permuted, rebiased, unbiased):
        value = lipreg.seqlip(variant, (5,), method="exact", dtype=F64).value
        assert value == pytest.approx(expected, rel=REL)


# ---------------------------------------------------------------------------------------------
# 7. Structure of the chain, boxes, errors, top-k
# ---------------------------------------------------------------------------------------------


def test_maxpool_splits_the_chain() -> None:
    c1 = nn.Conv2d(1, 2, 3, dtype=F64)
    c2 = nn.Conv2d(2, 2, 3, dtype=F64)
    net = init_(nn.Sequential(c1, nn.ReLU(), nn.MaxPool2d(2), c2), 0)
    res = lipreg.seqlip(net, (1, 8, 8), method="exact", dtype=F64)
    M1 = dense(lambda z: F.conv2d(z, c1.weight), (1, 8, 8))
    M2 = dense(lambda z: F.conv2d(z, c2.weight), (2, 3, 3))
    expected = norm2(M1) * 1.0 * norm2(M2)
    assert res.value == pytest.approx(expected, rel=REL)
    assert res.value >= expected * (1 - 1e-12)
    assert res.certified
    assert [lb.kind for lb in res.layers] == ["affine", "activation", "nonlinear", "affine"]
    assert not any(lb.kind == "seqlip-pair" for lb in res.layers)


def test_avgpool_is_linear_and_stays_inside_the_chain() -> None:
    c1 = nn.Conv2d(1, 1, 3, dtype=F64)
    c2 = nn.Conv2d(1, 2, 1, dtype=F64)
    lin = nn.Linear(8, 2, dtype=F64)
    net = init_(nn.Sequential(c1, nn.ReLU(), nn.AvgPool2d(2), c2, nn.Flatten(), lin), 1)
    res = lipreg.seqlip(net, (1, 6, 6), method="exact", dtype=F64)
    M1 = dense(lambda z: F.conv2d(z, c1.weight), (1, 6, 6))  # (16, 36)
    M2 = dense(
        lambda z: F.linear(F.conv2d(F.avg_pool2d(z, 2), c2.weight).flatten(1), lin.weight),
        (1, 4, 4),
    )  # (2, 16)
    assert res.value == pytest.approx(ref_seqlip([M1, M2], [RELU]), rel=REL)
    assert res.certified
    # one pair (the pooling stays inside the chain), widened by the materialisation rounding
    assert [lb.kind for lb in res.layers] == ["seqlip-pair", "rounding"]
    assert 1.0 < res.layers[1].value < 1 + 1e-8


BOX_ACTS = {
    "leaky0.25": (lambda: nn.LeakyReLU(0.25), (0.25, 1.0), REL),
    "leaky0.1": (lambda: nn.LeakyReLU(0.1), (0.1, 1.0), 1e-7),  # float32 box, see xfails
    "sigmoid": (nn.Sigmoid, (0.0, 0.25), REL),
    "tanh": (nn.Tanh, (0.0, 1.0), REL),
    "relu->sigmoid": (lambda: nn.Sequential(nn.ReLU(), nn.Sigmoid()), (0.0, 0.25), REL),
    "gelu": (nn.GELU, gelu_slope_range(), 1e-7),  # float32 box, see xfails
    "abs-like hardtanh": (nn.Hardtanh, (0.0, 1.0), REL),
}


@pytest.mark.parametrize("act,box,rel", BOX_ACTS.values(), ids=BOX_ACTS.keys())
def test_activation_boxes(act, box, rel) -> None:
    net = random_mlp([7, 5, 3], 600, act=act)
    Ms = weights(net)
    res = lipreg.seqlip(net, (7,), method="exact", dtype=F64)
    expected = brute_pair(*ref_factors(Ms)[0], *box)
    assert res.value == pytest.approx(expected, rel=rel)
    assert res.certified
    X = torch.randn(2000, 7, generator=gen(601), dtype=F64) * 2
    local = torch.linalg.matrix_norm(batched_jacobians(net, X), 2)
    assert float(local.max()) <= res.value * (1 + 1e-9)


def test_sigmoid_box_reaches_the_true_constant_when_aligned() -> None:
    """Linear(I) -> sigmoid -> Linear(1ᵀ): L = 1/4 · √n, attained at x = 0."""
    net = net_from([torch.eye(4, dtype=F64), torch.ones(1, 4, dtype=F64)], nn.Sigmoid)
    res = lipreg.seqlip(net, (4,), method="exact", dtype=F64)
    assert res.value == pytest.approx(0.5, rel=REL)
    assert res.value >= 0.5


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 4)
        self.l2 = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.l2(torch.relu(self.l1(x)))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 4)
        self.l2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        return self.l2(torch.cat([h, torch.relu(h)], dim=1))


@pytest.mark.parametrize("model", [Residual(), Concat()], ids=["residual", "concat"])
@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_non_sequential_networks_raise(model: nn.Module, method: str) -> None:
    with pytest.raises(lipreg.NotSequentialError, match="autolip"):
        lipreg.seqlip(model, (4,), method=method)
    assert issubclass(lipreg.NotSequentialError, ValueError)


def test_exact_width_limit() -> None:
    net = random_mlp([5, 12, 3], 700)
    with pytest.raises(ValueError, match="greedy"):
        lipreg.seqlip(net, (5,), method="exact", exact_width_limit=10)
    with pytest.raises(ValueError, match="greedy"):
        lipreg.seqlip(random_mlp([5, 25, 3], 701), (5,), method="exact")
    res = lipreg.seqlip(net, (5,), method="exact", exact_width_limit=12, dtype=F64)
    assert res.value == pytest.approx(ref_seqlip(weights(net), [RELU]), rel=REL)


def test_bad_arguments() -> None:
    net = random_mlp([5, 4, 3], 702)
    with pytest.raises(ValueError, match="method"):
        lipreg.seqlip(net, (5,), method="magic")  # type: ignore[arg-type]
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="top_k"):
            lipreg.seqlip(net, (5,), top_k=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed,widths", [(0, [6, 5, 4, 3]), (1, [4, 6, 6, 5, 2])])
def test_top_k_truncation_is_an_estimate_with_closed_form_for_k1(
    seed: int, widths: list[int]
) -> None:
    net = random_mlp(widths, 800 + seed)
    Ms = weights(net)
    with pytest.warns(UserWarning, match="estimate"):
        res = lipreg.seqlip(net, (widths[0],), method="exact", top_k=1, dtype=F64)
    assert res.kind == "estimate" and not res.certified
    # top-1 blocks are 1x1: s̃_{k+1} s̃_k max_σ |<σ v_{k+1}, u_k>|, i.e. AL · Π m_k
    svds = [torch.linalg.svd(M) for M in Ms]
    expected = math.prod(float(S[0]) for _, S, _ in svds) * math.prod(
        m_abs(svds[k][0][:, 0], svds[k + 1][2][0]) for k in range(len(Ms) - 1)
    )
    assert res.value == pytest.approx(expected, rel=REL)

    greedy = lipreg.seqlip(net, (widths[0],), method="greedy", top_k=2, dtype=F64)
    assert greedy.kind == "estimate" and not greedy.certified
    assert any("truncated" in note for note in greedy.notes)

    # truncated blocks are sub-matrices of the full blocks: never above untruncated SeqLip
    full = ref_seqlip(Ms, [RELU] * (len(Ms) - 1))
    with pytest.warns(UserWarning):
        top2 = lipreg.seqlip(net, (widths[0],), method="exact", top_k=2, dtype=F64)
    assert top2.value <= full * (1 + 1e-8)


def test_top_k_not_below_rank_keeps_certification() -> None:
    net = random_mlp([6, 5, 4, 3], 810)
    res = lipreg.seqlip(net, (6,), method="exact", top_k=10, dtype=F64)
    assert res.certified
    assert res.value == pytest.approx(ref_seqlip(weights(net), [RELU, RELU]), rel=REL)


def test_iterative_svds_for_maps_above_dense_limit() -> None:
    """dense_limit=1 forces the block power iteration for the convolutions' SVDs."""
    c1 = nn.Conv2d(1, 1, 3, padding=1, dtype=F64)
    c2 = nn.Conv2d(1, 2, 3, dtype=F64)
    lin = nn.Linear(8, 3, dtype=F64)
    net = init_(nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU(), nn.Flatten(), lin), 902)
    M1 = dense(lambda z: F.conv2d(z, c1.weight, padding=1), (1, 4, 4))
    M2 = dense(lambda z: F.conv2d(z, c2.weight), (1, 4, 4))
    Ms = [M1, M2, lin.weight.detach()]
    full = ref_seqlip(Ms, [RELU, RELU])
    with pytest.warns(UserWarning, match="estimate"):
        res = lipreg.seqlip(net, (1, 4, 4), method="exact", dense_limit=1, dtype=F64)
    assert not res.certified and res.kind == "estimate"
    assert res.value == pytest.approx(full, rel=1e-6)
    greedy = lipreg.seqlip(net, (1, 4, 4), method="greedy", dense_limit=1, dtype=F64)
    assert greedy.value <= full * (1 + 1e-6)
    assert greedy.value >= math.prod(ref_pairs_all_hi(Ms, [RELU, RELU])) * (1 - 1e-6)
    # warm start from the previous subspaces gives the same number
    again = lipreg.seqlip(
        net, (1, 4, 4), method="greedy", dense_limit=1, dtype=F64, state=greedy.state
    )
    assert again.value == pytest.approx(full, rel=1e-6)


def test_consecutive_affine_maps_are_merged() -> None:
    g = gen(860)
    W1, W2, W3 = (torch.randn(o, i, generator=g, dtype=F64) for o, i in [(6, 5), (4, 6), (3, 4)])
    net = nn.Sequential(linear(W1), linear(W2), nn.ReLU(), linear(W3))
    res = lipreg.seqlip(net, (5,), method="exact", dtype=F64)
    assert res.value == pytest.approx(ref_seqlip([W2 @ W1, W3], [RELU]), rel=REL)
    assert res.certified


def test_conv_batchnorm_chain() -> None:
    conv, bn = nn.Conv2d(1, 2, 3, dtype=F64), nn.BatchNorm2d(2, dtype=F64)
    lin = nn.Linear(8, 2, dtype=F64)
    net = init_(nn.Sequential(conv, bn, nn.ReLU(), nn.Flatten(), lin), 870)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.3, -1.0], dtype=F64))
        bn.running_var.copy_(torch.tensor([0.5, 2.0], dtype=F64))
    d = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    M1 = dense(lambda z: F.conv2d(z, conv.weight) * d[None, :, None, None], (1, 4, 4))
    res = lipreg.seqlip(net, (1, 4, 4), method="exact", dtype=F64)
    assert res.value == pytest.approx(ref_seqlip([M1, lin.weight.detach()], [RELU]), rel=REL)
    assert res.certified


@pytest.mark.parametrize("zeroed", [0, 2, 4])
def test_a_zero_layer_gives_zero(zeroed: int) -> None:
    net = random_mlp([5, 4, 4, 3], 880)
    with torch.no_grad():
        net[zeroed].weight.zero_()
    X = torch.randn(20, 5, generator=gen(881), dtype=F64)
    assert float(batched_jacobians(net, X).abs().max()) == 0.0  # constant function
    for method in ("exact", "greedy"):
        assert lipreg.seqlip(net, (5,), method=method, dtype=F64).value == 0.0


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_under_no_grad_and_inference_mode(context) -> None:
    net = random_mlp([5, 6, 3], 890)
    expected = ref_seqlip(weights(net), [RELU])
    with context():
        exact = lipreg.seqlip(net, (5,), method="exact", dtype=F64)
        greedy = lipreg.seqlip(net, (5,), method="greedy", dtype=F64)
    assert exact.value == pytest.approx(expected, rel=REL)
    assert greedy.value <= expected * (1 + 1e-12)


def test_single_affine_map() -> None:
    net = random_mlp([5, 3], 820)
    res = lipreg.seqlip(net, (5,), method="exact", dtype=F64)
    assert res.value == pytest.approx(norm2(weights(net)[0]), rel=REL)
    assert res.value >= norm2(weights(net)[0])
    assert res.certified


def test_activations_outside_a_pair_count_with_their_constant() -> None:
    net = nn.Sequential(nn.Sigmoid(), random_mlp([5, 4, 3], 830), nn.Sigmoid())
    res = lipreg.seqlip(net, (5,), method="exact", dtype=F64)
    expected = 0.25 * ref_seqlip(weights(net), [RELU]) * 0.25
    assert res.value == pytest.approx(expected, rel=REL)


def test_shared_module_applied_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4, dtype=F64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(torch.relu(self.lin(x)))

    model = init_(Twice(), 840, scale=1.0)
    W = model.lin.weight.detach()
    res = lipreg.seqlip(model, (4,), method="exact", dtype=F64)
    assert res.value == pytest.approx(ref_seqlip([W, W], [RELU]), rel=REL)


@pytest.mark.parametrize("method", ["exact", "greedy"])
def test_linear_on_multidimensional_input_then_flatten(method: str) -> None:
    """A Linear on a (T, d) sample is I_T ⊗ W; a Flatten then mixes the rows.

    Regression: this used to crash (the lone Linear's raw weight was taken as the matrix).
    """
    g = gen(850)
    W1 = torch.randn(4, 3, generator=g, dtype=F64)
    W2 = torch.randn(2, 8, generator=g, dtype=F64)
    net = nn.Sequential(linear(W1), nn.ReLU(), nn.Flatten(), linear(W2))
    res = lipreg.seqlip(net, (2, 3), method=method, dtype=F64)
    M1 = torch.kron(torch.eye(2, dtype=F64), W1)  # Linear on each of the 2 rows
    expected = ref_seqlip([M1, W2], [RELU])
    if method == "exact":
        assert res.value == pytest.approx(expected, rel=REL)
    else:
        assert res.value <= expected * (1 + 1e-12)


def test_linear_on_multidimensional_input_rowwise() -> None:
    """Row-wise Linear -> ReLU -> Linear: block-diagonal Jacobian, SeqLip = the 1-row value."""
    g = gen(851)
    W1, W2 = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(2, 4, generator=g, dtype=F64)
    net = nn.Sequential(linear(W1), nn.ReLU(), linear(W2))
    res = lipreg.seqlip(net, (2, 3), method="exact", dtype=F64)
    M1, M2 = (torch.kron(torch.eye(2, dtype=F64), W) for W in (W1, W2))
    assert res.value == pytest.approx(ref_seqlip([M1, M2], [RELU]), rel=REL)


# ---------------------------------------------------------------------------------------------
# 8. CNNs
# ---------------------------------------------------------------------------------------------


def test_cnn_greedy_below_autolip() -> None:
    c1, c2 = nn.Conv2d(1, 2, 3, dtype=F64), nn.Conv2d(2, 2, 3, dtype=F64)
    lin = nn.Linear(8, 3, dtype=F64)
    net = init_(nn.Sequential(c1, nn.ReLU(), c2, nn.Flatten(), lin), 900)
    res = lipreg.seqlip(net, (1, 6, 6), method="greedy", dtype=F64)
    autolip = lipreg.autolip(net, (1, 6, 6), dtype=F64)
    M1 = dense(lambda z: F.conv2d(z, c1.weight), (1, 6, 6))  # (32, 36)
    M2 = dense(lambda z: F.linear(F.conv2d(z, c2.weight).flatten(1), lin.weight), (2, 4, 4))
    assert res.value <= autolip.value * (1 + 1e-12)
    assert res.value <= norm2(M1) * norm2(M2) * (1 + 1e-9)
    # feasible: at least the σ = 1 pattern, i.e. the linear network's norm
    assert res.value >= norm2(M2 @ M1) * (1 - 1e-12)
    assert not res.certified and res.kind == "estimate"


def test_cnn_exact_pairs_match_brute_force() -> None:
    c1 = nn.Conv2d(1, 1, 3, padding=1, dtype=F64)
    c2 = nn.Conv2d(1, 2, 3, dtype=F64)
    lin = nn.Linear(8, 3, dtype=F64)
    net = init_(nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU(), nn.Flatten(), lin), 901)
    M1 = dense(lambda z: F.conv2d(z, c1.weight, padding=1), (1, 4, 4))  # (16, 16)
    M2 = dense(lambda z: F.conv2d(z, c2.weight), (1, 4, 4))  # (8, 16)
    M3 = lin.weight.detach()
    expected = ref_pairs([M1, M2, M3], [RELU, RELU])
    all_ones = ref_pairs_all_hi([M1, M2, M3], [RELU, RELU])

    exact = lipreg.seqlip(net, (1, 4, 4), method="exact", dtype=F64)
    greedy = lipreg.seqlip(net, (1, 4, 4), method="greedy", dtype=F64)
    exact_pairs = [lb.value for lb in exact.layers if lb.kind == "seqlip-pair"]
    greedy_pairs = [lb.value for lb in greedy.layers if lb.kind == "seqlip-pair"]
    assert exact_pairs == pytest.approx(expected, rel=REL)
    assert exact.value == pytest.approx(math.prod(expected), rel=REL)
    assert exact.certified
    for g_val, e_val, one in zip(greedy_pairs, expected, all_ones, strict=True):
        assert g_val <= e_val * (1 + 1e-12)
        assert g_val >= one * (1 - 1e-12)
    assert greedy.value <= lipreg.autolip(net, (1, 4, 4), dtype=F64).value


# ---------------------------------------------------------------------------------------------
# 9. Non-perturbation
# ---------------------------------------------------------------------------------------------


def test_seqlip_does_not_perturb_the_model() -> None:
    torch.manual_seed(1234)
    bn = nn.BatchNorm1d(5, dtype=F64)
    net = nn.Sequential(
        nn.Linear(6, 5, dtype=F64), bn, nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 3, dtype=F64)
    )
    init_(net, 950)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(5, generator=gen(951), dtype=F64))
        bn.running_var.copy_(torch.rand(5, generator=gen(952), dtype=F64) + 0.5)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=gen(953), dtype=F64)
    net.train()
    net[3].eval()  # a mixed mode must survive too
    before = copy.deepcopy(net.state_dict())
    grads = [p.grad.clone() for p in net.parameters()]
    modes = [m.training for m in net.modules()]
    rng = torch.get_rng_state()

    exact = lipreg.seqlip(net, (6,), method="exact", dtype=F64)
    greedy = lipreg.seqlip(net, (6,), method="greedy")

    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in net.modules()] == modes
    after = net.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    for p, g in zip(net.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)

    # bounded in eval mode: BN folded as diag(γ / sqrt(var + eps)) into the first layer
    W1, W2 = net[0].weight.detach(), net[4].weight.detach()
    d = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    expected = ref_seqlip([d[:, None] * W1, W2], [RELU])
    assert exact.value == pytest.approx(expected, rel=REL)
    assert greedy.value <= expected * (1 + 1e-6)
