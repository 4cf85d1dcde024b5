"""``autolip(certify=True, estimate=False)``: the certified value alone (issue 10, item 6).

The value must be the one of the full call (same certificates; only the estimates that no
certificate needs are skipped), and the skipped estimates must actually not run. Soundness
against the independent oracle: ``tests/soundness/test_harness.py::test_certificate_only``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipreg
from lipreg.functional import ladder
from lipreg.functional.linear_map import LinearMap
from tests.helpers import init_weights
from tests.soundness.generator import generate


def small_cnn(channels: int = 16, size: int = 32) -> nn.Module:
    """The issue's outlier network (3 × 3 convolutions, padding 1, a linear head)."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * size * size, 10),
    )


def mixed_cnn() -> nn.Module:
    """Two convolutions whose Gram test is over its cost budget (torus bounds, no estimate
    needed), then two whose Gram test runs on their estimate (``conv-gram``)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def conv_bn() -> nn.Module:
    """Convolutions with batch norms (merged chains) and a 1 × 1 convolution."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )
    init_weights(model, 3, scale=0.5, batchnorm_stats=True)
    return model.eval()


def count_products(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the Gram products of every iterative estimate (one list entry per call)."""
    calls: list[int] = []
    original = LinearMap.gram_matvec

    def counted(self: LinearMap, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(v.shape[0])
        return original(self, v)

    monkeypatch.setattr(LinearMap, "gram_matvec", counted)
    return calls


def factors(result: lipreg.LipschitzResult) -> list[tuple[str, float, str]]:
    return [(lb.name, lb.value, lb.method) for lb in result.layers if lb.kind == "affine"]


@pytest.mark.parametrize(
    ("make", "shape", "options"),
    [
        (small_cnn, (3, 32, 32), {}),
        (mixed_cnn, (3, 32, 32), {"dense_limit": 0}),
        (conv_bn, (3, 9, 9), {"dense_limit": 0}),
        (conv_bn, (3, 9, 9), {}),
    ],
    ids=["small-cnn", "torus-then-gram", "conv-bn-merged", "conv-bn-dense"],
)
def test_the_certified_value_is_the_full_calls(make, shape, options) -> None:
    """Equal to the last bit: a chain's random start does not depend on whether the chains
    before it ran their estimate (a Gram test's value depends on its estimate)."""
    torch.manual_seed(0)
    model = make()
    full = lipreg.autolip(model, shape, **options)
    only = lipreg.autolip(model, shape, estimate=False, **options)
    assert full.certified and only.certified
    assert only.value == full.value
    assert only.estimate is None and full.estimate is not None
    # same certificates chain by chain; a torus bound kept within TORUS_ACCEPT of its estimate
    # ("fft-merged") is, without the estimate, the same bound under its cost-budget name
    renamed = {"fft-merged": "fft-merged (cost budget)"}
    for (name, value, method), (name0, value0, method0) in zip(
        factors(only), factors(full), strict=True
    ):
        assert (name, value) == (name0, value0)
        assert method in (method0, renamed.get(method0))


@pytest.mark.parametrize("seed", range(0, 40, 3))
def test_random_architectures_keep_their_value(seed: int) -> None:
    """Random architectures of the soundness generator: the same value, certified or not."""
    g = generate(seed)
    try:
        full = lipreg.autolip(g.model, g.input_shape)
    except (lipreg.UnsupportedOperationError, lipreg.TraceError):
        pytest.skip("refused by name (the harness checks the refusal)")
    only = lipreg.autolip(g.model, g.input_shape, estimate=False)
    assert only.value == full.value and only.kind == full.kind


def test_the_torus_chains_run_no_lanczos(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the outlier CNN the convolutions' Gram tests are over their cost budget: with
    ``estimate=False`` no Gram product is computed for them (the linear head's dense
    certificate computes its own vector), with the default every chain runs its estimate."""
    torch.manual_seed(0)
    model, shape = small_cnn(), (3, 32, 32)
    products = count_products(monkeypatch)
    full = lipreg.autolip(model, shape)
    assert [m for *_, m in factors(full)][:2] == ["fft-merged (cost budget)"] * 2
    with_estimates = len(products)
    products.clear()
    only = lipreg.autolip(model, shape, estimate=False)
    assert with_estimates >= 2 and products == []
    assert [lb.n_iter for lb in only.layers if lb.kind == "affine"][:2] == [0, 0]


def test_a_product_of_op_certificates_runs_no_lanczos(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dense_limit=0`` and the Gram test over budget everywhere: every chain of a conv + batch
    norm network is a merged torus bound or a per-op product; none runs an estimate."""
    monkeypatch.setattr(ladder, "GRAM_FREE_COST", 0.0)
    monkeypatch.setattr(ladder, "GRAM_COST_RATIO", 0.0)
    model, shape = conv_bn(), (3, 9, 9)
    products = count_products(monkeypatch)
    only = lipreg.autolip(model, shape, estimate=False, dense_limit=0)
    assert only.certified and products == []
    full = lipreg.autolip(model, shape, dense_limit=0)
    assert only.value == full.value and len(products) > 0


def test_estimate_false_needs_certify() -> None:
    net = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="estimate=False asks for the certified value alone"):
        lipreg.autolip(net, (4,), certify=False, estimate=False)
    assert math.isfinite(lipreg.autolip(net, (4,), estimate=False).value)


def test_mobilenet_v2_keeps_every_factor() -> None:
    """torchvision's mobilenet_v2 at 64 × 64 mixes torus bounds over the Gram test's budget
    with Gram tests certified from their estimates (``σ̂ √(1 + δ)``): every factor is the
    same bit for bit (with one random stream shared by the chains, the estimates skipped
    before them moved the later Gram tests by ~1e-7)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    full = lipreg.autolip(model, (3, 64, 64))
    only = lipreg.autolip(model, (3, 64, 64), estimate=False)
    methods = {lb.method for lb in full.layers}
    assert {"conv-gram", "fft-merged (cost budget)"} <= methods
    values = [(name, value) for name, value, _ in factors(full)]
    assert [(name, value) for name, value, _ in factors(only)] == values
    assert only.value == full.value
