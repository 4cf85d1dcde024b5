"""Float64 proofs of positive definiteness: the only place where a matrix becomes a certificate.

Every tight certificate of issue 9 (LipSDP-Neuron, ECLipsE-Fast, certified SeqLip pairs,
convolutional pairs) ends in "this float64 matrix, up to an explicit rounding radius, is
positive definite". Whatever produced the matrix (a first-order optimiser, a closed form, float32
multipliers) only decides *which* matrix is tested; the test below is what is trusted.

**The theorem** (S. M. Rump, "Verification of positive definiteness", BIT 46:433–452, 2006,
Thm 2.3, Cor. 2.4 and 2.7; machine-checked for binary64 in ValidSDP, ``theories/cholesky.v``,
``corollary_2_7_with_c_r_upper_bounds``). Let ``A`` be a symmetric float64 ``N × N`` matrix with
``A_ii ≥ 0`` and ``4(N+1)u < 1`` (``u = 2⁻⁵³``, ``η = 2⁻¹⁰⁷⁴``, ``γ_k = ku/(1 − ku)``). Take::

    c ≥ ½ γ_{2(N+1)} tr(A) + 4ηN (2(N+1) + max_i A_ii)

and ``Ã`` equal to ``A`` off the diagonal with ``Ã_ii ≤ A_ii − c − r``. If floating-point
Cholesky of ``Ã`` runs to completion (every pivot > 0), then every symmetric ``X`` with
``‖X − A‖_2 ≤ r`` is positive definite. Any summation order inside the dot products is allowed
(blocked and FMA BLAS), Strassen-type products are not (LAPACK ``dpotrf`` does not use them).

**The radius.** Callers pass an entrywise bound ``Rad ≥ |P_exact − P̂|`` on the rounding of the
matrix formation. For symmetric ``E`` with ``|E| ≤ Rad``: ``‖E‖_2 = ρ(E) ≤ ρ(|E|) ≤ ρ(Rad) ≤
‖Rad‖_∞`` (Perron–Frobenius monotonicity), so ``r = ‖Rad‖_∞`` (the largest row sum; sharper
than Rump's ``N · max Rad``).

**Rounding of the test itself.** ``c``, ``r`` and ``tr`` are computed in float64 with relative
errors ≤ ``γ_N`` ≪ 1e-6 (for ``N`` < 10⁹); the shift ``(c + r)`` is multiplied by ``1 + 1e-6``,
and each shifted diagonal entry is rounded down with ``nextafter``, so ``Ã_ii ≤ A_ii − c − r``
holds exactly.

**Block-tridiagonal matrices** (the LipSDP LMI of a chain): :func:`certify_block_tridiagonal_psd`
runs the block Cholesky ``L_00 = chol(D_0 − s I)``, ``L_{k,k-1} = B_k L_{k-1,k-1}^{-T}``,
``L_kk = chol(D_k − s I − L_{k,k-1} L_{k,k-1}ᵀ)``. Every entry it computes is still "``a − Σ
x_i y_i`` in some order, then ``÷`` or ``√``", and the structural zeros contribute exact zeros,
so it *is* a floating-point Cholesky of the whole matrix (in one particular summation order) and
the theorem applies with the global ``N`` and trace. Cost ``O(Σ n_k³)``: linear in depth.
It first applies the exact power-of-two congruence ``P ↦ DPD`` (:func:`pow2_scaling`, unit
diagonal), so that the shift is relative to each block's own scale.

Matrices must be float64 and exactly symmetric: symmetrising inside the test would change the
matrix being certified, so the caller builds both triangles from the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "ETA",
    "UNIT_ROUNDOFF",
    "certify_block_tridiagonal_psd",
    "certify_hermitian_psd",
    "certify_psd",
    "gamma",
    "pow2_scaling",
    "product_radius",
    "rump_shift",
    "sqrt_up",
]

#: Unit roundoff of binary64 (round to nearest).
UNIT_ROUNDOFF = 2.0**-53
#: Smallest positive subnormal binary64 number.
ETA = 2.0**-1074
#: Relative inflation of the computed shift ``c + r``: covers the float64 rounding of ``c``,
#: ``r`` and the trace (each ≤ γ_N relative, N < 1e9).
_SHIFT_SAFETY = 1.0 + 1e-6


def gamma(k: int) -> float:
    """Higham's ``γ_k = k u / (1 − k u)`` for binary64, rounded up slightly.

    ``|fl(Σ_{i≤k} x_i y_i) − Σ x_i y_i| ≤ γ_k Σ |x_i y_i|`` for any summation order (no
    underflow). The returned float is increased by a relative ``4u`` so that its own rounding
    never makes it smaller than the exact ``γ_k``.

    Raises:
        ValueError: if ``k u ≥ 1/2`` (the bound is meaningless).
    """
    ku = k * UNIT_ROUNDOFF
    if k < 0 or ku >= 0.5:
        raise ValueError(f"gamma(k) needs 0 <= k < 2^52, got k = {k}")
    return ku / (1.0 - ku) * (1.0 + 4.0 * UNIT_ROUNDOFF)


def sqrt_up(x: float) -> float:
    """An upper bound on ``√x`` for ``x ≥ 0``: IEEE ``sqrt`` is correctly rounded, so one
    ``nextafter`` towards ``+∞`` is enough."""
    if not x >= 0.0:
        raise ValueError(f"sqrt_up needs x >= 0, got {x}")
    return math.nextafter(math.sqrt(x), math.inf)


def product_radius(A: Tensor, B: Tensor) -> Tensor:
    """Entrywise bound on ``|fl(A B) − A B|`` for float64 ``A`` (``m × n``), ``B`` (``n × p``).

    Formula: ``γ_{n+2} fl(|A| |B|) + 2(n+1)η``. Why: ``|fl(AB) − AB| ≤ γ_n |A||B| + nη``
    (Higham, ASNA §3.5, any summation order; ``nη`` covers underflow), ``fl(|A||B|)`` is at least
    ``|A||B| / (1 + γ_n)``, and ``γ_n (1 + γ_n)`` plus the rounding of the final product is
    below ``γ_{n+2}`` for ``n < 10⁷``. The result is computed in float64; it is an upper bound.
    """
    _require_float64(A, "A")
    _require_float64(B, "B")
    n = A.shape[-1]
    if n >= 10**7:
        raise ValueError(f"product_radius supports inner dimension < 1e7, got {n}")
    return A.abs() @ B.abs() * gamma(n + 2) + 2.0 * (n + 1) * ETA


def _require_float64(X: Tensor, name: str) -> None:
    if X.dtype != torch.float64:
        raise TypeError(f"{name} must be float64 (certificates are float64), got {X.dtype}")


def _check_square_symmetric(P: Tensor) -> None:
    _require_float64(P, "P")
    if P.dim() != 2 or P.shape[0] != P.shape[1]:
        raise ValueError(f"P must be a square matrix, got shape {tuple(P.shape)}")
    if not torch.equal(P, P.mT):
        raise ValueError(
            "P must be exactly symmetric: build both triangles from the same numbers "
            "(symmetrising inside the test would change the matrix being certified)"
        )


def _radius_row_sum(radius: Tensor | float, n: int) -> float:
    """``‖Rad‖_∞`` (largest row sum) of an entrywise radius (a scalar means every entry)."""
    if isinstance(radius, Tensor):
        _require_float64(radius, "radius")
        if radius.numel() == 1:
            radius = float(radius)
        else:
            if radius.shape != (n, n):
                raise ValueError(f"radius must be a scalar or {(n, n)}, got {tuple(radius.shape)}")
            if not bool(torch.isfinite(radius).all()) or bool((radius < 0).any()):
                raise ValueError("radius must be finite and non-negative entrywise")
            return float(radius.sum(dim=1).max()) if n else 0.0
    r = float(radius)
    if not (math.isfinite(r) and r >= 0.0):
        raise ValueError(f"radius must be finite and non-negative, got {r}")
    return n * r


def rump_shift(n: int, trace: float, max_diag: float, radius_norm: float) -> float:
    """The diagonal shift ``(c + r)(1 + 1e-6)`` of Rump's test for an ``n × n`` matrix.

    ``c = ½ γ_{2(n+1)} tr(A) + 4ηn (2(n+1) + max_i A_ii)`` is Rump's Cholesky backward-error
    bound (Cor. 2.4) and ``r = radius_norm ≥ ‖X − A‖_2`` the formation error (Cor. 2.7).

    Raises:
        ValueError: if ``4(n+1)u ≥ 1`` (the theorem does not apply).
    """
    if 4 * (n + 1) * UNIT_ROUNDOFF >= 1.0:
        raise ValueError(f"matrix of size {n} is too large for Rump's test (4(N+1)u >= 1)")
    c = 0.5 * gamma(2 * (n + 1)) * trace + 4.0 * ETA * n * (2.0 * (n + 1) + max_diag)
    return (c + radius_norm) * _SHIFT_SAFETY


def _shift_diagonal(D: Tensor, shift: float) -> Tensor:
    """Copy of ``D`` with ``D_ii`` replaced by a float64 number ``≤ D_ii − shift`` (exactly)."""
    if D.dim() == 1:
        return torch.nextafter(D - shift, torch.full_like(D, -math.inf))
    out = D.clone()
    d = torch.diagonal(D) - shift
    torch.diagonal(out).copy_(torch.nextafter(d, torch.full_like(d, -math.inf)))
    return out


def certify_psd(P: Tensor, radius: Tensor | float = 0.0) -> bool:
    """True only if every symmetric ``X`` with ``|X − P| ≤ radius`` (entrywise) is positive
    definite.

    Rump 2006, Cor. 2.4/2.7 (module docstring): shift the diagonal down by
    ``(½ γ_{2(N+1)} tr P + 4ηN(2(N+1) + max P_ii) + ‖radius‖_∞)(1 + 1e-6)`` (each entry rounded
    down) and run LAPACK's float64 Cholesky; success is the proof. If it fails, the same test
    runs on the exact power-of-two congruence ``DPD`` (:func:`pow2_scaling`, radius ``D Rad D``),
    which succeeds on badly scaled matrices. ``False`` means "not proved" (the matrix may
    still be PD, e.g. inside the rounding margin).

    Args:
        P: Float64, square and exactly symmetric (checked).
        radius: Entrywise bound on ``|X − P|``: a non-negative scalar (every entry) or an
            ``N × N`` float64 tensor.

    Raises:
        TypeError / ValueError: wrong dtype, non-square or non-symmetric ``P``, or an invalid
            radius. A ``P`` with non-finite entries returns ``False``.
    """
    _require_float64(P, "P")
    if not bool(torch.isfinite(P).all()):
        return False  # NaN/inf: nothing to prove (and NaN != NaN would fail the symmetry check)
    _check_square_symmetric(P)
    n = P.shape[0]
    if n == 0:
        return True
    r = _radius_row_sum(radius, n)
    P = P.cpu()
    diag = torch.diagonal(P)
    if bool((diag <= 0).any()):
        return False
    shift = rump_shift(n, float(diag.sum()), float(diag.max()), r)
    if int(torch.linalg.cholesky_ex(_shift_diagonal(P, shift))[1]) == 0:
        return True
    # not proved as given: retry on the exactly scaled matrix (each try is a full proof)
    d = pow2_scaling(diag)
    dd = d[:, None] * d[None, :]  # powers of two: exact and exactly symmetric
    Ps = P * dd
    if isinstance(radius, Tensor) and radius.numel() > 1:
        r = _radius_row_sum(radius.cpu() * dd, n)
    else:
        r *= float(d.max()) ** 2
    r += 2.0 * n * ETA  # the scaling is exact except for underflow (≤ η per entry)
    diag = torch.diagonal(Ps)
    shift = rump_shift(n, float(diag.sum()), float(diag.max()), r)
    _, info = torch.linalg.cholesky_ex(_shift_diagonal(Ps, shift))
    return int(info) == 0


def pow2_scaling(diagonal: Tensor) -> Tensor:
    """Powers of two ``d_i ≈ 1/√P_ii`` (exponents clamped to ±250) for the congruence
    ``P ↦ DPD``.

    ``P ≻ 0 ⇔ DPD ≻ 0`` for any positive diagonal ``D``, and ``|D(X − P)D| = D|X − P|D``; with
    powers of two the scaled entries are exact (up to underflow, which callers cover with
    ``η`` per entry). Scaling to a unit diagonal makes Rump's shift relative to each block's
    own size: without it a well-conditioned but badly scaled LMI (diagonal from 10 to 10⁷)
    needs a large inflation of ``ρ`` to pass.
    """
    _, e = torch.frexp(diagonal)
    e = torch.clamp(torch.div(e, 2, rounding_mode="floor"), -250, 250)
    return torch.ldexp(torch.ones_like(diagonal), -e)


def certify_hermitian_psd(P: Tensor, radius: Tensor | float = 0.0) -> bool:
    """:func:`certify_psd` for a complex128 Hermitian ``P`` (e.g. one Fourier block of a
    convolutional LMI).

    ``P = R + iI`` is positive definite iff its real embedding ``[[R, −I], [I, R]]`` (size
    ``2N``, symmetric because ``Iᵀ = −I``) is. A complex radius bound ``|X − P| ≤ ρ`` entrywise
    implies ``|ΔR|, |ΔI| ≤ ρ``, so the embedding's radius is ``[[ρ, ρ], [ρ, ρ]]``.

    Args:
        P: complex128, square, exactly Hermitian (checked).
        radius: Entrywise bound on ``|X − P|`` (modulus): a scalar or an ``N × N`` float64
            tensor.
    """
    if P.dtype != torch.complex128:
        raise TypeError(f"P must be complex128, got {P.dtype}")
    if P.dim() != 2 or P.shape[0] != P.shape[1]:
        raise ValueError(f"P must be a square matrix, got shape {tuple(P.shape)}")
    if not torch.equal(P, P.mH):
        raise ValueError("P must be exactly Hermitian (build both triangles from the same numbers)")
    re, im = P.real.contiguous(), P.imag.contiguous()
    emb = torch.cat([torch.cat([re, -im], dim=1), torch.cat([im, re], dim=1)], dim=0)
    if isinstance(radius, Tensor) and radius.numel() > 1:
        _require_float64(radius, "radius")
        rad: Tensor | float = radius.repeat(2, 2)
    else:
        rad = float(radius)
    return certify_psd(emb, rad)


def certify_block_tridiagonal_psd(
    diagonal: Sequence[Tensor],
    lower: Sequence[Tensor],
    radius_diagonal: Sequence[Tensor] | None = None,
    radius_lower: Sequence[Tensor] | None = None,
) -> bool:
    """True only if every symmetric ``X`` within the given radius of the block-tridiagonal
    matrix ``P`` is positive definite.

    ``P`` has diagonal blocks ``D_k = diagonal[k]`` (``n_k × n_k``, exactly symmetric; or a
    1-D tensor for a diagonal block, e.g. ``ρ I`` without its ``n_k²`` zeros) and
    sub-diagonal blocks ``P_{k,k-1} = lower[k-1]`` (``n_k × n_{k-1}``; the super-diagonal is
    their transpose); all other blocks are zero. Same theorem and shift as
    :func:`certify_psd` (global ``N`` and trace), applied by the block Cholesky of the module
    docstring: ``O(Σ n_k³)`` time, ``O(Σ n_k²)`` memory.

    Args:
        diagonal: Float64 diagonal blocks.
        lower: Float64 sub-diagonal blocks (``len(diagonal) − 1`` of them).
        radius_diagonal / radius_lower: Entrywise bounds on the formation errors of the
            corresponding blocks (1-D for a 1-D diagonal block; the super-diagonal blocks'
            radii are the transposes); ``None`` means exact.
    """
    m = len(diagonal)
    if len(lower) != max(m - 1, 0):
        raise ValueError(f"expected {max(m - 1, 0)} sub-diagonal blocks, got {len(lower)}")
    blocks = [*diagonal, *lower]
    if not all(bool(torch.isfinite(B).all()) for B in blocks):
        return False
    for k, D in enumerate(diagonal):
        if D.dim() == 1:
            _require_float64(D, "a diagonal block")
        else:
            _check_square_symmetric(D)
        if k and tuple(lower[k - 1].shape) != (D.shape[0], diagonal[k - 1].shape[0]):
            raise ValueError(f"block ({k},{k - 1}) has shape {tuple(lower[k - 1].shape)}")
    n = sum(D.shape[0] for D in diagonal)
    _block_radius_norm(diagonal, lower, radius_diagonal, radius_lower)  # validates the radii
    if any(bool((_diag_of(D) <= 0).any()) for D in diagonal if D.numel()):
        return False
    diagonal, lower, radius_diagonal, radius_lower = _scale_blocks(
        diagonal, lower, radius_diagonal, radius_lower
    )
    r = _block_radius_norm(diagonal, lower, radius_diagonal, radius_lower) + 2.0 * n * ETA
    diags = [_diag_of(D) for D in diagonal]
    trace = sum(float(d.sum()) for d in diags)
    max_diag = max((float(d.max()) for d in diags if d.numel()), default=0.0)
    return _block_cholesky(diagonal, lower, rump_shift(n, trace, max_diag, r))


def _diag_of(D: Tensor) -> Tensor:
    """The diagonal of a block given as a matrix or (a diagonal block) as a vector."""
    return D if D.dim() == 1 else torch.diagonal(D)


def _scale_blocks(
    diagonal: Sequence[Tensor],
    lower: Sequence[Tensor],
    radius_diagonal: Sequence[Tensor] | None,
    radius_lower: Sequence[Tensor] | None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None, list[Tensor] | None]:
    """The exact power-of-two congruence ``P ↦ DPD`` (:func:`pow2_scaling`), block by block,
    applied to the blocks and to their radii."""
    scales = [pow2_scaling(_diag_of(D)) for D in diagonal]

    def sym(X: Tensor, d: Tensor) -> Tensor:
        return X * d * d if X.dim() == 1 else X * (d[:, None] * d[None, :])

    outer = [scales[k + 1][:, None] * scales[k][None, :] for k in range(len(lower))]
    return (
        [sym(D, d) for D, d in zip(diagonal, scales, strict=True)],
        [B * o for B, o in zip(lower, outer, strict=True)],
        None
        if radius_diagonal is None
        else [sym(R, d) for R, d in zip(radius_diagonal, scales, strict=True)],
        None if radius_lower is None else [R * o for R, o in zip(radius_lower, outer, strict=True)],
    )


def _block_cholesky(diagonal: Sequence[Tensor], lower: Sequence[Tensor], shift: float) -> bool:
    """Block Cholesky of the shifted block-tridiagonal matrix (module docstring); ``True`` iff
    every pivot is positive. A diagonal block (1-D) is factored as ``sqrt`` of its entries,
    which is exactly what Cholesky computes on a diagonal matrix (all sums are exact zeros)."""
    prev: Tensor | None = None  # L_{k-1,k-1}, or its diagonal (1-D) when that block is diagonal
    for k, D in enumerate(diagonal):
        S = _shift_diagonal(D, shift)
        if k and prev is not None and prev.numel() and D.numel():
            # L_{k,k-1} = B_k L_{k-1,k-1}^{-T}; the Schur update is part of the same Cholesky
            if prev.dim() == 1:
                Lk = lower[k - 1] / prev  # trsm with a diagonal factor: the same operations
            else:
                Lk = torch.linalg.solve_triangular(prev.mT, lower[k - 1], upper=True, left=False)
            S = (torch.diag(S) if S.dim() == 1 else S) - Lk @ Lk.mT
        if S.dim() == 1 or (k == 0 and _is_diagonal(S)):
            d = _diag_of(S)
            if not bool((d > 0).all()):
                return False
            prev = torch.sqrt(d)
            continue
        L, info = torch.linalg.cholesky_ex(S)
        if int(info) != 0:
            return False
        prev = L
    return True


def _is_diagonal(S: Tensor) -> bool:
    return S.numel() > 0 and int(torch.count_nonzero(S)) == int(torch.count_nonzero(S.diagonal()))


def _block_radius_norm(
    diagonal: Sequence[Tensor],
    lower: Sequence[Tensor],
    radius_diagonal: Sequence[Tensor] | None,
    radius_lower: Sequence[Tensor] | None,
) -> float:
    """``‖Rad‖_∞`` of a block-tridiagonal radius, by block row sums."""
    rows = [torch.zeros(D.shape[0], dtype=torch.float64) for D in diagonal]
    for name, given, shapes, offs in (
        ("radius_diagonal", radius_diagonal, diagonal, 0),
        ("radius_lower", radius_lower, lower, 1),
    ):
        if given is None:
            continue
        if len(given) != len(shapes):
            raise ValueError(f"{name} needs {len(shapes)} blocks, got {len(given)}")
        for k, (R, B) in enumerate(zip(given, shapes, strict=True)):
            _require_float64(R, name)
            if R.shape != B.shape or not bool(torch.isfinite(R).all()) or bool((R < 0).any()):
                raise ValueError(f"{name}[{k}] must be finite, non-negative, shape {B.shape}")
            rows[k + offs] += R if R.dim() == 1 else R.sum(dim=1)
            if offs:
                rows[k] += R.sum(dim=0)  # the transposed super-diagonal block
    return max((float(r.max()) for r in rows if r.numel()), default=0.0)
