"""Graph rules and per-layer constants of AutoLip (paper.md §2.3, §2.5, §5 items 5 and 14).

Ground truths: closed forms (1 + |ω|, 1/k, 1/4, max(1, |α|) ...), ``torch.linalg.matrix_norm``
of float64 weights, SVDs of dense Jacobians from ``torch.autograd.functional.jacobian``,
numerically computed maxima of activation derivatives, and maxima over random points of
Jacobian norms (which are lower bounds of the true constant).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian

import lipreg
from lipreg.functional import rules as rules_module

F64 = torch.float64
# Certified values carry an explicit relative margin of 1e-9 (certify.RELATIVE_MARGIN).
REL = 1e-8


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def norm2(W: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(W.detach().to(F64), 2))


def init_(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic random parameters (and BN statistics) without the global RNG."""
    g = gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.7)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 2 + 0.2)
    return model


def jac(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dense Jacobian of one sample, (out_features, in_features)."""
    J = jacobian(lambda z: model(z), x[None].to(F64))
    out = J.shape[: J.ndim - x.ndim - 1]
    return J.reshape(math.prod(out[1:]), x.numel())


def linear_part_norm(model: nn.Module, in_shape: tuple[int, ...]) -> float:
    """Spectral norm of the Jacobian of an affine model (constant in x)."""
    x = torch.randn(in_shape, generator=gen(123), dtype=F64)
    return norm2(jac(model, x))


def autolip(model, shape, **kw):
    kw.setdefault("dtype", F64)
    return lipreg.autolip(model, shape, **kw)


@pytest.fixture
def rule_registry():
    """Isolate register_rule calls: the registry is restored after the test."""
    with rules_module.restored_registries():
        yield


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# --------------------------------------------------------------------------------------------
# Graph rules: sums, residuals, differences, the paper's f_ω example
# --------------------------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.fc = nn.Linear(n, n)

    def forward(self, x):
        return x + self.fc(x)


def test_residual_is_one_plus_norm():
    m = init_(Residual(6).double(), 0)
    r = autolip(m, (6,))
    assert r.certified and r.kind == "upper"
    assert r.value == pytest.approx(1 + norm2(m.fc.weight), rel=REL)
    assert r.value >= 1 + norm2(m.fc.weight)
    # and it is a valid upper bound of the true constant ||I + W||
    assert r.value >= norm2(torch.eye(6, dtype=F64) + m.fc.weight)


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Linear(5, 4)
        self.h = nn.Linear(5, 4)

    def forward(self, x):
        return self.g(x) + self.h(x)


def test_sum_of_branches_is_sum_of_norms():
    m = init_(TwoBranches().double(), 1)
    r = autolip(m, (5,))
    expected = norm2(m.g.weight) + norm2(m.h.weight)
    assert r.value == pytest.approx(expected, rel=REL)
    assert r.value >= norm2(m.g.weight + m.h.weight)


def test_x_minus_x_is_two():
    r = autolip(Lambda(lambda x: x - x), (3,))
    assert r.value == pytest.approx(2.0, rel=1e-12)
    r = autolip(Lambda(lambda x: torch.sub(x, x, alpha=3.0)), (3,))
    assert r.value == pytest.approx(4.0, rel=1e-12)


class FOmega(nn.Module):
    """The paper's Figure 1: ln(1 + e^{x/2}) + |x/2 − ω sin x|."""

    def __init__(self, omega, as_parameter):
        super().__init__()
        if as_parameter:
            self.omega = nn.Parameter(torch.tensor(float(omega), dtype=F64))
        else:
            self.omega = float(omega)

    def forward(self, x):
        return F.softplus(x / 2) + torch.abs(x / 2 - self.omega * torch.sin(x))


@pytest.mark.parametrize("omega", [0.0, 0.3, -0.7, 2.5, -4.0])
@pytest.mark.parametrize("as_parameter", [True, False])
def test_paper_f_omega_is_one_plus_abs_omega(omega, as_parameter):
    m = FOmega(omega, as_parameter)
    r = autolip(m, (1,))
    assert r.certified
    assert r.value == pytest.approx(1 + abs(omega), rel=1e-12)
    # the true constant 1 + |ω| is approached at x = 2kπ (ω < 0) or (2k+1)π (ω > 0):
    # |f'(x)| -> 1/2 + 1/2 + |ω| there, and AutoLip must dominate it.
    for k in (20, 21):
        x = torch.tensor([[k * math.pi]], dtype=F64)
        slope = float(jac(m, x[0]).abs().max())
        assert slope <= r.value * (1 + 1e-12)
    if omega != 0:
        best = max(float(jac(m, torch.tensor([k * math.pi], dtype=F64)).abs()) for k in (40, 41))
        assert best == pytest.approx(1 + abs(omega), rel=1e-6)


def test_f_omega_float32_parameter_uses_its_actual_value():
    m = FOmega(0.3, True).float()
    r = lipreg.autolip(m, (1,))
    assert r.value == pytest.approx(1 + abs(float(m.omega.detach())), rel=1e-12)


# --------------------------------------------------------------------------------------------
# Concatenation, reuse, unused modules
# --------------------------------------------------------------------------------------------


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(5, 4)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


def test_concatenation_is_root_sum_of_squares():
    m = init_(Cat().double(), 2)
    r = autolip(m, (5,))
    la, lb = norm2(m.a.weight), norm2(m.b.weight)
    assert r.value == pytest.approx(math.hypot(la, lb), rel=REL)
    # The true constant of the (linear) net is ||[Wa; Wb]||, below the AutoLip value.
    true = norm2(torch.cat([m.a.weight, m.b.weight], 0))
    assert true == pytest.approx(linear_part_norm(m, (5,)), rel=1e-10)
    assert r.value >= true


def test_stack_of_the_same_tensor_is_sqrt2():
    r = autolip(Lambda(lambda x: torch.stack([x, x], dim=1)), (4,))
    assert r.value == pytest.approx(math.sqrt(2), rel=1e-12)


class Twice(nn.Module):
    def __init__(self, with_relu):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.with_relu = with_relu

    def forward(self, x):
        y = self.fc(x)
        if self.with_relu:
            y = F.relu(y)
        return self.fc(y)


def test_module_called_twice_consecutively_is_merged_into_one_chain():
    m = init_(Twice(False).double(), 3)
    W = m.fc.weight
    r = autolip(m, (5,))
    assert r.certified
    assert r.value == pytest.approx(norm2(W @ W), rel=REL)
    assert r.value <= norm2(W) ** 2 * (1 + REL)
    assert len([lb for lb in r.layers if lb.kind == "affine"]) == 1


def test_module_called_twice_with_activation_counts_twice():
    m = init_(Twice(True).double(), 3)
    r = autolip(m, (5,))
    assert r.value == pytest.approx(norm2(m.fc.weight) ** 2, rel=REL)
    assert len([lb for lb in r.layers if lb.kind == "affine"]) == 2


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)

    def forward(self, x):
        return self.used(x)


def test_unused_module_is_not_counted():
    m = init_(Unused().double(), 4)
    with torch.no_grad():
        m.unused.weight.mul_(1000.0)
    r = autolip(m, (4,))
    assert r.value == pytest.approx(norm2(m.used.weight), rel=REL)


def test_constant_output_gives_zero():
    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.ones(3, dtype=F64))

        def forward(self, x):
            return self.b * 2

    r = autolip(Const(), (3,))
    assert r.value == 0.0


# --------------------------------------------------------------------------------------------
# Functional ops and merged affine chains
# --------------------------------------------------------------------------------------------


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 4 * 3, 4)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = x.view(x.size(0), -1)
        x = self.fc(x * 3)
        x = torch.flatten(x, 1)
        return -(x / 2)


def test_functional_ops_scalars_and_reshapes():
    m = init_(Functional().double(), 5)
    r = autolip(m, (2, 6, 5))
    assert r.certified
    conv_norm = linear_part_norm(m.conv, (2, 6, 5))
    expected = conv_norm * 3 * norm2(m.fc.weight) / 2
    assert r.value == pytest.approx(expected, rel=REL)


def make_bn(c, seed, dims=2):
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(c).double()
    g = gen(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g, dtype=F64))
        bn.running_var.copy_(torch.rand(c, generator=g, dtype=F64) * 3 + 0.05)
        bn.weight.copy_(torch.randn(c, generator=g, dtype=F64) * 2)
        bn.bias.copy_(torch.randn(c, generator=g, dtype=F64))
    return bn.eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conv_bn_relu_chain_is_merged_and_exact(seed):
    conv = init_(nn.Conv2d(2, 4, 3, padding=1, stride=2).double(), seed)
    bn = make_bn(4, seed)
    m = nn.Sequential(conv, bn, nn.ReLU()).eval()
    shape = (2, 7, 6)
    linear = nn.Sequential(conv, bn).eval()  # conv + BN are affine: constant Jacobian
    expected = linear_part_norm(linear, shape)
    r = autolip(m, shape)
    assert r.certified
    affine = [lb for lb in r.layers if lb.kind == "affine"]
    assert len(affine) == 1 and "0" in affine[0].name and "1" in affine[0].name
    assert affine[0].certified
    assert r.value == pytest.approx(expected, rel=REL)
    assert r.value >= expected
    # merged is tighter than (or equal to) the product of the separate norms
    bn_norm = float((bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)).max())
    assert r.value <= linear_part_norm(conv, shape) * bn_norm * (1 + REL)


def test_batchnorm_alone_closed_form():
    bn = make_bn(6, 7, dims=1)
    r = autolip(nn.Sequential(nn.ReLU(), bn), (6,))
    expected = float((bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)).max())
    assert r.value == pytest.approx(expected, rel=1e-12)
    assert r.value >= expected * (1 - 1e-15)


def test_batchnorm_closed_form_certificate_is_not_rounded_down_in_float32():
    g = gen(0)
    worst = 0.0
    for _ in range(100):
        bn = nn.BatchNorm1d(30)
        with torch.no_grad():
            bn.running_var.copy_(torch.rand(30, generator=g) * 3 + 0.1)
            bn.weight.copy_(torch.rand(30, generator=g) * 4 - 2)
        bn.eval()
        exact = float(
            (bn.weight.detach().double().abs() / torch.sqrt(bn.running_var.double() + bn.eps)).max()
        )
        r = lipreg.autolip(nn.Sequential(nn.ReLU(), bn), (30,))
        worst = min(worst, r.value / exact - 1)
    assert worst >= 0.0


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------


def _layer(r, kind):
    (lb,) = [lb for lb in r.layers if lb.kind == kind]
    return lb


def test_overlapping_maxpool_3x3_stride2_is_2():
    r = autolip(nn.Sequential(nn.MaxPool2d(3, 2)), (2, 9, 9))
    assert _layer(r, "nonlinear").value == pytest.approx(2.0, rel=1e-12)
    assert r.value == pytest.approx(2.0, rel=1e-12)
    # tightness: perturbing a window corner shared by 4 windows moves 4 outputs by the same
    # amount, so ||Δout|| / ||Δin|| = 2 is attained.
    x = torch.zeros(1, 2, 9, 9, dtype=F64)
    y = x.clone()
    y[0, 0, 2, 2] = 1.0
    ratio = float((F.max_pool2d(y, 3, 2) - F.max_pool2d(x, 3, 2)).norm() / (y - x).norm())
    assert ratio == pytest.approx(2.0)


def test_maxpool_bound_dominates_random_jacobians():
    m = nn.Sequential(nn.MaxPool2d(3, 2, padding=1))
    shape = (1, 7, 7)
    r = autolip(m, shape)
    g = gen(8)
    for _ in range(20):
        x = torch.randn(shape, generator=g, dtype=F64)
        assert norm2(jac(m, x)) <= r.value * (1 + 1e-12)


@pytest.mark.parametrize("functional", [False, True])
def test_non_overlapping_maxpool_is_1(functional):
    m = Lambda(lambda x: F.max_pool2d(x, 2)) if functional else nn.Sequential(nn.MaxPool2d(2, 2))
    r = autolip(m, (3, 8, 8))
    assert _layer(r, "nonlinear").value == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("dense_limit", [2048, 0])
def test_avgpool_k_stride_k_is_one_over_k(k, dense_limit):
    r = autolip(nn.Sequential(nn.AvgPool2d(k)), (2, 3 * k, 2 * k), dense_limit=dense_limit)
    assert r.certified
    assert r.value == pytest.approx(1.0 / k, rel=REL)
    assert r.value >= 1.0 / k


def test_avgpool_certify_false_estimate():
    r = autolip(nn.Sequential(nn.AvgPool2d(3)), (1, 9, 9), certify=False, tol=1e-10)
    assert r.value == pytest.approx(1.0 / 3, rel=1e-8)
    assert r.value <= 1.0 / 3 * (1 + 1e-12)


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


def max_abs_slope(fn, lo=-20.0, hi=20.0, n=400001) -> float:
    x = torch.linspace(lo, hi, n, dtype=F64, requires_grad=True)
    (d,) = torch.autograd.grad(fn(x).sum(), x)
    return float(d.abs().max())


@pytest.mark.parametrize(
    "module,fn",
    [
        (nn.Sigmoid(), torch.sigmoid),
        (nn.Tanh(), torch.tanh),
        (nn.ReLU(), torch.relu),
        (nn.LeakyReLU(2.0), lambda x: F.leaky_relu(x, 2.0)),
        (nn.LeakyReLU(0.1), lambda x: F.leaky_relu(x, 0.1)),
        (nn.LeakyReLU(-3.0), lambda x: F.leaky_relu(x, -3.0)),
        (nn.ELU(2.0), lambda x: F.elu(x, 2.0)),
        (nn.GELU(), F.gelu),
        (nn.GELU(approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
        (nn.SiLU(), F.silu),
        (nn.Mish(), F.mish),
        (nn.SELU(), F.selu),
        (nn.Softplus(beta=3.0), lambda x: F.softplus(x, beta=3.0)),
        (nn.Hardswish(), F.hardswish),
        (nn.Softsign(), F.softsign),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_activation_constant_matches_max_derivative(module, fn):
    r = autolip(nn.Sequential(module), (5,))
    truth = max_abs_slope(fn)
    assert r.value >= truth * (1 - 1e-12)
    assert r.value == pytest.approx(truth, rel=1e-6)


def test_closed_form_activation_constants():
    cases = [
        (nn.Sigmoid(), 0.25),
        (nn.LeakyReLU(2.0), 2.0),
        (nn.LeakyReLU(0.2), 1.0),
        (nn.LeakyReLU(-1.5), 1.5),
        (nn.SELU(), 1.0507009873554804934 * 1.6732632423543772848),
    ]
    for module, value in cases:
        assert autolip(nn.Sequential(module), (3,)).value == pytest.approx(value, rel=1e-12)
    # hardsigmoid is piecewise linear with slope 1/6 (torch's backward uses a float32 1/6, so
    # measure the slope of the float64 forward instead of using autograd)
    x = torch.tensor([-1.0, 1.0], dtype=F64)
    y = F.hardsigmoid(x)
    hs = float((y[1] - y[0]) / 2)
    assert hs == pytest.approx(1 / 6, rel=1e-14)
    assert autolip(nn.Sequential(nn.Hardsigmoid()), (3,)).value == pytest.approx(hs, rel=1e-12)
    gelu_max = 0.5 * (1 + math.erf(1.0)) + math.sqrt(2) * math.exp(-1.0) / math.sqrt(2 * math.pi)
    assert autolip(nn.Sequential(nn.GELU()), (3,)).value == pytest.approx(gelu_max, rel=1e-10)


@pytest.mark.parametrize("n_sigmoids", [1, 2, 3])
def test_sigmoid_mlp_is_product_over_four_per_layer(n_sigmoids):
    layers: list[nn.Module] = []
    widths = [6, 5, 7, 4, 3][: n_sigmoids + 2]
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < n_sigmoids:
            layers.append(nn.Sigmoid())
    m = init_(nn.Sequential(*layers).double(), 10 + n_sigmoids)
    r = autolip(m, (widths[0],))
    expected = math.prod(norm2(l.weight) for l in m if isinstance(l, nn.Linear))
    assert r.value == pytest.approx(expected / 4**n_sigmoids, rel=REL)


def test_relu_mlp_is_product_of_spectral_norms():
    m = init_(
        nn.Sequential(
            nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
        ).double(),
        11,
    )
    r = autolip(m, (6,))
    expected = math.prod(norm2(l.weight) for l in m if isinstance(l, nn.Linear))
    assert r.value == pytest.approx(expected, rel=REL)
    assert r.value >= expected


def test_leaky_relu_two_gives_factor_two_in_network():
    m = init_(nn.Sequential(nn.Linear(4, 5), nn.LeakyReLU(2.0), nn.Linear(5, 2)).double(), 12)
    r = autolip(m, (4,))
    assert _layer(r, "activation").value == 2.0
    assert r.value == pytest.approx(2 * norm2(m[0].weight) * norm2(m[2].weight), rel=REL)


@pytest.mark.parametrize("n", [2, 3, 10])
def test_softmax_is_at_most_half(n):
    m = nn.Sequential(nn.Softmax(dim=-1))
    r = autolip(m, (n,))
    assert r.value == pytest.approx(0.5, rel=1e-12)
    g = gen(n)
    best = 0.0
    for scale in (0.1, 1.0, 3.0, 10.0):
        for _ in range(50):
            x = torch.randn(n, generator=g, dtype=F64) * scale
            best = max(best, norm2(jac(m, x)))
    assert best <= r.value
    # two logits: the Jacobian at 0 has norm exactly 1/2 (p = (1/2, 1/2)), so 1/2 is tight.
    if n == 2:
        assert norm2(jac(m, torch.zeros(2, dtype=F64))) == pytest.approx(0.5)


def test_functional_sigmoid_and_tanh_and_abs():
    m = Lambda(lambda x: torch.abs(torch.tanh(torch.sigmoid(x) * 8.0)))
    r = autolip(m, (3,))
    assert r.value == pytest.approx(0.25 * 8.0, rel=1e-12)


# --------------------------------------------------------------------------------------------
# Unsupported operations: clear errors, all listed at once
# --------------------------------------------------------------------------------------------


class Square(nn.Module):
    def forward(self, x):
        return x * x


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


@pytest.mark.parametrize(
    "model,shape,words",
    [
        (Square(), (3,), ["mul", "product of two input-dependent"]),
        (Exp(), (3,), ["exp", "not globally Lipschitz"]),
        (
            nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)),
            (3,),
            ["LayerNorm", "standard deviation"],
        ),
        (Lambda(lambda x: 1.0 / x), (3,), ["division"]),
        (Lambda(lambda x: x.exp()), (3,), [".exp()", "not globally Lipschitz"]),
    ],
)
def test_unsupported_operation_raises_with_a_clear_message(model, shape, words):
    with pytest.raises(lipreg.UnsupportedOperationError) as info:
        lipreg.autolip(model, shape)
    assert isinstance(info.value, TypeError)
    msg = str(info.value)
    for w in words:
        assert w in msg
    # None of these ops is globally Lipschitz: registering a rule would make bounds wrong.
    assert "register_rule" not in msg


class ManyBad(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)

    def forward(self, x):
        y = self.fc(x)
        a = y * y
        b = torch.exp(y)
        return self.ln(a + b)


def test_all_unsupported_nodes_listed_in_one_error():
    with pytest.raises(lipreg.UnsupportedOperationError) as info:
        lipreg.autolip(ManyBad(), (4,))
    msg = str(info.value)
    assert "3 node(s)" in msg
    for w in ("'mul'", "'exp'", "'ln'", "LayerNorm"):
        assert w in msg


def test_batchnorm_without_running_stats_is_rejected():
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    with pytest.raises(lipreg.UnsupportedOperationError, match="track_running_stats"):
        lipreg.autolip(m, (3,))


# --------------------------------------------------------------------------------------------
# register_rule
# --------------------------------------------------------------------------------------------


def swish(x):
    return x * torch.sigmoid(x)


torch.fx.wrap("swish")  # fx keeps calls to this module-level function as one call_function node


class UsesSwish(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(swish(self.fc1(x)))


def test_register_rule_on_a_wrapped_function(rule_registry):
    m = init_(UsesSwish().double(), 13)
    with pytest.raises(lipreg.UnsupportedOperationError, match="swish"):
        autolip(m, (4,))
    slope = max_abs_slope(F.silu)
    lipreg.register_rule(swish, lipreg.Elementwise(-0.1, slope * (1 + 1e-9)))
    r = autolip(m, (4,))
    assert r.certified
    expected = norm2(m.fc1.weight) * slope * norm2(m.fc2.weight)
    assert r.value == pytest.approx(expected, rel=1e-8)
    g = gen(1)
    for _ in range(20):
        assert norm2(jac(m, torch.randn(4, generator=g, dtype=F64) * 3)) <= r.value


class UsesExpMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return torch.tanh(self.fc(x)).exp()


def test_register_rule_on_a_method_name(rule_registry):
    m = init_(UsesExpMethod().double(), 14)
    with pytest.raises(lipreg.UnsupportedOperationError):
        autolip(m, (3,))
    # on tanh's range [-1, 1], exp has slope at most e
    lipreg.register_rule("exp", lipreg.Nonlinear(math.e))
    r = autolip(m, (3,))
    assert r.value == pytest.approx(norm2(m.fc.weight) * math.e, rel=1e-8)


def shifted_double(x):
    return 2.0 * x + 1.0


torch.fx.wrap("shifted_double")


class UsesShiftedDouble(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return shifted_double(self.fc(x))


def test_register_rule_callable_returning_affine(rule_registry):
    m = init_(UsesShiftedDouble().double(), 16)
    seen = []

    def rule(ctx):
        seen.append(ctx.n_inputs)
        return ctx.generic_affine()  # linear part: f(x) - f(0), materialised by lipreg

    lipreg.register_rule(shifted_double, rule)
    r = autolip(m, (3,))
    assert seen == [1]
    assert r.certified
    # merged with the preceding Linear into one chain: exactly ||2 W||
    assert r.value == pytest.approx(2 * norm2(m.fc.weight), rel=REL)
    assert len([lb for lb in r.layers if lb.kind == "affine"]) == 1


def test_register_rule_rejects_bad_target(rule_registry):
    with pytest.raises(TypeError):
        lipreg.register_rule(42, lipreg.Nonlinear(1.0))


class Swish2(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


def test_register_rule_on_a_custom_module_class(rule_registry):
    lipreg.register_rule(Swish2, lipreg.Elementwise(-0.0999, 1.0999))
    m = nn.Sequential(nn.Linear(3, 4), Swish2(), nn.Linear(4, 2)).double()
    r = autolip(m, (3,))
    assert r.value > 0


# --------------------------------------------------------------------------------------------
# The activation table: one entry gives the module, function and method rules
# --------------------------------------------------------------------------------------------

ERF_SLOPE = 2 / math.sqrt(math.pi)  # erf'(x) = 2/sqrt(pi) exp(-x^2), largest at 0


def erf_via_ndtr(x):
    # erf(x) = 2 Phi(sqrt(2) x) - 1, written with ndtr (which has no rule), so that the only
    # way to bound the modules below is their own (module-class) rule, not tracing through.
    return 2 * torch.special.ndtr(x * math.sqrt(2)) - 1


class ErfModule(nn.Module):
    def forward(self, x):
        return erf_via_ndtr(x)


class ScaledErfModule(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return self.scale * erf_via_ndtr(x)


def scaled_erf(x, scale=1.0):
    return scale * torch.erf(x)


torch.fx.wrap("scaled_erf")


class ErfFunction(nn.Module):
    def forward(self, x):
        return torch.erf(x)


class ErfMethod(nn.Module):
    def forward(self, x):
        return x.erf()


class ScaledErfPositional(nn.Module):
    def forward(self, x):
        return scaled_erf(x, -3.0)


class ScaledErfKeyword(nn.Module):
    def forward(self, x):
        return scaled_erf(x, scale=0.5)


NEW_ENTRIES = (
    rules_module.Activation(
        "erf",
        (0.0, ERF_SLOPE * (1 + 1e-12)),
        modules=(ErfModule,),
        functions=(torch.erf, torch.special.erf),
        methods=("erf",),
    ),
    rules_module.Activation(
        "scaled_erf",
        lambda scale: (min(0.0, scale * ERF_SLOPE), max(0.0, scale * ERF_SLOPE)),
        modules=(ScaledErfModule,),
        functions=(scaled_erf,),
        params=(rules_module.Param("scale", 1, 1.0),),
    ),
)


def brute_force_slope(fn, lo=-20.0, hi=20.0, n=400001) -> float:
    """Largest secant slope |f(b) - f(a)| / |b - a| over a fine grid: a lower bound of the
    Lipschitz constant computed from values only (no derivative, no rule)."""
    x = torch.linspace(lo, hi, n, dtype=F64)
    with torch.no_grad():
        y = fn(x)
    return float(((y[1:] - y[:-1]).abs() / (x[1:] - x[:-1])).max())


@contextlib.contextmanager
def erf_in_table():
    """The activation table plus the two entries above, registered like the built-in ones;
    the registries are restored afterwards."""
    with rules_module.restored_registries():
        rules_module.register_activations((*rules_module.ACTIVATIONS, *NEW_ENTRIES))
        yield


@pytest.fixture
def table_with_erf():
    with erf_in_table():
        yield


ERF_FORMS = [
    (ErfModule(), torch.erf),
    (ErfFunction(), torch.erf),
    (ErfMethod(), torch.erf),
    (ScaledErfModule(2.5), lambda x: 2.5 * torch.erf(x)),
    (ScaledErfPositional(), lambda x: -3.0 * torch.erf(x)),
    (ScaledErfKeyword(), lambda x: 0.5 * torch.erf(x)),
]
ERF_IDS = ["module", "function", "method", "module-param", "function-pos", "function-kw"]


@pytest.mark.parametrize("net,fn", ERF_FORMS, ids=ERF_IDS)
def test_erf_form_without_rule_is_refused(net, fn):
    # the ground state for the test below: without the table entries every form is refused
    with pytest.raises(lipreg.UnsupportedOperationError):
        autolip(net, (5,))


@pytest.mark.parametrize("net,fn", ERF_FORMS, ids=ERF_IDS)
def test_erf_table_entry_gives_every_form_a_sound_rule(table_with_erf, net, fn):
    r = autolip(net, (5,))
    assert r.certified
    [layer] = r.layers
    assert layer.kind == "activation"
    truth = brute_force_slope(fn)
    assert r.value >= truth
    assert r.value == pytest.approx(truth, rel=1e-6)


def test_erf_table_entries_are_removed_afterwards():
    with erf_in_table():
        assert "erf" in lipreg.registered_targets()["methods"]
        assert "ErfModule" in lipreg.registered_targets()["modules"]
    assert "erf" not in lipreg.registered_targets()["methods"]
    assert "ErfModule" not in lipreg.registered_targets()["modules"]
    with pytest.raises(lipreg.UnsupportedOperationError):
        autolip(ErfMethod(), (5,))


# --------------------------------------------------------------------------------------------
# Broadcasting in sums of two input-dependent tensors
# --------------------------------------------------------------------------------------------


class AddMean(nn.Module):
    def forward(self, x):
        # (B, n) + (B, 1): the mean is broadcast, i.e. copied n times
        return x + x.mean(dim=1, keepdim=True)


class AddChannelMean(nn.Module):
    def forward(self, x):
        # global-average-pool branch added back to the feature map (SE / GAP-residual style)
        return x + x.mean(dim=(2, 3), keepdim=True)


@pytest.mark.parametrize("model,shape", [(AddMean(), (9,)), (AddChannelMean(), (2, 4, 4))])
def test_broadcast_sum_is_sound(model, shape):
    # the map is linear: x -> (I + P) x with P the averaging projector, whose norm is 2
    true_L = norm2(jac(model, torch.randn(shape, generator=gen(2), dtype=F64)))
    assert true_L == pytest.approx(2.0, rel=1e-12)
    r = autolip(model, shape)
    assert r.certified
    assert r.value >= true_L


class RsubAlpha(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return torch.rsub(self.fc(x), x, alpha=5.0)  # = x - 5 fc(x)


def test_rsub_with_alpha_is_sound():
    m = init_(RsubAlpha().double(), 17)
    true_L = norm2(torch.eye(3, dtype=F64) - 5 * m.fc.weight)
    assert true_L == pytest.approx(norm2(jac(m, torch.zeros(3, dtype=F64))), rel=1e-12)
    assert autolip(m, (3,)).value >= true_L


def test_sub_with_alpha_uses_alpha():
    m = init_(RsubAlpha().double(), 17)

    class SubAlpha(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = m.fc

        def forward(self, x):
            return torch.sub(x, self.fc(x), alpha=5.0)

    r = autolip(SubAlpha(), (3,))
    assert r.value == pytest.approx(1 + 5 * norm2(m.fc.weight), rel=REL)
    assert r.value >= norm2(torch.eye(3, dtype=F64) - 5 * m.fc.weight)


# --------------------------------------------------------------------------------------------
# Other non-linear / non-negative layers: bound >= max Jacobian norm over random points
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module,shape,exact",
    [
        (nn.AdaptiveMaxPool2d((3, 3)), (1, 7, 7), 2.0),
        (nn.AdaptiveMaxPool2d((4, 4)), (2, 6, 6), 2.0),
        (nn.MaxPool2d(3, 2, padding=1, ceil_mode=True), (1, 6, 6), 2.0),
        (nn.MaxPool2d(2, 1, dilation=2), (1, 6, 6), 2.0),
        (nn.MaxPool1d(3, 1), (2, 7), math.sqrt(3)),
        (nn.Upsample(scale_factor=2, mode="bilinear"), (1, 4, 4), 2.0),
        (nn.Upsample(scale_factor=3, mode="nearest"), (2, 3, 3), 3.0),
        (nn.AdaptiveAvgPool2d(1), (2, 5, 5), 0.2),
        (nn.PixelShuffle(2), (4, 3, 3), 1.0),
        (nn.LogSoftmax(dim=-1), (4,), None),
        (nn.Softmax2d(), (3, 2, 2), None),
        (nn.ZeroPad2d((1, 2, 0, 1)), (1, 3, 3), 1.0),
        (nn.ReflectionPad2d(1), (1, 4, 4), None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_layer_bound_dominates_jacobians(module, shape, exact):
    m = nn.Sequential(module)
    r = autolip(m, shape)
    assert r.certified
    g = gen(3)
    best = 0.0
    for i in range(30):
        x = torch.randn(shape, generator=g, dtype=F64) * (0.3, 1.0, 5.0)[i % 3]
        best = max(best, norm2(jac(m, x)))
    assert best <= r.value * (1 + 1e-12)
    if exact is not None:  # closed form, attained at random points (the rule is tight)
        assert r.value == pytest.approx(exact, rel=REL)
        assert best == pytest.approx(exact, rel=1e-9)
