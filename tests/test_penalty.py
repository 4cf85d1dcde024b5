"""Tests of ``lipreg.LipschitzPenalty`` (differentiable AutoLip with warm power iteration).

Ground truths, independent of lipreg's estimators: ``torch.linalg.matrix_norm`` /
``torch.linalg.svd`` of the weights; for convolutions, the float64 dense matrix of the
bias-free map (BatchNorm folded in) built by applying ``F.conv2d`` to the identity basis,
with its exact ``torch.linalg.svdvals``; ``torch.autograd.gradcheck`` for the gradients.
``lipreg.autolip(..., certify=True)`` is used as a second reference where the brief asks.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import lipreg
from lipreg import LipschitzPenalty
from tests.helpers import Residual, gen, init_weights

try:  # tests/ as a package (tests/__init__.py) or as a plain directory on sys.path
    from tests._lightning_helpers import D_IN, RegressionModule, make_mlp, regression_data
except ModuleNotFoundError:
    from _lightning_helpers import D_IN, RegressionModule, make_mlp, regression_data

torch.set_num_threads(1)

F64 = torch.float64
CNN_INPUT = (2, 8, 8)


# ---------------------------------------------------------------- models and truths
def init_(model: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    return init_weights(model, seed, scale=scale)


def mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    return init_(net.to(dtype), seed)


def cnn(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Sequential:
    """Conv2d(stride 2, padding 1) -> BatchNorm2d (eval, non-trivial stats) -> ReLU ->
    Flatten -> Linear."""
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 4),
    ).to(dtype)
    init_(net, seed)
    g = gen(seed + 100)
    bn = net[1]
    with torch.no_grad():
        bn.weight.copy_(torch.rand(3, generator=g, dtype=F64) + 0.5)
        bn.running_mean.copy_(torch.randn(3, generator=g, dtype=F64))
        bn.running_var.copy_(torch.rand(3, generator=g, dtype=F64) * 2 + 0.3)
    return net.eval()


def matrix_norm(w: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(w.detach().to(F64), 2).item()


def linear_norms(net: nn.Module) -> list[float]:
    return [matrix_norm(m.weight) for m in net.modules() if isinstance(m, nn.Linear)]


def folded_conv_bn(net: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """Bias-free BN∘conv of ``cnn()``: its kernel with the BN scale folded in, and that
    scale, in float64."""
    conv, bn = net[0], net[1]
    scale = bn.weight.detach().to(F64) / torch.sqrt(bn.running_var.detach().to(F64) + bn.eps)
    return conv.weight.detach().to(F64) * scale[:, None, None, None], scale


def conv_bn_operator_norm(net: nn.Sequential) -> float:
    """Exact ‖BN∘conv‖₂ at the real input shape: svdvals of the dense matrix."""
    kernel, _ = folded_conv_bn(net)
    n = math.prod(CNN_INPUT)
    basis = torch.eye(n, dtype=F64).reshape(n, *CNN_INPUT)
    columns = F.conv2d(basis, kernel, None, stride=2, padding=1).reshape(n, -1)
    return torch.linalg.svdvals(columns.T)[0].item()


def converge(penalty: LipschitzPenalty, calls: int = 300) -> torch.Tensor:
    penalty.train()
    with torch.no_grad():
        for _ in range(calls):
            value = penalty()
    return value


# ---------------------------------------------------------------- 7. state and buffers
@pytest.mark.parametrize(
    ("make", "shape", "in_features", "chains", "buffers"),
    [
        (mlp, (5,), [5, 7, 6], ["0", "2", "4"], ["v_0", "v_2", "v_4"]),
        (cnn, CNN_INPUT, [2 * 8 * 8, 3 * 4 * 4], ["0+1", "3+4"], ["v_0_1", "v_3_4"]),
    ],
    ids=["mlp", "cnn"],
)
def test_state_dict_has_one_vector_per_merged_affine_map(make, shape, in_features, chains, buffers):
    net = make()
    penalty = LipschitzPenalty(net, shape)
    # MLP: 3 Linear; CNN: conv+BN merged, flatten+Linear merged; buffers named by chain
    assert penalty.chain_names == chains
    assert list(penalty.state_dict()) == [*buffers, "_extra_state"]
    assert penalty.state_dict()["_extra_state"] == {
        "version": 2,
        "chains": chains,
        "buffers": buffers,
    }
    for name, n in zip(buffers, in_features, strict=True):
        v = penalty.state_dict()[name]
        assert v.numel() == n
        assert v.norm().item() == pytest.approx(1.0, rel=1e-5)
    # The model is referenced, not registered.
    assert list(penalty.parameters()) == []
    assert list(penalty.children()) == []
    assert penalty.model is net


def test_owner_state_dict_holds_weights_once_and_the_vectors():
    net = mlp()
    owner = RegressionModule(net, penalty=LipschitzPenalty(net, (5,)))
    keys = list(owner.state_dict())
    assert sorted(k for k in keys if not k.startswith("penalty.")) == sorted(
        f"net.{k}" for k in net.state_dict()
    )
    assert sorted(k for k in keys if k.startswith("penalty.")) == [
        "penalty._extra_state",
        "penalty.v_0",
        "penalty.v_2",
        "penalty.v_4",
    ]
    assert len(list(owner.parameters())) == len(list(net.parameters()))


def test_buffers_follow_to_and_round_trip_through_load_state_dict():
    net = mlp()
    penalty = LipschitzPenalty(net, (5,), seed=1)
    assert all(b.dtype == torch.float32 for b in penalty.buffers())
    penalty.to(F64)
    assert all(b.dtype == F64 for b in penalty.buffers())
    penalty.to(torch.device("cpu"))
    assert all(b.device.type == "cpu" for b in penalty.buffers())

    other = LipschitzPenalty(net, (5,), seed=7)  # another cold start: other vectors
    assert not all(
        torch.equal(a, b.to(F64)) for a, b in zip(penalty.buffers(), other.buffers(), strict=True)
    )
    other.to(F64)
    other.load_state_dict(penalty.state_dict())
    for name, v in penalty.named_buffers():
        assert torch.equal(other.get_buffer(name), v), name
    penalty.eval()
    other.eval()
    assert torch.equal(penalty(), other())

    meta = LipschitzPenalty(net, (5,)).to("meta")  # a real device move of the buffers
    assert all(b.device.type == "meta" for b in meta.buffers())


# ---------------------------------------------------------------- 8. train vs eval
def _perturb_(net: nn.Module, seed: int) -> None:
    g = gen(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.add_(0.5 * torch.randn(m.weight.shape, generator=g, dtype=m.weight.dtype))


def _top_right_vectors(net: nn.Module) -> list[torch.Tensor]:
    return [
        torch.linalg.svd(m.weight.detach().to(F64))[2][0]
        for m in net.modules()
        if isinstance(m, nn.Linear)
    ]


def test_training_mode_refreshes_buffers_eval_mode_does_not():
    net = mlp()
    penalty = LipschitzPenalty(net, (5,), weight=1.0, form="linear")
    penalty.eval()
    before = {k: v.clone() for k, v in penalty.named_buffers()}
    value_before = penalty()

    _perturb_(net, seed=3)
    out1, out2 = penalty(), penalty()
    for k, v in penalty.named_buffers():  # eval: vectors untouched
        assert torch.equal(v, before[k]), k
    assert torch.equal(out1, out2)  # repeated eval calls give the same output
    assert not torch.equal(out1, value_before)  # ... which reads the current weights

    truth = _top_right_vectors(net)
    penalty.train()
    penalty()
    after = dict(penalty.named_buffers())
    for name, v_true in zip(penalty.buffer_names, truth, strict=True):
        # train: vectors move towards the new top vectors
        old, new = before[name].to(F64), after[name].to(F64)
        assert not torch.equal(after[name], before[name]), name
        assert abs(new @ v_true) > abs(old @ v_true), name


def test_zero_power_iterations_never_update_buffers():
    net = mlp()
    penalty = LipschitzPenalty(net, (5,), n_power_iterations=0)
    before = {k: v.clone() for k, v in penalty.named_buffers()}
    _perturb_(net, seed=4)
    penalty.train()
    penalty()
    for k, v in penalty.named_buffers():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- 9. gradcheck
class PenaltyOwner(nn.Module):
    def __init__(self, model: nn.Module, penalty: LipschitzPenalty) -> None:
        super().__init__()
        self.model = model
        self.penalty = penalty

    def forward(self) -> torch.Tensor:
        return self.penalty()


@pytest.mark.parametrize("form", ["linear", "log", "hinge"])
@pytest.mark.parametrize(("make", "shape"), [(mlp, (5,)), (cnn, CNN_INPUT)], ids=["mlp", "cnn"])
def test_gradcheck_wrt_weights(make, shape, form):
    net = make(F64)
    target = None
    if form == "hinge":  # below the value: the hinge is active
        target = 0.5 * LipschitzPenalty(net, shape, weight=1.0, form="linear").eval()().item()
    penalty = LipschitzPenalty(net, shape, weight=0.7, form=form, target=target).eval()
    owner = PenaltyOwner(net, penalty)
    names = [n for n, _ in owner.named_parameters()]
    assert names and all(n.startswith("model.") for n in names)
    params = tuple(p.detach().clone().requires_grad_() for _, p in owner.named_parameters())
    buffers = {k: v.clone() for k, v in penalty.named_buffers()}

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(owner, dict(zip(names, ps, strict=True)), ())

    value = f(*params)
    assert value.dtype == F64 and value.item() > 0
    grads = torch.autograd.grad(value, params, allow_unused=True)
    weight_grads = [g for n, g in zip(names, grads, strict=True) if n.endswith("weight")]
    assert all(g is not None and g.abs().sum() > 0 for g in weight_grads[:1])
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6, rtol=1e-4)
    for k, v in penalty.named_buffers():  # eval mode: the vectors stayed fixed
        assert torch.equal(v, buffers[k]), k


# ---------------------------------------------------------------- 10. values vs truth
def test_linear_form_converges_to_autolip_on_mlp():
    net = mlp()
    penalty = LipschitzPenalty(net, (5,), weight=1.0, form="linear")
    value = converge(penalty).item()
    truth = math.prod(linear_norms(net))
    assert value == pytest.approx(lipreg.autolip(net, (5,), certify=True).value, rel=1e-4)
    assert value == pytest.approx(truth, rel=1e-4)


def test_linear_form_uses_the_conv_operator_norm_not_the_reshaped_kernel():
    net = cnn()
    penalty = LipschitzPenalty(net, CNN_INPUT, weight=1.0, form="linear")
    value = converge(penalty).item()
    certified = lipreg.autolip(net, CNN_INPUT, certify=True)
    assert certified.certified
    assert value == pytest.approx(certified.value, rel=1e-4)

    conv_bn = conv_bn_operator_norm(net)
    lin = matrix_norm(net[4].weight)
    assert value == pytest.approx(conv_bn * lin, rel=1e-4)
    sigmas = penalty.eval().layer_norms()
    first, second = (sigmas[name].item() for name in penalty.chain_names)
    assert first == pytest.approx(conv_bn, rel=1e-4)
    assert second == pytest.approx(lin, rel=1e-4)
    # torch's spectral_norm quantity: the reshaped (out, in*k*k) kernel, BN folded in.
    kernel, _ = folded_conv_bn(net)
    reshaped = matrix_norm(kernel.reshape(kernel.shape[0], -1))
    assert abs(first - reshaped) / reshaped > 0.02


def test_log_form_is_weighted_sum_of_log_layer_norms():
    net = mlp(seed=5)
    penalty = LipschitzPenalty(net, (5,), weight=0.5, form="log")
    value = converge(penalty).item()
    truth = 0.5 * sum(math.log(s) for s in linear_norms(net))
    assert value == pytest.approx(truth, rel=1e-4, abs=1e-6)


def test_hinge_form_is_zero_below_target_and_shifted_above():
    net = mlp()
    lip = math.prod(linear_norms(net))
    above = LipschitzPenalty(net, (5,), weight=2.0, form="hinge", target=2 * lip)
    assert converge(above).item() == 0.0
    below = LipschitzPenalty(net, (5,), weight=2.0, form="hinge", target=0.25 * lip)
    assert converge(below).item() == pytest.approx(2.0 * 0.75 * lip, rel=1e-4)


# ---------------------------------------------------------------- 11. gradient = u vᵀ
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_linear_form_gradient_is_product_of_top_singular_vectors(dtype):
    net = mlp(dtype, seed=2)
    penalty = LipschitzPenalty(net, (5,), weight=1.0, form="linear")
    converge(penalty)
    penalty.eval()
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    grads = torch.autograd.grad(penalty(), [m.weight for m in linears])
    norms = linear_norms(net)
    for i, (m, g) in enumerate(zip(linears, grads, strict=True)):
        u, _, vh = torch.linalg.svd(m.weight.detach().to(F64))
        others = math.prod(n for j, n in enumerate(norms) if j != i)
        expected = others * torch.outer(u[:, 0], vh[0])  # sign-invariant
        err = torch.linalg.matrix_norm(g.to(F64) - expected) / torch.linalg.matrix_norm(expected)
        assert err.item() < 1e-3, (i, err.item())


# ---------------------------------------------------------------- 12. training lowers L
def _fit(penalty_weight: float | None) -> float:
    pl.seed_everything(0, verbose=False)
    net = make_mlp((6, 32, 32, 3))
    penalty = (
        LipschitzPenalty(net, (6,), weight=penalty_weight, form="linear")
        if penalty_weight is not None
        else None
    )
    module = RegressionModule(net, lr=0.05, penalty=penalty)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=20,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(regression_data(64, seed=1), batch_size=16))
    assert trainer.global_step == 80
    assert all(torch.isfinite(p).all() for p in net.parameters())
    result = lipreg.autolip(net, (6,), certify=True)
    assert result.certified
    return result.value


def test_training_with_the_penalty_lowers_the_certified_bound():
    plain = _fit(None)
    penalised = _fit(0.1)
    assert penalised < 0.8 * plain, (penalised, plain)


# ---------------------------------------------------------------- 13. bad input
@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "lower_bound"},
        {"method": "SeqLip"},
        {"form": "hinge"},
        {"form": "hinge", "target": 0.0},
        {"form": "squared"},
        {"weight": -1e-3},
        {"weight": math.nan},
        {"n_power_iterations": -1},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        LipschitzPenalty(mlp(), (5,), **kwargs)


def test_seqlip_method_rejects_a_residual_network():
    # The brief asked for method="seqlip" -> ValueError; penalty.py has since gained a
    # (sequential-only) SeqLip penalty, so the error remains for non-sequential graphs.
    with pytest.raises(ValueError, match="sequential"):
        LipschitzPenalty(Residual(), (6,), method="seqlip")
    LipschitzPenalty(Residual(), (6,), method="autolip")  # AutoLip handles it


# ---------------------------------------------------------------- functional-style models
class FunctionalMLP(nn.Module):
    """Parameters used through ``F.linear`` (fx ``get_attr`` nodes), not ``nn.Linear``."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        g = gen(11)
        self.w1 = nn.Parameter(torch.randn(7, 5, generator=g, dtype=dtype) * 0.5)
        self.b1 = nn.Parameter(torch.randn(7, generator=g, dtype=dtype) * 0.5)
        self.w2 = nn.Parameter(torch.randn(3, 7, generator=g, dtype=dtype) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2)


def _functional_truth(net: FunctionalMLP) -> float:
    return matrix_norm(net.w1) * matrix_norm(net.w2)


def test_functional_model_sees_in_place_updates():
    net = FunctionalMLP()
    penalty = LipschitzPenalty(net, (5,), weight=1.0, form="linear")
    assert converge(penalty).item() == pytest.approx(_functional_truth(net), rel=1e-4)
    penalty.eval()
    before = penalty().item()
    with torch.no_grad():
        net.w1.mul_(2.0)  # what optimizers do: same Parameter object
    assert penalty().item() == pytest.approx(2.0 * before, rel=1e-6)


def test_functional_model_sees_replaced_parameters():
    net = FunctionalMLP()
    penalty = LipschitzPenalty(net, (5,), weight=1.0, form="linear").eval()
    before = penalty().item()
    net.load_state_dict({k: 2.0 * v for k, v in net.state_dict().items()}, assign=True)
    assert penalty().item() == pytest.approx(4.0 * before, rel=1e-6)  # fixed v: exactly 4x


def test_functional_model_gradcheck_via_functional_call():
    net = FunctionalMLP(F64)
    penalty = LipschitzPenalty(net, (5,), weight=1.0, form="linear").eval()
    owner = PenaltyOwner(net, penalty)
    names = [n for n, _ in owner.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in owner.named_parameters())

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(owner, dict(zip(names, ps, strict=True)), ())

    doubled = f(*(2.0 * p.detach() for p in params)).item()
    assert doubled == pytest.approx(4.0 * f(*params).item(), rel=1e-9)
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_penalty_follows_model_converted_to_float64():
    net = mlp()
    penalty = LipschitzPenalty(net, (5,), weight=1.0, form="linear")
    net.double()
    penalty.double()
    assert all(b.dtype == F64 for b in penalty.buffers())
    assert penalty().dtype == F64


# ---------------------------------------------------------------- 11. composition and state
class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a downsampling shortcut, ReLU, then a concatenation of a
    Linear head and a scaled copy: Combine "sum" and Combine "l2" in one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1, stride=2), nn.BatchNorm2d(3)
        self.down = nn.Sequential(nn.Conv2d(2, 3, 1, stride=2), nn.BatchNorm2d(3))
        self.head = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + self.down(x))
        return torch.cat([self.head(y.flatten(1)), 0.5 * y.flatten(1)], 1)


def residual_block() -> ResidualBlock:
    net = init_(ResidualBlock().double(), seed=11)
    g = gen(12)
    for bn in (net.bn1, net.bn2, net.down[1]):
        bn.running_mean.copy_(torch.randn(3, generator=g, dtype=F64))
        bn.running_var.copy_(torch.rand(3, generator=g, dtype=F64) + 0.5)
    return net.eval()


def test_lipschitz_estimate_is_the_autolip_composition_on_a_branching_net():
    """Same per-chain sigmas: the tensor walk equals the float walk of ``lipreg.autolip``'s
    composition routine and the hand-written formula of this graph."""
    from lipreg.functional.analysis import analyse
    from lipreg.functional.chains import find_affine_chains
    from lipreg.functional.compose import propagate

    net = residual_block()
    penalty = LipschitzPenalty(net, (2, 6, 6), weight=1.0, form="linear").eval()
    names = penalty.chain_names
    # module chains by module path; the flatten nodes' labels belong to the graph analysis
    assert names[:3] == ["conv1+bn1", "conv2+bn2", "down[0+1]"] and len(names) == 5
    head, scaled = names[3], names[4]
    assert head.endswith("+head") and scaled.endswith("+mul"), names
    sigmas = penalty.layer_norms()
    value = penalty.lipschitz_estimate(sigmas)
    assert value.dtype == F64 and value.requires_grad

    s = {k: float(v.detach()) for k, v in sigmas.items()}
    analysis = analyse(net, (2, 6, 6), dtype=F64)
    chains = find_affine_chains(analysis)
    floats = propagate(analysis, chains, lambda chain: s[chain.name], 1.0)
    assert value.item() == pytest.approx(floats[analysis.output_node], rel=1e-14)
    y = s["conv2+bn2"] * s["conv1+bn1"] + s["down[0+1]"]  # ReLUs: slope 1
    truth = math.sqrt((s[head] * y) ** 2 + (s[scaled] * y) ** 2)
    assert value.item() == pytest.approx(truth, rel=1e-14)
    assert s[scaled] == pytest.approx(0.5, rel=1e-14)
    # converged sigmas give the certified AutoLip value of the same walk
    converge(penalty.train(), calls=60)
    certified = lipreg.autolip(net, (2, 6, 6))
    assert penalty.eval().lipschitz_estimate().item() == pytest.approx(certified.value, rel=1e-6)
    assert {lb.name for lb in certified.layers if lb.kind == "affine"} == set(names)


def test_loading_another_architectures_state_raises_naming_the_chains():
    penalty = LipschitzPenalty(mlp(), (5,))
    other = LipschitzPenalty(cnn(), CNN_INPUT)
    with pytest.raises(ValueError, match=r"another network") as info:
        other.load_state_dict(penalty.state_dict())
    message = str(info.value)
    assert "['0', '2', '4']" in message and "['0+1', '3+4']" in message
    newer = {**penalty.state_dict(), "_extra_state": {"version": 3, "chains": ["0", "2", "4"]}}
    with pytest.raises(ValueError, match="version 3"):
        LipschitzPenalty(mlp(), (5,)).load_state_dict(newer)


def test_version_1_state_dict_with_positional_vectors_still_loads():
    net = mlp()
    penalty = LipschitzPenalty(net, (5,), seed=1)
    old = {f"v_{i}": v.clone() for i, v in enumerate(penalty.buffers())}  # format version 1
    owner_old = {f"penalty.{k}": v for k, v in old.items()}
    fresh = LipschitzPenalty(net, (5,), seed=7)
    fresh.load_state_dict(old)
    for name, v in penalty.named_buffers():
        assert torch.equal(fresh.get_buffer(name), v), name
    owner = RegressionModule(net, penalty=LipschitzPenalty(net, (5,), seed=7))
    owner.load_state_dict({**{f"net.{k}": v for k, v in net.state_dict().items()}, **owner_old})
    for name, v in penalty.named_buffers():
        assert torch.equal(owner.penalty.get_buffer(name), v), name

    with pytest.raises(ValueError, match=r"2 positional vectors.*3 chains"):
        fresh.load_state_dict({"v_0": old["v_0"], "v_1": old["v_1"]})
    wrong_size = {**old, "v_1": torch.ones(3)}
    with pytest.raises(ValueError, match=r"chain '2' has 3 entries.*has 7"):
        fresh.load_state_dict(wrong_size)


# ---------------------------------------------------------------- FSDP2 on one rank
def _prelu_cnn() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.PReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)
    )


def _fully_shard_each_layer(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in reversed(list(model.modules())[1:]):
        if isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm2d | nn.PReLU):
            fully_shard(m)
    fully_shard(model)
    return model


@pytest.mark.usefixtures("one_rank_group")
def test_one_rank_fully_shard_penalty_matches_the_plain_model():
    """A 1-rank FSDP2 model (DTensor parameters, the sharded path) against the plain model
    with the same weights: penalty values, gradients of loss + penalty and ``v`` over two SGD
    steps; the state dict has the plain keys and plain tensors (the 2-rank version is
    tests/test_penalty_fsdp.py)."""
    sharded, plain = _fully_shard_each_layer(_prelu_cnn()), _prelu_cnn()
    penalties = [
        LipschitzPenalty(m, CNN_INPUT, form="linear", weight=0.1) for m in (sharded, plain)
    ]
    assert penalties[0]._analysis.sharded and not penalties[1]._analysis.sharded
    x = torch.randn(3, *CNN_INPUT, generator=gen(5))
    for _ in range(2):
        values = []
        for model, penalty in zip((sharded, plain), penalties, strict=True):
            pen = penalty()
            (model(x).pow(2).mean() + pen).backward()
            values.append(pen.item())
        assert values[0] == pytest.approx(values[1], rel=1e-6)
        for p, q in zip(sharded.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-6, atol=1e-9)
        for name in penalties[1].buffer_names:
            torch.testing.assert_close(getattr(penalties[0], name), getattr(penalties[1], name))
        with torch.no_grad():
            for p, q in zip(sharded.parameters(), plain.parameters(), strict=True):
                p.sub_(0.5 * p.grad)
                q.sub_(0.5 * q.grad)
                p.grad = q.grad = None
    states = [p.state_dict() for p in penalties]
    assert list(states[0]) == list(states[1])
    assert all(type(t) is torch.Tensor for k, t in states[0].items() if k.startswith("v_"))


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")  # one rank: expected
@pytest.mark.filterwarnings("ignore:lipreg gathers the FSDP unit of the root")  # root-only: idem
def test_sharded_models_refuse_fsdp1_the_seqlip_forms_and_mixed_precision():
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = FullyShardedDataParallel(make_mlp(), device_id=torch.device("cpu"))
    with pytest.raises(NotImplementedError, match="fully_shard"):
        LipschitzPenalty(wrapped, (D_IN,))
    for method in ("seqlip", "lipsdp"):
        with pytest.raises(NotImplementedError, match="method='autolip'"):
            LipschitzPenalty(_fully_shard_each_layer(make_mlp()), (D_IN,), method=method)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mixed = fully_shard(make_mlp(), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    with pytest.raises(NotImplementedError, match="mixed-precision"):
        LipschitzPenalty(mixed, (D_IN,))
