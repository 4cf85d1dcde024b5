"""The float64 positive-definiteness proof (Rump 2006) against matrices whose smallest
eigenvalue is known by construction (``Q diag(λ) Qᵀ``; its rounding, ~1e-15 relative, is far
below the 1e-12 margins tested)."""

from __future__ import annotations

import math

import pytest
import torch

from lipreg.functional.lmi import (
    certify_block_tridiagonal_psd,
    certify_hermitian_psd,
    certify_psd,
    gamma,
    product_radius,
    sqrt_up,
)


def _with_spectrum(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = eigs.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    P = (Q * eigs) @ Q.T
    return torch.triu(P) + torch.triu(P, 1).T  # exactly symmetric


def _spectrum(n: int, lmin: float, scale: float) -> torch.Tensor:
    eigs = torch.linspace(0.1, 1.0, n, dtype=torch.float64) * scale
    eigs[0] = lmin * scale
    return eigs


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e5])
@pytest.mark.parametrize("n", [5, 60])
def test_negative_min_eigenvalue_is_rejected(n: int, scale: float) -> None:
    P = _with_spectrum(_spectrum(n, -1e-12, scale))
    assert torch.linalg.eigvalsh(P)[0] < 0  # the construction is what we claim
    assert not certify_psd(P)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e5])
def test_min_eigenvalue_inside_margin_is_rejected(scale: float) -> None:
    # n = 300: Rump's shift ½γ_{602} tr ≈ 301 u · 165 scale ≈ 5.5e-12 scale > λ_min = 1e-12 scale
    P = _with_spectrum(_spectrum(300, 1e-12, scale))
    assert torch.linalg.eigvalsh(P)[0] > 0
    assert not certify_psd(P)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e5])
@pytest.mark.parametrize("n", [1, 5, 60, 300])
def test_clear_positive_definite_is_accepted(n: int, scale: float) -> None:
    assert certify_psd(_with_spectrum(_spectrum(n, 1e-6, scale)))


def test_small_positive_eigenvalue_accepted_when_margin_allows() -> None:
    # n = 5: shift ≈ 6u · 2.8 ≈ 2e-15, far below λ_min = 1e-12
    assert certify_psd(_with_spectrum(_spectrum(5, 1e-12, 1.0)))


def test_scalar_radius() -> None:
    n = 20
    P = _with_spectrum(_spectrum(n, 1e-3, 1.0))
    assert certify_psd(P, 0.4e-3 / n)  # ‖E‖ ≤ n·r = 4e-4 < 1e-3
    assert not certify_psd(P, 1.2e-3 / n)  # a perturbation of norm 1.2e-3 may reach λ < 0


def test_matrix_radius_uses_largest_row_sum() -> None:
    n = 20
    P = _with_spectrum(_spectrum(n, 1e-3, 1.0))
    R = torch.zeros(n, n, dtype=torch.float64)
    # ‖R‖_∞ = 0.9e-3 < λ_min = 1e-3 although N · max R = 1.8e-2 (Rump's cruder N·r would fail)
    R[0, 1] = R[1, 0] = 0.9e-3
    assert certify_psd(P, R)
    R[0, 1] = R[1, 0] = 1.5e-3  # a perturbation of norm 1.5e-3 may reach λ < 0
    assert not certify_psd(P, R)


def test_accepted_radius_is_sound_on_random_perturbations() -> None:
    n = 12
    P = _with_spectrum(_spectrum(n, 1e-2, 1.0), seed=3)
    R = torch.full((n, n), 0.99e-2 / n, dtype=torch.float64)
    assert certify_psd(P, R)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        S = torch.sign(torch.randn(n, n, generator=g, dtype=torch.float64))
        E = torch.triu(S * R) + torch.triu(S * R, 1).T
        assert torch.linalg.eigvalsh(P + E)[0] > 0


def test_input_checks() -> None:
    P = torch.eye(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        certify_psd(P.float())
    Q = P.clone()
    Q[0, 1] = 1e-3
    with pytest.raises(ValueError, match="symmetric"):
        certify_psd(Q)
    with pytest.raises(ValueError, match="non-negative"):
        certify_psd(P, -1.0)
    P[1, 1] = math.nan
    assert not certify_psd(P)
    assert not certify_psd(-torch.eye(2, dtype=torch.float64))


def test_hermitian() -> None:
    n = 8
    g = torch.Generator().manual_seed(0)
    Z = torch.randn(n, n, generator=g, dtype=torch.complex128)
    U, _ = torch.linalg.qr(Z)
    for lmin, ok in ((1e-6, True), (-1e-12, False)):
        eigs = _spectrum(n, lmin, 1.0).to(torch.complex128)
        H = (U * eigs) @ U.mH
        H = torch.triu(H) + torch.triu(H, 1).mH
        H.diagonal().imag.zero_()
        assert certify_hermitian_psd(H) is ok
    with pytest.raises(ValueError, match="Hermitian"):
        certify_hermitian_psd(Z)


def _block_tridiagonal(sizes: list[int], seed: int) -> tuple[list, list, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    diag, low = [], []
    for k, n in enumerate(sizes):
        A = torch.randn(n, n, generator=g, dtype=torch.float64)
        D = A @ A.T + 0.5 * torch.eye(n, dtype=torch.float64)
        diag.append(torch.triu(D) + torch.triu(D, 1).T)
        if k:
            low.append(torch.randn(n, sizes[k - 1], generator=g, dtype=torch.float64))
    N = sum(sizes)
    off = [0, *torch.cumsum(torch.tensor(sizes), 0).tolist()]
    dense = torch.zeros(N, N, dtype=torch.float64)
    for k, D in enumerate(diag):
        dense[off[k] : off[k + 1], off[k] : off[k + 1]] = D
        if k:
            dense[off[k] : off[k + 1], off[k - 1] : off[k]] = low[k - 1]
            dense[off[k - 1] : off[k], off[k] : off[k + 1]] = low[k - 1].T
    return diag, low, dense


@pytest.mark.parametrize("seed", range(4))
def test_block_tridiagonal_matches_the_spectrum(seed: int) -> None:
    sizes = [3, 5, 4, 2]
    diag, low, dense = _block_tridiagonal(sizes, seed)
    lmin = float(torch.linalg.eigvalsh(dense)[0])
    for margin, ok in ((1e-6, True), (-1e-10, False)):
        shift = lmin - margin * max(abs(lmin), 1.0)
        shifted = [D - shift * torch.eye(D.shape[0], dtype=torch.float64) for D in diag]
        dense_shifted = dense - shift * torch.eye(dense.shape[0], dtype=torch.float64)
        dense_shifted = torch.triu(dense_shifted) + torch.triu(dense_shifted, 1).T
        assert certify_block_tridiagonal_psd(shifted, low) is ok
        assert certify_psd(dense_shifted) is ok


def test_block_tridiagonal_radius() -> None:
    diag = [torch.eye(2, dtype=torch.float64), torch.eye(3, dtype=torch.float64)]
    low = [torch.zeros(3, 2, dtype=torch.float64)]
    zero_d = [torch.zeros(2, 2, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)]
    # an off-diagonal radius of 0.3 per entry: row sums of 0.9 (rows 0-1) and 0.6: accept
    assert certify_block_tridiagonal_psd(diag, low, zero_d, [torch.full((3, 2), 0.3).double()])
    assert not certify_block_tridiagonal_psd(diag, low, zero_d, [torch.full((3, 2), 0.34).double()])


def test_product_radius_bounds_the_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(7, 300, generator=g, dtype=torch.float64)
    B = torch.randn(300, 5, generator=g, dtype=torch.float64)
    # float64 products against an extended-precision reference (x87 long double, 64-bit mantissa)
    err = (A @ B).numpy() - A.numpy().astype("longdouble") @ B.numpy().astype("longdouble")
    assert (abs(err).astype("float64") <= product_radius(A, B).numpy()).all()
    assert (abs(err).astype("float64") > 0).any()  # the check is not vacuous
    assert gamma(10) >= 10 * 2.0**-53 and sqrt_up(2.0) > math.sqrt(2.0)


@pytest.mark.parametrize(("lmin", "ok"), [(1e-3, True), (-1e-9, False)])
def test_badly_scaled_matrices(lmin: float, ok: bool) -> None:
    # D A D has the inertia of A (Sylvester): PD iff λ_min(A) > 0, whatever the scaling
    A = _with_spectrum(_spectrum(40, lmin, 1.0), seed=5)
    d = torch.logspace(-4, 4, 40, dtype=torch.float64)
    P = A * (d[:, None] * d[None, :])
    P = torch.triu(P) + torch.triu(P, 1).T
    assert certify_psd(P) is ok
    diag = [P[:20, :20].contiguous(), P[20:, 20:].contiguous()]
    low = [P[20:, :20].contiguous()]
    assert certify_block_tridiagonal_psd(diag, low) is ok


def test_vector_diagonal_block_equals_the_matrix_form() -> None:
    diag, low, dense = _block_tridiagonal([6, 4, 3], 7)
    dense[:6, :6] = torch.eye(6, dtype=torch.float64)  # block 0 := I, given as a vector below
    lmin = float(torch.linalg.eigvalsh(dense)[0])
    for margin, ok in ((1e-6, True), (-1e-10, False)):
        shift = lmin - margin  # the shifted matrix has λ_min = margin
        rest = [D - shift * torch.eye(D.shape[0], dtype=torch.float64) for D in diag[1:]]
        first = torch.full((6,), 1.0 - shift, dtype=torch.float64)
        assert certify_block_tridiagonal_psd([first, *rest], low) is ok
        assert certify_block_tridiagonal_psd([torch.diag(first), *rest], low) is ok
        zero = [torch.zeros(6, dtype=torch.float64), *(torch.zeros_like(D) for D in rest)]
        assert certify_block_tridiagonal_psd([first, *rest], low, zero, None) is ok
