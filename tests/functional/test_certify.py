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
