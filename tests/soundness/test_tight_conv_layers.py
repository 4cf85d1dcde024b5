"""Per-chain certificates of conv + batch-norm chains (ladder entry ``merged_conv_chain``):
sound against each chain's dense float64 norm and the harness's oracle lower bound, tight
(within 0.1 % of the true norm), chosen by the ladder, and honest about memory fallbacks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipreg
from lipreg.functional import ladder
from lipreg.functional.analysis import analyse
from lipreg.functional.chains import chain_linear_map, find_affine_chains
from tests.helpers import init_weights
from tests.soundness.harness import check_soundness

TIGHT = {"conv-gram", "conv-pointwise", "fft-merged"}  # the torus one: within 0.1 %


def _bn(c: int, dim: int) -> nn.Module:
    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dim - 1](c)


def _conv(dim: int, *args, **kwargs) -> nn.Module:
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1](*args, **kwargs)


def _net(dim: int) -> nn.Sequential:
    """BN → conv → BN chains: plain, strided, dilated, depthwise, pointwise; then a head."""
    return nn.Sequential(
        _bn(3, dim),
        _conv(dim, 3, 6, 3, padding=1),
        _bn(6, dim),
        nn.ReLU(),
        _conv(dim, 6, 8, 3, stride=2, padding=1, bias=False),
        _bn(8, dim),
        nn.ReLU6(),
        _conv(dim, 8, 8, 3, padding=2, dilation=2, groups=8),
        _bn(8, dim),
        nn.Tanh(),
        _conv(dim, 8, 4, 1),
        _bn(4, dim),
        nn.Flatten(),
    )


SHAPES = {1: (3, 17), 2: (3, 9, 8), 3: (3, 5, 6, 5)}


def _model(dim: int, seed: int) -> nn.Module:
    model = _net(dim).double()
    init_weights(model, seed, scale=0.4, batchnorm_stats=True)
    return model.eval()


def _true_chain_norms(model: nn.Module, shape: tuple[int, ...]) -> dict[str, float]:
    analysis = analyse(model, shape, dtype=torch.float64)
    norms = {}
    for chain in find_affine_chains(analysis).values():
        matrix = chain_linear_map(analysis, chain).to_dense()
        norms[chain.name] = float(torch.linalg.matrix_norm(matrix, 2))
    return norms


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_bn_chains_are_tight_and_sound(dim: int, seed: int) -> None:
    model = _model(dim, seed)
    shape = SHAPES[dim]
    result = lipreg.autolip(model, shape, dense_limit=0)  # no chain is materialised
    truth = _true_chain_norms(model, shape)
    conv_layers = [layer for layer in result.layers if layer.kind == "affine"]
    assert len(conv_layers) == 4
    for layer in conv_layers:
        true = truth[layer.name]
        assert layer.certified and layer.method in TIGHT, (layer.name, layer.method)
        assert true <= layer.value <= true * (1 + 1.1e-3), (layer.name, layer.value, true)
    pointwise = conv_layers[-1]
    assert pointwise.method == "conv-pointwise"


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_harness_oracle(dim: int) -> None:
    """The whole network's certified AutoLip against the independent oracle lower bound."""
    model = _model(dim, seed=3)
    outcome = check_soundness(
        model,
        SHAPES[dim],
        label=f"tight-conv/{dim}d",
        families=[f"tight-conv/{dim}d"],
        names=["Conv"],
        autolip_kwargs={"dense_limit": 0},
    )
    assert outcome.ok, outcome.message
    assert outcome.status == "certified"


def test_tight_chains_never_exceed_the_old_product() -> None:
    """The new entry is at most the product of the op certificates it pre-empts."""
    model = _model(2, seed=4)
    new = lipreg.autolip(model, SHAPES[2], dense_limit=0)
    old_ladder = [e for e in ladder.LADDER if e is not ladder.merged_conv_chain]
    old_values = {}
    original = list(ladder.LADDER)
    try:
        ladder.LADDER[:] = old_ladder
        old = lipreg.autolip(model, SHAPES[2], dense_limit=0)
        old_values = {layer.name: layer.value for layer in old.layers}
    finally:
        ladder.LADDER[:] = original
    for layer in new.layers:
        assert layer.value <= old_values[layer.name] * (1 + 1e-12)
    assert new.value <= old.value


def test_chain_of_pointwise_convolutions() -> None:
    """A MobileNet-style projection (1×1 conv + BN) followed by the next expansion (1×1 conv +
    BN), no activation between: one chain, certified as the product of the kernel matrices."""
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 3, 1, bias=False),
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 8, 1, stride=2, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
    ).double()
    init_weights(model, 6, scale=0.5, batchnorm_stats=True)
    model.eval()
    shape = (4, 7, 7)
    result = lipreg.autolip(model, shape, dense_limit=0)
    truth = _true_chain_norms(model, shape)
    (layer,) = [layer for layer in result.layers if layer.method == "conv-pointwise-product"]
    assert truth[layer.name] <= layer.value <= truth[layer.name] * (1 + 1e-8)


def test_memory_budget_falls_back_to_the_merged_torus_bound() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)).double()
    init_weights(model, 5, scale=0.4, batchnorm_stats=True)
    model.eval()
    shape = (4, 12, 12)
    with pytest.warns(UserWarning, match="Gram test"):
        result = lipreg.autolip(model, shape, dense_limit=0, memory_limit_bytes=2**20)
    (layer,) = [layer for layer in result.layers if layer.kind == "affine"]
    assert layer.method == "fft-merged (memory budget)"
    assert any("Gram test" in note for note in result.notes)
    (true,) = _true_chain_norms(model, shape).values()
    assert layer.certified and layer.value >= true
    assert math.isfinite(layer.value)


def test_a_failed_gram_test_warns_and_keeps_the_torus_bound(monkeypatch) -> None:
    """If the Gram test cannot certify (estimate far too low), the merged torus bound is used,
    labelled, and a warning says so."""
    monkeypatch.setattr(ladder, "certify_conv_norm", lambda *args, **kwargs: None)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)).double()
    init_weights(model, 8, scale=0.4, batchnorm_stats=True)
    model.eval()
    shape = (3, 5, 5)
    with pytest.warns(UserWarning, match="Gram test could not certify"):
        result = lipreg.autolip(model, shape, dense_limit=0)
    (layer,) = [layer for layer in result.layers if layer.kind == "affine"]
    assert layer.method.startswith("fft-merged (Gram test failed")
    (true,) = _true_chain_norms(model, shape).values()
    assert layer.certified and layer.value >= true


def _conv_bn(groups: int = 1, stride: int = 1, dilation: int = 1) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, stride=stride, padding=1, dilation=dilation, groups=groups),
        nn.BatchNorm2d(8),
    ).double()
    init_weights(model, 11, scale=0.4, batchnorm_stats=True)
    return model.eval()


def test_cost_budget_keeps_the_torus_bound_and_says_so(monkeypatch) -> None:
    """A Gram test over the cost budget is not run: the merged torus bound, named in the
    method; TIGHTEST_LADDER (or a raised budget) still runs it."""
    monkeypatch.setattr(ladder, "GRAM_FREE_COST", 0.0)
    monkeypatch.setattr(ladder, "GRAM_COST_RATIO", 0.0)
    model, shape = _conv_bn(), (4, 6, 5)
    (true,) = _true_chain_norms(model, shape).values()
    result = lipreg.autolip(model, shape, dense_limit=0)
    (layer,) = [layer for layer in result.layers if layer.kind == "affine"]
    assert layer.method == "fft-merged (cost budget)"
    assert layer.certified and layer.value >= true and layer.extra["gram_cost"] > 0
    tight = lipreg.autolip(model, shape, dense_limit=0, ladder=ladder.TIGHTEST_LADDER)
    (layer,) = [layer for layer in tight.layers if layer.kind == "affine"]
    assert layer.method == "conv-gram"
    assert true <= layer.value <= true * (1 + 1.1e-3)
    monkeypatch.setattr(ladder, "GRAM_COST_RATIO", math.inf)  # the module constant is read
    raised = lipreg.autolip(model, shape, dense_limit=0)
    assert [lb.method for lb in raised.layers if lb.kind == "affine"] == ["conv-gram"]


def test_warm_gram_state_is_reused_and_stays_sound_after_a_weight_change(monkeypatch) -> None:
    """The last δ and refined vector per chain go to the state; the next call starts from
    them (here a δ planted in the state is where the search starts) and is still certified
    after the weights change."""
    model, shape = _conv_bn(groups=2, stride=2), (4, 7, 6)
    first = lipreg.autolip(model, shape, dense_limit=0)
    (layer,) = [layer for layer in first.layers if layer.kind == "affine"]
    assert layer.method == "conv-gram"
    key = f"{layer.name}#gram_delta"
    assert float(first.state[key]) == layer.extra["gram_delta"]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(
                0.05
                * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(2))
            )
    state = dict(first.state)
    state[key] = torch.tensor(1.6e-5, dtype=torch.float64)
    warm = lipreg.autolip(model, shape, dense_limit=0, state=state)
    (layer,) = [layer for layer in warm.layers if layer.kind == "affine"]
    (true,) = _true_chain_norms(model, shape).values()
    assert layer.method == "conv-gram" and layer.extra["gram_delta"] >= 1.6e-5
    assert layer.certified and true <= layer.value <= true * (1 + 1.1e-3)
    assert float(warm.state[key]) == layer.extra["gram_delta"]


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_dense_conv_chains_are_scattered_kernels_and_exact(dim: int) -> None:
    """Chains small enough to materialise (default dense_limit) are the scattered merged
    kernel: certified, ≥ the dense Jacobian's norm and within the dense certificate's slack."""
    model = _model(dim, seed=5)
    shape = SHAPES[dim]
    result = lipreg.autolip(model, shape)
    truth = _true_chain_norms(model, shape)
    layers = [layer for layer in result.layers if layer.kind == "affine"]
    assert {layer.method for layer in layers} == {"dense"}
    for layer in layers:
        true = truth[layer.name]
        assert layer.certified and true <= layer.value <= true * (1 + 1e-8), layer.name
        assert layer.estimate <= layer.value


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_dense_chains_with_duplicating_padding_are_sound(mode: str) -> None:
    """Not a zero-padded conv: applied to the identity, with the rounding bound of rounding.py
    (the shared abs_norm_bound with copies)."""
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, padding_mode=mode), nn.BatchNorm2d(6), nn.ReLU()
    ).double()
    init_weights(model, 12, scale=0.4, batchnorm_stats=True)
    model.eval()
    shape = (3, 6, 5)
    result = lipreg.autolip(model, shape)
    (true,) = _true_chain_norms(model, shape).values()
    (layer,) = [layer for layer in result.layers if layer.kind == "affine"]
    assert layer.method == "dense" and layer.certified
    assert true <= layer.value <= true * (1 + 1e-8)


def test_pointwise_chains_need_no_lanczos() -> None:
    """A 1×1 conv + BN chain: the dense kernel-matrix certificate alone (no iterative run),
    its own ‖W v‖ as the estimate, both against the dense Jacobian's norm."""
    model = nn.Sequential(nn.Conv2d(5, 7, 1, stride=2, bias=False), nn.BatchNorm2d(7)).double()
    init_weights(model, 13, scale=0.5, batchnorm_stats=True)
    model.eval()
    shape = (5, 6, 7)
    result = lipreg.autolip(model, shape, dense_limit=0)
    (true,) = _true_chain_norms(model, shape).values()
    (layer,) = [layer for layer in result.layers if layer.kind == "affine"]
    assert layer.method == "conv-pointwise" and layer.n_iter == 0
    assert layer.certified and true <= layer.value <= true * (1 + 1e-8)
    assert layer.estimate <= layer.value and layer.estimate >= true * (1 - 1e-6)


def test_a_pointwise_conv_reading_only_padding_is_not_shortcut() -> None:
    """Padding 4, stride 8 on a 3-wide axis: the two outputs read positions −4 and 4, padding
    zeros (the map is 0, not ‖W‖): the pointwise shortcut must not claim ‖W‖ as the estimate."""
    model = nn.Sequential(nn.Conv1d(2, 3, 1, stride=8, padding=4, bias=False)).double()
    init_weights(model, 14, scale=0.5)
    model.eval()
    result = lipreg.autolip(model, (2, 3), dense_limit=0)
    (layer,) = [layer for layer in result.layers if layer.kind == "affine"]
    assert layer.estimate == pytest.approx(0.0, abs=1e-12)
    assert layer.certified and layer.value >= 0.0
