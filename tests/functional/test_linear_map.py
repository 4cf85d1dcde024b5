"""Tests of ``lipreg.LinearMap``: adjoint identity, dense materialisation, Gram products.

Ground truths: dense Jacobians from ``torch.autograd.functional.jacobian`` of the same torch
functional op (computed here, independently of lipreg), explicit transposed convolutions as
adjoints of convolutions, and float64 inner products.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

import lipreg
from lipreg.functional.linear_map import compose
from tests.helpers import gen, randn

F64 = torch.float64


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return randn(*shape, seed=seed, dtype=F64)


def make_case(name: str) -> tuple[Callable, tuple[int, ...]]:
    """(batched bias-free linear callable, per-sample input shape) for each layer type."""
    if name == "linear":
        W = rand(7, 11, seed=1)
        return (lambda x: F.linear(x, W)), (11,)
    if name == "conv1d":
        w = rand(4, 3, 5, seed=2)
        return (lambda x: F.conv1d(x, w, stride=2, padding=3, dilation=2)), (3, 17)
    if name == "conv2d":
        w = rand(4, 3, 3, 3, seed=3)
        return (lambda x: F.conv2d(x, w, padding=1)), (3, 6, 7)
    if name == "conv2d_stride_pad":
        w = rand(5, 2, 3, 2, seed=4)
        return (lambda x: F.conv2d(x, w, stride=(2, 3), padding=(1, 2))), (2, 9, 8)
    if name == "conv2d_dilation_groups":
        w = rand(6, 2, 3, 3, seed=5)  # groups=2: 4 input channels, 6 output channels
        return (lambda x: F.conv2d(x, w, stride=1, padding=2, dilation=2, groups=2)), (4, 7, 6)
    if name == "conv2d_reflect":
        w = rand(3, 2, 3, 3, seed=6)
        return (lambda x: F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w)), (2, 5, 6)
    if name == "conv3d":
        w = rand(3, 2, 3, 2, 3, seed=7)
        return (lambda x: F.conv3d(x, w, stride=(1, 2, 1), padding=1)), (2, 4, 5, 3)
    if name == "conv_transpose2d":
        w = rand(4, 3, 3, 3, seed=8)  # (in, out/groups, kh, kw)
        return (lambda x: F.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1)), (
            4,
            4,
            3,
        )
    if name == "conv_transpose2d_groups":
        w = rand(4, 2, 4, 3, seed=9)  # groups=2: out channels 4
        return (lambda x: F.conv_transpose2d(x, w, stride=(2, 1), groups=2, dilation=(1, 2))), (
            4,
            3,
            4,
        )
    if name == "avgpool2d":
        return (lambda x: F.avg_pool2d(x, 3, stride=2, padding=1)), (2, 7, 6)
    if name == "avgpool2d_no_pad_count":
        return (lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)), (
            1,
            6,
            6,
        )
    if name == "avgpool1d":
        return (lambda x: F.avg_pool1d(x, 2)), (3, 9)
    raise KeyError(name)


CASES = [
    "linear",
    "conv1d",
    "conv2d",
    "conv2d_stride_pad",
    "conv2d_dilation_groups",
    "conv2d_reflect",
    "conv3d",
    "conv_transpose2d",
    "conv_transpose2d_groups",
    "avgpool2d",
    "avgpool2d_no_pad_count",
    "avgpool1d",
]


def build(name: str, dtype: torch.dtype = F64) -> tuple[lipreg.LinearMap, torch.Tensor]:
    fn, in_shape = make_case(name)
    out_shape = tuple(fn(torch.zeros(1, *in_shape, dtype=F64)).shape[1:])

    def apply(x: torch.Tensor) -> torch.Tensor:
        return fn(x.to(F64)).to(x.dtype)

    op = lipreg.LinearMap(apply, in_shape, out_shape, dtype, torch.device("cpu"), name)
    # Independent dense matrix: the Jacobian of the op at a random point (it is linear).
    x0 = rand(*in_shape, seed=99)[None]
    J = jacobian(fn, x0).reshape(math.prod(out_shape), math.prod(in_shape))
    return op, J


@pytest.mark.parametrize("name", CASES)
def test_adjoint_identity(name):
    op, _ = build(name)
    x = rand(3, op.in_features, seed=10)
    y = rand(3, op.out_features, seed=11)
    Ax = op.matvec(x)
    ATy = op.rmatvec(y)
    assert Ax.shape == (3, op.out_features)
    assert ATy.shape == (3, op.in_features)
    lhs = (Ax * y).sum(dim=1)
    rhs = (x * ATy).sum(dim=1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_matvec_rmatvec_and_dense_equal_the_jacobian(name):
    op, J = build(name)
    assert op.in_features == J.shape[1] and op.out_features == J.shape[0]
    x = rand(4, op.in_features, seed=12)
    y = rand(4, op.out_features, seed=13)
    torch.testing.assert_close(op.matvec(x), x @ J.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.rmatvec(y), y @ J, rtol=1e-12, atol=1e-12)
    for batch_size in (256, 7, 1):  # batching must not change the matrix
        D = op.to_dense(batch_size=batch_size)
        assert D.shape == J.shape
        torch.testing.assert_close(D, J, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_gram_matvec(name):
    op, J = build(name)
    v = rand(2, op.in_features, seed=14)
    g, av = op.gram_matvec(v)
    torch.testing.assert_close(av, v @ J.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, v @ J.T @ J, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("name", ["conv2d_stride_pad", "conv2d_dilation_groups", "conv3d"])
def test_operator_norm_of_conv_equals_svd_of_jacobian(name):
    op, J = build(name)
    t = float(torch.linalg.matrix_norm(J, 2))
    for method in ("lanczos", "power"):
        res = lipreg.operator_norm(op, tol=1e-11, max_iter=5000, method=method, generator=gen(0))
        assert res.sigma == pytest.approx(t, rel=1e-6)
        assert res.sigma <= t * (1 + 1e-12)


def test_conv_adjoint_is_the_transposed_convolution():
    """Independent adjoint: conv2d^T = conv_transpose2d with the same weight."""
    w = rand(5, 3, 3, 3, seed=20)
    in_shape = (3, 9, 8)

    def fn(x):
        return F.conv2d(x, w, stride=2, padding=1)

    out_shape = tuple(fn(torch.zeros(1, *in_shape, dtype=F64)).shape[1:])
    op = lipreg.LinearMap(fn, in_shape, out_shape, F64, torch.device("cpu"), "conv")
    y = rand(2, *out_shape, seed=21)
    ref = F.conv_transpose2d(y, w, stride=2, padding=1, output_padding=(0, 1))
    assert ref.shape[1:] == in_shape
    torch.testing.assert_close(
        op.rmatvec(y.reshape(2, -1)), ref.reshape(2, -1), rtol=1e-12, atol=1e-12
    )


def test_float32_map():
    op, J = build("conv2d_stride_pad", dtype=torch.float32)
    D = op.to_dense()
    assert D.dtype == torch.float32
    torch.testing.assert_close(D.to(F64), J, rtol=1e-6, atol=1e-6)


def test_in_out_features_and_shapes():
    op, _ = build("conv3d")
    assert op.in_features == 2 * 4 * 5 * 3
    assert op.out_features == math.prod(op.out_shape)
    x = rand(3, *op.in_shape, seed=30)
    # matvec accepts flat vectors; any input layout with the right number of entries works.
    assert op.matvec(x.reshape(3, -1)).shape == (3, op.out_features)


def test_compose_equals_matrix_product():
    A, JA = build("conv2d")  # (3, 6, 7) -> (4, 6, 7)
    W = rand(5, 4 * 6 * 7, seed=40)
    B = lipreg.LinearMap(
        lambda x: x.reshape(x.shape[0], -1) @ W.T, A.out_shape, (5,), F64, torch.device("cpu"), "B"
    )
    C = compose([A, B])
    assert C.in_shape == A.in_shape and C.out_shape == (5,)
    torch.testing.assert_close(C.to_dense(), W @ JA, rtol=1e-12, atol=1e-10)
    with pytest.raises(ValueError, match="shapes differ"):
        compose([B, A])
    with pytest.raises(ValueError):
        compose([])


# --------------------------------------------------------------------------------------------
# The LinearMaps that AutoLip builds from modules (lipreg's rules) are the layers' linear parts
# --------------------------------------------------------------------------------------------


def _modules():
    from torch import nn

    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.3, 2.0)
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
    return [
        ("conv_zeros", nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1)), (2, 7, 6)),
        (
            "conv_reflect",
            nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")),
            (2, 5, 6),
        ),
        (
            "conv_circular",
            nn.Sequential(nn.Conv2d(2, 3, 3, padding=2, padding_mode="circular", dilation=2)),
            (2, 6, 5),
        ),
        (
            "conv_replicate",
            nn.Sequential(nn.Conv1d(2, 3, 4, padding=2, padding_mode="replicate")),
            (2, 9),
        ),
        ("conv3d_groups", nn.Sequential(nn.Conv3d(4, 2, 2, groups=2, padding=1)), (4, 3, 4, 3)),
        (
            "convT",
            nn.Sequential(nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)),
            (3, 4, 3),
        ),
        (
            "convT1d_groups",
            nn.Sequential(nn.ConvTranspose1d(4, 6, 3, stride=3, groups=2, dilation=2)),
            (4, 5),
        ),
        ("avgpool", nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)), (2, 7, 7)),
        (
            "conv_bn_flatten_linear",
            nn.Sequential(nn.Conv2d(2, 3, 3), bn, nn.Flatten(), nn.Linear(3 * 3 * 4, 5)),
            (2, 5, 6),
        ),
    ]


MODULE_NAMES = [
    "conv_zeros",
    "conv_reflect",
    "conv_circular",
    "conv_replicate",
    "conv3d_groups",
    "convT",
    "convT1d_groups",
    "avgpool",
    "conv_bn_flatten_linear",
]


@pytest.mark.parametrize("idx", range(len(MODULE_NAMES)), ids=MODULE_NAMES)
def test_rule_linear_maps_match_layer_jacobian(idx):
    from lipreg.functional.analysis import analyse
    from lipreg.functional.chains import chain_linear_map, find_affine_chains

    torch.manual_seed(idx)
    name, model, in_shape = _modules()[idx]
    assert name == MODULE_NAMES[idx]
    model = model.double().eval()
    analysis = analyse(model, in_shape, dtype=F64)
    chains = list(find_affine_chains(analysis).values())
    assert len(chains) == 1  # every model here is one affine chain
    op = chain_linear_map(analysis, chains[0])
    J = jacobian(model, rand(*in_shape, seed=idx)[None]).reshape(-1, math.prod(in_shape))
    torch.testing.assert_close(op.to_dense(), J, rtol=1e-11, atol=1e-11)
    x = rand(2, op.in_features, seed=50)
    y = rand(2, op.out_features, seed=51)
    torch.testing.assert_close(
        (op.matvec(x) * y).sum(1), (x * op.rmatvec(y)).sum(1), rtol=1e-11, atol=1e-11
    )
