r"""Certified upper bounds on the l2 operator norm of convolution layers.

:func:`conv_operator_norm_bound` returns a float64 number that is **never below** the largest
singular value of the bias-free linear map ``x -> conv(x)`` of a ``ConvNd`` /
``ConvTransposeNd`` layer applied to inputs of one given spatial size. The only slack it adds on
purpose is an explicit floating-point margin (see *Rounding* below); everything else is exact
algebra, so the number can be used as a proof-grade Lipschitz constant of the layer.
The geometry (argument checks, per-axis torus embeddings, sections 1, 4-6) is computed by
:mod:`lipreg.functional.conv_geometry`; this module holds the spectrum (sections 2-3) and the
rounding margins.

Notation (one spatial dimension; several dimensions are handled per axis, see *Separability*)
------------------------------------------------------------------------------------------------
Input length ``n``, left/right padding ``p_l, p_r``, padded length ``m = n + p_l + p_r``, kernel
length ``k``, dilation ``d``, effective kernel length ``k_eff = d (k - 1) + 1``, stride ``s``,
``L = (m - k_eff) // s + 1`` outputs. PyTorch convolutions are cross-correlations:

    y[o, i] = sum_{c, t} w[o, c, t] * xpad[c, s i + d t],      0 <= i < L.

Only the padded indices ``J = {s i + d t}`` are ever read. Each read index ``j`` is either a
padding zero (``zeros`` mode) or a copy of one input entry ``pi(j)`` (``circular``, ``reflect``,
``replicate`` modes, and the interior in every mode). With zero padding, a tap ``t`` whose reads
all hit padding zeros contributes nothing: it is zeroed and its reads are dropped from ``J``
(exact; this matters for small inputs with large dilation or padding).

1. Torus embedding
   Let ``N`` be a torus size and place every input entry ``x[a]`` at torus position ``j mod N``
   for the read index ``j`` it is copied to. This is an isometry ``x -> x_T`` (a coordinate
   embedding) provided it is well defined: all reads of one entry land on the same position,
   different entries land on different positions, and no read of a padding zero lands on a
   position holding an entry. Then ``xpad[j] = x_T[j mod N]`` for every read ``j``, hence

       y[o, i] = (T x_T)[o, s i mod N],  T z[o, u] = sum_{c,t} w[o,c,t] z[c, (u + d t) mod N],

   i.e. ``conv = D T E`` where ``E`` is the isometric embedding and ``D`` picks the outputs.
   Zero padding always admits such an ``N``: ``N >= max(J) + 1`` (no wrap at all), and often
   ``N = n + p`` (the right padding is wrapped onto the left padding, which is also zero). A
   true circular "same" convolution admits ``N = n`` exactly.

2. Spectrum of the torus convolution (Sedghi, Gupta & Long, ICLR 2019)
   ``T`` is block-circulant; the DFT diagonalises it into the ``C_out x C_in`` matrices
   ``K(f) = sum_t w[:, :, t] exp(2 pi i f d t / N)``, ``f in Z_N`` (the kernel zero-embedded in
   the torus with its dilation, and *folded* modulo ``N`` when it is longer than the torus; the
   sign of the exponent is immaterial). The singular values of ``T`` are exactly the union over
   all frequencies of the singular values of ``K(f)``, so ``||T|| = max_f ||K(f)||_2``.

3. Stride via the polyphase decomposition
   Let ``N`` be a multiple of ``s`` and ``M = N / s``. Splitting the torus into the ``s`` phases
   ``x^(c, r)[u] = x_T[c, s u + r]`` (a permutation of coordinates, hence orthogonal) and writing
   ``d t = s q + r`` turns the *strided* torus convolution into a stride-1 torus convolution on
   ``Z_M`` from ``C_in * s`` phase channels to ``C_out`` with the kernel
   ``W'[o, (c, r), q mod M] = sum_{t: d t = s q + r} w[o, c, t]`` of length
   ``ceil(k_eff / s)``. Its norm is therefore exactly
   ``max_f ||K'(f)||_2`` over the ``C_out x (C_in s)`` matrices ``K'(f)`` of the polyphase kernel
   (in several dimensions the phases multiply: ``C_in * prod(s)`` phase channels).
   Bounding the strided conv by the stride-1 one instead would be loose by up to ``sqrt(s)``.
   This is exact for a true circular strided convolution (``s | n`` and ``L = n / s``).

4. The output side ``D`` maps the op's outputs to torus outputs; when ``N > s (L - 1)`` the
   positions ``s i mod N`` are distinct and ``D`` is a coordinate restriction (norm <= 1).

5. Padding maps that duplicate entries (``reflect``, ``replicate``, ``circular`` whose geometry
   is not a torus): every read index copies one input entry, so ``xpad|_J = P x`` with a 0/1
   matrix ``P`` having one 1 per row. ``P^T P`` is diagonal with the copy counts, so
   ``||P|| = sqrt(max_a #{j in J : pi(j) = a})`` exactly. Then ``conv = (valid conv) P`` and
   ``||conv|| <= ||P|| * ||valid conv on the read window||``; the valid conv is bounded by 1.-4.
   Likewise, when the output positions ``s i mod N`` repeat (large circular padding), ``D`` is a
   0/1 matrix with one 1 per row and ``||D|| = sqrt(max repetition)``. For circular padding both
   the direct torus embedding (with its output factor) and the duplication argument are tried,
   with the strided (polyphase) and with the stride-1 torus, and the smallest bound is returned.
   Every candidate is a proven upper bound, so their minimum is one as well.

6. im2col bound (wins when the output is tiny)
   ``conv = (I_L (x) W_mat) U`` where ``U`` stacks the receptive field of every output (a 0/1
   matrix with at most one 1 per row; reads of padding zeros are zero rows) and ``W_mat`` is the
   ``C_out x (C_in k)`` weight matrix. So ``||conv|| <= sqrt(c) ||W_mat||_2`` with ``c`` the
   largest number of (output, tap) pairs reading one input entry. It is exact for a single
   output whose window holds no padding. The smaller of this bound and the torus bounds is returned.

Separability
   Padding maps, read sets, torus embeddings and output maps are all tensor products over the
   spatial axes, so each axis chooses its own ``(stride of the torus conv, N, factor)`` and the
   bound is ``prod(factor_axis) * max_f ||K'(f)||_2`` on the product torus.

Choice of N
   Any valid ``N`` gives a sound bound. We use the smallest valid one per axis: the bound samples
   the same continuous symbol on the grid ``f / M``, and a coarser grid usually (not always)
   takes a smaller maximum; it also minimises the work.

groups
   A grouped convolution is block diagonal over groups, so its norm is the maximum over groups;
   the per-frequency matrices are computed for all groups in one batch.

Real FFT half spectrum
   The kernel is real, so ``K'(-f) = conj(K'(f))`` has the same singular values; only the
   frequencies with the last coordinate in ``[0, M_last // 2]`` (as in ``rfftn``) are needed.

Transposed convolutions
   ``ConvTransposeNd(weight, stride, padding, output_padding, dilation, groups)`` on an input of
   length ``n`` is the adjoint of ``ConvNd`` with the same weight tensor (read as a conv weight),
   same stride/padding/dilation/groups, on inputs of length
   ``n_T = (n - 1) s - 2 p + k_eff + output_padding``, restricted to that conv's first ``n``
   outputs. Adjoints have the same norm and restrictions do not increase it. (Output padding
   exposes extra output rows, so it *can* increase the norm; it is accounted for exactly.)

Rounding (the only deliberate slack)
   Everything runs in float64 / complex128. The weight is converted exactly and scaled by a
   power of two (exact) so that its largest entry lies in ``[0.5, 1)``; the result is scaled
   back. Let ``u = 2**-53`` and ``S`` the matrix of per-entry sums of ``|w|`` over the kernel taps
   (per group, in the polyphase layout). DFT coefficients use exactly reduced integer angles, so
   each is within ``40 u`` of exact. (a) The computed polyphase taps and, on the direct route, the
   computed DFT matrices differ from the exact ones by at most ``(2 Q + T + 110) u ||S||_F`` in
   spectral norm (``Q`` polyphase taps, ``T`` kernel taps); by Weyl's inequality this is added to
   the singular value. (b) Each computed Gram matrix (direct route ``K' K'^H``, or autocorrelation
   route, see :func:`_autocorr_route`) differs from the exact one by at most
   ``sqrt(2) (2 Q l + n_shifts + 120) u ||S||_F^2`` (``l`` the longer side), and the Hermitian
   eigensolver is backward stable with error ``p(g) u ||G||_2`` (LAPACK only promises a
   "modestly growing" ``p``); we take ``p(g) = 4 g + 16`` for Gram size ``g`` and
   ``||G||_2 <= ||S||_F^2``. Both, plus ``1e-290`` for underflow, are added to the eigenvalue.
   (c) The result is multiplied by ``1 + 1e-10``, which absorbs the final square roots and
   products and would on its own cover any ``p(g) <= 10^6``. Measured on AlexNet-sized layers,
   (a)+(b)+(c) add ``1e-10`` to ``5e-10`` relative to the exact torus norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product

import torch

from lipreg.functional.certify import MemoryBudget, current_budget, matrix_norm_certificate
from lipreg.functional.conv_geometry import AxisPlan, conv_geometry, plan_axes

__all__ = ["SCREEN_MIN_SIDE", "conv_operator_norm_bound", "top_eigenvalue_max"]

_UNIT_ROUNDOFF = 2.0**-53
_REL_MARGIN = 1e-10
# Working-memory budget per frequency chunk (complex matrices + real intermediates + Gram).
_CHUNK_BYTES = 256 * 2**20
#: Gram sides from which :func:`top_eigenvalue_max` screens in single precision first.
SCREEN_MIN_SIDE = 32


def conv_operator_norm_bound(
    weight: torch.Tensor,
    input_spatial: Sequence[int],
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int | str = 0,
    dilation: Sequence[int] | int = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    transposed: bool = False,
    output_padding: Sequence[int] | int = 0,
) -> float:
    """Certified upper bound on the l2 -> l2 norm of a bias-free convolution on one input size.

    The arguments mirror ``torch.nn.ConvNd`` / ``ConvTransposeNd``; the result ``B`` satisfies

        ``max_{x != 0} ||conv(x)||_2 / ||x||_2  <=  B``

    for the linear part of the layer (bias excluded) applied to inputs of spatial size
    ``input_spatial``. ``B`` is the smaller of ``prod(axis factors) * max_f ||K'(f)||_2``, with
    ``K'(f)`` the DFT of the polyphase kernel on the smallest valid torus, and the im2col bound
    ``sqrt(c) ||W_mat||_2`` (see the module docstring), plus an explicit rounding margin
    (relative ``~1e-10``). It is exact up to that margin for circular convolutions whose
    geometry is a true torus, including strided ones; with zero padding it approaches the true
    norm as the input grows (within 1% on 32x32 inputs with 3x3 kernels in our tests).

    Args:
        weight: real ``ConvNd`` weight ``(C_out, C_in / groups, *kernel)``; for ``transposed``
            the ``ConvTransposeNd`` layout ``(C_in, C_out / groups, *kernel)``. Any float dtype
            or device; it is converted exactly to float64 on the CPU.
        input_spatial: spatial size of one input (no batch/channel), 1 to 3 entries.
        stride, padding, dilation, groups, padding_mode, output_padding: as in PyTorch.
            ``padding`` may be ``"valid"`` or ``"same"`` (the latter needs stride 1 and a
            non-transposed conv, like PyTorch). Transposed convs only support ``"zeros"``.
        transposed: treat ``weight`` as a ``ConvTransposeNd`` weight.

    Returns:
        A Python float, never below the true operator norm.

    Raises:
        ValueError: for geometries PyTorch would reject or that are malformed (wrong weight
            rank, mismatched lengths, non-positive sizes, unknown padding mode, ...).
    """
    geometry = conv_geometry(
        weight,
        input_spatial,
        stride,
        padding,
        dilation,
        groups,
        padding_mode,
        transposed,
        output_padding,
    )
    axis_candidates, window_copies, dead_taps = plan_axes(geometry)
    # A private copy (never a view of the model's weight): it is modified in place below.
    w64 = weight.detach().to(device="cpu", dtype=torch.float64, copy=True)
    # An axis that reads padding zeros only makes the whole operator zero.
    if w64.numel() == 0 or not all(axis_candidates):
        return 0.0
    exponent = _drop_dead_taps_and_normalise(w64, dead_taps)
    if exponent is None:
        return 0.0
    w_groups = w64.reshape(geometry.groups, w64.shape[0] // geometry.groups, *w64.shape[1:])
    budget = current_budget()
    best = math.sqrt(window_copies) * _im2col_norm(w_groups, budget.limit_bytes)
    torus = _best_torus_bound(w_groups, geometry.dilation, axis_candidates, budget)
    if torus.skipped:
        budget.record(
            f"conv weight {tuple(weight.shape)} on input {tuple(input_spatial)}: {torus.skipped} "
            f"FFT (torus) certificate(s) need more than the memory budget of "
            f"{budget.limit_bytes / 2**20:.0f} MiB; used the im2col bound sqrt(c)·‖W_mat‖ "
            "instead (looser). Raise memory_limit_bytes for the FFT certificate."
        )
    best = min(best, torus.bound)
    try:
        return math.ldexp(best * (1.0 + _REL_MARGIN), exponent)
    except OverflowError:  # beyond float64: infinity is still a valid upper bound
        return math.inf


def _drop_dead_taps_and_normalise(w64: torch.Tensor, dead_taps: list[list[int]]) -> int | None:
    """Zero the taps that only ever meet padding zeros (exact: they contribute nothing), then
    scale ``w64`` in place by a power of two (exact) so that its largest entry lies in
    ``[0.5, 1)``. Returns the exponent ``e`` (the norm is ``2**e`` times the scaled one), or
    ``None`` for an all-zero weight."""
    for axis, dead in enumerate(dead_taps):
        if dead:
            w64.index_fill_(axis + 2, torch.tensor(dead), 0.0)
    peak = float(w64.abs().max())
    if peak == 0.0:
        return None
    # Exact power-of-two normalisation keeps squares away from overflow and underflow.
    exponent = math.frexp(peak)[1]
    half = -exponent // 2  # two steps: 2**-exponent alone may overflow for subnormal weights
    w64.mul_(2.0**half).mul_(2.0 ** (-exponent - half))
    return exponent


def _im2col_norm(w_groups: torch.Tensor, limit_bytes: int) -> float:
    """Certified ``max_g ||W_mat,g||_2`` of the im2col weight matrices (section 6): dense
    eigenvalues within ``limit_bytes``, else the budgeted matrix certificate (row blocks,
    Frobenius, Schur)."""
    if _window_bytes(w_groups) <= limit_bytes:
        return _window_norm(w_groups)
    mats = w_groups.reshape(w_groups.shape[0], w_groups.shape[1], -1)
    return max(
        matrix_norm_certificate(m, memory_limit_bytes=limit_bytes, name="conv weight").bound
        for m in mats
    )


@dataclass(frozen=True)
class _TorusBound:
    """The smallest torus bound over the plan combinations (``inf`` if none fitted the
    budget) and how many combinations were skipped for memory."""

    bound: float
    skipped: int


def _best_torus_bound(
    w_groups: torch.Tensor,
    dilation: tuple[int, ...],
    axis_candidates: list[list[AxisPlan]],
    budget: MemoryBudget,
) -> _TorusBound:
    """``min over plan combinations of prod(sqrt(mult)) * ||torus conv||`` (sections 1-5):
    every combination is a proven bound, so their minimum is one."""
    best, skipped = math.inf, 0
    for combo in product(*axis_candidates):
        factor = math.sqrt(math.prod(p.mult for p in combo))
        torus = _torus_norm(w_groups, dilation, combo, budget.limit_bytes)
        if torus is None:
            skipped += 1
        else:
            best = min(best, factor * torus)
    return _TorusBound(best, skipped)


# ----------------------------------------------------------------------------- spectrum


def _window_bytes(w_groups: torch.Tensor) -> int:
    """Peak bytes of :func:`_window_norm`: the Gram matrices, eigvalsh's copies, squares."""
    n_groups, rows = w_groups.shape[:2]
    cols = w_groups[0, 0].numel()
    small = min(rows, cols)
    return 8 * (4 * n_groups * small * small + w_groups.numel())


def _polyphase_layout(
    kernel: tuple[int, ...], dilation: tuple[int, ...], sigmas: list[int], tori: list[int]
) -> tuple[list[list[int]], list[int]]:
    """Where each kernel tap goes in the polyphase kernel (section 3).

    Per axis, tap ``t`` sits at torus position ``d t = sigma q + r`` with ``q`` folded modulo
    ``M``. Returns, per axis, the sorted distinct ``q`` values, and for every tap (row-major
    order) its flat ``(polyphase tap, phase)`` slot ``q_flat * prod(sigmas) + r_flat``.
    """
    q_values: list[list[int]] = []
    q_index: list[list[int]] = []
    r_index: list[list[int]] = []
    for k, d, sigma, size in zip(kernel, dilation, sigmas, tori, strict=True):
        qs = [(d * t // sigma) % size for t in range(k)]
        uniq = sorted(set(qs))
        q_values.append(uniq)
        q_index.append([uniq.index(q) for q in qs])
        r_index.append([(d * t) % sigma for t in range(k)])
    n_phases = math.prod(sigmas)
    dest = []
    for taps in product(*(range(k) for k in kernel)):
        qi = ri = 0
        for axis, t in enumerate(taps):
            qi = qi * len(q_values[axis]) + q_index[axis][t]
            ri = ri * sigmas[axis] + r_index[axis][t]
        dest.append(qi * n_phases + ri)
    return q_values, dest


def _per_frequency_bytes(n_groups: int, rows: int, cols: int, n_coeffs: int, autocorr: bool) -> int:
    """Working bytes per frequency of a Gram route (``n_coeffs``: DFT coefficients per
    frequency, the polyphase taps on the direct route, the shifts on the autocorrelation one)."""
    small = min(rows, cols)
    if autocorr:
        return n_groups * small * small * 48 + n_coeffs * 32
    return n_groups * (rows * cols * 48 + small * small * 32) + n_coeffs * 32


def _torus_norm(
    w_groups: torch.Tensor,
    dilation: tuple[int, ...],
    plans: tuple[AxisPlan, ...],
    limit_bytes: int | None = None,
) -> float | None:
    """Upper bound on the norm of the (polyphase) torus convolution described by ``plans``.

    ``w_groups`` has shape ``(G, C_out/G, C_in/G, *kernel)`` in float64. Returns
    ``max_f sigma_max(K'(f))`` over the half spectrum plus the rounding margins of the module
    docstring (the relative ``1e-10`` is applied by the caller), or ``None`` when its working
    memory (polyphase kernels, autocorrelations, one frequency chunk) would exceed
    ``limit_bytes``.
    """
    n_groups, c_out, c_in = w_groups.shape[:3]
    kernel = tuple(w_groups.shape[3:])
    sigmas = [p.sigma for p in plans]
    tori = [p.size // p.sigma for p in plans]
    n_phases = math.prod(sigmas)
    q_values, dest = _polyphase_layout(kernel, dilation, sigmas, tori)
    n_q = math.prod(len(v) for v in q_values)
    n_taps = math.prod(kernel)
    rows, cols = c_out, c_in * n_phases
    small, inner = min(rows, cols), max(rows, cols)
    freq_shape = [*tori[:-1], tori[-1] // 2 + 1]  # half spectrum (real kernel)
    n_freq = math.prod(freq_shape)
    # Rough multiply-add counts of the two ways of forming the Gram matrices.
    n_shifts = math.prod(2 * len(v) - 1 for v in q_values)
    cost_direct = n_freq * n_q * rows * cols * 2 + n_freq * small * small * inner * 4
    cost_autocorr = n_q * n_q * small * small * inner + n_freq * n_shifts * small * small * 2
    autocorr = small > 1 and cost_autocorr < cost_direct
    chunk_bytes = _CHUNK_BYTES if limit_bytes is None else min(_CHUNK_BYTES, limit_bytes // 4)
    if limit_bytes is not None:
        poly = n_q * n_phases * n_groups * c_out * c_in
        need = 8 * (3 * poly + w_groups.numel())
        if autocorr:
            need += 8 * n_groups * small * (n_shifts * small + 2 * n_q * inner)
        n_coeffs = n_shifts if autocorr else n_q
        need += max(chunk_bytes, _per_frequency_bytes(n_groups, rows, cols, n_coeffs, autocorr))
        if need > limit_bytes:
            return None
    dest_t = torch.tensor(dest, dtype=torch.long)
    taps_first = w_groups.reshape(n_groups, c_out, c_in, n_taps).permute(3, 0, 1, 2)

    def polyphase(values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros(n_q * n_phases, n_groups, c_out, c_in)
        out.index_add_(0, dest_t, values)
        # -> (Q, G, C_out, C_in * phases): columns are (input channel, phase) pairs.
        out = out.reshape(n_q, n_phases, n_groups, c_out, c_in).permute(0, 2, 3, 4, 1)
        return out.reshape(n_q, n_groups, c_out, c_in * n_phases)

    w_poly = polyphase(taps_first)
    # S = per-entry sums of |w| over taps: dominates |W'_q| and sum_q |W'_q| entrywise.
    s_frob = float(polyphase(taps_first.abs()).sum(0).square().sum((-2, -1)).sqrt().max())
    s_frob *= 1 + 1e-6
    q_grid = torch.tensor(list(product(*q_values)), dtype=torch.long).reshape(n_q, len(tori))
    route = _autocorr_route if autocorr else _direct_route
    top = _max_over_spectrum(route(w_poly, q_grid), tori, freq_shape, chunk_bytes)
    # Weyl: rounding of the polyphase sums (folded taps) and, on the direct route, of the DFT
    # moves each singular value by at most eps * ||S||_F.
    sigma_margin = (2 * n_q + n_taps + 110) * _UNIT_ROUNDOFF * s_frob
    lam = top + _gram_margin(n_q, inner, small, n_shifts) * s_frob**2 + 1e-290
    return math.sqrt(max(lam, 0.0)) + sigma_margin


def _window_norm(w_groups: torch.Tensor) -> float:
    """Upper bound on ``max_g ||W_g||_2`` for the ``C_out/G x (C_in/G * taps)`` matrices ``W_g``.

    Gram rounding (``gamma_l ||W||_F^2``) and the eigensolver backward error are covered by the
    same margin as in :func:`_gram_margin` with a single tap.
    """
    mats = w_groups.reshape(w_groups.shape[0], w_groups.shape[1], -1)
    rows, cols = mats.shape[-2:]
    if min(rows, cols) == 1:
        top = float(mats.square().sum((-2, -1)).max())
    else:
        gram = mats @ mats.mT if rows <= cols else mats.mT @ mats
        top = float(torch.linalg.eigvalsh(gram)[..., -1].max())
    frob2 = float(mats.square().sum((-2, -1)).max()) * (1 + 1e-6)
    lam = top + _gram_margin(1, max(rows, cols), min(rows, cols), 1) * frob2 + 1e-290
    return math.sqrt(max(lam, 0.0))


def _gram_margin(n_q: int, inner: int, small: int, n_shifts: int) -> float:
    """Coefficient ``c`` such that ``c ||S||_F^2`` bounds every Gram/eigenvalue rounding error.

    Covers (i) the rounding of each Gram entry, a real contraction of length at most
    ``n_q * inner`` (autocorrelation route; ``inner`` complex terms on the direct route) combined
    over at most ``n_shifts`` DFT coefficients that are each within ``40 u`` of exact, real and
    imaginary parts separately (factor ``sqrt(2)``); entrywise it is at most that factor times
    ``u (S S^T)`` and ``||S S^T||_2 <= ||S||_F^2``; and (ii) the eigensolver's backward error,
    taken as ``(4 g + 16) u ||G||_2`` with ``||G||_2 <= ||S||_F^2``.
    """
    terms = math.sqrt(2) * (n_q * inner + n_q * inner + n_shifts + 120) + 4 * small + 16
    return terms * _UNIT_ROUNDOFF * 1.01


def _angles(
    start: int, stop: int, freq_shape: list[int], tori: list[int], offsets: torch.Tensor
) -> torch.Tensor:
    """``2 pi <f, offset / M> mod 2 pi`` for flat half-spectrum frequencies ``[start, stop)``.

    The reduction is done in exact integer arithmetic (common denominator ``lcm(M)``) so the
    float angle lies in ``[0, 2 pi)`` with a few ulps of error; ``offsets`` is ``(X, D)`` int64.
    """
    lcm = math.lcm(*tori)
    rem = torch.arange(start, stop, dtype=torch.long)
    numer = torch.zeros(rem.numel(), offsets.shape[0], dtype=torch.long)
    for axis in reversed(range(len(tori))):
        omega = rem % freq_shape[axis]
        rem = rem // freq_shape[axis]
        numer += ((omega[:, None] * offsets[None, :, axis]) % tori[axis]) * (lcm // tori[axis])
    return (numer % lcm).to(torch.float64) * (2 * math.pi / lcm)


@dataclass(frozen=True)
class _GramRoute:
    """One way of forming the Gram matrices ``G(f)`` of the half spectrum, chunk by chunk.

    ``offsets``: ``(X, D)`` integer shifts whose DFT phases the route combines; ``per_freq``:
    its working bytes per frequency; ``top(angles)``: ``max_f lambda_max(G(f))`` over a chunk
    of frequencies given by their ``(F, X)`` phase angles (:func:`top_eigenvalue_max`).
    """

    offsets: torch.Tensor
    per_freq: int
    top: Callable[[torch.Tensor], float]


def _max_over_spectrum(
    route: _GramRoute, tori: list[int], freq_shape: list[int], chunk_bytes: int = _CHUNK_BYTES
) -> float:
    """``max_f lambda_max(G(f))`` over the half spectrum, in chunks of at most ``chunk_bytes``."""
    n_freq = math.prod(freq_shape)
    step = max(1, chunk_bytes // route.per_freq)
    best = 0.0
    for start in range(0, n_freq, step):
        angle = _angles(start, min(start + step, n_freq), freq_shape, tori, route.offsets)
        best = max(best, route.top(angle))
    return best


def top_eigenvalue_max(gram: torch.Tensor) -> float:
    """``max`` over a batch of Hermitian PSD matrices ``gram`` (``(..., g, g)``, float64 or
    complex128) of the float64 ``eigvalsh`` top eigenvalue, computing that float64 value
    only where the maximum can be.

    Screen: ``λ̃_f`` = ``eigvalsh`` of every matrix rounded to single precision (about twice
    as fast). Under the backward-error model the torus margin already uses for ``eigvalsh``
    (``|λ̂ − λ| ≤ (4g + 16) u ‖G‖``, :func:`_gram_margin`), plus the rounding of ``G`` to single
    precision (entrywise ``≤ u_s |G|``, so ``‖ΔG‖_2 ≤ u_s ‖G‖_F ≤ u_s √g ‖G‖_2``), and
    ``‖G‖_2 = λ_max(G)`` for a PSD ``G``: ``λ_max(G_f) ≤ λ̃_f / (1 − c u_s)`` with
    ``c = 4g + 16 + √g``, here padded tenfold: ``λ_max(G_f) ≤ λ̃_f (1 + τ)``,
    ``τ = 10 c u_s`` (6e-4 at ``g = 256``). The float64 ``eigvalsh`` then runs on every matrix
    with ``λ̃_f (1 + τ) ≥ max λ̃ (1 − τ)``, and again on any other whose ``λ̃_f (1 + τ)`` exceeds
    the float64 maximum found. **Guarantee**: the result is the float64 value of a matrix
    holding the maximum, so it equals the plain float64 ``max_f eigvalsh(G_f)[-1]`` wherever
    the screen holds; every skipped matrix has ``λ_max ≤ λ̃_f (1 + τ) ≤`` the result. Small
    sides (``g <`` :data:`SCREEN_MIN_SIDE`), single matrices and non-finite screens use float64
    throughout.
    """
    g = gram.shape[-1]
    flat = gram.reshape(-1, g, g)
    if g < SCREEN_MIN_SIDE or flat.shape[0] < 2:
        return float(torch.linalg.eigvalsh(flat)[:, -1].max())
    single = torch.complex64 if flat.is_complex() else torch.float32
    screen = torch.linalg.eigvalsh(flat.to(single))[:, -1].to(torch.float64)
    if not bool(torch.isfinite(screen).all()):
        return float(torch.linalg.eigvalsh(flat)[:, -1].max())
    tau = 10 * (4 * g + 16 + math.sqrt(g)) * 2.0**-24
    upper = screen * (1 + tau)  # ≥ λ_max(G_f) (model above)
    done = upper >= float(screen.max()) * (1 - tau)
    best = float(torch.linalg.eigvalsh(flat[done])[:, -1].max())
    while bool((rest := ~done & (upper > best)).any()):  # the screen was not decisive
        best = max(best, float(torch.linalg.eigvalsh(flat[rest])[:, -1].max()))
        done |= rest
    return best


def _direct_route(w_poly: torch.Tensor, q_grid: torch.Tensor) -> _GramRoute:
    """The smaller Gram matrix of ``K'(f) = sum_q exp(i theta) W'_q``: the DFT matrices are
    formed chunk by chunk (two real matmuls), then their Gram matrices."""
    n_q, n_groups, rows, cols = w_poly.shape
    small = min(rows, cols)
    w_flat = w_poly.reshape(n_q, -1)

    def top(angle: torch.Tensor) -> torch.Tensor:
        real = torch.cos(angle) @ w_flat
        imag = torch.sin(angle) @ w_flat
        if small == 1:  # a single row/column: its squared norm is its squared Frobenius norm
            squares = real.square() + imag.square()
            return float(squares.reshape(-1, n_groups, rows * cols).sum(-1).max())
        mats = torch.complex(real, imag).reshape(-1, n_groups, rows, cols)
        gram = mats @ mats.mH if rows <= cols else mats.mH @ mats
        return top_eigenvalue_max(gram)

    return _GramRoute(q_grid, _per_frequency_bytes(n_groups, rows, cols, n_q, False), top)


def _autocorr_route(w_poly: torch.Tensor, q_grid: torch.Tensor) -> _GramRoute:
    """The smaller Gram matrix via the kernel autocorrelation.

    With ``V_q`` the polyphase taps oriented so that ``V_q`` is ``g x l`` with ``g <= l``,
    ``G(f) = sum_{q,q'} exp(i theta(f, q - q')) V_q V_q'^T = sum_delta exp(i theta(f, delta))
    R_delta`` with ``R_delta = sum_{q - q' = delta} V_q V_q'^T``. The ``R_delta`` are computed
    once (real matmuls), then each ``G(f)`` costs one small complex combination.
    """
    n_q, n_groups, rows, cols = w_poly.shape
    v = w_poly if rows <= cols else w_poly.transpose(-1, -2)
    small = v.shape[-2]
    diffs = q_grid[:, None, :] - q_grid[None, :, :]  # (Q, Q, D) integer shifts
    shifts, inverse = torch.unique(diffs.reshape(n_q * n_q, -1), dim=0, return_inverse=True)
    left_idx = torch.arange(n_q).repeat_interleave(n_q)
    right_idx = torch.arange(n_q).repeat(n_q)
    autocorr = []
    for s in range(shifts.shape[0]):
        sel = (inverse == s).nonzero().flatten()
        # (G, g, P*l) @ (G, P*l, g): the sum over pairs is the contraction over P*l.
        lhs = v[left_idx[sel]].permute(1, 2, 0, 3).reshape(n_groups, small, -1)
        rhs = v[right_idx[sel]].permute(1, 2, 0, 3).reshape(n_groups, small, -1)
        autocorr.append(lhs @ rhs.transpose(-1, -2))
    r_flat = torch.stack(autocorr).reshape(shifts.shape[0], -1)

    def top(angle: torch.Tensor) -> torch.Tensor:
        gram = torch.complex(torch.cos(angle) @ r_flat, torch.sin(angle) @ r_flat)
        return top_eigenvalue_max(gram.reshape(-1, n_groups, small, small))

    per_freq = _per_frequency_bytes(n_groups, rows, cols, shifts.shape[0], True)
    return _GramRoute(shifts, per_freq, top)
