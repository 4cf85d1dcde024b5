"""End-to-end tests of ``lipreg.autolip``: single layers, linear networks, soundness on random
architectures, non-perturbation of the model, warm starts and bad input.

Ground truths: ``torch.linalg.matrix_norm`` of float64 weights, SVDs of dense Jacobians built
with ``torch.autograd.functional.jacobian`` (exact for affine maps, lower bounds of the
Lipschitz constant at any point otherwise), orthogonal matrices (norm 1), and snapshots of the
model's state taken before the call.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd.functional import jacobian

import lipreg
from tests.helpers import init_weights

F64 = torch.float64
REL = 1e-8  # certified values carry a relative margin of 1e-9


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def norm2(W: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(W.detach().to(F64), 2))


def init_(model: nn.Module, seed: int, scale: float = 0.7) -> nn.Module:
    """Deterministic random parameters and BN statistics, without the global RNG."""
    return init_weights(model, seed, scale=scale, batchnorm_stats=True)


def jac(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Dense Jacobian at one sample x (no batch dim): (out_features, in_features)."""
    J = jacobian(lambda z: model(z), x[None].to(F64))
    return J.reshape(-1, x.numel())


def affine_norm(model: nn.Module, in_shape: tuple[int, ...]) -> float:
    """Spectral norm of the (constant) Jacobian of an affine model."""
    return norm2(jac(model, torch.randn(in_shape, generator=gen(321), dtype=F64)))


def max_jac_norm(model: nn.Module, in_shape, n: int, seed: int) -> float:
    g = gen(seed)
    best = 0.0
    for i in range(n):
        scale = (0.3, 1.0, 3.0)[i % 3]
        x = torch.randn(in_shape, generator=g, dtype=F64) * scale
        best = max(best, norm2(jac(model, x)))
    return best


# --------------------------------------------------------------------------------------------
# Single layers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (1, 9), (6, 6)])
def test_linear_is_matrix_norm(shape):
    out_f, in_f = shape
    m = init_(nn.Sequential(nn.Linear(in_f, out_f)).double(), 1)
    t = norm2(m[0].weight)
    r = lipreg.autolip(m, (in_f,), dtype=F64)
    assert r.certified and r.kind == "upper" and r.method == "autolip"
    assert r.value >= t
    assert r.value == pytest.approx(t, rel=REL)
    est = lipreg.autolip(m, (in_f,), dtype=F64, certify=False, tol=1e-10)
    assert est.kind == "estimate" and not est.certified
    assert est.value == pytest.approx(t, rel=1e-7)
    assert est.value <= t * (1 + 1e-12)


def test_linear_float32_model_default_dtype():
    m = init_(nn.Sequential(nn.Linear(30, 20)), 2)
    t = norm2(m[0].weight)  # float32 weights are exact in float64
    r = lipreg.autolip(m, (30,))
    assert r.value >= t
    assert r.value == pytest.approx(t, rel=REL)


def test_biases_never_matter():
    base = init_(
        nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)
        ).double(),
        3,
    )
    shifted = copy.deepcopy(base)
    nobias = copy.deepcopy(base)
    with torch.no_grad():
        for mod in shifted:
            if getattr(mod, "bias", None) is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen(4), dtype=F64) * 100)
        for mod in nobias:
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
    for kw in ({}, {"certify": False, "tol": 1e-10}):
        vals = [
            lipreg.autolip(m, (2, 6, 6), dtype=F64, **kw).value for m in (base, shifted, nobias)
        ]
        assert vals[1] == pytest.approx(vals[0], rel=1e-9)
        assert vals[2] == pytest.approx(vals[0], rel=1e-9)
    # and equal to the product of the two layers' norms (independent ground truth)
    expected = affine_norm(nn.Sequential(base[0]), (2, 6, 6)) * norm2(base[3].weight)
    assert vals[0] == pytest.approx(expected, rel=1e-7)


CONVS = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": 3, "padding": 2, "dilation": 2},
    {"kernel_size": 3, "padding": 1, "groups": 2},
    {"kernel_size": 5, "stride": 3},
    {"kernel_size": 1},
    {"kernel_size": 4, "stride": 2, "padding": 1, "groups": 2},
    {"kernel_size": (2, 3), "stride": (1, 2), "dilation": (3, 1)},
    {"kernel_size": 3, "padding": 1, "padding_mode": "circular"},
    {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    {"kernel_size": 3, "padding": 1, "padding_mode": "replicate"},
]


@pytest.mark.parametrize("kw", CONVS, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_conv2d_certified_and_estimate(kw):
    conv = nn.Conv2d(4, 6, **kw).double()
    init_(conv, 5)
    m = nn.Sequential(conv)
    shape = (4, 7, 6)
    t = affine_norm(m, shape)
    # default: small layer, certified through a dense float64 SVD -> exact
    r = lipreg.autolip(m, shape)
    assert r.certified and r.layers[0].certified
    assert r.value >= t
    assert r.value == pytest.approx(t, rel=REL)
    # certified through the conv-specific bound (dense path disabled): sound
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rf = lipreg.autolip(m, shape, dense_limit=0)
    assert rf.certified
    assert rf.value >= t * (1 - 1e-12)
    if kw.get("padding_mode", "zeros") == "zeros":
        assert rf.value <= 1.5 * t  # loose on tiny inputs; see the larger-input test
    # estimate: within 1e-3 and never above (float32 and float64 iterations)
    for dtype, eps in ((torch.float32, 1e-5), (F64, 1e-12)):
        for method in ("lanczos", "power"):
            e = lipreg.autolip(m, shape, certify=False, tol=1e-7, dtype=dtype, method=method)
            assert not e.certified
            assert abs(e.value - t) <= 1e-3 * t
            assert e.value <= t * (1 + eps)


@pytest.mark.parametrize("kw", CONVS[:8], ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_conv2d_structured_certificate_is_tight_on_larger_inputs(kw):
    conv = init_(nn.Conv2d(4, 6, **kw).double(), 6)
    m = nn.Sequential(conv)
    shape = (4, 14, 13)
    t = affine_norm(m, shape)
    rf = lipreg.autolip(m, shape, dense_limit=0)
    assert rf.certified
    assert t * (1 - 1e-12) <= rf.value <= 1.1 * t


@pytest.mark.parametrize(
    "module,shape",
    [
        (nn.Conv1d(3, 4, 5, stride=2, padding=2, dilation=2), (3, 20)),
        (nn.Conv3d(2, 3, 3, stride=(1, 2, 1), padding=1), (2, 5, 6, 4)),
        (nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (3, 5, 5)),
        (nn.ConvTranspose2d(2, 4, 4, stride=2, groups=2), (2, 4, 6)),
        (nn.ConvTranspose1d(2, 3, 3, stride=3, dilation=2), (2, 7)),
    ],
    ids=["conv1d", "conv3d", "convT2d", "convT2d-groups", "convT1d"],
)
def test_other_convolutions(module, shape):
    m = init_(nn.Sequential(module).double(), 7)
    t = affine_norm(m, shape)
    r = lipreg.autolip(m, shape)
    assert r.certified and r.value >= t and r.value == pytest.approx(t, rel=REL)
    rf = lipreg.autolip(m, shape, dense_limit=0)
    assert rf.certified and rf.value >= t * (1 - 1e-12)
    e = lipreg.autolip(m, shape, certify=False, tol=1e-8, dtype=F64)
    assert abs(e.value - t) <= 1e-3 * t and e.value <= t * (1 + 1e-12)


def test_bare_conv_module_is_certified_like_a_wrapped_one():
    conv = init_(nn.Conv2d(2, 3, 3, padding=1).double(), 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = lipreg.autolip(nn.Sequential(conv), (2, 8, 8), dense_limit=0)
        bare = lipreg.autolip(conv, (2, 8, 8), dense_limit=0)
    assert wrapped.certified
    assert bare.certified


# --------------------------------------------------------------------------------------------
# Linear networks (paper.md §5 item 3)
# --------------------------------------------------------------------------------------------


def test_linear_chain_is_merged_and_equals_true_constant():
    m = init_(
        nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(5, 4)).double(), 9, scale=1.0
    )
    W1, W2, W3 = (l.weight for l in m)
    true_L = norm2(W3 @ W2 @ W1)
    assert true_L == pytest.approx(affine_norm(m, (6,)), rel=1e-10)
    product = norm2(W1) * norm2(W2) * norm2(W3)
    assert true_L < product
    r = lipreg.autolip(m, (6,), dtype=F64)
    assert r.certified
    assert r.value >= true_L and r.value == pytest.approx(true_L, rel=REL)
    assert len(r.layers) == 1
    e = lipreg.autolip(m, (6,), dtype=F64, certify=False, tol=1e-10)
    assert e.value == pytest.approx(true_L, rel=1e-7) and e.value <= true_L * (1 + 1e-12)
    # without materialisation, the certificate is the product of per-layer norms (still sound)
    p = lipreg.autolip(m, (6,), dtype=F64, dense_limit=0)
    assert p.certified and p.value == pytest.approx(product, rel=REL)


def test_linear_conv_flatten_linear_chain():
    m = init_(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).double(), 10)
    t = affine_norm(m, (2, 5, 5))
    r = lipreg.autolip(m, (2, 5, 5))
    assert r.value >= t and r.value == pytest.approx(t, rel=REL)


@pytest.mark.parametrize("n_layers", [1, 3, 5])
def test_orthogonal_layers_give_one(n_layers):
    layers = [nn.Linear(7, 7).double() for _ in range(n_layers)]
    for l in layers:
        nn.init.orthogonal_(l.weight, generator=gen(11))
    m = nn.Sequential(*layers)
    assert affine_norm(m, (7,)) == pytest.approx(1.0, rel=1e-12)
    r = lipreg.autolip(m, (7,), dtype=F64)
    assert r.value == pytest.approx(1.0, rel=REL) and r.value >= 1.0
    # with activations in between (1-Lipschitz), AutoLip is still the product = 1
    act = nn.Sequential(*[mod for l in layers for mod in (l, nn.ReLU())])
    assert lipreg.autolip(act, (7,), dtype=F64).value == pytest.approx(1.0, rel=REL)


# --------------------------------------------------------------------------------------------
# Soundness on random architectures (hypothesis)
# --------------------------------------------------------------------------------------------

ACTS = {
    "relu": nn.ReLU,
    "leaky0.1": lambda: nn.LeakyReLU(0.1),
    "leaky1.5": lambda: nn.LeakyReLU(1.5),
    "leaky-0.5": lambda: nn.LeakyReLU(-0.5),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}
act_names = st.sampled_from(sorted(ACTS))


class MLP(nn.Module):
    def __init__(self, in_dim, blocks, out_dim):
        super().__init__()
        self.kinds = [b[0] for b in blocks]
        self.blocks = nn.ModuleList()
        w = in_dim
        for b in blocks:
            if b[0] == "lin":
                self.blocks.append(nn.ModuleList([nn.Linear(w, b[1]), ACTS[b[2]]()]))
                w = b[1]
            elif b[0] == "res":
                self.blocks.append(nn.ModuleList([nn.Linear(w, w), ACTS[b[1]](), nn.Linear(w, w)]))
            elif b[0] == "cat":
                self.blocks.append(
                    nn.ModuleList([nn.Linear(w, b[1]), ACTS[b[3]](), nn.Linear(w, b[2])])
                )
                w = b[1] + b[2]
            elif b[0] == "bn":
                self.blocks.append(nn.BatchNorm1d(w))
            elif b[0] == "drop":
                self.blocks.append(nn.Dropout(0.3))
        self.head = nn.Linear(w, out_dim)

    def forward(self, x):
        for kind, m in zip(self.kinds, self.blocks, strict=True):
            if kind == "lin":
                x = m[1](m[0](x))
            elif kind == "res":
                x = x + m[2](m[1](m[0](x)))
            elif kind == "cat":
                x = torch.cat([m[1](m[0](x)), m[2](x)], dim=1)
            else:
                x = m(x)
        return self.head(x)


@st.composite
def mlp_configs(draw):
    width = st.integers(1, 6)
    block = st.one_of(
        st.tuples(st.just("lin"), width, act_names),
        st.tuples(st.just("res"), act_names),
        st.tuples(st.just("cat"), width, width, act_names),
        st.tuples(st.just("bn")),
        st.tuples(st.just("drop")),
    )
    return (
        draw(st.integers(1, 5)),
        draw(st.lists(block, min_size=1, max_size=4)),
        draw(st.integers(1, 4)),
        draw(st.integers(0, 2**31 - 1)),
    )


class CNN(nn.Module):
    def __init__(self, in_shape, blocks, out_dim):
        super().__init__()
        self.kinds = [b[0] for b in blocks]
        self.blocks = nn.ModuleList()
        c, h, w = in_shape
        for b in blocks:
            kind = b[0]
            if kind == "conv":
                _, oc, k, s, p, act = b
                self.blocks.append(
                    nn.ModuleList([nn.Conv2d(c, oc, k, stride=s, padding=p), ACTS[act]()])
                )
                c, h, w = oc, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            elif kind == "res":
                self.blocks.append(
                    nn.ModuleList(
                        [nn.Conv2d(c, c, 3, padding=1), ACTS[b[1]](), nn.Conv2d(c, c, 3, padding=1)]
                    )
                )
            elif kind == "cat":
                self.blocks.append(nn.ModuleList([nn.Conv2d(c, b[1], 3, padding=1), ACTS[b[2]]()]))
                c = c + b[1]
            elif kind in ("maxpool", "avgpool"):
                _, k, s = b
                cls = nn.MaxPool2d if kind == "maxpool" else nn.AvgPool2d
                self.blocks.append(cls(k, stride=s))
                h, w = (h - k) // s + 1, (w - k) // s + 1
            elif kind == "bn":
                self.blocks.append(nn.BatchNorm2d(c))
        self.head = nn.Linear(c * h * w, out_dim)

    def forward(self, x):
        for kind, m in zip(self.kinds, self.blocks, strict=True):
            if kind == "conv":
                x = m[1](m[0](x))
            elif kind == "res":
                x = x + m[2](m[1](m[0](x)))
            elif kind == "cat":
                x = torch.cat([x, m[1](m[0](x))], dim=1)
            else:
                x = m(x)
        return self.head(torch.flatten(x, 1))


@st.composite
def cnn_configs(draw):
    c = draw(st.integers(1, 2))
    h, w = draw(st.integers(4, 7)), draw(st.integers(4, 7))
    blocks = []
    ch, hh, ww = c, h, w
    for _ in range(draw(st.integers(1, 4))):
        options = ["res", "bn", "cat"] if ch <= 4 else ["res", "bn"]
        if min(hh, ww) >= 2:
            options += ["conv", "maxpool", "avgpool"]
        kind = draw(st.sampled_from(options))
        if kind == "conv":
            k = draw(st.integers(1, min(3, hh, ww)))
            s = draw(st.integers(1, 2))
            p = draw(st.integers(0, k // 2))
            oc = draw(st.integers(1, 3))
            blocks.append(("conv", oc, k, s, p, draw(act_names)))
            ch, hh, ww = oc, (hh + 2 * p - k) // s + 1, (ww + 2 * p - k) // s + 1
        elif kind in ("maxpool", "avgpool"):
            k = draw(st.integers(2, min(3, hh, ww)))
            s = draw(st.integers(1, k))
            blocks.append((kind, k, s))
            hh, ww = (hh - k) // s + 1, (ww - k) // s + 1
        elif kind == "cat":
            oc = draw(st.integers(1, 2))
            blocks.append(("cat", oc, draw(act_names)))
            ch += oc
        elif kind == "res":
            blocks.append(("res", draw(act_names)))
        else:
            blocks.append(("bn",))
    return (c, h, w), blocks, draw(st.integers(1, 3)), draw(st.integers(0, 2**31 - 1))


HYP = settings(
    deadline=None,
    max_examples=30,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _check_sound(model: nn.Module, in_shape, seed: int):
    model = init_(model.double(), seed).eval()
    r = lipreg.autolip(model, in_shape, dtype=F64)
    assert r.certified
    lower = max_jac_norm(model, in_shape, 20, seed)
    assert lower <= r.value * (1 + 1e-12), (lower, r.value)
    # the default float32 path on the float32 copy of the model (same exact function)
    m32 = copy.deepcopy(model).float()
    r32 = lipreg.autolip(m32, in_shape)
    assert r32.certified
    lower32 = max_jac_norm(copy.deepcopy(m32).double(), in_shape, 5, seed)
    assert lower32 <= r32.value * (1 + 1e-6)


@HYP
@given(mlp_configs())
def test_soundness_random_mlps(cfg):
    in_dim, blocks, out_dim, seed = cfg
    _check_sound(MLP(in_dim, blocks, out_dim), (in_dim,), seed)


@HYP
@given(cnn_configs())
def test_soundness_random_cnns(cfg):
    in_shape, blocks, out_dim, seed = cfg
    _check_sound(CNN(in_shape, blocks, out_dim), in_shape, seed)


def test_two_layer_relu_net_bruteforce():
    """K = 2, M1 full row rank: L = max over all activation patterns of ||M2 diag(σ) M1||."""
    import itertools

    m = init_(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).double(), 12)
    M1, M2 = m[0].weight, m[2].weight
    true_L = max(
        norm2(M2 @ torch.diag(torch.tensor(s, dtype=F64)) @ M1)
        for s in itertools.product((0.0, 1.0), repeat=6)
    )
    r = lipreg.autolip(m, (8,), dtype=F64)
    assert r.value >= true_L
    assert r.value == pytest.approx(norm2(M1) * norm2(M2), rel=REL)


# --------------------------------------------------------------------------------------------
# Non-perturbation of the model and of the global state
# --------------------------------------------------------------------------------------------


def make_train_model() -> nn.Module:
    m = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 5),
        nn.BatchNorm1d(5),
        nn.Dropout(0.3),
        nn.Linear(5, 2),
    )
    return init_(m, 13)


def _hook_counts(model):
    return [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    ]


@pytest.mark.parametrize("certify", [True, False])
def test_autolip_does_not_perturb_the_model(certify):
    m = make_train_model().train()
    m[3].eval()  # mixed modes must be preserved per module
    for i, p in enumerate(m.parameters()):
        if i % 2 == 0:
            p.grad = torch.randn(p.shape, generator=gen(i))
    m[6].weight.requires_grad_(False)
    calls = []
    m.register_forward_hook(lambda *a: calls.append("root"))
    m[0].register_forward_hook(lambda *a: calls.append("conv"))
    m[6].register_forward_pre_hook(lambda *a: calls.append("fc-pre"))
    m[1].register_forward_hook(lambda *a: calls.append("bn"))
    state = copy.deepcopy(m.state_dict())
    grads = [None if p.grad is None else p.grad.clone() for p in m.parameters()]
    req = [p.requires_grad for p in m.parameters()]
    modes = [mod.training for mod in m.modules()]
    hooks = _hook_counts(m)
    rng = torch.get_rng_state()

    r = lipreg.autolip(m, (1, 6, 6), certify=certify)

    assert r.value > 0
    assert calls == []
    assert torch.equal(rng, torch.get_rng_state())
    after = m.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(v, after[k]), k  # includes BN running stats and num_batches_tracked
    for g, p in zip(grads, m.parameters(), strict=True):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
    assert req == [p.requires_grad for p in m.parameters()]
    assert modes == [mod.training for mod in m.modules()]
    assert hooks == _hook_counts(m)
    # the hooks still work afterwards
    m.eval()(torch.zeros(1, 1, 6, 6))
    assert calls == ["conv", "bn", "fc-pre", "root"]


@pytest.mark.parametrize("certify", [True, False])
def test_train_mode_value_equals_eval_mode_value(certify):
    m = make_train_model()
    v_train = lipreg.autolip(m.train(), (1, 6, 6), certify=certify).value
    v_eval = lipreg.autolip(m.eval(), (1, 6, 6), certify=certify).value
    assert v_train == v_eval
    # and the eval-mode network is what is bounded (lower bound from eval Jacobians)
    m64 = copy.deepcopy(m).double().eval()
    if certify:
        assert max_jac_norm(m64, (1, 6, 6), 10, 0) <= v_eval * (1 + 1e-6)


def test_hooks_of_nested_containers_are_not_called():
    inner = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    m = nn.Sequential(inner, nn.Linear(4, 2))
    calls = []
    inner.register_forward_hook(lambda *a: calls.append("inner"))
    lipreg.autolip(m, (3,))
    assert calls == []


@pytest.mark.parametrize(
    "layer", [nn.RReLU(), nn.FeatureAlphaDropout(0.5)], ids=["RReLU", "FeatureAlphaDropout"]
)
def test_train_mode_random_layers_leave_global_rng_alone(layer):
    m = nn.Sequential(nn.Conv2d(2, 2, 3), layer, nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).train()
    with torch.no_grad():
        m[0].bias.fill_(-1.0)  # RReLU only draws random slopes for negative inputs
    rng = torch.get_rng_state()
    lipreg.autolip(m, (2, 6, 6))
    assert torch.equal(rng, torch.get_rng_state())


def test_seed_makes_estimates_deterministic():
    m = init_(nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 20)), 18)
    truth = norm2(m[0].weight) * norm2(m[2].weight)
    a = lipreg.autolip(m, (40,), certify=False, seed=3)
    b = lipreg.autolip(m, (40,), certify=False, seed=3)
    assert a.value == b.value
    assert a.value == pytest.approx(truth, rel=1e-3)
    assert a.value <= truth * (1 + 1e-5)


# --------------------------------------------------------------------------------------------
# Warm start
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_warm_start_from_result_state(method):
    m = init_(
        nn.Sequential(
            nn.Conv2d(2, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 5 * 5, 10),
        ),
        14,
    )
    shape = (2, 10, 10)
    tol = 1e-6
    cold = lipreg.autolip(m, shape, certify=False, method=method, tol=tol, max_iter=3000)
    warm = lipreg.autolip(
        m, shape, certify=False, method=method, tol=tol, max_iter=3000, state=cold.state
    )
    vectors = {k for k in cold.state if not k.endswith("#gap")}
    assert vectors == {lb.name for lb in cold.layers if lb.kind == "affine"}
    assert warm.value == pytest.approx(cold.value, rel=10 * tol)
    n_affine = len(vectors)
    assert warm.n_iter <= 3 * n_affine
    assert warm.n_iter * 3 < cold.n_iter
    # independent truth: per-layer dense Jacobian norms
    truth = (
        affine_norm(nn.Sequential(m[0]).double(), shape)
        * affine_norm(nn.Sequential(m[2]).double(), (6, 10, 10))
        * norm2(m[5].weight)
    )
    assert warm.value == pytest.approx(truth, rel=1e-3)
    assert warm.value <= truth * (1 + 1e-5)


def test_certified_result_state_is_accepted_for_warm_start():
    m = init_(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)), 15)
    cert = lipreg.autolip(m, (20,))
    assert set(cert.state) == {"0", "2"}
    cold = lipreg.autolip(m, (20,), certify=False, tol=1e-8)
    warm = lipreg.autolip(m, (20,), certify=False, state=cert.state, tol=1e-8)
    assert warm.n_iter <= 3 * len(cert.state)
    assert warm.n_iter < cold.n_iter
    assert warm.value == pytest.approx(norm2(m[0].weight) * norm2(m[2].weight), rel=1e-5)


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        a = F.relu(self.conv(x))
        b = F.relu(self.conv(F.max_pool2d(x, 2)))
        return torch.cat([a.flatten(1), b.flatten(1)], dim=1)


def test_warm_start_with_a_module_used_at_two_input_sizes():
    m = init_(SharedConv(), 16)
    cold = lipreg.autolip(m, (1, 8, 8), certify=False)
    warm = lipreg.autolip(m, (1, 8, 8), certify=False, state=cold.state)
    assert warm.value == pytest.approx(cold.value, rel=1e-3)


def test_shared_conv_value_is_sound():
    m = init_(SharedConv(), 16).double()
    r = lipreg.autolip(m, (1, 8, 8), dtype=F64)
    assert max_jac_norm(m, (1, 8, 8), 10, 1) <= r.value


# --------------------------------------------------------------------------------------------
# Result object
# --------------------------------------------------------------------------------------------


def test_result_fields():
    m = init_(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2)).double(), 17)
    r = lipreg.autolip(m, (5,), dtype=F64)
    assert float(r) == r.value
    assert r.kind == "upper" and r.certified and r.method == "autolip"
    assert [lb.kind for lb in r.layers] == ["affine", "activation", "affine"]
    assert all(lb.certified for lb in r.layers)
    assert math.prod(lb.value for lb in r.layers) == pytest.approx(r.value, rel=1e-12)
    assert r.layers[0].value == pytest.approx(norm2(m[0].weight), rel=REL)
    assert r.estimate == pytest.approx(r.value, rel=1e-12)
    assert r.time_s >= 0 and r.n_iter == sum(lb.n_iter for lb in r.layers)
    assert "autolip" in r.summary()
    e = lipreg.autolip(m, (5,), certify=False)
    assert e.kind == "estimate" and not e.certified and e.n_iter > 0
    assert any("certify=False" in n for n in e.notes)


def test_uncertifiable_layer_warns_and_reports_estimate():
    class MatMul(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3, generator=gen(0), dtype=F64))

        def forward(self, x):
            return torch.relu(torch.matmul(x, self.w))  # generic affine: no structured bound

    m = MatMul()
    with pytest.warns(UserWarning, match="could not certify"):
        r = lipreg.autolip(m, (3,), dense_limit=0, dtype=F64, tol=1e-10)
    assert r.kind == "estimate" and not r.certified
    assert r.value == pytest.approx(norm2(m.w), rel=1e-7)
    # with materialisation allowed it is certified
    r = lipreg.autolip(m, (3,), dtype=F64)
    assert r.certified and r.value >= norm2(m.w)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


CNN_28 = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 26 * 26, 3))


@pytest.mark.parametrize(
    "shape",
    [(1, -28, 28), (1, 0, 28), [[1, 28, 28]], (), None, "1x28x28", (1.0, 28, 28), (True, 28, 28)],
    ids=["negative", "zero", "list-of-lists", "empty", "none", "string", "float", "bool"],
)
def test_invalid_input_shape_raises_value_error(shape):
    with pytest.raises(ValueError, match="input_shape"):
        lipreg.autolip(CNN_28, shape)


def test_missing_channel_dimension_is_reported():
    with pytest.raises(RuntimeError, match="input_shape"):
        lipreg.autolip(CNN_28, (28, 28))


def test_missing_channel_dimension_with_two_channels_is_reported():
    m = nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    with pytest.raises((RuntimeError, ValueError), match="input_shape"):
        lipreg.autolip(m, (8, 8))


def test_valid_shape_spellings_are_accepted():
    m = nn.Sequential(nn.Linear(4, 2))
    for shape in (4, (4,), [4], torch.Size([4])):
        r = lipreg.autolip(m, shape)
        assert r.value == pytest.approx(norm2(m[0].weight), rel=REL)


class ReturnsTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x), x


class ReturnsDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return {"out": self.fc(x)}


@pytest.mark.parametrize("model,word", [(ReturnsTuple(), "tuple"), (ReturnsDict(), "dict")])
def test_non_tensor_output_raises(model, word):
    with pytest.raises(TypeError, match=f"output is a .*{word}"):
        lipreg.autolip(model, (3,))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_raise(bad):
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        m[2].weight[0, 1] = bad
    with pytest.raises(ValueError, match=r"NaN/Inf.*2\.weight"):
        lipreg.autolip(m, (3,))


def test_non_finite_buffer_raises():
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).eval()
    m[1].running_var[0] = float("nan")
    with pytest.raises(ValueError, match="running_var"):
        lipreg.autolip(m, (3,))


def test_empty_sequential_raises():
    with pytest.raises(ValueError, match="empty"):
        lipreg.autolip(nn.Sequential(), (3,))


def test_batch_mixing_raises():
    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x).view(-1)

    with pytest.raises(lipreg.UnsupportedOperationError, match="mixes the samples"):
        lipreg.autolip(Mix(), (3,))


def test_not_a_module_raises():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        lipreg.autolip(lambda x: x, (3,))


def test_untraceable_model_raises_trace_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return x

    with pytest.raises(lipreg.TraceError, match="could not trace"):
        lipreg.autolip(DataDependent(), (3,))


@pytest.mark.parametrize(
    "kw", [{"dtype": torch.float16}, {"method": "foo"}, {"tol": 0.0}, {"max_iter": 0}]
)
def test_invalid_options_raise_when_iterations_run(kw):
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    with pytest.raises(ValueError):
        lipreg.autolip(m, (3,), certify=False, **kw)


@pytest.mark.parametrize("kw", [{"method": "foo"}, {"tol": -1.0}, {"max_iter": 0}])
def test_invalid_options_raise_even_when_certifying(kw):
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    with pytest.raises(ValueError):
        lipreg.autolip(m, (3,), **kw)


def test_float64_model_with_float32_iterations_stays_sound():
    m = nn.Sequential(nn.Linear(4, 3, bias=False)).double()
    with torch.no_grad():
        m[0].weight.fill_(1 + 3e-8)  # rounds down to 1.0 in float32
    r = lipreg.autolip(m, (4,))
    assert r.certified
    assert r.value >= norm2(m[0].weight)


# ---------------------------------------------------------------------------------------------
# Non-finite values are never reported (issue 7): ValueError mentioning "non-finite"
# ---------------------------------------------------------------------------------------------


class NaNScale(nn.Module):
    """A NaN in a plain tensor attribute (neither parameter nor buffer) used by forward."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.scale = torch.tensor(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)) * self.scale)


class NaNRuleAct(nn.Module):
    """An activation whose registered rule claims a NaN Lipschitz constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


lipreg.register_rule(NaNRuleAct, lambda ctx: lipreg.Nonlinear(float("nan")))


def nan_rule_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), NaNRuleAct(), nn.Linear(4, 2))


def overflow_net() -> nn.Module:
    """Finite float64 weights whose AutoLip product (~1e400) overflows float64."""
    m = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3)).double()
    with torch.no_grad():
        m[0].weight.fill_(1e200)
        m[2].weight.fill_(1e200)
    return m


ESTIMATORS = {
    "autolip": lambda m, s: lipreg.autolip(m, s),
    "autolip-uncertified": lambda m, s: lipreg.autolip(m, s, certify=False),
    "seqlip-exact": lambda m, s: lipreg.seqlip(m, s, method="exact"),
    "seqlip-greedy": lambda m, s: lipreg.seqlip(m, s),
}
NONFINITE_NETS = {
    "nan-attribute": (lambda: NaNScale(math.nan), (4,)),
    "inf-attribute": (lambda: NaNScale(math.inf), (4,)),
    "nan-rule": (nan_rule_net, (3,)),
    "overflow": (overflow_net, (3,)),
}


@pytest.mark.parametrize("estimate", ESTIMATORS.values(), ids=ESTIMATORS.keys())
@pytest.mark.parametrize("make,shape", NONFINITE_NETS.values(), ids=NONFINITE_NETS.keys())
def test_non_finite_values_raise_never_a_bound(make, shape, estimate):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="non-finite"):
            estimate(make(), shape)


def test_check_finite_result_inspects_total_and_layers():
    from lipreg.functional.autolip import check_finite_result
    from lipreg.functional.results import LayerBound, LipschitzResult

    def layer(estimate: float) -> LayerBound:
        return LayerBound(
            name="fc",
            kind="affine",
            value=2.0,
            certified=True,
            estimate=estimate,
            upper=2.0,
            method="dense",
        )

    def result(value: float, kind: str, layers: list, **kw) -> LipschitzResult:
        return LipschitzResult(value=value, kind=kind, method="autolip", layers=layers, **kw)

    ok = layer(2.0)
    check_finite_result(result(2.0, "upper", [ok]))
    bad_layer = layer(math.nan)
    for bad in (
        result(math.nan, "upper", [ok]),
        result(math.inf, "estimate", [ok]),
        result(2.0, "upper", [ok], estimate=math.inf),
        result(2.0, "upper", [bad_layer]),
    ):
        with pytest.raises(ValueError, match="non-finite"):
            check_finite_result(bad)


def test_large_finite_weights_stay_certified():
    """Power-of-two scaling: 1e150 weights give a finite certified 1e150-scale bound."""
    m = nn.Sequential(nn.Linear(3, 3, bias=False)).double()
    with torch.no_grad():
        m[0].weight.copy_(torch.randn(3, 3, generator=gen(5), dtype=F64) * 1e150)
    r = lipreg.autolip(m, (3,))
    exact = norm2(m[0].weight / 1e150) * 1e150
    assert r.certified and exact * (1 - 1e-14) <= r.value <= exact * (1 + 1e-7)


def test_one_certified_call_traces_once(monkeypatch):
    """The float32 estimate and the float64 certificates share one torch.fx trace."""
    calls = []
    original = torch.fx.Tracer.trace

    def counting(self, root, *args, **kwargs):
        calls.append(type(root).__name__)
        return original(self, root, *args, **kwargs)

    monkeypatch.setattr(torch.fx.Tracer, "trace", counting)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    result = lipreg.autolip(net, (1, 4, 4), dense_limit=0)  # per-op certificates: float64 specs
    assert result.certified
    assert len(calls) == 1, calls
    calls.clear()
    lipreg.seqlip(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), (3,), method="exact")
    assert len(calls) == 1, calls


def test_chain_names_are_the_common_module_path_and_the_members():
    from lipreg.functional.chains import chain_name

    assert chain_name(["features.0"]) == "features.0"
    assert (
        chain_name(["model.layer2.0.downsample.0", "model.layer2.0.downsample.1"])
        == "model.layer2.0.downsample[0+1]"
    )
    assert chain_name(["conv1", "bn1"]) == "conv1+bn1"
    assert chain_name(["a.b", "a"]) == "a.b+a"  # every member keeps a part after the prefix
    assert chain_name(["l.0.c", "l.0.b", "l.1.c"]) == "l[0.c+0.b+1.c]"

    net = torch.nn.Sequential(
        OrderedDict(
            stem=torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)),
            act=torch.nn.ReLU(),
            head=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3)),
        )
    ).eval()
    r = lipreg.autolip(net, (1, 6, 6))
    assert [lb.name for lb in r.layers] == ["stem[0+1]", "act", "head[0+1]"]
    assert {k for k in r.state if "#" not in k} == {"stem[0+1]", "head[0+1]"}
    s = lipreg.seqlip(net, (1, 6, 6))
    assert s.layers[0].name == "stem[0+1] | act | head[0+1]"


# --------------------------------------------------------------------------------------------
# Caller's certificate ladder (ladder=)
# --------------------------------------------------------------------------------------------


def test_ladder_keyword_puts_a_callers_entry_first():
    from lipreg.functional.ladder import LADDER

    m = init_(nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2)).double(), 3)
    seen: list[str] = []

    def declines(ctx):  # records the chain and lets the default ladder answer
        seen.append(ctx.chain.name)
        return None

    r = lipreg.autolip(m, (5,), dtype=F64, ladder=[declines, *LADDER])
    assert seen == ["0", "2"]
    assert r.certified and r.value == lipreg.autolip(m, (5,), dtype=F64).value

    def answers(ctx):  # an uncertified constant: used, and the result becomes an estimate
        return lipreg.LayerBound(name=ctx.chain.name, kind="affine", value=2.0, certified=False)

    with pytest.warns(UserWarning, match="could not certify"):
        r = lipreg.AutoLip(m, (5,), dtype=F64, ladder=[answers])()
    assert r.value == pytest.approx(4.0) and not r.certified
