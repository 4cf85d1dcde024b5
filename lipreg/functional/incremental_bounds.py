"""Certified bounds on ``‖Δ‖₂`` for a weight change ``Δ``: the increments of incremental
certificates (:mod:`lipreg.functional.incremental`, ``docs/design/issue10/incremental.md``
§1–§2).

Every function takes a float64 tensor and returns a float64 number ``≥`` the spectral norm of
the linear operator it describes, **including** the rounding of its own evaluation: a float64
sum of ``n`` non-negative terms has relative error at most ``γ_n`` (any summation order,
Higham ASNA §3.5), so each sum is multiplied by ``1 + γ_{n+2}`` (one more rounding for the
squares or the product) and rounded up with ``nextafter``; square roots go through
:func:`~lipreg.functional.lmi.sqrt_up`. No accumulation happens in float32.

Dense matrices ``Δ`` (``m × n``):

* :func:`frobenius_bound`: ``‖Δ‖₂² = λ_max(ΔᵀΔ) ≤ tr(ΔᵀΔ) = ‖Δ‖_F²``;
* :func:`schur_bound_matrix`: ``‖Δ‖₂ ≤ sqrt(‖Δ‖₁ ‖Δ‖_∞)`` (Schur test with unit weights);
* :func:`gram_iteration_bound`: ``‖Δ‖₂ = ‖G_k‖₂^{1/2^k}`` with ``G_0 = Δ``,
  ``G_{i+1} = G_iᵀ G_i`` and ``‖G_k‖₂ ≤ ‖G_k‖_F`` (Delattre et al. 2023), each product's
  rounding ``|fl(GᵀG) − GᵀG| ≤ γ_p |G|ᵀ|G|`` carried back as ``‖·‖₂ ≤ γ_p ‖G‖_F²``.

Convolutions with kernel ``Δ`` (``c_out × c_in/groups × k_1 × … × k_d``, any stride,
dilation and zero padding; the operator is linear in the kernel, so this bounds
``‖A_{K_t} − A_{K_s}‖₂`` for ``Δ = K_t − K_s``) — :func:`conv_increment_bound`:

* **im2col**: per group ``A = Δ_mat ∘ U`` with ``U`` copying each input entry into at most
  ``c`` patches (:func:`window_copies`), so ``‖A‖ ≤ √c · ‖Δ_mat‖₂`` bounded by the dense
  bounds above; groups act on disjoint channels, so the maximum over groups;
* **Young/Schur on the operator**: every row ``(o, y)`` has absolute sum at most
  ``R = max_o Σ_{c,τ} |Δ[o,c,τ]|``, every column ``(c, x)`` at most
  ``C = max_{c, φ} Σ_{o ∈ group(c)} Σ_{τ : τd ≡ φ (mod s)} |Δ[o,c,τ]|`` (an input position is
  read by tap ``τ`` only in one stride-phase class, and by each tap at most once), so
  ``‖A‖ ≤ sqrt(R C)``.

Zero padding only deletes columns (reads of the padding) of the operator on the padded input,
so both bounds, proved for that operator, hold for the zero-padded convolution.

**Live taps** (when the padding and the input's spatial size are given): a tap ``τ`` of an
axis is *dead* when no output position reads a real input entry through it (``s·y − p + τd``
outside ``[0, n)`` for every output ``y``; small feature maps, e.g. the centre tap alone of a
3 × 3 convolution on a 1 × 1 map). Its weights only ever multiply padding zeros, so zeroing
them leaves the operator unchanged (exact). Both bounds above are then taken of the kernel
restricted to its live taps, and ``c`` becomes the exact largest number of (output, live tap)
pairs reading one input entry (:func:`~lipreg.functional.conv_geometry.axis_plans`, at most
the number of outputs per axis: one tap per output position), which can be much smaller than
``Π⌈k/s⌉``; the im2col proof holds verbatim with the dead rows of ``Δ_mat`` removed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lipreg.functional.conv_geometry import axis_plans
from lipreg.functional.lmi import ETA, gamma, sqrt_up

__all__ = [
    "CONV_GRAM_ITERATION_FLOPS",
    "GRAM_ITERATION_FLOPS",
    "conv_increment_bound",
    "dense_increment_bound",
    "frobenius_bound",
    "gram_iteration_bound",
    "live_taps",
    "schur_bound_matrix",
    "sum_up",
    "window_copies",
]

#: Gram iteration runs only when its products cost at most this many multiply-adds (convolution
#: kernels, small dense layers); a 1000 × 1000 layer would cost ≈ 9 training steps.
GRAM_ITERATION_FLOPS = 5e7
#: The same for the im2col matrices of convolution-kernel changes (incremental certificates'
#: default): resnet18's largest (512 × 4608) costs 1.2e9; measured on resnet18 at 32 × 32
#: (docs/design/issue10/incremental.md §9), all its chains together add ≈ 0.3 s per call and
#: halve the slack against the Frobenius/Schur bounds.
CONV_GRAM_ITERATION_FLOPS = 2e9


def sum_up(total: float, n: int) -> float:
    """An upper bound on the exact value of a float64 sum of ``n`` non-negative terms (each
    itself one rounded product) computed as ``total``: ``total · (1 + γ_{n+2})``, rounded up."""
    return math.nextafter(total * (1.0 + gamma(n + 2)), math.inf)


def _mul_up(a: float, b: float) -> float:
    return math.nextafter(a * b, math.inf)


def times_pow2(D: Tensor, k: int) -> Tensor:
    """``D · 2^k`` (exact unless an entry becomes subnormal), as one or two multiplications
    by a power of two (``2.0**k`` alone overflows for ``|k| > 1023``)."""
    if -1000 <= k <= 1000:
        return D * (2.0**k)
    half = k // 2
    return (D * (2.0**half)) * (2.0 ** (k - half))


#: :func:`normalised` leaves ``D`` unscaled when ``max |D|`` lies in ``[2^-SAFE_EXPONENT,
#: 2^SAFE_EXPONENT]``: squares, products and sums of up to 2^100 of them stay far from
#: overflow, and an entry whose square underflows loses at most ``η`` in absolute terms,
#: which the bounds count per square anyway; skipping the scaling saves a pass over the
#: weights (an increment of a 1000 × 1000 layer makes about six).
SAFE_EXPONENT = 400


def normalised(D: Tensor) -> tuple[Tensor, int, float] | None:
    """``(D', e, r)`` with ``D' = 2^{−e} D`` (an exact power of two) and ``r`` an absolute
    bound on the entrywise error of ``D'`` (entries of ``D`` that become subnormal when scaled
    down lose bits: at most ``η`` each; otherwise ``r = 0``); ``None`` when ``D`` is zero.
    ``max |D'| ∈ [½, 1)``, or ``D' = D`` (``e = 0``, ``r = 0``) when ``max |D|`` is within
    ``2^±SAFE_EXPONENT``. Squares and products of ``D'`` neither overflow nor, except
    negligible terms counted by the bounds, underflow.

    Raises:
        ValueError: a non-finite entry. TypeError: ``D`` is not float64.
    """
    if D.dtype != torch.float64:
        raise TypeError(f"the increment bounds evaluate float64 tensors, got {D.dtype}.")
    if D.numel() == 0:
        return None
    low, high = torch.aminmax(D)  # one pass, no |D| written
    top = max(-float(low), float(high))
    if not math.isfinite(top):
        raise ValueError(f"a weight change is not finite (max |Δ| = {top}): no bound.")
    if top == 0.0:
        return None
    e = math.frexp(top)[1]
    if abs(e) <= SAFE_EXPONENT:
        return D, 0, 0.0
    return times_pow2(D, -e), e, (ETA if e > 0 else 0.0)


def _frobenius_scaled(D: Tensor, r: float) -> float:
    """``‖D_exact‖_F`` for ``|D_exact − D| ≤ r`` entrywise (``D`` from :func:`normalised`):
    the sum of squares (one dot product: a rounded sum of rounded products, any order) plus
    ``η`` per square for underflow, then ``+ r √n``."""
    n = D.numel()
    flat = D.reshape(-1)
    total = sum_up(float(torch.dot(flat, flat)) + n * ETA, n)
    return math.nextafter(sqrt_up(total) + r * sqrt_up(float(n)), math.inf)


def _schur_scaled(D: Tensor, r: float) -> float:
    """``sqrt(‖D_exact‖₁ ‖D_exact‖_∞)`` bound for ``|D_exact − D| ≤ r`` (``D`` from
    :func:`normalised`)."""
    A = D.abs()
    rows = sum_up(float(A.sum(1).max()) + D.shape[1] * r, D.shape[1])
    cols = sum_up(float(A.sum(0).max()) + D.shape[0] * r, D.shape[0])
    return sqrt_up(_mul_up(rows, cols))


def frobenius_bound(D: Tensor) -> float:
    """``‖D‖_F`` rounded up (an upper bound on ``‖D‖₂`` of a float64 matrix)."""
    scaled = normalised(D)
    return 0.0 if scaled is None else math.ldexp(_frobenius_scaled(scaled[0], scaled[2]), scaled[1])


def schur_bound_matrix(D: Tensor) -> float:
    """``sqrt(max_i Σ_j |D_ij| · max_j Σ_i |D_ij|)`` rounded up, an upper bound on ``‖D‖₂``
    of a float64 matrix (Schur test with unit weights)."""
    scaled = normalised(D)
    return 0.0 if scaled is None else math.ldexp(_schur_scaled(scaled[0], scaled[2]), scaled[1])


def gram_iteration_bound(D: Tensor, k: int = 2) -> float:
    """Upper bound on ``‖D‖₂`` by ``k`` Gram squarings (module docstring).

    Each step scales ``G`` by an exact power of two (:func:`normalised`: ``max|G| < 1``, no
    overflow), forms ``fl(GᵀG)`` on the smaller side and records
    ``e = γ_p ‖G‖_F² + q²·2(p+1)η`` (``p`` the inner length, ``q`` the Gram side; ``η``
    covers underflow) plus the scaling's own error ``r`` (``‖G‖₂ ≤ ‖G'‖₂ + r√(pq)``); then
    from ``U_k ≥ ‖G_k‖_F`` back to ``‖G_i‖₂ ≤ sqrt(U_{i+1} + e_i) + r_i√(p_i q_i)``, unscaled
    exactly."""
    G = D if D.shape[0] >= D.shape[1] else D.T
    steps: list[tuple[int, float, float]] = []  # (exponent, product error, scaling error)
    for _ in range(k):
        scaled = normalised(G)
        if scaled is None:
            return _unroll(0.0, steps)
        G, e, r = scaled
        p, q = G.shape
        fro2 = sum_up(float((G * G).sum()) + G.numel() * ETA, G.numel())
        product = _mul_up(gamma(p), fro2) + q * q * 2.0 * (p + 1) * ETA
        steps.append((e, product, r * sqrt_up(float(p * q))))
        G = G.T @ G
    return _unroll(frobenius_bound(G), steps)


def _unroll(bound: float, steps: list[tuple[int, float, float]]) -> float:
    """From a bound on ``‖G_k‖₂`` back to one on ``‖G_0‖₂`` (:func:`gram_iteration_bound`)."""
    for e, product, scaling in reversed(steps):
        norm = sqrt_up(math.nextafter(bound + product, math.inf))
        bound = math.ldexp(math.nextafter(norm + scaling, math.inf), e)
    return bound


def dense_increment_bound(
    D: Tensor, *, gram_flops: float = GRAM_ITERATION_FLOPS
) -> tuple[float, str]:
    """``(bound ≥ ‖D‖₂, which)``: the smallest of Frobenius, Schur and (when its
    ``m·n·min(m, n)`` multiply-adds are at most ``gram_flops``) two Gram squarings, evaluated
    on ``D`` scaled by an exact power of two (:func:`normalised`)."""
    scaled = normalised(D)
    if scaled is None:
        return 0.0, "zero"
    S, e, r = scaled
    candidates = {"frobenius": _frobenius_scaled(S, r), "schur": _schur_scaled(S, r)}
    m, n = D.shape
    if m * n * min(m, n) <= gram_flops:
        extra = r * sqrt_up(float(m * n))  # ‖D_exact − S‖ ≤ ‖·‖_F
        candidates["gram-iteration"] = math.nextafter(gram_iteration_bound(S, 2) + extra, math.inf)
    which = min(candidates, key=candidates.__getitem__)
    return math.ldexp(candidates[which], e), which


def window_copies(kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> int:
    """The largest number of (output position, tap) pairs that read one input position of a
    convolution: per axis, the taps ``τ`` with ``τd ≡ r (mod s)`` for one residue ``r``, at
    most ``⌈k / (s / gcd(s, d))⌉``; the product over the axes."""
    copies = 1
    for k, s, d in zip(kernel, stride, dilation, strict=True):
        period = s // math.gcd(s, d)
        copies *= -(-k // period)
    return copies


@functools.lru_cache(maxsize=64)
def _phase_matrix(k: int, s: int, d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ``k × s`` 0/1 matrix sending tap ``τ`` to its stride phase ``τd mod s`` (cached:
    an incremental certificate asks for the same few at every call)."""
    onehot = torch.zeros(k, s, dtype=dtype, device=device)
    onehot[torch.arange(k, device=device), (torch.arange(k, device=device) * d) % s] = 1.0
    return onehot


def _phase_column_sums(A: Tensor, stride: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """``Σ_{τ : τd ≡ φ (mod s)} A[o, c, τ]`` for every phase ``φ`` (one axis at a time):
    shape ``(c_out, c_in_g, s_1, …, s_d)``."""
    out = A
    for axis, (s, d) in enumerate(zip(stride, dilation, strict=True)):
        dim = 2 + axis
        onehot = _phase_matrix(out.shape[dim], s, d, out.dtype, out.device)
        out = torch.movedim(torch.movedim(out, dim, -1) @ onehot, -1, dim)
    return out


def young_bound(A: Tensor, stride: Sequence[int], dilation: Sequence[int], groups: int) -> float:
    """``sqrt(R · C)`` of the module docstring (row sums and stride-phase column sums) for a
    kernel whose absolute values are at most ``A`` (non-negative, float64)."""
    c_out, c_in_g = A.shape[:2]
    taps = math.prod(A.shape[2:])
    rows = sum_up(float(A.flatten(1).sum(1).max()), c_in_g * taps)
    phased = _phase_column_sums(A, stride, dilation).flatten(2)  # (c_out, c_in_g, phases)
    per_group = phased.reshape(groups, c_out // groups, c_in_g, -1).sum(1)
    cols = sum_up(float(per_group.max()), (c_out // groups) * taps)
    return sqrt_up(_mul_up(rows, cols))


def im2col_bound(
    D: Tensor, r: float, copies: int, groups: int, gram_flops: float = GRAM_ITERATION_FLOPS
) -> tuple[float, str]:
    """``√c · max_g ‖Δ_g‖₂`` for a kernel within ``r`` (entrywise) of ``D``, with ``‖Δ_g‖₂``
    bounded per group by the smaller of Frobenius and Schur (and Gram iteration when there is
    one group and it costs at most ``gram_flops`` multiply-adds)."""
    c_out = D.shape[0]
    mats = D.reshape(groups, c_out // groups, -1)
    if groups == 1:
        norm, which = dense_increment_bound(mats[0], gram_flops=gram_flops)
        if r:
            norm = math.nextafter(norm + r * sqrt_up(float(D.numel())), math.inf)
    else:
        A = mats.abs() + r
        n_cols, n_rows = mats.shape[2], mats.shape[1]
        fro = float((A * A).sum((1, 2)).max()) + n_cols * n_rows * ETA  # η: underflow
        frob = sqrt_up(sum_up(fro, n_cols * n_rows))
        rows = A.sum(2).max(1).values
        cols = A.sum(1).max(1).values
        # per group, then the worst group; each factor's sum and the product's rounding
        # (covered by the two extra terms of each γ) widened by sum_up
        schur_each = float((rows * cols).max()) + ETA
        schur = sqrt_up(sum_up(sum_up(schur_each, n_cols), n_rows))
        norm, which = (frob, "frobenius") if frob <= schur else (schur, "schur")
    return _mul_up(sqrt_up(float(copies)), norm), f"im2col-{which}"


def live_taps(
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    in_spatial: Sequence[int],
) -> tuple[list[list[int]], int]:
    """Per axis the live taps of a zero-padded convolution on inputs of spatial size
    ``in_spatial`` (module docstring), and the largest number of (output, live tap) pairs that
    read one input entry (the product over the axes of
    :func:`~lipreg.functional.conv_geometry.axis_plans`'s counts; 0 when an axis has no live
    tap: the operator is zero)."""
    live, copies = _live_taps(*(tuple(x) for x in (kernel, stride, padding, dilation, in_spatial)))
    return [list(taps) for taps in live], copies


@functools.lru_cache(maxsize=256)
def _live_taps(
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    in_spatial: tuple[int, ...],
) -> tuple[tuple[tuple[int, ...], ...], int]:
    """:func:`live_taps` on hashable arguments, cached: a pure function of the geometry, which
    an incremental certificate asks for at every call (``axis_plans`` also searches torus
    embeddings, milliseconds in Python)."""
    live: list[tuple[int, ...]] = []
    copies = 1
    for n, k, s, p, d in zip(in_spatial, kernel, stride, padding, dilation, strict=True):
        _, axis_copies, dead = axis_plans(n, p, p, k, d, s, None, "zeros")
        live.append(tuple(t for t in range(k) if t not in dead) if axis_copies else ())
        copies *= axis_copies
    return tuple(live), copies


def _restricted(D: Tensor, live: list[list[int]]) -> tuple[Tensor, Tensor]:
    """``(D with dead taps zeroed, D restricted to its live taps)``; ``(D, D)`` when every tap
    is live (no copy)."""
    if all(len(taps) == size for taps, size in zip(live, D.shape[2:], strict=True)):
        return D, D
    compact = D
    zeroed = torch.zeros_like(D)
    for axis, taps in enumerate(live):
        index = torch.tensor(taps, dtype=torch.long, device=D.device)
        compact = compact.index_select(2 + axis, index)
    axes = [torch.tensor(t, dtype=torch.long, device=D.device) for t in live]
    index = torch.meshgrid(*axes, indexing="ij")
    zeroed[(slice(None), slice(None), *index)] = D[(slice(None), slice(None), *index)]
    return zeroed, compact


def conv_increment_bound(
    D: Tensor,
    stride: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    *,
    padding: Sequence[int] | None = None,
    in_spatial: Sequence[int] | None = None,
    gram_flops: float = GRAM_ITERATION_FLOPS,
) -> tuple[float, str]:
    """``(bound ≥ ‖A_D‖₂, which)`` for the convolution with float64 kernel ``D`` (any zero
    padding and input size): the smaller of im2col and Young/Schur (module docstring),
    evaluated on ``D`` scaled by an exact power of two (:func:`normalised`). With ``padding``
    and ``in_spatial`` (the input's spatial size) given, both are taken of the live taps only
    with the exact copy count (module docstring: live taps); ``gram_flops`` caps the Gram
    iteration of the im2col matrix."""
    normal = normalised(D)
    if normal is None:
        return 0.0, "zero"
    scaled, e, r = normal
    copies = window_copies(D.shape[2:], stride, dilation)
    compact, prefix = scaled, ""
    if padding is not None and in_spatial is not None:
        live, copies = live_taps(D.shape[2:], stride, padding, dilation, in_spatial)
        if copies == 0:
            return 0.0, "dead-taps"
        scaled, compact = _restricted(scaled, live)
        prefix = "live-"
    im2col, which = im2col_bound(compact, r, copies, groups, gram_flops)
    young = young_bound(scaled.abs() + r, stride, dilation, groups)
    best, which = (im2col, which) if im2col <= young else (young, "young")
    return math.ldexp(best, e), prefix + which
