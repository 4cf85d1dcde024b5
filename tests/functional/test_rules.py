"""Graph rules and per-layer constants of AutoLip (paper.md §2.3, §2.5, §5 items 5 and 14).

Ground truths: closed forms (1 + |ω|, 1/k, 1/4, max(1, |α|) ...), ``torch.linalg.matrix_norm``
of float64 weights, SVDs of dense Jacobians from ``torch.autograd.functional.jacobian``,
numerically computed maxima of activation derivatives, and maxima over random points of
Jacobian norms (which are lower bounds of the true constant). Activations, refusals and
``register_rule`` are tested in test_rule_registry.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from rules_helpers import (
    F64,
    REL,
    Lambda,
    autolip,
    gen,
    init_,
    jac,
    linear_part_norm,
    norm2,
    only_layer,
)
from torch import nn

import lipreg

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


def test_overlapping_maxpool_3x3_stride2_is_2():
    r = autolip(nn.Sequential(nn.MaxPool2d(3, 2)), (2, 9, 9))
    assert only_layer(r, "nonlinear").value == pytest.approx(2.0, rel=1e-12)
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
    assert only_layer(r, "nonlinear").value == pytest.approx(1.0, rel=1e-12)


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
