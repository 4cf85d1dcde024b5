"""banded_gram: the Gram test of a zero-padded convolution against independent ground truths
(the convolution materialised densely, float64 SVD; brute-force enumeration of the coupled
positions)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lipreg.functional.banded_gram import (
    abs_norm_bound,
    axis_incidences,
    certify_conv_norm,
    conv_matrix,
    conv_pass_flops,
    gram_plan,
    output_spatial,
    pointwise_product_bound,
    used_tap_pairs,
)
from lipreg.functional.specs import ConvData
from tests.helpers import gen

F64 = torch.float64


def _dense(conv: ConvData) -> torch.Tensor:
    """The convolution's matrix (out × in), from the convolution applied to the identity."""
    n = math.prod(conv.in_shape)
    eye = torch.eye(n, dtype=F64).reshape(n, *conv.in_shape)
    fn = (F.conv1d, F.conv2d, F.conv3d)[len(conv.in_shape) - 2]
    out = fn(eye, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.reshape(n, -1).T


def _norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix, 2))


def _conv(in_shape, weight_shape, stride, padding, dilation, groups, seed=0) -> ConvData:
    w = torch.randn(weight_shape, dtype=F64, generator=gen(seed))
    return ConvData(w, stride, padding, dilation, groups, in_shape)


CASES = {
    "2d-s1-p1": ((3, 8, 8), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),
    "2d-groups-stride2": ((4, 7, 9), (6, 2, 3, 3), (2, 2), (1, 1), (1, 1), 2),
    "2d-mixed": ((3, 9, 8), (5, 3, 3, 2), (2, 1), (0, 1), (2, 1), 1),
    "2d-pad-gt-kernel": ((2, 5, 6), (3, 2, 3, 3), (1, 2), (3, 2), (1, 1), 1),
    "2d-stride3-dil2": ((2, 11, 10), (3, 2, 3, 3), (3, 3), (2, 1), (2, 2), 1),
    "2d-depthwise": ((5, 6, 6), (5, 1, 3, 3), (1, 1), (1, 1), (1, 1), 5),
    "2d-7x7-stride2": ((3, 14, 14), (4, 3, 7, 7), (2, 2), (3, 3), (1, 1), 1),
    "2d-1x3": ((3, 5, 7), (4, 3, 1, 3), (1, 1), (0, 1), (1, 1), 1),
    "1d-depthwise-stride3": ((4, 10), (4, 1, 5), (3,), (2,), (1,), 4),
    "1d-dilated": ((2, 13), (3, 2, 3), (1,), (0,), (3,), 1),
    "3d": ((2, 5, 5, 5), (3, 2, 3, 3, 3), (1, 2, 1), (1, 1, 1), (1, 1, 1), 1),
    "3d-stride2-groups": ((4, 4, 5, 4), (4, 2, 2, 3, 2), (2, 1, 2), (0, 1, 1), (1, 1, 1), 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_certified_between_norm_and_one_plus_two_delta(case: str) -> None:
    """Given the exact norm as estimate, the certificate is sound and within (1 + 2δ)."""
    conv = _conv(*CASES[case])
    true = _norm(_dense(conv))
    cert = certify_conv_norm(conv, true, refine=False)
    assert cert is not None and cert.method == "conv-gram"
    assert true <= cert.bound <= true * (1 + 2 * cert.delta)
    assert cert.delta == 1e-6


@pytest.mark.parametrize("case", ["2d-groups-stride2", "1d-dilated", "3d"])
def test_estimate_below_the_norm_still_gives_a_bound(case: str) -> None:
    """A low estimate makes the test fail until δ is large enough: still ≥ the norm."""
    conv = _conv(*CASES[case], seed=1)
    true = _norm(_dense(conv))
    cert = certify_conv_norm(conv, true * (1 - 3e-4), refine=False)
    assert cert is not None and cert.delta > 1e-6
    assert cert.bound >= true


@pytest.mark.parametrize("case", ["2d-s1-p1", "2d-depthwise", "1d-depthwise-stride3"])
def test_estimate_far_below_is_refused(case: str) -> None:
    """No δ ≤ max_delta can certify 0.9 × the norm: the Cholesky test must reject."""
    conv = _conv(*CASES[case], seed=2)
    true = _norm(_dense(conv))
    assert certify_conv_norm(conv, 0.9 * true, max_delta=1e-2, refine=False) is None


@pytest.mark.parametrize("case", ["2d-mixed", "3d-stride2-groups"])
def test_a_poor_estimate_is_refined_first(case: str) -> None:
    """The float64 Lanczos refinement lifts a poor estimate: the first δ succeeds."""
    conv = _conv(*CASES[case], seed=3)
    true = _norm(_dense(conv))
    cert = certify_conv_norm(conv, 0.5 * true)
    assert cert is not None and cert.delta == 1e-6
    assert true <= cert.bound <= true * (1 + 2e-6)


@pytest.mark.parametrize(
    "geometry",
    [
        ((4, 6, 6), (5, 4, 1, 1), (1, 1), (0, 0), (1, 1), 1),
        ((4, 7, 6), (6, 2, 1, 1), (2, 3), (1, 0), (1, 1), 2),
        ((3, 9), (2, 3, 1), (2,), (1,), (1,), 1),
    ],
)
def test_pointwise_is_the_kernel_matrix_norm(geometry) -> None:
    conv = _conv(*geometry)
    true = _norm(_dense(conv))
    cert = certify_conv_norm(conv, 1.0)
    assert cert is not None and cert.method == "conv-pointwise"
    assert true <= cert.bound <= true * (1 + 1e-8)


@pytest.mark.parametrize("case", ["2d-groups-stride2", "2d-stride3-dil2", "3d-stride2-groups"])
def test_abs_norm_bound_dominates_the_absolute_matrix(case: str) -> None:
    conv = _conv(*CASES[case])
    assert abs_norm_bound(conv.weight, conv.groups) >= _norm(_dense(conv).abs())


def test_kernel_error_adds_its_term() -> None:
    conv = _conv(*CASES["2d-s1-p1"])
    true = _norm(_dense(conv))
    plain = certify_conv_norm(conv, true)
    padded = certify_conv_norm(conv, true, kernel_error=1e-3)
    assert plain is not None and padded is not None
    extra = 1e-3 * abs_norm_bound(conv.weight, conv.groups)
    assert padded.bound == pytest.approx(plain.bound + extra, rel=1e-12)


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("geometry", [(7, 4, 3, 2, 1, 1), (9, 3, 3, 1, 2, 2), (5, 5, 2, 3, 2, 1)])
def test_axis_incidences_match_brute_force(side: str, geometry) -> None:
    """Every coupling (i, j, t, t') of one axis, once, by enumerating outputs and taps."""
    n_in, n_out, k, s, pad, d = geometry
    expected = set()
    for q, t, u in itertools.product(range(n_out), range(k), range(k)):
        p, p2 = q * s - pad + t * d, q * s - pad + u * d
        if side == "input" and 0 <= p < n_in and 0 <= p2 < n_in:
            expected.add((p, p2, t, u))
    for q, q2, t, u in itertools.product(range(n_out), range(n_out), range(k), range(k)):
        p = q * s - pad + t * d
        if side == "output" and 0 <= p < n_in and p == q2 * s - pad + u * d:
            expected.add((q, q2, t, u))
    i, j, t, u = axis_incidences(n_in, n_out, k, s, pad, d, side)
    got = list(zip(i.tolist(), j.tolist(), t.tolist(), u.tolist(), strict=True))
    assert len(got) == len(set(got)) and set(got) == expected


def test_plan_picks_the_smaller_side() -> None:
    strided = _conv((8, 16, 16), (8, 8, 3, 3), (2, 2), (1, 1), (1, 1), 1)
    assert gram_plan(strided).side == "output"
    assert output_spatial(strided) == (8, 8)
    widening = _conv((2, 8, 8), (16, 2, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    assert gram_plan(widening).side == "input"
    assert gram_plan(widening).size == 2 * 64 and gram_plan(widening).reach == 2


@pytest.mark.parametrize("strides", [(1, 1), (2, 1), (1, 3)])
def test_pointwise_product_is_the_product_matrix_norm(strides) -> None:
    """Two 1×1 convolutions (paddings, strides) composed: the norm of W_b W_a, exactly."""
    g = gen(7)
    wa = torch.randn(6, 4, 1, 1, dtype=F64, generator=g)
    wb = torch.randn(3, 6, 1, 1, dtype=F64, generator=g)
    x_shape = (4, 7, 6)
    n = math.prod(x_shape)
    x = torch.eye(n, dtype=F64).reshape(n, *x_shape)
    y = F.conv2d(F.conv2d(x, wa, None, strides[0], 1), wb, None, strides[1], 0)
    true = _norm(y.reshape(n, -1).T)
    bound = pointwise_product_bound([wa.flatten(1), wb.flatten(1)], [0.0, 0.0])
    assert true <= bound <= true * (1 + 1e-8)  # the dense certificate pads by 1e-9
    padded = pointwise_product_bound([wa.flatten(1), wb.flatten(1)], [1e-3, 1e-3])
    assert padded > bound * (1 + 1e-4)  # the kernel errors are accounted for


def test_used_tap_pairs_of_a_strided_output_side() -> None:
    """3×3, stride 2: output positions share an input only through taps of equal parity per
    axis (3 × 3 + 2 = 5 pairs per axis, 25 in 2-D); the input side uses all 81."""
    conv = _conv((2, 9, 9), (3, 2, 3, 3), (2, 2), (1, 1), (1, 1), 1)
    out_pairs = {tuple(p) for p in used_tap_pairs(conv, "output").tolist()}
    parity = {
        (3 * a + b, 3 * c + d)
        for a, b, c, d in itertools.product(range(3), repeat=4)
        if (a - c) % 2 == 0 and (b - d) % 2 == 0
    }
    assert out_pairs == parity and len(out_pairs) == 25
    assert used_tap_pairs(conv, "input").shape[0] == 81


@pytest.mark.parametrize("case", sorted(CASES))
def test_conv_matrix_is_the_convolution_applied_to_the_identity(case: str) -> None:
    """The scattered kernel equals, bit for bit, the float64 convolution of every basis vector
    (whose outputs are single kernel values: exact)."""
    conv = _conv(*CASES[case])
    expected = _dense(conv)
    matrix = conv_matrix(conv)
    assert matrix.shape == expected.shape and matrix.dtype == F64
    assert torch.equal(matrix, expected)


def test_conv_pass_flops_counts_the_multiply_adds() -> None:
    conv = _conv(*CASES["2d-groups-stride2"])  # 4×7×9 → 6 channels, groups 2, stride 2, pad 1
    outputs = 4 * 5  # ⌊(7 + 2 − 3)/2⌋ + 1 by ⌊(9 + 2 − 3)/2⌋ + 1
    assert conv_pass_flops(conv) == 6 * outputs * 6 * 2 * 9


@pytest.mark.parametrize(
    ("mode", "padding", "stride", "groups"),
    [("reflect", 1, 1, 1), ("replicate", 2, 2, 2), ("circular", 1, 1, 3), ("zeros", 1, 2, 3)],
)
def test_abs_norm_bound_with_copies_dominates_padded_convolutions(mode, padding, stride, groups):
    """Padding modes that duplicate entries: ``copies = Π(1 + 2p)`` covers them (dense |A| of
    the module, float64)."""
    conv = torch.nn.Conv2d(6, 12, 3, stride, padding, groups=groups, padding_mode=mode)
    conv = conv.double().requires_grad_(False)
    torch.nn.init.normal_(conv.weight, generator=gen(4))
    n = 6 * 7 * 8
    matrix = conv(torch.eye(n, dtype=F64).reshape(n, 6, 7, 8)) - conv.bias[:, None, None]
    absolute = matrix.reshape(n, -1).T.abs()
    copies = (1 + 2 * padding) ** 2 if mode != "zeros" else 1
    assert abs_norm_bound(conv.weight, groups, copies=copies) >= _norm(absolute)


@pytest.mark.parametrize(("stride", "padding", "out_pad", "groups"), [(1, 1, 0, 1), (2, 1, 1, 2)])
def test_abs_norm_bound_dominates_transposed_convolutions(stride, padding, out_pad, groups):
    w = torch.randn(4, 3, 3, 3, dtype=F64, generator=gen(5))  # (c_in, c_out/groups, k, k)
    n = 4 * 5 * 6
    eye = torch.eye(n, dtype=F64).reshape(n, 4, 5, 6)
    out = F.conv_transpose2d(eye, w, None, stride, padding, out_pad, groups)
    assert abs_norm_bound(w, groups) >= _norm(out.reshape(n, -1).T.abs())


@pytest.mark.parametrize("case", ["2d-groups-stride2", "1d-dilated", "3d"])
def test_a_good_estimate_needs_no_refinement(case: str) -> None:
    """The float32-accurate estimate is tried first: no float64 Lanczos vector comes back."""
    conv = _conv(*CASES[case], seed=6)
    true = _norm(_dense(conv))
    cert = certify_conv_norm(conv, true * (1 - 1e-8))
    assert cert is not None and cert.v is None and cert.delta == 1e-6
    assert cert.bound >= true


@pytest.mark.parametrize("case", ["2d-s1-p1", "3d-stride2-groups"])
def test_a_failed_first_test_refines_and_returns_the_vector(case: str) -> None:
    conv = _conv(*CASES[case], seed=7)
    true = _norm(_dense(conv))
    cert = certify_conv_norm(conv, 0.99 * true)
    assert cert is not None and cert.v is not None
    assert cert.v.shape == (math.prod(conv.in_shape),)
    assert true <= cert.bound <= true * (1 + 2e-6)
    # the returned vector warm-starts the next refinement: still sound
    again = certify_conv_norm(conv, 0.99 * true, v0=cert.v)
    assert again is not None and again.bound >= true


def test_the_search_starts_at_delta0() -> None:
    conv = _conv(*CASES["2d-mixed"], seed=8)
    true = _norm(_dense(conv))
    cert = certify_conv_norm(conv, true, refine=False, delta0=4e-4)
    assert cert is not None and cert.delta == 4e-4
    assert true <= cert.bound <= true * (1 + 2 * 4e-4)
