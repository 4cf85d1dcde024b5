"""Certified upper bounds against exact singular values (LAPACK svdvals in float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lipreg.functional.certify import (
    RELATIVE_MARGIN,
    dense_norm_bound,
    matrix_norm_bound,
    schur_bound,
)
from lipreg.functional.linear_map import LinearMap

F64 = torch.float64


def exact_norm(W: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(W.to(F64))[0])


@pytest.mark.parametrize(
    "shape",
    [(7, 3), (3, 7), (200, 50), (1100, 1030), (1030, 1100)],  # the last two: Cholesky path
)
def test_matrix_norm_bound_is_sound_and_tight(shape):
    g = torch.Generator().manual_seed(sum(shape))
    W = torch.randn(*shape, generator=g, dtype=F64)
    exact = exact_norm(W)
    bound, v = matrix_norm_bound(W)
    assert exact <= bound <= exact * (1 + 1e-7)
    # the returned vector is (close to) the top right singular vector
    assert float((W @ v).norm()) == pytest.approx(exact, rel=1e-6)


def test_matrix_norm_bound_with_a_tight_cluster_on_the_cholesky_path():
    """Top singular values 1, 1 - 1e-10, ...: the certificate must still be >= the top one."""
    g = torch.Generator().manual_seed(3)
    n = 1100
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    S = torch.linspace(0.5, 1.0, n, dtype=F64)
    S[-2] = 1.0 - 1e-10
    W = U @ torch.diag(S) @ V.T
    bound, _ = matrix_norm_bound(W)
    assert bound >= exact_norm(W)
    assert bound <= 1.0 + 1e-6


def test_matrix_norm_bound_of_a_float32_matrix_uses_its_exact_value():
    W = torch.full((4, 3), 1 + 3e-8, dtype=torch.float32)  # float32 -> float64 is exact
    assert matrix_norm_bound(W)[0] >= exact_norm(W.double())


def test_dense_norm_bound_of_a_strided_conv_matches_its_dense_jacobian():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=F64)
    op = LinearMap(
        lambda x: F.conv2d(x, w, stride=2, padding=1),
        (2, 7, 7),
        (3, 4, 4),
        F64,
        torch.device("cpu"),
        "conv",
    )
    J = torch.autograd.functional.jacobian(
        lambda x: F.conv2d(x[None], w, stride=2, padding=1)[0], torch.zeros(2, 7, 7, dtype=F64)
    ).reshape(3 * 16, 2 * 49)
    exact = exact_norm(J)
    bound, _ = dense_norm_bound(op)
    assert exact <= bound <= exact * (1 + 2 * RELATIVE_MARGIN)
    with pytest.raises(ValueError, match="float64"):
        dense_norm_bound(
            LinearMap(op.apply, op.in_shape, op.out_shape, torch.float32, op.device, "f32")
        )


@pytest.mark.parametrize(
    "pool, expected",
    [
        (lambda x: F.avg_pool2d(x, 2), 0.5),  # k x k / stride k: exactly 1/k
        (lambda x: F.avg_pool2d(x, 3), 1 / 3),
    ],
)
def test_schur_bound_is_exact_for_non_overlapping_average_pooling(pool, expected):
    op = LinearMap(
        pool,
        (1, 6, 6),
        tuple(pool(torch.zeros(1, 1, 6, 6)).shape[1:]),
        F64,
        torch.device("cpu"),
        "pool",
    )
    assert schur_bound(op) == pytest.approx(expected, rel=1e-8)
    assert schur_bound(op) >= expected


def test_schur_bound_is_sound_for_overlapping_pooling():
    pool = lambda x: F.avg_pool2d(x, 3, stride=1, padding=1)  # noqa: E731
    op = LinearMap(pool, (1, 6, 6), (1, 6, 6), F64, torch.device("cpu"), "pool")
    exact = exact_norm(op.to_dense())
    assert exact <= schur_bound(op) <= 1.5 * exact


def test_schur_bound_rejects_a_map_with_negative_entries():
    op = LinearMap(lambda x: -x, (3,), (3,), F64, torch.device("cpu"), "neg")
    with pytest.raises(ValueError, match="non-negative"):
        schur_bound(op)


# ---------------------------------------------------------------- the certificate ladder
def _ladder_bounds(
    net: torch.nn.Module, shape: tuple[int, ...], ladder=None, dense_limit: int = 2048
) -> list:
    """Every chain's LayerBound from a ChainBounder (float64 analysis) with ``ladder``."""
    from lipreg.functional.analysis import analyse
    from lipreg.functional.chains import find_affine_chains
    from lipreg.functional.ladder import ChainBounder

    analysis = analyse(net, shape, dtype=F64)
    bounder = ChainBounder(
        analysis,
        net,
        certify=True,
        tol=1e-8,
        max_iter=500,
        method="lanczos",
        state={},
        generator=torch.Generator().manual_seed(0),
        dense_limit=dense_limit,
        ladder=ladder,
    )
    return [bounder.bound(c) for c in find_affine_chains(analysis).values()]


def _dense_jacobian_norm(net: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Exact norm of the bias-free linear map (the Jacobian of an affine net), float64."""
    x = torch.zeros(1, *shape, dtype=F64)
    J = torch.autograd.functional.jacobian(lambda z: net(z), x).reshape(-1, x.numel())
    return exact_norm(J)


def _conv_bn(seed: int) -> torch.nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.AvgPool2d(2)
    ).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
        net[1].running_var.copy_(torch.rand(3, generator=g, dtype=F64) + 0.3)
    return net.eval()


def test_each_ladder_entry_answers_where_documented_and_is_sound():
    net = _conv_bn(0)
    exact = _dense_jacobian_norm(net, (2, 6, 6))
    (dense,) = _ladder_bounds(net, (2, 6, 6))  # small: the whole chain materialised
    assert dense.method == "dense" and dense.certified
    assert exact <= dense.value <= exact * (1 + 1e-7)
    (product,) = _ladder_bounds(net, (2, 6, 6), dense_limit=0)  # too large: a product
    assert product.method == "fft x closed-form x schur" and product.certified
    assert exact <= product.value and product.estimate == pytest.approx(exact, rel=1e-6)

    linear = torch.nn.Linear(5, 4).double()
    (lone,) = _ladder_bounds(linear, (5,))  # one dense weight: its chunked certificate
    truth = exact_norm(linear.weight.detach())
    assert lone.method == "dense" and truth <= lone.value <= truth * (1 + 1e-7)

    bn = _conv_bn(1)[1]
    (closed,) = _ladder_bounds(bn, (3, 4, 4))
    scale = float((bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)).abs().max())
    assert closed.method == "closed-form"
    assert scale <= closed.value <= scale * (1 + 1e-15)


def test_a_new_ladder_entry_is_tried_first_and_a_ladder_must_end_with_an_answer():
    from lipreg.functional.ladder import LADDER, estimate
    from lipreg.functional.results import LayerBound

    def everything_is_two(ctx) -> LayerBound:
        return LayerBound(name=ctx.chain.name, kind="affine", value=2.0, certified=True)

    net = _conv_bn(2)
    (answer,) = _ladder_bounds(net, (2, 6, 6), ladder=[everything_is_two, *LADDER])
    assert answer.value == 2.0
    (fallback,) = _ladder_bounds(net, (2, 6, 6), ladder=[estimate])  # no certificate at all
    assert not fallback.certified and fallback.upper is None
    assert fallback.value == pytest.approx(_dense_jacobian_norm(net, (2, 6, 6)), rel=1e-6)
    with pytest.raises(RuntimeError, match="no entry of the certificate ladder"):
        _ladder_bounds(net, (2, 6, 6), ladder=[])


@pytest.mark.parametrize(
    ("groups", "stride", "in_shape"), [(1, 1, (4, 6, 6)), (2, 2, (4, 7, 5)), (4, 1, (4, 5, 5))]
)
def test_batch_norm_merged_torus_bound_is_at_most_the_product(groups, stride, in_shape):
    """BN → conv → BN folded into one kernel: its torus bound is ≥ the chain's exact norm and
    ≤ max|s_out| · torus(w) · max|s_in| (the product certificate it replaces)."""
    from lipreg.functional.conv_bounds import conv_operator_norm_bound
    from lipreg.functional.conv_chain import merged_conv
    from lipreg.functional.specs import Affine, ConvData

    g = torch.Generator().manual_seed(groups)
    w = torch.randn(8, 4 // groups, 3, 3, generator=g, dtype=F64)
    s_in = torch.rand(4, generator=g, dtype=F64) * 3 - 1.5
    s_out = torch.rand(8, generator=g, dtype=F64) * 3 - 1.5
    data = ConvData(w, (stride, stride), (1, 1), (1, 1), groups, in_shape)

    def conv(x):
        return F.conv2d(x, w, None, data.stride, data.padding, data.dilation, groups)

    def scaled(s):
        return Affine(linear=lambda x: x * s[:, None, None], channel_scale=s)

    merged = merged_conv([scaled(s_in), Affine(linear=conv, conv=data), scaled(s_out)])
    assert merged is not None
    spatial = in_shape[1:]
    args = (data.stride, data.padding, data.dilation, groups)
    new = conv_operator_norm_bound(merged.weight, spatial, *args)
    old = float(s_in.abs().max() * s_out.abs().max()) * conv_operator_norm_bound(w, spatial, *args)
    n = torch.tensor(in_shape).prod().item()
    basis = torch.eye(n, dtype=F64).reshape(n, *in_shape)
    chain = conv(basis * s_in[:, None, None]) * s_out[:, None, None]
    assert exact_norm(chain.reshape(n, -1).T) <= new <= old * (1 + 1e-9)


@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 0), (2, 1)])
def test_pointwise_chains_on_large_maps_skip_materialising_and_stay_exact(stride, padding):
    """batch norm → 1×1 conv → batch norm on a map whose materialised side is ≥
    POINTWISE_MIN_SIDE: the kernel matrix's certificate (``conv-pointwise``), checked against
    the SVD of the chain's dense Jacobian (the exact norm: a 1×1 convolution is ``W ⊗ S``)."""
    import lipreg
    from lipreg.functional.ladder import POINTWISE_MIN_SIDE

    gen = torch.Generator().manual_seed(7 + stride + padding)
    model = torch.nn.Sequential(
        torch.nn.BatchNorm2d(16),
        torch.nn.Conv2d(16, 24, 1, stride=stride, padding=padding),
        torch.nn.BatchNorm2d(24),
    ).double()
    with torch.no_grad():
        for module in model:
            for tensor in (*module.parameters(), *module.buffers()):
                if tensor.is_floating_point():
                    tensor.copy_(torch.rand(tensor.shape, generator=gen, dtype=F64) + 0.5)
    model.eval()
    shape = (16, 8, 8)
    eye = torch.eye(16 * 64, dtype=F64).reshape(-1, *shape)
    with torch.no_grad():
        jac = (model(eye) - model(torch.zeros(1, *shape, dtype=F64))).flatten(1).T
    assert min(jac.shape) >= POINTWISE_MIN_SIDE
    true = exact_norm(jac)
    result = lipreg.autolip(model, shape)
    (layer,) = [lb for lb in result.layers if lb.kind == "affine"]
    assert layer.method == "conv-pointwise" and layer.certified
    assert true <= layer.value <= true * (1 + 1e-8)
    assert layer.estimate <= layer.value
