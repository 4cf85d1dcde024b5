"""Certified upper bounds on operator norms, within a memory budget.

Power iteration and Lanczos approach ``‖A‖_2`` from below, so a product of their values is
an *estimate* of AutoLip, not a bound. This module supplies numbers that are guaranteed to be
``≥ ‖A‖_2`` (with the explicit floating-point margins below):

* :func:`matrix_norm_certificate` / :func:`matrix_norm_bound` — an explicit matrix ``W``
  (``out × in``), converted to float64 (exact from float16/bfloat16/float32) chunk by chunk.
  Let ``s`` be its smaller side, ``l`` the larger, ``u = 2⁻⁵³``.

  - ``"dense"``: the ``s × s`` Gram matrix ``Ĝ`` is accumulated chunk by chunk (never a float64
    copy of ``W``), on one triangle by block rows. Entrywise ``|Ĝ − G| ≤ γ_l |W|ᵀ|W|``, so
    ``‖Ĝ − G‖_2 ≤ γ_l ‖W‖_F²``. Lanczos on ``Ĝ`` (warm from ``v0`` when given) gives ``λ̂``;
    one Rump/Cholesky test of ``μI − Ĝ`` at ``μ = λ̂(1 + δ)``, with that radius, proves
    ``λ_max(G) < μ`` (:mod:`lipreg.functional.gram`; ``δ ≈ 1e-10 + 2 × Rump's margin``, about
    ``s² u``, tenfold on failure). No ``eigh``: its cost is 5–17× a Cholesky.
  - ``"row-blocks"`` (when the Gram matrix exceeds the budget): split the smaller side into
    ``p`` blocks ``W_i`` of ``g`` lines each; ``‖W x‖² = Σ ‖W_i x‖²`` (row blocks) or
    ``‖W x‖ ≤ Σ ‖W_i x_i‖`` (column blocks, then Cauchy–Schwarz) gives
    ``‖W‖ ≤ sqrt(Σ_i ‖W_i‖²)``, each ``‖W_i‖`` certified as above on a ``g × g`` Gram matrix.
    Exact when ``W`` is rank one; for a random square matrix about ``1 + 1/sqrt(p)`` times
    ``sqrt(p)/2`` too large (1.5× for ``p = 4``).
  - always also ``‖W‖_F`` and the Schur test ``sqrt(‖W‖_1 ‖W‖_∞)``, accumulated in the same
    chunked passes (``"frobenius"`` / ``"schur"`` when they are the smallest); with a budget
    too small for even ``g = 1`` blocks they are the certificate.

  The result is ``sqrt`` of the eigenvalue bound, times ``1 + RELATIVE_MARGIN`` (1e-9, which
  absorbs the final square roots and products).
* :func:`dense_norm_bound` — materialise a :class:`LinearMap` in float64 (the caller checks the
  budget, :func:`dense_bytes`), then the above.
* :func:`schur_bound` — for a matrix with non-negative entries (pooling, padding, indexing,
  nearest/bilinear upsampling): ``‖A‖_2 ≤ sqrt(‖A‖_1 ‖A‖_∞) = sqrt(max_j (Aᵀ1)_j · max_i
  (A1)_i)``, two passes. Exact for non-overlapping average pooling (``1/k``) and reshapes.
* convolutions: :func:`lipreg.functional.conv_bounds.conv_operator_norm_bound` (FFT,
  polyphase for strides), which reads the same budget.

**Memory budget.** Every certificate here allocates at most about ``limit_bytes`` beyond its
input: the budget of the innermost :func:`memory_budget` context (AutoLip opens one per call,
``memory_limit_bytes=``), else :data:`DEFAULT_MEMORY_LIMIT_BYTES` (1 GiB). AutoLip's default is
``min(1 GiB, max(256 MiB, 4 × the bytes of the network's parameters and buffers))``. A
certificate that falls back to a looser method because of the budget records the fact
(:attr:`MemoryBudget.events`, reported in AutoLip's notes and as a warning).

The float64 evaluation bounds the exact-arithmetic network; the rounding of the float32
network itself is not modelled.

Which of these certifies a given affine chain of a network is decided by the certificate
ladder, :mod:`lipreg.functional.ladder` (an ordered list of documented entries).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

from lipreg.functional.gram import certified_top_eigenvalue, gram_lower
from lipreg.functional.linear_map import LinearMap

__all__ = [
    "DEFAULT_MEMORY_LIMIT_BYTES",
    "RELATIVE_MARGIN",
    "MatrixNormCertificate",
    "MemoryBudget",
    "current_budget",
    "default_memory_limit",
    "dense_bytes",
    "dense_norm_bound",
    "matrix_norm_bound",
    "matrix_norm_certificate",
    "memory_budget",
    "schur_bound",
]

RELATIVE_MARGIN = 1e-9
DEFAULT_MEMORY_LIMIT_BYTES = 2**30
"""Absolute cap of every certificate's extra memory (1 GiB)."""
MIN_DEFAULT_MEMORY_BYTES = 256 * 2**20
_U = 2.0**-53
# Gram sides up to this are still budgeted as an eigh (48 s² bytes) although every side now
# uses Lanczos + one Cholesky (≤ 24 s² + the basis): a conservative estimate that keeps the
# memory-budget decisions of earlier versions unchanged.
_EIGH_LIMIT = 1024
_LANCZOS_ITER = 300


@dataclass
class MemoryBudget:
    """The memory a certificate may allocate beyond its inputs, and the fallbacks it caused.

    Attributes:
        limit_bytes: the budget in bytes.
        events: one message per certificate that used a looser method to stay within it.
        explicit: set by a :func:`memory_budget` context (else the module default, and
            fallbacks also warn immediately).
    """

    limit_bytes: int
    events: list[str] = field(default_factory=list)
    explicit: bool = True

    def record(self, message: str) -> None:
        self.events.append(message)
        if not self.explicit:
            warnings.warn(message, stacklevel=3)


_BUDGET: ContextVar[MemoryBudget | None] = ContextVar("lipreg_memory_budget", default=None)


def _check_limit(limit_bytes: float) -> int:
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int | float):
        raise TypeError(f"memory_limit_bytes must be a number, got {type(limit_bytes).__name__}.")
    if not math.isfinite(limit_bytes) or limit_bytes <= 0:
        raise ValueError(
            f"memory_limit_bytes must be a positive finite number, got {limit_bytes!r}."
        )
    return int(limit_bytes)


@contextlib.contextmanager
def memory_budget(limit_bytes: float) -> Iterator[MemoryBudget]:
    """Run the certificates inside with at most ``limit_bytes`` of extra memory each."""
    budget = MemoryBudget(_check_limit(limit_bytes))
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def current_budget() -> MemoryBudget:
    """The innermost :func:`memory_budget`, or the default 1 GiB one (which warns on fallback)."""
    budget = _BUDGET.get()
    return (
        budget if budget is not None else MemoryBudget(DEFAULT_MEMORY_LIMIT_BYTES, explicit=False)
    )


def default_memory_limit(model: nn.Module) -> int:
    """``min(1 GiB, max(256 MiB, 4 × bytes of the model's parameters and buffers))``."""
    own = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return min(DEFAULT_MEMORY_LIMIT_BYTES, max(MIN_DEFAULT_MEMORY_BYTES, 4 * own))


def dense_bytes(side: int) -> int:
    """Peak bytes of the dense certificate of a Gram matrix of side ``side`` (float64)."""
    if side <= _EIGH_LIMIT:
        return 48 * side * side  # Gram, eigh's copy, eigenvectors, workspace (2 s²)
    # Gram/μI−Ĝ, the Cholesky factor and LAPACK's copy, the Krylov basis
    return 24 * side * side + 16 * _LANCZOS_ITER * side


@dataclass
class MatrixNormCertificate:
    """A certified ``bound ≥ ‖W‖_2``, how it was obtained, and a direction.

    Attributes:
        bound: the certified upper bound.
        v: unit float64 vector, an approximate top right singular vector.
        estimate: ``‖W v‖`` (a lower estimate of the norm) when computed, else ``bound``.
        method: ``"dense"``, ``"row-blocks"``, ``"frobenius"`` or ``"schur"``.
        blocks: number of blocks of the ``"row-blocks"`` certificate (1 for ``"dense"``).
    """

    bound: float
    v: torch.Tensor
    estimate: float
    method: str
    blocks: int = 1


def matrix_norm_bound(
    W: torch.Tensor, *, v0: torch.Tensor | None = None
) -> tuple[float, torch.Tensor]:
    """Certified ``‖W‖_2`` and an approximate top right singular vector, within the current
    memory budget (see :func:`matrix_norm_certificate`; ``v0``: optional warm start)."""
    cert = matrix_norm_certificate(W, v0=v0)
    return cert.bound, cert.v


def _chunks(length: int, width: int) -> Iterator[slice]:
    for start in range(0, length, width):
        yield slice(start, min(length, start + width))


class _Scaled:
    """Float64 blocks of ``2^-e W`` (exact: a power of two), chunk by chunk, never in place.

    ``e`` puts the largest entry in ``[0.5, 1)``, so no square overflows or underflows; the
    rows of ``M`` are the smaller side of ``W`` (``M = W`` or ``Wᵀ``, a view).
    """

    def __init__(self, W: torch.Tensor, chunk_bytes: int) -> None:
        self.W = W
        self.transposed = W.shape[0] > W.shape[1]
        self.M = W.T if self.transposed else W
        self.chunk_bytes = chunk_bytes
        peak = 0.0
        for cols in self.columns(self.M.shape[0]):
            chunk_peak = float(self.M[:, cols].abs().max())  # NaN propagates
            if not math.isfinite(chunk_peak):
                peak = chunk_peak
                break
            peak = max(peak, chunk_peak)
        self.peak = peak  # the largest magnitude, or NaN/Inf
        self.exponent = math.frexp(peak)[1] if peak > 0 and math.isfinite(peak) else 0
        half = -self.exponent // 2  # two steps: 2^-e alone may overflow for subnormal peaks
        self.factors = (2.0**half, 2.0 ** (-self.exponent - half))

    def columns(self, rows: int) -> Iterator[slice]:
        """Column slices whose float64 block (counted twice: the copy and BLAS workspace)
        fits in ``chunk_bytes``."""
        return _chunks(self.M.shape[1], max(1, self.chunk_bytes // (16 * max(rows, 1))))

    def block(self, rows: slice, cols: slice) -> torch.Tensor:
        a, b = self.factors
        out = self.M[rows, cols].to(torch.float64, memory_format=torch.contiguous_format, copy=True)
        return out.mul_(a).mul_(b)

    def unscale(self, value: float) -> float:
        """``2^e value`` (``inf`` beyond float64, still a valid upper bound)."""
        try:
            return math.ldexp(value, self.exponent)
        except OverflowError:
            return math.inf


def matrix_norm_certificate(
    W: torch.Tensor,
    *,
    memory_limit_bytes: float | None = None,
    name: str = "matrix",
    v0: torch.Tensor | None = None,
) -> MatrixNormCertificate:
    """Certified ``‖W‖_2`` of an explicit matrix within a memory budget (module docstring).

    Args:
        W: a real ``(out, in)`` matrix of any float dtype and device.
        memory_limit_bytes: extra memory allowed; default: the current :func:`memory_budget`.
        name: how fallbacks name the matrix in their messages.
        v0: optional warm start, an approximate top right singular vector of ``W`` (e.g. the
            ``v`` of a previous certificate): the dense certificate is then one Gram product,
            a few Lanczos products and one Cholesky test. It only speeds the search for ``μ``;
            the bound is proved by the test whatever ``v0`` is (ignored when the shape does
            not match or it is zero/non-finite).

    Returns:
        :class:`MatrixNormCertificate` with ``bound ≥ ‖W‖_2``.
    """
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(W.shape)}.")
    if W.is_complex() or not W.is_floating_point():
        raise ValueError(f"expected a real floating-point matrix, got {W.dtype}.")
    W = W.detach()
    budget = current_budget()
    limit = budget.limit_bytes if memory_limit_bytes is None else _check_limit(memory_limit_bytes)
    device = W.device
    if W.numel() == 0:
        return MatrixNormCertificate(
            0.0, torch.zeros(W.shape[1], dtype=torch.float64, device=device), 0.0, "dense"
        )
    s, l = min(W.shape), max(W.shape)
    chunk_budget = max(limit // 8, 8 * s)
    sc = _Scaled(W, chunk_budget)
    if not math.isfinite(sc.peak):
        raise ValueError(f"{name} has non-finite (NaN/Inf) entries: no finite norm bound exists.")
    if sc.peak == 0:
        return MatrixNormCertificate(
            0.0, torch.zeros(W.shape[1], dtype=torch.float64, device=device), 0.0, "dense"
        )
    dense_budget = limit - chunk_budget
    if dense_bytes(s) <= dense_budget:
        lam, top = _block_top_eig(sc, slice(0, s), _gram_side_start(sc, v0))
        v = top if sc.transposed else _rmatvec(sc, top)  # right vector of W
        v = v / v.norm().clamp_min(1e-300)
        bound = sc.unscale(_sqrt_up(lam) * (1 + RELATIVE_MARGIN))
        return MatrixNormCertificate(bound, v, bound, "dense")

    # Too large for one Gram matrix: blocks of g lines, plus the matrix-free bounds.
    g = _largest_side(dense_budget)
    frob2, row_abs, col_abs = _entry_sums(sc)
    candidates: dict[str, float] = {
        "frobenius": _sqrt_up(frob2 * (1 + (W.numel() + 8) * 2 * _U)),
        "schur": _sqrt_up(float(row_abs.max()) * float(col_abs.max()) * (1 + (l + s + 8) * 4 * _U)),
    }
    n_blocks = 0
    if g >= 1:
        total = 0.0
        for rows in _chunks(s, g):
            total += _block_top_eig(sc, rows)[0]
            n_blocks += 1
        candidates["row-blocks"] = _sqrt_up(total * (1 + 4 * n_blocks * _U))
    method = min(candidates, key=candidates.__getitem__)
    bound = sc.unscale(candidates[method] * (1 + RELATIVE_MARGIN))
    v, estimate = _power_direction(sc)
    budget.record(
        f"{name}: the exact certificate of this {W.shape[0]}x{W.shape[1]} matrix needs "
        f"~{dense_bytes(s) / 2**20:.0f} MiB, over the memory budget of {limit / 2**20:.0f} MiB; "
        f"used the {method} bound ({bound:.6g}, power-iteration estimate {estimate:.6g}"
        + (f", {n_blocks} blocks" if method == "row-blocks" else "")
        + "). Raise memory_limit_bytes for a tighter certificate."
    )
    return MatrixNormCertificate(
        bound, v, estimate, method, n_blocks if method == "row-blocks" else 0
    )


def _gram_side_start(sc: _Scaled, v0: torch.Tensor | None) -> torch.Tensor | None:
    """A right vector ``v0`` of ``W`` moved to the Gram side ``M Mᵀ``: itself when
    ``M = Wᵀ``, else ``M v0`` (one chunked product). ``None`` when it does not fit."""
    if v0 is None:
        return None
    v0 = v0.detach().reshape(-1).to(dtype=torch.float64, device=sc.M.device)
    if v0.numel() != sc.W.shape[1]:
        return None
    return v0 if sc.transposed else _matvec(sc, v0)


def _sqrt_up(x: float) -> float:
    """``sqrt(max(x, 0))`` padded by 2 ulps (the rounding of ``math.sqrt``)."""
    return math.sqrt(max(x, 0.0)) * (1 + 4 * _U) + 1e-300


def _largest_side(budget_bytes: int) -> int:
    """The largest Gram side whose dense certificate fits in ``budget_bytes`` (0 if none)."""
    lo, hi = 0, 1
    while dense_bytes(hi) <= budget_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if dense_bytes(mid) <= budget_bytes else (lo, mid)
    return lo


def _block_top_eig(
    sc: _Scaled, rows: slice, v0: torch.Tensor | None = None
) -> tuple[float, torch.Tensor]:
    """A proven upper bound on ``λ_max(M_r M_rᵀ)`` for the row block ``M_r`` of the scaled
    matrix, and an approximate top eigenvector (float64, on ``M``'s device): the Gram matrix on
    one triangle (:func:`~lipreg.functional.gram.gram_lower`), then Lanczos (warm from ``v0``,
    a vector on the Gram side) and one Rump/Cholesky test
    (:func:`~lipreg.functional.gram.certified_top_eigenvalue`)."""
    g = rows.stop - rows.start
    l = sc.M.shape[1]
    G, frob2 = gram_lower((sc.block(rows, cols) for cols in sc.columns(g)), g, sc.M.device)
    frob2 *= 1 + (g * l + 8) * 2 * _U  # fl(Σ m²) ≥ Σ m² / (1 + γ_{gl}): an upper bound
    cert = certified_top_eigenvalue(G, frob2, l, v0=v0, max_iter=_LANCZOS_ITER)
    return cert.bound, cert.vector


def _entry_sums(sc: _Scaled) -> tuple[float, torch.Tensor, torch.Tensor]:
    """``‖M‖_F²``, row sums and column sums of ``|M|`` (scaled, float64), chunk by chunk."""
    s, l = sc.M.shape
    frob2 = 0.0
    row_abs = torch.zeros(s, dtype=torch.float64, device=sc.M.device)
    col_abs = torch.zeros(l, dtype=torch.float64, device=sc.M.device)
    for cols in sc.columns(s):
        block = sc.block(slice(0, s), cols)
        flat = block.view(-1)
        frob2 += float(torch.dot(flat, flat))
        block.abs_()  # a fresh tensor (``_Scaled.block`` never returns a view of W)
        row_abs += block.sum(1)
        col_abs[cols] = block.sum(0)
        del block
    return frob2, row_abs, col_abs


def _rmatvec(sc: _Scaled, u: torch.Tensor) -> torch.Tensor:
    """``Mᵀ u`` of the scaled matrix, chunk by chunk."""
    s = sc.M.shape[0]
    out = torch.empty(sc.M.shape[1], dtype=torch.float64, device=sc.M.device)
    for cols in sc.columns(s):
        out[cols] = sc.block(slice(0, s), cols).T @ u
    return out


def _matvec(sc: _Scaled, x: torch.Tensor) -> torch.Tensor:
    """``M x`` of the scaled matrix, chunk by chunk."""
    s = sc.M.shape[0]
    out = torch.zeros(s, dtype=torch.float64, device=sc.M.device)
    for cols in sc.columns(s):
        out += sc.block(slice(0, s), cols) @ x[cols]
    return out


def _power_direction(sc: _Scaled, n_iter: int = 10) -> tuple[torch.Tensor, float]:
    """A few chunked power iterations: ``(v, ‖W v‖)`` with ``v`` a unit right vector of ``W``
    (the estimate is a lower value of the norm, up to rounding)."""
    gen = torch.Generator(device=sc.M.device).manual_seed(0)
    # Iterate on M Mᵀ (the smaller side), then map to W's input side.
    u = torch.randn(sc.M.shape[0], generator=gen, dtype=torch.float64, device=sc.M.device)
    u = u / u.norm()
    for _ in range(n_iter):
        w = _matvec(sc, _rmatvec(sc, u))
        norm = float(w.norm())
        if norm == 0:
            break
        u = w / norm
    mt_u = _rmatvec(sc, u)  # Mᵀ u, on M's column side
    if sc.transposed:  # M = Wᵀ: u lives on W's input side
        v = u
        estimate = float(mt_u.norm())  # ‖W u‖ = ‖Mᵀ u‖
    else:  # M = W: Wᵀ u is the right direction
        v = mt_u / mt_u.norm().clamp_min(1e-300)
        estimate = float(_matvec(sc, v).norm())
    return v, sc.unscale(estimate)


def dense_norm_bound(
    op: LinearMap, *, batch_size: int = 256, v0: torch.Tensor | None = None
) -> tuple[float, torch.Tensor]:
    """Certified ``‖A‖_2`` by materialising ``A`` (``op`` must compute in float64).

    Materialising takes ``8 · in · out`` bytes plus the operator's activations for
    ``batch_size`` basis vectors: the caller checks the budget (``autolip`` does). ``v0``:
    optional warm start (a previous top right singular vector, see
    :func:`matrix_norm_certificate`).
    """
    if op.dtype != torch.float64:
        raise ValueError(f"dense_norm_bound needs a float64 operator, got {op.dtype}.")
    cert = matrix_norm_certificate(op.to_dense(batch_size=batch_size), name=op.name, v0=v0)
    return cert.bound, cert.v


def schur_bound(op: LinearMap) -> float:
    """``sqrt(‖A‖_1 ‖A‖_∞)`` for an operator whose matrix entries are all ``≥ 0``.

    The caller guarantees non-negativity (a property of the op, e.g. average pooling).
    """
    ones_in = torch.ones(1, op.in_features, dtype=op.dtype, device=op.device)
    ones_out = torch.ones(1, op.out_features, dtype=op.dtype, device=op.device)
    with torch.no_grad():
        row = op.matvec(ones_in)
    col = op.rmatvec(ones_out)
    if float(row.min()) < -1e-12 or float(col.min()) < -1e-12:
        raise ValueError(
            f"{op.name!r} was declared non-negative but A·1 or Aᵀ·1 has negative entries; "
            "its rule must not set nonnegative=True."
        )
    bound = math.sqrt(float(row.max()) * float(col.max()))
    return bound * (1 + RELATIVE_MARGIN)
