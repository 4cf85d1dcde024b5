"""Incremental certificates of batch-norm networks trained in TRAIN mode
(docs/design/issue10/incremental.md §9): the live-tap increment bounds and the scale-weighted
ratio bound (2'') against independent ground truths — brute-force enumeration of the taps a
zero-padded convolution reads, dense float64 convolution matrices (SVD) built without the
library, and the dense Jacobian of each conv→BN chain after real SGD steps in train mode."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import jacobian

from lipreg.functional.incremental import certified_anchor, incremental_autolip, incremental_entry
from lipreg.functional.incremental_bounds import conv_increment_bound, live_taps
from lipreg.functional.incremental_channels import channel_norms_squared, threshold_ratio_bound
from lipreg.functional.incremental_scaled import ScaledCore, scaled_increment_bound
from tests.helpers import dense_conv_matrix, gen, spectral_norm

F64 = torch.float64

# (spatial, kernel, stride, padding, dilation): small maps, where taps die
GEOMETRIES = [
    ((1, 1), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 2), (3, 3), (2, 2), (1, 1), (1, 1)),
    ((2, 2), (3, 3), (1, 1), (1, 1), (1, 1)),
    ((4, 3), (3, 3), (2, 1), (1, 1), (1, 1)),
    ((3, 5), (5, 3), (1, 2), (2, 1), (1, 1)),
    ((2, 6), (3, 3), (1, 1), (2, 1), (2, 1)),
    ((7,), (7,), (2,), (3,), (1,)),
    # every tap live (the bound's no-copy path)
    ((5, 5), (3, 3), (2, 2), (0, 0), (1, 1)),
    ((6, 4), (3, 2), (1, 1), (1, 0), (1, 1)),
]


def _enumerated(spatial, kernel, stride, padding, dilation) -> tuple[list[list[int]], int]:
    """Live taps and the largest number of (output, live tap) pairs reading one input entry,
    by enumerating every output position and tap."""
    live, copies = [], 1
    for n, k, s, p, d in zip(spatial, kernel, stride, padding, dilation, strict=True):
        n_out = (n + 2 * p - d * (k - 1) - 1) // s + 1
        reads = [(y, t, s * y - p + t * d) for y in range(n_out) for t in range(k)]
        real = [(y, t, x) for y, t, x in reads if 0 <= x < n]
        taps = sorted({t for _, t, _ in real})
        per_input = [sum(1 for *_, x in real if x == i) for i in range(n)]
        live.append(taps)
        copies *= max(per_input) if real else 0
    return live, copies


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_live_taps_by_enumeration(geometry) -> None:
    spatial, kernel, stride, padding, dilation = geometry
    assert live_taps(kernel, stride, padding, dilation, spatial) == _enumerated(*geometry)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_live_tap_bound_above_exact_norm(geometry, groups: int, seed: int) -> None:
    """Live-tap bound ≥ the SVD of the dense convolution; never above the plain bound by
    more than rounding on these kernels (the live taps are a subset)."""
    spatial, kernel, stride, padding, dilation = geometry
    g = gen(seed)
    D = torch.randn(4, 6 // groups, *kernel, generator=g, dtype=F64)
    true = spectral_norm(dense_conv_matrix(D, spatial, stride, padding, dilation, groups))
    live, _ = conv_increment_bound(
        D, stride, dilation, groups, padding=padding, in_spatial=spatial, gram_flops=math.inf
    )
    plain, _ = conv_increment_bound(D, stride, dilation, groups, gram_flops=math.inf)
    assert true <= live <= plain * (1 + 1e-12), (true, live, plain)


def test_live_tap_bound_exact_on_a_rank_one_centre_tap() -> None:
    """A 3 × 3 convolution on a 1 × 1 map reads its centre tap only: with a rank-one centre
    and anything in the dead taps, the bound is the exact norm ‖u‖‖v‖ (the plain one pays
    for the dead taps and √9 copies)."""
    g = gen(5)
    u, v = torch.randn(8, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    D = 100.0 * torch.randn(8, 5, 3, 3, generator=g, dtype=F64)
    D[:, :, 1, 1] = torch.outer(u, v)
    exact = float(u.norm() * v.norm())
    assert math.isclose(spectral_norm(dense_conv_matrix(D, (1, 1), 1, 1)), exact, rel_tol=1e-12)
    live, which = conv_increment_bound(D, (1, 1), (1, 1), 1, padding=(1, 1), in_spatial=(1, 1))
    assert exact <= live <= exact * (1 + 1e-10), (live, exact, which)
    assert conv_increment_bound(D, (1, 1), (1, 1), 1)[0] > 50 * exact


def test_live_taps_are_fresh_lists_at_every_call() -> None:
    """live_taps is cached by geometry: a caller changing its answer must not change the
    next caller's."""
    live, copies = live_taps((3, 3), (1, 1), (1, 1), (1, 1), (1, 1))
    assert (live, copies) == ([[1], [1]], 1)
    live[0].append(0)
    live.append([2])
    assert live_taps((3, 3), (1, 1), (1, 1), (1, 1), (1, 1)) == ([[1], [1]], 1)


def test_a_convolution_reading_padding_only_has_a_zero_increment() -> None:
    D = torch.ones(2, 2, 1, 1, dtype=F64)  # 1 × 1 kernel, padding 2, stride 3: reads zeros only
    assert live_taps((1,), (3,), (2,), (1,), (1,)) == ([[]], 0)
    assert conv_increment_bound(D[..., 0], (3,), (1,), 1, padding=(2,), in_spatial=(1,)) == (
        0.0,
        "dead-taps",
    )
    assert spectral_norm(dense_conv_matrix(D[..., 0], (1,), 3, 2)) == 0.0


def _scaled_dense(K, d_in, d_out, spatial, stride, padding, dilation, groups) -> torch.Tensor:
    A = dense_conv_matrix(K, spatial, stride, padding, dilation, groups)
    rows = d_out.repeat_interleave(A.shape[0] // d_out.numel())
    cols = d_in.repeat_interleave(A.shape[1] // d_in.numel())
    return rows[:, None] * A * cols[None, :]


@pytest.mark.parametrize("geometry", GEOMETRIES[:4])
@pytest.mark.parametrize("spread", [0.0, 2.0, 4.0])
@pytest.mark.parametrize("seed", range(3))
def test_weighted_ratio_bound_above_exact_norm(geometry, spread: float, seed: int) -> None:
    """(2'') with scales on both sides spread over 10^±spread/2 (a few channels large), a
    kernel change of the kernel's size, γ = 0 channels on both sides: ≥ the SVD of the exact
    new map."""
    spatial, kernel, stride, padding, dilation = geometry
    g = gen(40 + seed)
    c_out, c_in, groups = 6, 4, 2
    K = torch.randn(c_out, c_in // groups, *kernel, generator=g, dtype=F64)
    K_t = K + torch.randn(K.shape, generator=g, dtype=F64)

    def scales(n: int) -> torch.Tensor:
        return 10.0 ** (spread * (torch.rand(n, generator=g, dtype=F64) - 0.5))

    d_in_s, d_in_t, d_out_s, d_out_t = scales(c_in), scales(c_in), scales(c_out), scales(c_out)
    d_in_s[0], d_out_s[1] = 0.0, 0.0
    geo = (spatial, stride, padding, dilation, groups)
    sigma = spectral_norm(_scaled_dense(K, d_in_s, d_out_s, *geo)) * (1 + 1e-9)
    conv = (stride, dilation, groups, padding, spatial)
    anchor = ScaledCore(K, d_in_s, d_out_s, 1e-15, 1e-15, conv)
    now = ScaledCore(K_t, d_in_t, d_out_t, 1e-15, 1e-15, conv)
    value, _, which = scaled_increment_bound(anchor, now, sigma, 1.0, math.inf)
    assert value >= spectral_norm(_scaled_dense(K_t, d_in_t, d_out_t, *geo)), which


class ConvBN(nn.Module):
    """conv→BN→ReLU blocks down to 1 × 1 maps (dead taps), a grouped one, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False), nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Conv2d(12, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Flatten(), nn.Linear(12, 5),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _chain_norm(model: ConvBN, conv: int, shape: tuple[int, ...]) -> float:
    """Exact float64 norm of body[conv]→body[conv + 1] (eval mode): SVD of the Jacobian."""
    body = copy.deepcopy(model.body).double().eval()
    x = torch.zeros(1, *shape, dtype=F64)
    with torch.no_grad():
        for module in body[:conv]:
            x = module(x)
    pair = nn.Sequential(body[conv], body[conv + 1])
    J = jacobian(lambda z: pair(z[None])[0], torch.zeros(x.shape[1:], dtype=F64))
    return spectral_norm(J.reshape(-1, x[0].numel()))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, g: torch.Generator) -> None:
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 3, 4, 4, generator=g)
        y = torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("optimiser", ["sgd", "adam"])
def test_train_mode_steps_stay_above_exact_chain_norms(optimiser: str) -> None:
    """Real SGD (lr 0.1, momentum 0.9) / Adam (lr 1e-3) steps in train mode (running
    statistics move), then every incremental conv→BN factor ≥ the exact norm of its chain
    (the last one reads its centre tap only)."""
    torch.manual_seed(0)
    model, shape = ConvBN(), (3, 4, 4)
    if optimiser == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = gen(7)
    _train(model, opt, 3, g)
    anchor, _ = certified_anchor(model, shape)
    names = {0: "body[0+1]", 3: "body[3+4]", 6: "body[6+7]", 9: "body[9+10]"}
    for steps in (1, 5):
        _train(model, opt, steps, g)
        result = incremental_autolip(model, shape, anchor)
        factors = {lb.name: lb for lb in result.layers if lb.kind == "affine"}
        for conv, name in names.items():
            lb = factors[name]
            exact = _chain_norm(model, conv, shape)
            assert lb.method.startswith("incremental"), (name, lb.method)
            assert lb.value >= exact, (name, lb.value, exact, lb.method)


def test_refresh_slack_takes_the_smaller_certificate_per_chain() -> None:
    """``refresh_slack=0``: every chain above its estimate is also certified in full and keeps
    the smaller value — never above the plain incremental factor, never below the exact
    chain norm; the plain run is unchanged by the option's existence."""
    torch.manual_seed(1)
    model, shape = ConvBN(), (3, 4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = gen(9)
    _train(model, opt, 2, g)
    anchor, _ = certified_anchor(model, shape)
    _train(model, opt, 5, g)
    plain = incremental_autolip(model, shape, anchor)
    refreshed = incremental_autolip(model, shape, anchor, refresh_slack=0.0)
    before = {lb.name: lb for lb in plain.layers if lb.kind == "affine"}
    names = {0: "body[0+1]", 3: "body[3+4]", 6: "body[6+7]", 9: "body[9+10]"}
    moved = 0
    for lb in refreshed.layers:
        if lb.kind != "affine":
            continue
        assert lb.value <= before[lb.name].value and lb.estimate is not None
        if not lb.method.startswith("incremental"):
            moved += 1
            assert lb.extra["incremental"] == before[lb.name].value
    for conv, name in names.items():
        lb = next(lb for lb in refreshed.layers if lb.name == name)
        assert lb.value >= _chain_norm(model, conv, shape), (name, lb.value, lb.method)
    assert moved > 0 and refreshed.value < plain.value
    with pytest.raises(ValueError, match="refresh_slack"):
        incremental_entry(anchor, estimate=False, refresh_slack=0.1)


@pytest.mark.parametrize("geometry", [None, *GEOMETRIES[:4]])
@pytest.mark.parametrize("seed", range(4))
def test_per_channel_ratio_bound_above_exact_norm(geometry, seed: int) -> None:
    """(2r) against the SVD of ``R A_s`` (rows of channel ``o`` scaled by ``r_o``): above it
    for ratios spread over 10^±2, and far below ``max r · ‖A_s‖`` when the channel that grew
    most carries a tiny part of the map."""
    g = gen(70 + seed)
    c_out, c_in = 6, 4
    if geometry is None:
        K = torch.randn(c_out, c_in, generator=g, dtype=F64)
        conv, A = None, K.clone()
    else:
        spatial, kernel, stride, padding, dilation = geometry
        K = torch.randn(c_out, c_in, *kernel, generator=g, dtype=F64)
        conv = (stride, dilation, 1, padding, spatial)
        A = dense_conv_matrix(K, spatial, stride, padding, dilation)
    K[0] *= 1e-3  # channel 0: a tiny part of the map ...
    A = A.reshape(c_out, -1, A.shape[-1]).clone()
    A[0] *= 1e-3
    ratios = 10.0 ** (4 * torch.rand(c_out, generator=g, dtype=F64) - 2)
    ratios[0] = 1e3  # ... that grows most
    exact = spectral_norm((ratios[:, None, None] * A).reshape(-1, A.shape[-1]))
    sigma = spectral_norm(A.reshape(-1, A.shape[-1])) * (1 + 1e-12)
    norms2 = channel_norms_squared(K, conv, 0.0)
    value = threshold_ratio_bound(sigma, ratios, norms2, 1.0)
    assert exact <= value, (exact, value)
    assert value < 0.1 * float(ratios.max()) * sigma
