"""conv_pair_certificate: certified bounds on conv → activation → conv pairs by Fourier blocks.

Ground truths, all independent of lipreg: the two convolutions materialised as dense matrices by
PyTorch (``dense_conv_matrix``), the exact ``max_D ‖K2 D K1‖`` by enumerating every activation
pattern (the maximum of a convex function of ``D`` over the box is at a vertex) or, for larger
maps, a lower bound on it by alternating ascent; dense autograd Jacobians of the real network;
and, for a circular pair, the dense (not Fourier) torus LMI.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipreg.functional.analysis import analyse
from lipreg.functional.chains import find_affine_chains
from lipreg.functional.conv_pair_fourier import UnsupportedPairError, conv_output_shape
from lipreg.functional.conv_pairs import chain_pair_certificate, conv_pair_certificate
from lipreg.functional.specs import ConvData
from tests.helpers import F64, dense_conv_matrix, dense_jacobian_norms, gen

# Tightness factor over the exact pattern maximum measured on these geometries (4x4-6x6 maps,
# where torus boundary effects are largest): 1.23-1.71 (the dense per-position LMI is within 2 %
# of the maximum on the same pairs: the gap is the torus, not the relaxation).
TIGHTNESS = 1.8


def _conv(c_out, c_in, k, stride, pad, dil, in_shape, seed, groups=1) -> ConvData:
    dims = len(in_shape) - 1
    w = torch.randn(c_out, c_in // groups, *([k] * dims), dtype=F64, generator=gen(seed))
    return ConvData(w, (stride,) * dims, (pad,) * dims, (dil,) * dims, groups, tuple(in_shape))


def _pair(c0, c1, c2, n, k1, k2, s1, s2, p1, p2, d1=1, d2=1, dims=2, seed=0, groups=1):
    first = _conv(c1, c0, k1, s1, p1, d1, (c0, *([n] * dims)), seed, groups)
    second = _conv(c2, c1, k2, s2, p2, d2, conv_output_shape(first), seed + 1, groups)
    return first, second


def _dense(c: ConvData) -> torch.Tensor:
    return dense_conv_matrix(c.weight, c.in_shape[1:], c.stride, c.padding, c.dilation, c.groups)


def _pattern_max(A: torch.Tensor, B: torch.Tensor, a: float, b: float, seed: int = 0) -> float:
    """``max_{d ∈ {a,b}^n} ‖B diag(d) A‖``: exact by enumeration for ``n ≤ 14``, else the best
    of random patterns improved by alternating ascent (a lower bound on the maximum)."""
    n = A.shape[0]
    if n <= 14:
        d = torch.tensor(list(itertools.product([a, b], repeat=n)), dtype=F64)
        mats = B[None] @ (d[:, :, None] * A[None])
        return float(torch.linalg.matrix_norm(mats, 2).max())
    g = gen(seed)
    best = 0.0
    for _ in range(12):
        d = torch.where(torch.rand(n, generator=g, dtype=F64) < 0.5, a, b)
        for _ in range(40):
            U, S, Vh = torch.linalg.svd(B @ (d[:, None] * A))
            best = max(best, float(S[0]))
            # for fixed singular vectors the bilinear form is maximised coordinate by coordinate
            new = torch.where((B.T @ U[:, 0]) * (A @ Vh[0]) > 0, b, a)
            if torch.equal(new, d):
                break
            d = new
    return best


def _network(first: ConvData, second: ConvData, act: nn.Module, seed: int) -> nn.Module:
    dims = len(first.in_shape) - 1
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    g = gen(seed)
    b1 = torch.randn(first.weight.shape[0], *([1] * dims), dtype=F64, generator=g)
    b2 = torch.randn(second.weight.shape[0], *([1] * dims), dtype=F64, generator=g)

    class Pair(nn.Module):
        def forward(self, x):
            h = conv(x, first.weight, None, first.stride, first.padding, first.dilation)
            h = act(h + b1)
            out = conv(h, second.weight, None, second.stride, second.padding, second.dilation)
            return out + b2

    return Pair()


GEOMETRIES = {
    # (c0, c1, c2, n, k1, k2, s1, s2, p1, p2, d1, d2)
    "s1-p1-enum": (1, 1, 2, 4, 3, 3, 1, 1, 1, 1, 1, 1),
    "s1-p0-p1": (2, 2, 2, 5, 3, 3, 1, 1, 0, 1, 1, 1),
    "s2-first": (2, 3, 2, 6, 3, 3, 2, 1, 1, 1, 1, 1),
    "s2-second": (1, 2, 2, 6, 3, 3, 1, 2, 1, 1, 1, 1),
    "s2-both-enum": (3, 3, 3, 6, 3, 3, 2, 2, 1, 1, 1, 1),
    "dilation2": (2, 2, 2, 6, 3, 2, 1, 1, 1, 0, 2, 1),
    "dilation-second": (1, 2, 1, 5, 2, 3, 1, 1, 0, 2, 1, 2),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_relu_pair_is_sound_and_tight(name: str) -> None:
    first, second = _pair(*GEOMETRIES[name], seed=3)
    cert = conv_pair_certificate(first, (0.0, 1.0), second, max_steps=150)
    A, B = _dense(first), _dense(second)
    exact = _pattern_max(A, B, 0.0, 1.0)
    assert cert.value >= exact * (1 - 1e-12)
    assert cert.lmi_value >= exact * (1 - 1e-12)
    x = torch.randn(6, *first.in_shape, dtype=F64, generator=gen(9))
    jac = dense_jacobian_norms(_network(first, second, nn.ReLU(), 4), x)
    assert float(jac.max()) <= cert.value
    assert cert.value <= cert.product_bound
    assert cert.value <= TIGHTNESS * exact, (name, cert.value / exact)
    assert cert.estimate <= cert.lmi_value <= cert.estimate * (1 + 1e-6)


@pytest.mark.parametrize("slope", [(-0.3, 1.0), (0.25, 1.5), (-1.0, -0.5)])
def test_general_slopes_against_every_vertex(slope: tuple[float, float]) -> None:
    """Slope intervals not containing 0 exercise the widening to [min(a,0), max(b,0)]."""
    first, second = _pair(1, 1, 2, 4, 3, 3, 1, 1, 1, 1, seed=5)
    cert = conv_pair_certificate(first, slope, second, max_steps=100)
    exact = _pattern_max(_dense(first), _dense(second), *slope)
    assert exact * (1 - 1e-12) <= cert.value <= cert.product_bound
    assert cert.value <= 2.0 * exact


def test_one_and_three_dims_and_groups() -> None:
    for args in [
        dict(c0=2, c1=3, c2=2, n=9, k1=3, k2=3, s1=2, s2=1, p1=1, p2=1, dims=1),
        dict(c0=1, c1=2, c2=1, n=3, k1=2, k2=2, s1=1, s2=1, p1=1, p2=0, dims=3),
        dict(c0=2, c1=4, c2=2, n=5, k1=3, k2=3, s1=1, s2=1, p1=1, p2=1, groups=2),
    ]:
        first, second = _pair(**args, seed=7)
        cert = conv_pair_certificate(first, (0.0, 1.0), second, max_steps=60)
        lower = _pattern_max(_dense(first), _dense(second), 0.0, 1.0)
        assert lower * (1 - 1e-12) <= cert.value <= cert.product_bound, args


def _circular(w: torch.Tensor, n: int) -> torch.Tensor:
    """Dense matrix of the circular 2-D convolution ``z[i] = Σ_t w[t] x[(i + t) mod n]``."""
    c_in, k = w.shape[1], w.shape[-1]
    basis = torch.eye(c_in * n * n, dtype=F64).reshape(-1, c_in, n, n)
    out = F.conv2d(F.pad(basis, (0, k - 1, 0, k - 1), mode="circular"), w)
    return out.reshape(c_in * n * n, -1).T


def test_unpadded_pair_equals_the_dense_torus_lmi() -> None:
    """Without padding the pair lives on the torus Z_n itself; the Fourier blocks must give the
    same ρ*(T) as the dense circulant LMI with the same channel-wise T (hidden map (n-k+1)²
    inside the n×n torus: fake positions, ReLU slope [0, 1] unchanged)."""
    n = 5
    first, second = _pair(2, 3, 2, n, 3, 2, 1, 1, 0, 0, seed=11)
    cert = conv_pair_certificate(first, (0.0, 1.0), second, max_steps=40)
    assert cert.torus == (n, n)
    C1, C2 = _circular(first.weight, n), _circular(second.weight, n)
    # hidden channel-major layout: (c1, i, j) -> T = diag(t_c) ⊗ I
    t = torch.exp(cert.multipliers).repeat_interleave(n * n)
    S = torch.diag(2 * t) - C2.T @ C2
    rho = float(
        torch.linalg.eigvalsh(C1.T @ (t[:, None] * torch.linalg.solve(S, t[:, None] * C1)))[-1]
    )
    assert math.isclose(cert.estimate**2, rho, rel_tol=1e-9)
    assert cert.lmi_value**2 >= rho
    # and the dense torus pair is bounded too (torus patterns include the real ones)
    assert cert.lmi_value >= _pattern_max(C1, C2, 0.0, 1.0) * (1 - 1e-12)


def test_warm_start_reproduces_the_bound() -> None:
    first, second = _pair(2, 3, 2, 6, 3, 3, 2, 1, 1, 1, seed=13)
    cold = conv_pair_certificate(first, (0.0, 1.0), second, max_steps=80)
    warm = conv_pair_certificate(first, (0.0, 1.0), second, warm=cold.multipliers, max_steps=0)
    assert warm.lmi_value <= cold.lmi_value * (1 + 1e-7)
    assert warm.multipliers.shape == cold.multipliers.shape


def test_refusals_name_the_problem() -> None:
    first, second = _pair(2, 3, 2, 6, 3, 3, 1, 1, 1, 1, seed=0)
    wrong_map = ConvData(second.weight, (1, 1), (1, 1), (1, 1), 1, (3, 5, 5))
    with pytest.raises(UnsupportedPairError, match="in_shape"):
        conv_pair_certificate(first, (0.0, 1.0), wrong_map)
    wrong_channels = ConvData(second.weight[:, :2], (1, 1), (1, 1), (1, 1), 1, (3, 6, 6))
    with pytest.raises(UnsupportedPairError, match="input channels"):
        conv_pair_certificate(first, (0.0, 1.0), wrong_channels)
    one_d = _conv(2, 3, 3, 1, 1, 1, (3, 6), 0)
    with pytest.raises(UnsupportedPairError, match="spatial dims"):
        conv_pair_certificate(first, (0.0, 1.0), one_d)
    with pytest.raises(ValueError, match="slope"):
        conv_pair_certificate(first, (1.0, 0.0), second)
    with pytest.raises(ValueError, match="warm"):
        conv_pair_certificate(first, (0.0, 1.0), second, warm=torch.zeros(7, dtype=F64))


def test_chain_pair_certificate_merges_batchnorm() -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2, padding=1),
    ).double()
    with torch.no_grad():
        model[1].running_var.uniform_(0.3, 2.0, generator=gen(1))
        model[1].weight.normal_(generator=gen(2))
    model.eval()
    analysis = analyse(model, (2, 6, 6), dtype=F64)
    chains = list(find_affine_chains(analysis).values())
    assert len(chains) == 2
    cert = chain_pair_certificate(analysis, chains[0], (0.0, 1.0), chains[1], max_steps=60)
    assert cert is not None
    x = torch.randn(6, 2, 6, 6, dtype=F64, generator=gen(3))
    assert float(dense_jacobian_norms(model, x).max()) <= cert.value <= cert.product_bound

    mlp = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    analysis = analyse(mlp, (2, 2, 2), dtype=F64)
    chains = list(find_affine_chains(analysis).values())
    assert chain_pair_certificate(analysis, chains[0], (0.0, 1.0), chains[-1]) is None


def test_failed_certificate_warns_and_returns_the_labelled_product(monkeypatch) -> None:
    """If no block passes the float64 test, the LMI value is never reported: a warning, and
    the certified product of norms labelled as such."""
    import lipreg.functional.conv_pairs as module

    monkeypatch.setattr(module, "certify_hermitian_psd", lambda P, radius: False)
    first, second = _pair(2, 3, 2, 6, 3, 3, 1, 1, 1, 1, seed=17)
    with pytest.warns(UserWarning, match="did not pass the float64 certificate"):
        cert = conv_pair_certificate(first, (0.0, 1.0), second, max_steps=5)
    assert cert.method == "norm-product" and cert.value == cert.product_bound
    assert cert.lmi_value == math.inf


def test_zero_operator_gives_zero() -> None:
    first, second = _pair(2, 3, 2, 6, 3, 3, 1, 1, 1, 1, seed=19)
    zero = ConvData(torch.zeros_like(second.weight), (1, 1), (1, 1), (1, 1), 1, second.in_shape)
    assert conv_pair_certificate(first, (0.0, 1.0), zero).value == 0.0
    assert conv_pair_certificate(first, (0.0, 0.0), second).value == 0.0
