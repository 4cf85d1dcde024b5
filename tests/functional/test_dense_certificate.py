"""Dense certificates (one-triangle Gram + Lanczos + one Rump/Cholesky test) and the Lanczos
core, against independent ground truths: LAPACK float64 norms/eigenvalues, closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from lipreg.functional.certify import RELATIVE_MARGIN, matrix_norm_certificate
from lipreg.functional.gram import certified_top_eigenvalue, gram_lower
from lipreg.functional.lanczos import lanczos_top
from lipreg.functional.linear_map import LinearMap
from lipreg.functional.power_iteration import operator_norm

F64 = torch.float64
TIGHT = 1e-8  # today's dense certificates are within ~1e-9 relative of the exact norm


def exact(W: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(W.to(F64), ord=2))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rotated(singular: torch.Tensor, m: int, n: int, seed: int) -> torch.Tensor:
    """``U diag(s) Vᵀ`` with random orthogonal ``U`` (m × k), ``V`` (n × k)."""
    k = singular.numel()
    U = torch.linalg.qr(torch.randn(m, k, generator=gen(seed), dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen(seed + 1), dtype=F64)).Q
    return U @ torch.diag(singular.to(F64)) @ V.T


def assert_certified_and_tight(W: torch.Tensor, tight: float = TIGHT, **kw) -> None:
    truth = exact(W)
    cert = matrix_norm_certificate(W, **kw)
    assert cert.method == "dense"
    assert truth <= cert.bound <= truth * (1 + tight) + 1e-300, (cert.bound, truth)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (40, 7), (7, 40), (130, 300)])
def test_tall_wide_and_tiny_shapes(shape):
    assert_certified_and_tight(torch.randn(*shape, generator=gen(sum(shape)), dtype=F64))


def test_repeated_top_singular_values():
    s = torch.cat([torch.full((3,), 2.0), torch.linspace(1.9, 0.1, 57)])
    assert_certified_and_tight(rotated(s, 80, 70, 0))


def test_rank_one_and_rank_one_on_a_coordinate():
    u = torch.randn(50, 1, generator=gen(1), dtype=F64)
    v = torch.randn(1, 30, generator=gen(2), dtype=F64)
    assert_certified_and_tight(u @ v)
    E = torch.zeros(20, 30, dtype=F64)
    E[3, 7] = 5.0  # μI − G is then nearly singular on all but one coordinate
    assert_certified_and_tight(E)


def test_zero_matrix_is_exactly_zero():
    assert matrix_norm_certificate(torch.zeros(6, 4)).bound == 0.0


@pytest.mark.parametrize("scale", [1e150, 1e-150, 1e-300])
def test_huge_and_tiny_scales(scale):
    base = torch.randn(60, 45, generator=gen(3), dtype=F64)
    truth = exact(base) * scale
    bound = matrix_norm_certificate(base * scale).bound
    assert truth * (1 - 1e-14) <= bound <= truth * (1 + TIGHT)  # truth itself rounds ~1 ulp


def test_float32_weight_with_an_exact_float64_gram():
    """Small integers: W, WᵀW and its eigenvalues are exact; the norm of [[3, 4], [0, 0]] is 5."""
    W = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float32)
    bound = matrix_norm_certificate(W).bound
    assert 5.0 <= bound <= 5.0 * (1 + 2 * RELATIVE_MARGIN)
    ints = torch.randint(-8, 9, (64, 48), generator=gen(4)).to(torch.float32)
    assert_certified_and_tight(ints)


def test_warm_and_cold_certificates_are_both_certified():
    W = torch.randn(300, 200, generator=gen(5), dtype=F64)
    cold = matrix_norm_certificate(W)
    W2 = W + 1e-3 * torch.randn(300, 200, generator=gen(6), dtype=F64)
    truth = exact(W2)
    for v0 in (cold.v, None, torch.zeros(200), torch.full((200,), math.nan), torch.ones(7)):
        warm = matrix_norm_certificate(W2, v0=v0)
        assert truth <= warm.bound <= truth * (1 + TIGHT)


def test_a_warm_vector_orthogonal_to_the_top_one_is_still_certified_and_tight():
    W = torch.diag(torch.tensor([2.0] + [1.0] * 99, dtype=F64))
    v0 = torch.zeros(100, dtype=F64)
    v0[1] = 1.0  # Krylov space of diag(4, 1, ...) from e_2 never sees e_1
    assert_certified_and_tight(W, v0=v0)
    assert_certified_and_tight(W.T.contiguous()[:, :60], v0=torch.ones(60))


def test_certified_top_eigenvalue_of_a_gram_matrix():
    M = torch.randn(90, 150, generator=gen(7), dtype=F64)
    chunks = [M[:, :64].clone(), M[:, 64:].clone()]  # two column chunks
    G, frob2 = gram_lower(chunks, 90, M.device)
    assert torch.equal(G, G.T)
    assert torch.allclose(G, M @ M.T, rtol=1e-13, atol=1e-12)
    assert frob2 == pytest.approx(float((M * M).sum()), rel=1e-13)
    truth = float(torch.linalg.eigvalsh(M @ M.T)[-1])
    cert = certified_top_eigenvalue(G, frob2 * (1 + 1e-12), 150)
    assert truth <= cert.bound <= truth * (1 + TIGHT)
    assert cert.factorisations == 1


def test_lanczos_top_matches_eigvalsh():
    A = torch.randn(200, 120, generator=gen(8), dtype=F64)
    B = A.T @ A
    truth = torch.linalg.eigvalsh(B)
    q = torch.randn(120, generator=gen(9), dtype=F64)
    run = lanczos_top(lambda x: (B @ x, None), q / q.norm(), rtol=1e-12, max_iter=300)
    assert run.converged and run.theta == pytest.approx(float(truth[-1]), rel=1e-11)
    assert float(run.x @ B @ run.x) == pytest.approx(float(truth[-1]), rel=1e-11)
    assert run.gap == pytest.approx(float((truth[-1] - truth[-2]) / truth[-1]), rel=1e-3)


def test_lanczos_long_run_keeps_the_basis_orthogonal():
    """A slowly converging spectrum (many steps, single-pass re-orthogonalisation)."""
    n = 600
    evals = torch.linspace(0.0, 1.0, n, dtype=F64) ** 0.5
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen(10), dtype=F64)).Q
    B = Q @ torch.diag(evals) @ Q.T
    q = torch.randn(n, generator=gen(11), dtype=F64)
    run = lanczos_top(lambda x: (B @ x, None), q / q.norm(), rtol=1e-10, max_iter=400)
    assert run.n_iter > 50
    assert run.theta <= 1.0 + 1e-12
    # gap-free rule: (λ_1 − θ)|v_1ᵀx| ≤ r; here |v_1ᵀx| is not small once converged
    assert run.converged and 1.0 - run.theta <= 1e-6


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_products_raise(bad):
    W = torch.randn(30, 20, generator=gen(12), dtype=F64)
    W[4, 5] = bad
    op = LinearMap(lambda x: x @ W.T, (20,), (30,), F64, torch.device("cpu"), "bad")
    with pytest.raises(ValueError, match="non-finite"):
        operator_norm(op)
    with pytest.raises(ValueError, match="non-finite"):
        matrix_norm_certificate(W)


def test_overflowing_products_raise_non_finite():
    W = torch.full((10, 10), 1e30, dtype=torch.float32)  # AᵀA v overflows float32
    op = LinearMap(lambda x: x @ W.T, (10,), (10,), torch.float32, torch.device("cpu"), "big")
    with pytest.raises(ValueError, match="non-finite"):
        operator_norm(op)
    assert matrix_norm_certificate(W).bound >= 1e31  # the scaled float64 certificate is fine
