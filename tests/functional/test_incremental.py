"""Incremental certificates (lipreg.functional.incremental): every incremental factor is at
least the exact float64 norm of its chain at the NEW weights (dense Jacobian of the chain's
modules, SVD), the network value at least the dense-Jacobian norms at random points; nothing
changed means no increment; changed isometry scales or architectures are certified in full."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

import lipreg
from lipreg.functional.incremental import (
    certified_anchor,
    incremental_autolip,
    make_anchor,
    slack,
)
from lipreg.functional.incremental_bounds import (
    conv_increment_bound,
    frobenius_bound,
    gram_iteration_bound,
    schur_bound_matrix,
    window_copies,
)
from lipreg.functional.incremental_ritz import ritz_anchor, ritz_bound
from lipreg.functional.incremental_scaled import ScaledCore, scaled_increment_bound
from tests.helpers import (
    dense_conv_matrix,
    dense_conv_norm,
    dense_jacobian_norms,
    gen,
    init_weights,
    spectral_norm,
)

F64 = torch.float64


# ---------------------------------------------------------------- the bounds on ||Delta||
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scale", [1e-300, 1e-120, 1e-8, 1.0, 1e120, 1e150])
def test_dense_bounds_above_exact_norm(seed: int, scale: float) -> None:
    g = gen(seed)
    shapes = [(7, 5), (1, 9), (9, 1), (12, 12)]
    D = torch.randn(*shapes[seed], generator=g, dtype=F64) * scale
    if seed == 3:  # rank one: Frobenius and Gram iteration are exact, Schur is not
        D = torch.outer(D[:, 0], D[0])
    true = spectral_norm(D)
    for bound in (frobenius_bound(D), schur_bound_matrix(D), gram_iteration_bound(D, 2)):
        assert bound >= true, (bound, true)
    gram = gram_iteration_bound(D, 3)
    assert true <= gram <= true * 1.6  # k = 3: (rank)^(1/16) at most, ~1.1 in practice


@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "expected"),
    [((3, 3), (1, 1), (1, 1), 9), ((3, 3), (2, 2), (1, 1), 4), ((2,), (3,), (1,), 1),
     ((3,), (2,), (2,), 3), ((5, 1), (2, 1), (1, 1), 3), ((3,), (4,), (2,), 2)],
)  # fmt: skip
def test_window_copies_by_enumeration(kernel, stride, dilation, expected) -> None:
    assert window_copies(kernel, stride, dilation) == expected
    # brute force: input position x read by output q with tap t iff x = q s + t d
    best = 1
    for k, s, d in zip(kernel, stride, dilation, strict=True):
        counts = [
            sum(1 for q in range(40) for t in range(k) if q * s + t * d == x) for x in range(40)
        ]
        best *= max(counts)
    assert best == expected


CONVS = [  # (c_out, c_in, kernel, input spatial, stride, padding, dilation, groups)
    (4, 3, (3, 3), (7, 6), (1, 1), (1, 1), (1, 1), 1),
    (6, 4, (3, 3), (8, 7), (2, 2), (1, 0), (1, 1), 2),
    (4, 4, (3, 3), (9, 9), (1, 1), (2, 2), (2, 2), 4),
    (5, 3, (1, 1), (5, 4), (2, 1), (0, 0), (1, 1), 1),
    (3, 2, (2,), (11,), (3,), (1,), (1,), 1),
    (4, 2, (3,), (12,), (2,), (2,), (2,), 2),
    (2, 2, (3, 2, 2), (4, 4, 3), (2, 1, 2), (1, 1, 0), (1, 1, 1), 1),
]


@pytest.mark.parametrize("case", range(len(CONVS)))
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1e-300, 1e-120, 1e120, 1e200])
def test_conv_bound_above_exact_operator_norm(case: int, sparse: bool, scale: float) -> None:
    c_out, c_in, kernel, spatial, stride, padding, dilation, groups = CONVS[case]
    D = torch.randn(c_out, c_in // groups, *kernel, generator=gen(case), dtype=F64) * scale
    if sparse:  # one tap of one channel: the adversarial case of the column sums
        D = torch.zeros_like(D)
        D[:, 0].view(c_out, -1)[:, -1] = scale
    bound, _ = conv_increment_bound(D, stride, dilation, groups)
    true = dense_conv_norm(D, spatial, stride, padding, dilation, groups)
    assert bound >= true, (bound, true)


# ---------------------------------------------------------------- networks
def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _cnn(dim: int) -> nn.Sequential:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1]
    return nn.Sequential(
        bn(3),
        conv(3, 6, 3, padding=1),
        bn(6),
        nn.ReLU(),
        conv(6, 8, 3, stride=2, padding=1, bias=False),
        bn(8),
        nn.ReLU(),
        conv(8, 8, 3, padding=2, dilation=2, groups=4),
        bn(8),
        nn.Tanh(),
        conv(8, 4, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(5),
    )


SHAPES = {1: (3, 12), 2: (3, 8, 7), 3: (3, 5, 4, 4)}


def _mlp_bn() -> nn.Sequential:
    """Batch norms on feature vectors around dense layers: merged-dense chains."""
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 8),
        nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3),
    )  # fmt: skip


def _model(kind: str, seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    if kind == "mlp":
        model, shape = _mlp(), (6,)
    elif kind == "mlpbn":
        model, shape = _mlp_bn(), (6,)
    else:
        dim = int(kind[-1])
        model, shape = _cnn(dim), SHAPES[dim]
        model(torch.zeros(2, *shape))  # materialise the lazy layer
    init_weights(model, seed, scale=0.4, batchnorm_stats=True)
    return model.eval(), shape


def _chain_truth(model: nn.Sequential, name: str, shape: tuple[int, ...]) -> float:
    """Exact float64 norm of the chain named by its module indices (``"4+5"``): the SVD of
    the Jacobian of those modules (bias-free part of an affine map) at a zero input."""
    idx = [int(i) for i in name.split("+")]
    sub = copy.deepcopy(nn.Sequential(*[model[i] for i in idx])).double().eval()
    x = torch.zeros(_input_shape(model, idx[0], shape), dtype=F64)
    J = jacobian(lambda z: sub(z[None])[0], x)
    return spectral_norm(J.reshape(-1, x.numel()))


def _input_shape(model: nn.Sequential, index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    x = torch.zeros(1, *shape, dtype=F64)
    with torch.no_grad():
        for module in copy.deepcopy(model).double().eval()[:index]:
            x = module(x)
    return tuple(x.shape[1:])


def _perturb(model: nn.Module, how: str, seed: int) -> None:
    """Change the weights in place (adversarially or at random), BN statistics and γ too."""
    g = gen(1000 + seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
                _perturb_weight(module.weight, how, g)
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and how != "ulp":
                module.running_var.mul_(torch.rand(module.running_var.shape, generator=g) + 0.5)
                module.running_mean.add_(torch.randn(module.running_mean.shape, generator=g))
                module.weight.mul_(1 + 0.3 * torch.randn(module.weight.shape, generator=g))
                module.weight[0] = 0.0  # a channel switched off at the new step


def _perturb_weight(w: torch.Tensor, how: str, g: torch.Generator) -> None:
    if how == "sign":
        w.neg_()
    elif how == "ulp":
        flat = w.view(-1)
        flat[0] = torch.nextafter(flat[0], torch.tensor(math.inf))
    elif how == "aligned":  # along the top singular pair: the norm itself grows
        M = w.double().reshape(w.shape[0], -1)
        U, S, Vh = torch.linalg.svd(M)
        w.add_((0.3 * S[0] * torch.outer(U[:, 0], Vh[0])).reshape(w.shape).to(w.dtype))
    else:
        scale = {"tiny": 1e-6, "random": 1e-2, "large": 1.0}[how]
        w.add_(scale * w.abs().mean() * torch.randn(w.shape, generator=g, dtype=w.dtype))


def _check_network(model: nn.Module, shape: tuple[int, ...], result) -> None:
    assert result.certified and result.kind == "upper"
    X = torch.randn(8, *shape, generator=gen(7), dtype=F64)
    assert result.value >= float(dense_jacobian_norms(model, X).max())


@pytest.mark.parametrize("kind", ["mlp", "mlpbn", "cnn1", "cnn2", "cnn3"])
@pytest.mark.parametrize("how", ["random", "tiny", "large", "aligned", "sign", "ulp"])
def test_incremental_factors_above_exact_chain_norms(kind: str, how: str) -> None:
    model, shape = _model(kind, seed=len(how))
    anchor, _ = certified_anchor(model, shape)
    expected = {"mlp": 3, "mlpbn": 3, "cnn1": 5, "cnn2": 5, "cnn3": 5}[kind]
    assert len(anchor.chains) == expected, anchor.skipped  # every chain has a rule
    _perturb(model, how, seed=len(kind))
    result = incremental_autolip(model, shape, anchor)
    affine = [lb for lb in result.layers if lb.kind == "affine"]
    assert all(lb.method.startswith("incremental") for lb in affine), [lb.method for lb in affine]
    for lb in affine:
        true = _chain_truth(model, lb.name, shape)
        assert lb.value >= true, (lb.name, lb.value, true, lb.method)
        assert lb.extra["increment"] > 0  # every chain changed
    _check_network(model, shape, result)


@pytest.mark.parametrize("kind", ["mlp", "mlpbn", "cnn2"])
def test_unchanged_weights_have_no_increment(kind: str) -> None:
    model, shape = _model(kind, seed=3)
    anchor, first = certified_anchor(model, shape)
    again = incremental_autolip(model, shape, anchor)
    for a, b in zip(first.layers, again.layers, strict=True):
        if b.kind != "affine":
            continue
        assert b.extra["increment"] == 0.0 and "unchanged" in b.method
        folding = b.extra["folding"]
        assert folding <= 1e-12 * a.value  # only the rounding of folded batch norms
        if folding == 0.0:
            assert b.value == a.value
        else:
            assert a.value < b.value <= a.value * (1 + 1e-12)
    assert again.value <= first.value * (1 + 1e-12)
    assert slack(again) <= 1e-3


def test_anchor_is_a_copy_of_float64_weights_updated_in_place() -> None:
    """A float64 model: converting its weights to float64 returns the live parameters; the
    anchor must hold copies, or every later step would look unchanged."""
    model, shape = _model("mlp", seed=5)
    model.double()
    anchor, _ = certified_anchor(model, shape)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, *shape, generator=gen(3), dtype=F64)).pow(2).sum().backward()
        opt.step()  # in place
    result = incremental_autolip(model, shape, anchor)
    for lb in result.layers:
        if lb.kind == "affine":
            assert lb.extra["increment"] > 0
            assert lb.value >= _chain_truth(model, lb.name, shape)
    _check_network(model, shape, result)


class _Scaled(nn.Module):
    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 2)
        self.register_buffer("alpha", torch.tensor(alpha))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x) * self.alpha))


def test_changed_isometry_scale_is_certified_in_full() -> None:
    model = _Scaled(2.0).eval()
    init_weights(model, 0, scale=0.5)
    anchor, _ = certified_anchor(model, (5,))
    scaled = [name for name, c in anchor.chains.items() if c.scales]
    assert len(scaled) == 1 and anchor.chains[scaled[0]].scales == (2.0,)
    model.alpha.fill_(3.0)  # ||A|| grows by 1.5 with the weights unchanged
    result = incremental_autolip(model, (5,), anchor)
    layer = next(lb for lb in result.layers if lb.name == scaled[0])
    assert not layer.method.startswith("incremental")
    assert scaled[0] in result.notes[-1]  # named as certified in full
    assert layer.value >= 3.0 * spectral_norm(model.fc1.weight.double())
    model.alpha.fill_(-2.0)  # same scale, another isometry: the increment still applies
    result = incremental_autolip(model, (5,), anchor)
    layer = next(lb for lb in result.layers if lb.name == scaled[0])
    assert layer.method.startswith("incremental") and layer.extra["increment"] == 0.0


def test_changed_architecture_is_certified_in_full() -> None:
    model, shape = _model("mlp", seed=1)
    anchor, _ = certified_anchor(model, shape)
    wider = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 3))
    init_weights(wider, 1, scale=0.4)
    result = incremental_autolip(wider.eval(), shape, anchor)
    methods = {lb.name: lb.method for lb in result.layers if lb.kind == "affine"}
    assert not methods["0"].startswith("incremental")  # output width changed
    assert not methods["2"].startswith("incremental")  # input width changed
    assert methods["4"].startswith("incremental")  # same shapes: a valid increment
    _check_network(wider, shape, result)
    conv_model, conv_shape = _model("cnn2", seed=1)
    result = incremental_autolip(conv_model, conv_shape, anchor)  # nothing in common
    assert not any(lb.method.startswith("incremental") for lb in result.layers)


def test_changed_conv_geometry_is_refused() -> None:
    model, shape = _model("cnn2", seed=2)
    anchor, _ = certified_anchor(model, shape)
    model[7].dilation = (1, 1)  # padding 2 -> 1 with it: same shapes, another operator
    model[7].padding = (1, 1)
    result = incremental_autolip(model, shape, anchor)
    layer = next(lb for lb in result.layers if lb.name == "7+8")
    assert not layer.method.startswith("incremental")
    assert layer.value >= _chain_truth(model, "7+8", shape)


def test_slack_over_states_the_true_slack_and_needs_estimates() -> None:
    model, shape = _model("mlp", seed=4)
    anchor, _ = certified_anchor(model, shape)
    _perturb(model, "random", seed=0)
    result = incremental_autolip(model, shape, anchor)
    fresh = lipreg.autolip(model, shape)
    true_slack = result.value / fresh.value - 1  # fresh is dense-exact here
    # the float32 Lanczos estimate may exceed the exact norm by its rounding (~1e-7)
    assert slack(result) >= true_slack - 1e-6
    from lipreg.functional.autolip import autolip
    from lipreg.functional.incremental import incremental_entry
    from lipreg.functional.ladder import LADDER

    quick = autolip(model, shape, ladder=[incremental_entry(anchor, estimate=False), *LADDER])
    assert quick.value == result.value
    with pytest.raises(ValueError, match="estimate"):
        slack(quick)


def test_refusals() -> None:
    model, shape = _model("mlp", seed=0)
    estimate = lipreg.autolip(model, shape, certify=False)
    with pytest.raises(ValueError, match="certified"):
        make_anchor(model, shape, estimate)
    anchor, _ = certified_anchor(model, shape)
    with pytest.raises(ValueError, match="certif"):
        incremental_autolip(model, shape, anchor, certify=False)
    with pytest.raises(ValueError, match="ladder"):
        incremental_autolip(model, shape, anchor, ladder=[])


def test_gamma_zero_channels_switching_on_and_off() -> None:
    """Batch-norm channels with γ = 0 at the anchor (zero rows of the merged map) that come
    back at the new step, and the reverse: the merged kernels are differenced as a whole."""
    model, shape = _model("cnn2", seed=6)
    with torch.no_grad():
        model[2].weight[1:4] = 0.0
        model[5].weight[:] = 0.0  # the whole chain is zero at the anchor
    anchor, first = certified_anchor(model, shape)
    assert next(lb for lb in first.layers if lb.name == "4+5").value == 0.0
    with torch.no_grad():
        model[2].weight[1:4] = 2.0
        model[2].weight[5] = 0.0
        model[5].weight[:] = torch.linspace(-1.0, 1.0, 8)
    result = incremental_autolip(model, shape, anchor)
    for lb in result.layers:
        if lb.kind == "affine":
            assert lb.method.startswith("incremental")
            assert lb.value >= _chain_truth(model, lb.name, shape), lb.name
    _check_network(model, shape, result)


# ---------------------------------------------------------------- second-order bound (5)
def _ritz_case(shape: tuple[int, int], how: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_s, W_t)``: a random matrix and an (adversarial) change."""
    g = gen(seed)
    W = torch.randn(*shape, generator=g, dtype=F64) / math.sqrt(shape[1])
    U, S, Vh = torch.linalg.svd(W)
    if how == "rotate-top":  # the top singular pair turns towards a direction outside V
        step = 0.05 * S[0] * torch.outer(U[:, 0], Vh[-1])
    elif how == "new-top":  # a direction outside the top-16 space overtakes the top
        step = 2.0 * S[0] * torch.outer(U[:, -1], Vh[-1])
    elif how == "sign":
        step = -2.0 * W
    elif how == "large":
        step = torch.randn(*shape, generator=g, dtype=F64)
    else:
        step = {"tiny": 1e-7, "small": 1e-3}[how] * torch.randn(*shape, generator=g, dtype=F64)
    return W, W + step


@pytest.mark.parametrize("how", ["tiny", "small", "rotate-top", "new-top", "sign", "large"])
@pytest.mark.parametrize("shape", [(50, 40), (30, 60), (6, 50)])  # (6, 50): 5 Ritz vectors
def test_ritz_bound_above_exact_norm(how: str, shape: tuple[int, int]) -> None:
    from lipreg.functional.incremental_bounds import dense_increment_bound

    W, W_t = _ritz_case(shape, how, seed=len(how))
    sigma = spectral_norm(W) * (1 + 1e-12)
    anchor = ritz_anchor(W, sigma, k=16)
    assert anchor is not None and anchor.eps < 1e-12
    assert anchor.V.shape[1] == min(16, min(shape) - 1)
    beta, _ = dense_increment_bound(W_t - W)
    bound = ritz_bound(W_t, anchor, beta * (1 + 1e-15))
    true = spectral_norm(W_t)
    assert bound is not None and bound >= true, (bound, true)
    if how in ("tiny", "small"):  # second order: far below the first-order slack
        assert bound - true <= 0.05 * (sigma + beta - true)


def _wide_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 20), nn.ReLU(),
        nn.Linear(20, 3),
    )  # fmt: skip


@pytest.mark.parametrize("how", ["tiny", "random", "aligned", "sign", "large"])
def test_ritz_factors_in_networks(how: str) -> None:
    model = _wide_mlp()
    init_weights(model, 2, scale=0.2)
    model.eval()
    anchor, _ = certified_anchor(model, (30,))
    assert all(c.ritz is not None for c in anchor.chains.values())
    _perturb(model, how, seed=2)
    result = incremental_autolip(model, (30,), anchor)
    for lb in result.layers:
        if lb.kind != "affine":
            continue
        assert "ritz" in lb.extra and lb.value == min(lb.extra["ritz"], lb.extra["first_order"])
        true = _chain_truth(model, lb.name, (30,))
        assert lb.extra["ritz"] >= true and lb.extra["first_order"] >= true, (lb.name, lb.extra)
        if how == "tiny":
            assert lb.method.endswith("ritz)")
    _check_network(model, (30,), result)
    no_ritz, _ = certified_anchor(copy.deepcopy(model), (30,), ritz=0)
    assert all(c.ritz is None for c in no_ritz.chains.values())


@pytest.mark.parametrize("kind", ["mlpbn", "cnn2"])
def test_with_an_analysis_cache(kind: str) -> None:
    """One trace and probe shared by the anchor and the later certificates (the callback's
    set-up): the cached specs are re-read, the anchor keeps its own copies."""
    from lipreg.functional.analysis_cache import AnalysisCache

    model, shape = _model(kind, seed=8)
    if kind == "mlpbn":
        model.double()  # float64 specs are the live parameters themselves
    cache = AnalysisCache(model, shape)
    anchor, _ = certified_anchor(model, shape, analysis=cache)
    _perturb(model, "random", seed=8)
    result = incremental_autolip(model, shape, anchor, analysis=cache)
    assert cache.builds == 1
    for lb in result.layers:
        if lb.kind == "affine":
            assert lb.method.startswith("incremental") and lb.extra["increment"] > 0
            assert lb.value >= _chain_truth(model, lb.name, shape)
    _check_network(model, shape, result)


# ---------------------------------------------------------------- ratio bound (2') of BN chains
def _scaled_matrix(K: torch.Tensor, d_in: torch.Tensor, d_out: torch.Tensor, geo) -> torch.Tensor:
    """``diag(d_out) A_K diag(d_in)`` as a dense float64 matrix (convolutions: every spatial
    position of a channel gets its scale), built without the library."""
    if geo is None:
        return d_out[:, None] * K * d_in[None, :]
    spatial, stride, padding, dilation, groups = geo
    A = dense_conv_matrix(K, spatial, stride, padding, dilation, groups)
    rows = d_out.repeat_interleave(A.shape[0] // d_out.numel())
    cols = d_in.repeat_interleave(A.shape[1] // d_in.numel())
    return rows[:, None] * A * cols[None, :]


def _scales(n: int, how: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor and new scales: statistics moved by ×0.01..×100 per channel (or by one common
    factor), γ = 0 channels switching on and off."""
    d_s = torch.rand(n, generator=g, dtype=F64) + 0.2
    factor = 10.0 ** (4 * torch.rand(n, generator=g, dtype=F64) - 2)
    d_t = d_s * (0.01 if how == "common" else factor)
    if how == "gamma":
        d_s[0], d_t[1] = 0.0, 0.0  # channel 0 switches on, channel 1 off
        d_t[0] = 3.0
    return d_s, d_t


def _kernel_change(K: torch.Tensor, how: str, g: torch.Generator) -> torch.Tensor:
    if how == "none":
        return K.clone()
    if how == "sign":
        return -K
    if how == "aligned":  # along the top singular pair of the reshaped kernel
        M = K.reshape(K.shape[0], -1)
        U, S, Vh = torch.linalg.svd(M)
        return K + (5.0 * S[0] * torch.outer(U[:, 0], Vh[0])).reshape(K.shape)
    return K + 0.1 * K.abs().mean() * torch.randn(K.shape, generator=g, dtype=F64)


RATIO_CASES = [None, *[(c[3], c[4], c[5], c[6], c[7], c[0], c[1], c[2]) for c in CONVS[:4]]]


@pytest.mark.parametrize("case", range(len(RATIO_CASES)))
@pytest.mark.parametrize("scales", ["spread", "common", "gamma"])
@pytest.mark.parametrize("change", ["none", "random", "aligned", "sign"])
def test_ratio_bound_above_exact_norm(case: int, scales: str, change: str) -> None:
    """(2') against the SVD of the exact new map, scales on both sides; exact (up to the
    anchor's own slack) when only the statistics move by a common factor."""
    g = gen(100 + case)
    if RATIO_CASES[case] is None:
        c_out, c_in, geo, conv = 7, 5, None, None
        K = torch.randn(c_out, c_in, generator=g, dtype=F64)
    else:
        spatial, stride, padding, dilation, groups, c_out, c_in, kernel = RATIO_CASES[case]
        geo = (spatial, stride, padding, dilation, groups)
        K = torch.randn(c_out, c_in // groups, *kernel, generator=g, dtype=F64)
        conv = (stride, dilation, groups)
    (di_s, di_t), (do_s, do_t) = _scales(c_in, scales, g), _scales(c_out, scales, g)
    K_t = _kernel_change(K, change, g)
    sigma = spectral_norm(_scaled_matrix(K, di_s, do_s, geo)) * (1 + 1e-9)
    kappa = 1e-15  # the scales here are exact: any small radius is sound
    anchor = ScaledCore(K, di_s, do_s, kappa, kappa, conv)
    now = ScaledCore(K_t, di_t, do_t, kappa, kappa, conv)
    value, _, which = scaled_increment_bound(anchor, now, sigma, 1.0, math.inf)
    true = spectral_norm(_scaled_matrix(K_t, di_t, do_t, geo))
    assert value >= true, (value, true, which)
    if scales == "common" and change == "none":  # r_out r_in σ_s, nothing added
        assert value <= true * (1 + 1e-8), (value, true)


def test_ratio_bound_refuses_scales_outside_the_rounding_model() -> None:
    K = torch.ones(2, 2, dtype=F64)
    good = ScaledCore(K, torch.ones(2, dtype=F64), torch.ones(2, dtype=F64), 0.0, 0.0)
    tiny = ScaledCore(K, torch.full((2,), 1e-290, dtype=F64), good.d_out, 0.0, 0.0)
    nan = ScaledCore(K, torch.tensor([1.0, math.nan], dtype=F64), good.d_out, 0.0, 0.0)
    for bad in (tiny, nan):
        assert scaled_increment_bound(good, bad, 1.0, 1.0, math.inf) is None
        assert scaled_increment_bound(bad, good, 1.0, 1.0, math.inf) is None


def _bn_net() -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(3), nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.BatchNorm2d(6),
        nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, groups=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3),
    )  # fmt: skip


@pytest.mark.parametrize("stats", ["small", "large", "spread", "gamma"])
@pytest.mark.parametrize("change", ["none", "random", "aligned"])
def test_batch_norm_chains_with_moving_statistics(stats: str, change: str) -> None:
    """Running variances ×0.01..×100 (several batch norms on one side), γ = 0 channels
    switching on: every factor above the chain's exact norm; with the kernels unchanged the
    ratio bound answers, within the anchor's slack times the scales' ratio."""
    model, shape = _bn_net(), (3, 6, 6)
    init_weights(model, 11, scale=0.5, batchnorm_stats=True)
    for m in model.modules():  # ε = 0: moving the variances by λ scales d by exactly 1/√λ
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 0.0
    model.eval()
    if stats == "gamma":
        with torch.no_grad():
            model[2].weight[:2] = 0.0
    anchor, first = certified_anchor(model, shape)
    truth_s = {
        lb.name: _chain_truth(model, lb.name, shape) for lb in first.layers if lb.kind == "affine"
    }
    g = gen(12)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.running_var.numel()
                spread = 10.0 ** (4 * torch.rand(n, generator=g) - 2)
                m.running_var.mul_({"small": 0.01, "large": 100.0}.get(stats, spread))
        if stats == "gamma":
            model[2].weight[:2] = 1.5
        for m in (model[1], model[5], model[9]):
            m.weight.copy_(_kernel_change(m.weight.double(), change, g).float())
    result = incremental_autolip(model, shape, anchor)
    before = {lb.name: lb.value for lb in first.layers}
    methods = [lb.method for lb in result.layers if lb.kind == "affine"]
    if change == "none" and stats in ("small", "large"):
        assert sum("ratio" in m for m in methods) >= 3, methods  # the three BN chains
    for lb in result.layers:
        if lb.kind != "affine":
            continue
        true = _chain_truth(model, lb.name, shape)
        assert lb.value >= true, (lb.name, lb.value, true, lb.method)
        if change == "none" and stats in ("small", "large") and "ratio" in lb.extra:
            assert "ratio" in lb.method, lb.method
            slack_s = before[lb.name] / truth_s[lb.name]
            assert lb.value <= true * slack_s * (1 + 1e-6), (lb.name, lb.value, true)
    _check_network(model, shape, result)


# ---------------------------------------------------------------- Krylov Ritz anchor
@pytest.mark.parametrize("spectrum", ["random", "separated"])
def test_krylov_ritz_anchor_is_certified_and_tight(spectrum: str) -> None:
    """A Gram side above ``dense_side``: the Krylov V (cold and warm-started) gives a b_s
    above the exact λ_max of G on span(V)⊥ (dense eigendecomposition of the compressed G), and
    bound (5) stays above the exact norm after a change (float64 SVD)."""
    p, dense_side = 300, 256
    g = gen(21)
    W = torch.randn(p + 20, p, generator=g, dtype=F64) / math.sqrt(p)
    if spectrum == "separated":
        W[:, :6] *= 4.0
    norm_s = spectral_norm(W) * (1 + 1e-9)
    cold = ritz_anchor(W, norm_s, 16, dense_side=dense_side)
    assert cold is not None
    warm = ritz_anchor(W, norm_s, 16, start=cold.V, dense_side=dense_side)
    assert warm is not None
    G = W.T @ W
    for anchor in (cold, warm):
        Q = torch.linalg.qr(anchor.V).Q
        P = torch.eye(p, dtype=F64) - Q @ Q.T
        true = float(torch.linalg.eigvalsh(P @ G @ P)[-1])
        assert anchor.b_s >= true
        assert anchor.b_s <= true * 1.11 + 1e-3 * spectral_norm(G)  # the slack ladder's top
        W_t = W + 1e-3 * torch.randn(W.shape, generator=g, dtype=F64)
        beta = spectral_norm(W_t - W) * (1 + 1e-9)
        bound = ritz_bound(W_t, anchor, beta)
        assert bound is not None and bound >= spectral_norm(W_t)
