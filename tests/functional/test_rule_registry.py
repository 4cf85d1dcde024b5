"""Activation constants, the activation table, refusals with their reasons, and
``register_rule`` (paper.md §2.5).

Ground truths: closed forms (1/4, max(1, |α|), 1/6 ...), numerically computed maxima of
activation derivatives, secant slopes of the functions themselves (computed from values only),
``torch.linalg.matrix_norm`` of float64 weights and dense Jacobians.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from rules_helpers import F64, REL, Lambda, autolip, gen, init_, jac, norm2, only_layer
from torch import nn

import lipreg
from lipreg.functional import rules as rules_module


@pytest.fixture
def rule_registry():
    """Isolate register_rule calls: the registry is restored after the test."""
    with rules_module.restored_registries():
        yield


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
    assert only_layer(r, "activation").value == 2.0
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
# FSDP2's dynamic classes (fully_shard swaps Linear for FSDPLinear(FSDPModule, Linear))
# --------------------------------------------------------------------------------------------


class ShiftedLinear(nn.Linear):
    """A different function than nn.Linear (x -> W x + b + 1): must never take its rule."""

    def forward(self, x):
        return super().forward(x) + 1.0


def test_fsdp_dynamic_class_binds_to_original_rule_without_registration(
    one_rank_group, rule_registry
):
    from torch.distributed.fsdp import FSDPModule, fully_shard

    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    # AutoLip of this chain: the product of the float64 spectral norms (ReLU: 1)
    truth = math.prod(
        float(torch.linalg.matrix_norm(m.weight.detach().to(F64), 2)) for m in (net[0], net[2])
    )
    before = lipreg.registered_targets()["modules"]
    for layer in (net[0], net[2]):
        fully_shard(layer)
    fully_shard(net)
    layer = net[0]
    assert isinstance(layer, FSDPModule) and type(layer) is not nn.Linear
    assert rules_module.module_rule_class(layer) is nn.Linear
    assert rules_module.overriding_methods(layer) == []
    # the model's rules bind without any registration (the registry is unchanged)
    r = lipreg.autolip(net, (3,), certify=True)
    assert lipreg.registered_targets()["modules"] == before
    assert r.certified and r.value >= truth
    assert r.value == pytest.approx(truth, rel=1e-6)  # a certificate: truth + margin


def test_fsdp_class_of_a_forward_overriding_subclass_stays_refused(one_rank_group):
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layer = ShiftedLinear(3, 2)
    fully_shard(layer)
    assert isinstance(layer, FSDPModule)
    assert rules_module.module_rule_class(layer) is None
    assert "ShiftedLinear.forward" in rules_module.overriding_methods(layer)


def test_fsdp_mixin_with_own_forward_stays_refused():
    # deny by default: only FSDPModule's own methods are harmless, not a class mixing it in
    # that defines a forward (a user class built like fully_shard's dynamic ones)
    from torch.distributed.fsdp import FSDPModule

    cls = type("FSDPShifted", (FSDPModule, nn.Linear), {"forward": ShiftedLinear.forward})
    layer = nn.Linear(3, 2)
    layer.__class__ = cls
    assert rules_module.module_rule_class(layer) is None
    assert rules_module.overriding_methods(layer) == ["FSDPShifted.forward"]
