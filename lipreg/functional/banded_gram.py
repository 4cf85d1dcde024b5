"""Certified norms of zero-padded convolutions, exact up to rounding: block-banded Gram tests.

The FFT (torus) bound of :mod:`lipreg.functional.conv_bounds` is the norm of the *circular*
convolution, about 10 % above the norm of the zero-padded one on 4×4 maps. This module proves
``‖A‖ ≤ σ̂ sqrt(1 + δ)`` for the zero-padded convolution ``A`` itself, given an estimate ``σ̂``
(Lanczos), by showing that ``μ I − G`` is positive definite, ``μ = σ̂²(1 + δ)``, where ``G`` is
the Gram matrix of ``A`` on its smaller side (``AᵀA`` on the input side, ``AAᵀ`` on the output
side: both have the eigenvalue ``‖A‖²``).

**Structure.** ``y[o, q] = Σ_{c,t} w[o, c, t] x[c, q s − pad + t d]`` (per axis). On the input
side ``G[(c,p),(c',p')] = Σ M_in[t,t'][c,c']`` over the (at most one per tap pair) outputs
``q`` with ``p = q s − pad + t d`` and ``p' = q s − pad + t' d`` both inside the map, where
``M_in[t,t'] = Σ_o w[o,:,t]ᵀ w[o,:,t']``; on the output side, with ``M_out[t,t'] = Σ_c
w[:,c,t] w[:,c,t']ᵀ``, over the inputs ``p`` read by both ``q`` (tap ``t``) and ``q'`` (tap
``t'``). Positions couple only within the reach ``R = (k−1)d`` (input side) or ``⌊(k−1)d/s⌋``
(output side) per axis, so with positions ordered row-major (channels innermost) and cut into
blocks of ``h ≤ R`` rows of the first axis, ``G`` is **block banded** with ``β = ⌈R/h⌉``
blocks on each side of the diagonal. The blocks are built from the kernel, block row by block
row, never the whole matrix. Groups are block diagonal: the groups form a batch.

**The test** is Rump's (2006, Cor. 2.4/2.7; :mod:`lipreg.functional.lmi`, whose
:func:`~lipreg.functional.lmi.rump_shift` computes the shift here too) applied to ``P = μI − Ĝ``
through a streamed block-banded Cholesky (a floating-point Cholesky of the whole matrix in
one summation order; structural zeros are exact zeros), with ``tr P ≤ Nμ`` and ``max P_ii ≤ μ``
and the radius ``r ≥ ‖P̂ − (μI − G)‖_2``:

* each Gram entry is a sum of at most ``n = K·T`` products (``K`` the channels summed per
  group, ``T`` the taps), so ``|Ĝ − G| ≤ γ_n |Â|ᵀ|Â| + 2(n+1)η`` entrywise and
  ``‖Ĝ − G‖ ≤ γ_n ‖|Â|‖² + 2(n+1)Nη`` with ``‖|Â|‖² ≤ ‖|Â|‖_1 ‖|Â|‖_∞ ≤ max_c Σ_{o,t}|w| ·
  max_o Σ_{c,t}|w|`` (every input entry meets each tap of each output channel at most once);
* the diagonal ``fl(μ − Ĝ_ii)`` adds at most ``u μ``.

Success proves ``λ_max(G) < μ``, so ``‖A‖ < sqrt(μ)``. ``δ`` starts at 1e-6 and is multiplied
by 4 until the test succeeds (or ``max_delta`` is passed: ``None``). A caller whose kernel is
itself rounded (batch-norm scales folded in float64) adds ``kernel_error · ‖|Â|‖`` (see
:func:`abs_norm_bound`). 1×1 kernels need no Gram test: such a convolution is ``(selection of
positions) ⊗ W`` per group, whose norm is at most ``max_g ‖W_g‖``, certified densely
(:func:`~lipreg.functional.certify.matrix_norm_certificate`).

Cost ``O(N (β+1)² b²)`` time and ``≈ 8·g·((β+1)² + 3)·b²`` bytes (plus the kernel-pair
matrices) for ``N`` Gram rows per group, ``g`` groups and blocks of ``b = h·(map size / first
axis)·channels`` rows (:func:`gram_plan`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from lipreg.functional.certify import matrix_norm_certificate
from lipreg.functional.linear_map import LinearMap
from lipreg.functional.lmi import ETA, UNIT_ROUNDOFF, gamma, product_radius, rump_shift, sqrt_up
from lipreg.functional.power_iteration import operator_norm
from lipreg.functional.specs import ConvData

__all__ = [
    "ConvNormCertificate",
    "GramPlan",
    "abs_norm_bound",
    "axis_incidences",
    "certify_conv_norm",
    "conv_linear_map",
    "conv_matrix",
    "conv_pass_flops",
    "gram_plan",
    "output_spatial",
    "pointwise_product_bound",
    "used_tap_pairs",
]

_CHUNK_BYTES = 8 * 2**20  # gathered kernel-pair matrices per index_add
_MIN_BLOCK = 128  # smaller blocks: Python overhead dominates
# Tolerance of the float64 Lanczos run that sharpens the caller's estimate before the test: a
# few cheap convolutions instead of a failed factorisation per missing digit.
REFINE_TOL = 1e-9
_SUM_SAFETY = 1.0 + 1e-6  # float64 sums of < 1e9 non-negative terms: relative error < γ_1e9


@dataclass(frozen=True)
class ConvNormCertificate:
    """A certified ``bound ≥ ‖A‖_2`` of a zero-padded convolution.

    Attributes:
        bound: the certified upper bound.
        method: ``"conv-gram"`` (block-banded Gram test) or ``"conv-pointwise"`` (1×1 kernel,
            dense kernel-matrix certificate; ``… (memory budget)`` if that fell back).
        delta: the ``δ`` of the successful Gram test (0 for pointwise).
        side: ``"input"`` or ``"output"`` (which Gram matrix was tested), ``""`` for pointwise.
        estimate: the ``σ̂`` of the successful test; for pointwise, the dense certificate's
            ``‖W v‖`` (a lower value of ``max_g ‖W_g‖``).
        v: the float64 Lanczos vector when the estimate had to be refined, else ``None``
            (a warm start for the next refinement).
    """

    bound: float
    method: str
    delta: float = 0.0
    side: str = ""
    estimate: float = 0.0
    v: Tensor | None = None


@dataclass(frozen=True)
class GramPlan:
    """Which Gram matrix is tested and its block structure (per group).

    Attributes:
        side: ``"input"`` (``AᵀA``) or ``"output"`` (``AAᵀ``).
        spatial: the spatial shape on that side.
        channels: channels per group on that side (``C``); ``summed`` the other side's (``K``).
        reach: ``R``, positions further apart than this along the first axis do not couple.
        height: ``h``, rows of the first axis per block; ``bandwidth``: ``⌈R/h⌉`` blocks.
        size: ``N``, Gram rows per group; ``block``: largest block side ``b``.
        bytes: peak memory of :func:`certify_conv_norm` with this plan.
    """

    side: str
    spatial: tuple[int, ...]
    channels: int
    summed: int
    reach: int
    height: int
    bandwidth: int
    size: int
    block: int
    bytes: int

    @property
    def cost(self) -> float:
        """Flops of one test, up to a constant: ``(N/b)(β+1)² b³``."""
        return self.size * (self.bandwidth + 1) ** 2 * self.block**2


def conv_linear_map(conv: ConvData) -> LinearMap:
    """The convolution as a float64 :class:`~lipreg.functional.linear_map.LinearMap`."""
    fn = (F.conv1d, F.conv2d, F.conv3d)[len(conv.in_shape) - 2]
    w = conv.weight.detach().to(torch.float64)

    def apply(x: Tensor) -> Tensor:
        return fn(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    out_shape = (w.shape[0], *output_spatial(conv))
    return LinearMap(apply, conv.in_shape, out_shape, torch.float64, w.device, "merged conv")


def output_spatial(conv: ConvData) -> tuple[int, ...]:
    """Spatial output shape ``⌊(n + 2p − d(k−1) − 1)/s⌋ + 1`` per axis."""
    kernel = conv.weight.shape[2:]
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(
            conv.in_shape[1:], conv.padding, conv.dilation, kernel, conv.stride, strict=True
        )
    )


def gram_plan(conv: ConvData) -> GramPlan:
    """The cheaper side (:attr:`GramPlan.cost`, ties to the input side) and its blocks: ``h``
    rows of the first axis per block, ``h ≤ R`` and blocks of at least ``_MIN_BLOCK`` rows
    when possible (fewer, larger BLAS calls)."""
    w = conv.weight
    groups, kernel = conv.groups, tuple(w.shape[2:])
    c_out_g, c_in_g = w.shape[0] // groups, w.shape[1]
    plans = []
    sides = (
        ("input", tuple(conv.in_shape[1:]), c_in_g, c_out_g, 1),
        ("output", output_spatial(conv), c_out_g, c_in_g, conv.stride[0]),
    )
    for side, spatial, channels, summed, divisor in sides:
        reach = (kernel[0] - 1) * conv.dilation[0] // divisor
        row = math.prod(spatial[1:]) * channels
        height = min(max(1, -(-_MIN_BLOCK // row)), spatial[0])
        height = min(height, reach) if reach else height
        bandwidth = -(-reach // height)
        block = height * row
        n_pairs = used_tap_pairs(conv, side).shape[0]
        pair_bytes = 8 * groups * n_pairs * channels * channels
        gather_bytes = 16 * groups * n_pairs * channels * summed  # while the pairs are built
        # L rows kept, the current row, copies made by LAPACK calls and the allocator's slack:
        # twice (β+1)² + 1 blocks covered the peak resident memory measured on ResNet layers
        stored = 2 * (bandwidth + 1) ** 2 + 2
        blocks_bytes = 8 * groups * stored * block * block
        nbytes = pair_bytes + max(blocks_bytes, gather_bytes) + 2 * _CHUNK_BYTES
        size = math.prod(spatial) * channels
        plans.append(
            GramPlan(side, spatial, channels, summed, reach, height, bandwidth, size, block, nbytes)
        )
    return min(plans, key=lambda p: p.cost)


def axis_incidences(
    n_in: int, n_out: int, k: int, s: int, pad: int, d: int, side: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Along one axis, every ``(i, j, t, t')`` such that Gram positions ``i`` and ``j`` are
    coupled through taps ``t`` and ``t'`` (module docstring); each appears once.

    Input side: ``i = q s − pad + t d``, ``j = q s − pad + t' d`` for an output ``q``, both in
    ``[0, n_in)``. Output side: ``i = q``, ``j = q'`` with ``q s − pad + t d = q' s − pad + t'
    d = p`` for an input ``p``, both in ``[0, n_out)``.
    """
    taps = torch.arange(k)
    if side == "input":
        pos = torch.arange(n_out)[:, None] * s - pad + taps[None, :] * d  # (q, t) -> p
        valid = (pos >= 0) & (pos < n_in)
    else:
        num = torch.arange(n_in)[:, None] + pad - taps[None, :] * d  # (p, t) -> q s
        pos = torch.div(num, s, rounding_mode="floor")
        valid = (num % s == 0) & (pos >= 0) & (pos < n_out)
    both = valid[:, :, None] & valid[:, None, :]
    i = pos[:, :, None].expand_as(both)[both]
    j = pos[:, None, :].expand_as(both)[both]
    t1 = taps[None, :, None].expand_as(both)[both]
    t2 = taps[None, None, :].expand_as(both)[both]
    return i, j, t1, t2


def abs_norm_bound(weight: Tensor, groups: int, *, copies: int = 1) -> float:
    """An upper bound on ``‖|A|‖_2`` for the convolution with kernel ``weight`` (any geometry,
    any stride, dilation and zero padding; forward or transposed):
    ``sqrt(max_o Σ_{c,t}|w[o,c,t]| · copies · max_c Σ_{o∈g(c),t}|w[o,c,t]|)`` (Schur test
    ``‖|A|‖² ≤ ‖|A|‖_∞ ‖|A|‖_1`` on ``|A|``), the column sums taken per group.

    A row of ``|A|`` (an output entry of channel ``o``) meets each ``(c, t)`` of its group at
    most once; a column (an input entry of channel ``c``) meets each ``(o, t)`` of its group at
    most ``copies`` times: 1 for zero padding, the largest number of times a padding mode
    duplicates one entry (reflect/replicate/circular). A transposed convolution with this
    weight (``(c_in, c_out/groups, *k)``) is the adjoint of the forward convolution with the
    same weight, and ``‖|Aᵀ|‖ = ‖|A|‖``: the same bound (``copies=1``). The bound does not
    depend on the spatial size."""
    w = weight.detach().to(torch.float64).abs()
    c_out = w.shape[0]
    per_out = w.flatten(1).sum(1)  # Σ_{c,t} per output channel
    cols = w.reshape(groups, c_out // groups, w.shape[1], -1).sum(dim=(1, 3))  # (g, c_in_g)
    value = float(per_out.max()) * float(cols.max()) * copies * _SUM_SAFETY**2
    return sqrt_up(value) * (1 + 4 * UNIT_ROUNDOFF)


def conv_matrix(conv: ConvData) -> Tensor:
    """The zero-padded convolution's matrix ``A`` (``(c_out·Πout, c_in·Πin)``, float64, rows and
    columns in the C order of ``(channel, *spatial)``), built by scattering the kernel:
    ``A[(o, q), (c, p)] = w[o, c − g(o) c_g, t]`` for the (at most one) tap ``t`` with
    ``p = q s − pad + t d`` on every axis, zero elsewhere. **Exact**: every entry is a kernel
    value or zero, with no arithmetic (the same matrix as the convolution applied in float64
    to the identity, at a fraction of its cost: no rounding term is needed for it)."""
    w = conv.weight.detach().to(torch.float64)
    g, kernel = conv.groups, tuple(w.shape[2:])
    c_out, c_in_g = w.shape[0], w.shape[1]
    c_out_g, out_sp, in_sp = c_out // g, output_spatial(conv), tuple(conv.in_shape[1:])
    n_q, n_p = math.prod(out_sp), math.prod(in_sp)
    # per axis and tap: the outputs q reading a valid input p = q s − pad + t d
    per_axis = []
    for n_in, n_out, k, s, pad, d in zip(
        in_sp, out_sp, kernel, conv.stride, conv.padding, conv.dilation, strict=True
    ):
        q = torch.arange(n_out)
        pos = q[None, :] * s - pad + torch.arange(k)[:, None] * d  # (t, q) -> p
        per_axis.append(
            [(q[(row >= 0) & (row < n_in)], row[(row >= 0) & (row < n_in)]) for row in pos]
        )
    matrix = w.new_zeros(g, c_out_g, n_q, g, c_in_g, n_p)
    # the group-diagonal blocks, written through a (c_out_g, n_q, c_in_g, n_p, g) view
    diagonal = torch.diagonal(matrix, dim1=0, dim2=3)
    w_taps = w.reshape(g, c_out_g, c_in_g, -1).permute(1, 2, 0, 3)  # (c_out_g, c_in_g, g, t)
    for flat, taps in enumerate(itertools.product(*(range(k) for k in kernel))):
        q_idx = p_idx = torch.zeros(1, dtype=torch.long)
        for (qa, pa), n_out, n_in in zip(
            (axis[t] for axis, t in zip(per_axis, taps, strict=True)), out_sp, in_sp, strict=True
        ):
            q_idx = (q_idx[:, None] * n_out + qa[None, :]).flatten()
            p_idx = (p_idx[:, None] * n_in + pa[None, :]).flatten()
        if q_idx.numel():  # distinct taps give distinct (q, p): plain assignment, no sums
            diagonal[:, q_idx, :, p_idx] = w_taps[..., flat]
    return matrix.reshape(c_out * n_q, g * c_in_g * n_p)


def conv_pass_flops(conv: ConvData) -> float:
    """Flops of one forward+backward of the convolution on one sample: ``6 ×`` its
    multiply-adds ``Πout · c_out · c_in/groups · Πk`` (forward, input and weight gradients)."""
    w = conv.weight
    return 6.0 * math.prod(output_spatial(conv)) * w.shape[0] * math.prod(w.shape[1:])


def used_tap_pairs(conv: ConvData, side: str) -> Tensor:
    """The flat tap pairs ``(t, t')`` that couple some Gram positions on ``side``, ``(P, 2)``:
    the Cartesian product of each axis's pairs (:func:`axis_incidences`); a strided output
    side uses only pairs with ``(t − t')d ≡ 0 (mod s)``."""
    kernel = tuple(conv.weight.shape[2:])
    flat_t = flat_u = torch.zeros(1, dtype=torch.long)
    axes = zip(
        conv.in_shape[1:],
        output_spatial(conv),
        kernel,
        conv.stride,
        conv.padding,
        conv.dilation,
        strict=True,
    )
    for n_in, n_out, k, stride, pad, dil in axes:
        _, _, t, u = axis_incidences(n_in, n_out, k, stride, pad, dil, side)
        pairs = torch.unique(t * k + u)
        flat_t = (flat_t[:, None] * k + (pairs // k)[None, :]).flatten()
        flat_u = (flat_u[:, None] * k + (pairs % k)[None, :]).flatten()
    return torch.stack([flat_t, flat_u], dim=1)


def _pair_matrices(conv: ConvData, plan: GramPlan, pairs: Tensor) -> Tensor:
    """``M[g, p, c, c']`` (float64) for the tap pairs ``p = (t, t')`` of ``pairs``:
    ``Σ_o w[o,c,t] w[o,c',t']`` (input side) or ``Σ_c w[o,c,t] w[o',c,t']`` (output side),
    per group; each entry one dot product of ``K`` terms."""
    w = conv.weight.detach().to(torch.float64)
    g = conv.groups
    taps = math.prod(w.shape[2:])
    x = w.reshape(g, w.shape[0] // g, w.shape[1], taps)  # (g, o, c, t)
    # input side: (g, t, c, o), rows c summed over o; output side: (g, t, o, c)
    x = x.permute(0, 3, 2, 1) if plan.side == "input" else x.permute(0, 3, 1, 2)
    return x[:, pairs[:, 0]] @ x[:, pairs[:, 1]].mT


class _BlockBuilder:
    """Builds the blocks ``Ĝ[block k, block j]`` (``h`` rows of the first axis each)."""

    def __init__(self, conv: ConvData, plan: GramPlan) -> None:
        self.plan = plan
        kernel = tuple(conv.weight.shape[2:])
        self.taps = math.prod(kernel)
        pairs = used_tap_pairs(conv, plan.side)
        self.pairs = _pair_matrices(conv, plan, pairs)
        # flat (t, t') -> index into self.pairs (every pair an incidence uses is there)
        self.lookup = torch.full((self.taps * self.taps,), -1, dtype=torch.long)
        self.lookup[pairs[:, 0] * self.taps + pairs[:, 1]] = torch.arange(pairs.shape[0])
        axes = zip(
            conv.in_shape[1:],
            output_spatial(conv),
            kernel,
            conv.stride,
            conv.padding,
            conv.dilation,
            strict=True,
        )
        self.axes = [axis_incidences(*a, plan.side) for a in axes]
        self.kernel = kernel
        self.rest = math.prod(plan.spatial[1:])
        self.n_blocks = -(-plan.spatial[0] // plan.height)

    def rows(self, k: int) -> int:
        """Positions in block ``k``."""
        h = self.plan.height
        return (min((k + 1) * h, self.plan.spatial[0]) - k * h) * self.rest

    def block(self, k: int, j: int) -> Tensor:
        """``Ĝ[block k, block j]`` as a ``(groups, b_k, b_j)`` float64 tensor."""
        h, c = self.plan.height, self.plan.channels
        i0, j0, t0, u0 = self.axes[0]
        keep = (i0 // h == k) & (j0 // h == j)
        lists = [(i0[keep] - k * h, j0[keep] - j * h, t0[keep], u0[keep]), *self.axes[1:]]
        # Cartesian product over the axes: flattened local positions and taps
        i = jj = t = u = torch.zeros(1, dtype=torch.long)
        for (ia, ja, ta, ua), n_axis, k_axis in zip(
            lists, (h, *self.plan.spatial[1:]), self.kernel, strict=True
        ):
            i = (i[:, None] * n_axis + ia[None, :]).flatten()
            jj = (jj[:, None] * n_axis + ja[None, :]).flatten()
            t = (t[:, None] * k_axis + ta[None, :]).flatten()
            u = (u[:, None] * k_axis + ua[None, :]).flatten()
        bi, bj = self.rows(k), self.rows(j)
        g = self.pairs.shape[0]
        out = torch.zeros(g, bi * bj, c, c, dtype=torch.float64)
        target, pair = i * bj + jj, self.lookup[t * self.taps + u]
        step = max(1, _CHUNK_BYTES // (8 * g * c * c))
        for start in range(0, target.numel(), step):
            sl = slice(start, start + step)
            out.index_add_(1, target[sl], self.pairs[:, pair[sl]])
        return out.view(g, bi, bj, c, c).permute(0, 1, 3, 2, 4).reshape(g, bi * c, bj * c)


def _gram_radius(conv: ConvData, plan: GramPlan, mu: float) -> float:
    """``r ≥ ‖P̂ − (μI − G)‖_2`` (module docstring)."""
    n = plan.summed * math.prod(conv.weight.shape[2:])
    abs_norm = abs_norm_bound(conv.weight, conv.groups)
    return (
        gamma(n) * abs_norm * abs_norm * _SUM_SAFETY
        + 2.0 * (n + 1) * plan.size * ETA
        + UNIT_ROUNDOFF * mu
    ) * _SUM_SAFETY


def _shifted_diagonal_block(gram: Tensor, mu: float, shift: float) -> Tensor | None:
    """``P̂[k, k]`` with its diagonal lowered by ``shift`` (each entry rounded down): the lower
    triangle of ``−Ĝ[k, k]`` mirrored, diagonal ``fl(fl(μ − Ĝ_ii) − shift)`` then one step
    down (``fl(μ − Ĝ_ii)`` is ``P̂_ii``; its own rounding is in the radius). ``None`` if some
    ``Ĝ_ii > μ`` (not positive definite)."""
    diag = torch.diagonal(gram, dim1=-2, dim2=-1).clone()
    if bool((diag > mu).any()):
        return None
    s = torch.tril(gram).neg_()
    s = s + torch.tril(s, -1).mT  # the lower triangle defines the matrix
    shifted = (mu - diag) - shift
    down = torch.nextafter(shifted, torch.full_like(shifted, -math.inf))
    torch.diagonal(s, dim1=-2, dim2=-1).copy_(down)
    return s


def _block_cholesky_succeeds(builder: _BlockBuilder, mu: float, shift: float) -> bool:
    """The streamed (left-looking) block-banded Cholesky of ``P̂ = μI − Ĝ`` with its diagonal
    lowered by ``shift``: ``True`` iff every pivot is positive.

    ``L[k,j] = (P̂[k,j] − Σ_{i<j} L[k,i] L[j,i]ᵀ) L[j,j]⁻ᵀ`` for the ``β`` blocks ``j`` left of
    ``k``, then ``L[k,k] = chol(P̂[k,k] − Σ_j L[k,j] L[k,j]ᵀ)``; only the last ``β`` block rows
    of ``L`` are kept. Every entry is ``a − Σ x_i y_i`` (some order), then ``÷`` or ``√``: a
    floating-point Cholesky of the whole matrix, as Rump's theorem requires."""
    beta = builder.plan.bandwidth
    rows: dict[int, dict[int, Tensor]] = {}
    for k in range(builder.n_blocks):
        row: dict[int, Tensor] = {}
        for j in range(max(0, k - beta), k):
            a = builder.block(k, j).neg_()  # P̂[k, j] = −Ĝ[k, j] (exact)
            for i, lki in row.items():
                if i in rows[j]:
                    a.baddbmm_(lki, rows[j][i].mT, alpha=-1)
            row[j] = torch.linalg.solve_triangular(rows[j][j].mT, a, upper=True, left=False)
            del a
        s = _shifted_diagonal_block(builder.block(k, k), mu, shift)
        if s is None:
            return False
        for lkj in row.values():
            s.baddbmm_(lkj, lkj.mT, alpha=-1)
        factor, info = torch.linalg.cholesky_ex(s)
        if bool((info != 0).any()):
            return False
        row[k] = factor
        rows[k] = row
        rows.pop(k - beta, None)  # row k + 1 needs rows k + 1 − β … k
    return True


def certify_conv_norm(
    conv: ConvData,
    estimate: float,
    *,
    max_delta: float = 1e-2,
    kernel_error: float = 0.0,
    v0: Tensor | None = None,
    refine: bool = True,
    delta0: float = 1e-6,
) -> ConvNormCertificate | None:
    """Certified ``‖A‖_2`` of the zero-padded convolution ``conv`` close to ``estimate``.

    ``bound = (sqrt(σ̂²(1+δ)) + kernel_error · ‖|Â|‖)(1 + 4u)`` with the smallest tried ``δ``
    (``delta0``, default 1e-6, ×4 each retry, at most ``max_delta``) for which the Gram test
    succeeds (module docstring); 1×1 kernels: ``max_g ‖W_g‖`` certified densely.
    ``kernel_error`` is the relative entrywise error of ``conv.weight`` against the exact
    kernel (0 if exact).

    The test first runs once at ``delta0`` with the caller's ``estimate`` (a float32 Lanczos
    value is usually accurate enough); only if that fails and ``refine`` is set, ``estimate``
    is raised to a float64 Lanczos value (tolerance :data:`REFINE_TOL`, warm-started from
    ``v0``; its vector is returned in ``v`` for the next call) before the ``δ`` search. The
    test's outcome, not the estimate, is what is trusted: any ``estimate`` is sound.

    The caller checks the memory (:func:`gram_plan` ``.bytes``). Returns ``None`` when no
    ``δ ≤ max_delta`` succeeds (``estimate`` too far below the norm).
    """
    extra = kernel_error * abs_norm_bound(conv.weight, conv.groups) if kernel_error else 0.0
    if all(k == 1 for k in conv.weight.shape[2:]):
        return _pointwise_certificate(conv, extra)
    if not (estimate > 0 and math.isfinite(estimate)):
        return None
    plan = gram_plan(conv)
    builder = _BlockBuilder(conv, plan)

    def test(sigma: float, delta: float) -> ConvNormCertificate | None:
        mu = sigma * sigma * (1 + delta)
        shift = rump_shift(plan.size, plan.size * mu, mu, _gram_radius(conv, plan, mu))
        if not _block_cholesky_succeeds(builder, mu, shift):
            return None
        bound = (sqrt_up(mu) + extra) * (1 + 4 * UNIT_ROUNDOFF)
        return ConvNormCertificate(bound, "conv-gram", delta, plan.side, estimate=sigma)

    refined = None
    if refine:  # one factorisation with the caller's estimate, then sharpen it if needed
        cert = test(estimate, delta0)
        if cert is not None:
            return cert
        start = v0.detach().to(torch.float64) if v0 is not None else None
        refined = operator_norm(conv_linear_map(conv), v0=start, tol=REFINE_TOL, max_iter=300)
        if refined.sigma <= estimate:  # nothing gained: the search below starts one step up
            delta0 *= 4
        estimate = max(estimate, refined.sigma)
    delta = delta0
    while delta <= max_delta:
        cert = test(estimate, delta)
        if cert is not None:
            return replace(cert, v=None if refined is None else refined.v)
        delta *= 4
    return None


def _pointwise_certificate(conv: ConvData, extra: float) -> ConvNormCertificate:
    """A 1×1 convolution: ``max_g ‖W_g‖`` (dense certificate of each group's kernel matrix)."""
    w = conv.weight.detach().flatten(1)
    per_group = w.shape[0] // conv.groups
    certs = [
        matrix_norm_certificate(w[g * per_group : (g + 1) * per_group]) for g in range(conv.groups)
    ]
    top = max(certs, key=lambda cert: cert.bound)
    method = "conv-pointwise" + ("" if top.method == "dense" else " (memory budget)")
    bound = (top.bound + extra) * (1 + 4 * UNIT_ROUNDOFF)
    return ConvNormCertificate(bound, method, estimate=top.estimate)


def pointwise_product_bound(weights: list[Tensor], kernel_errors: list[float]) -> float:
    """Certified ``‖A‖`` of a chain of 1×1 convolutions (``groups = 1``, any strides and
    paddings) with float64 kernel matrices ``Ŵ_1, …, Ŵ_m`` (application order, ``out × in``)
    whose entries are within ``kernel_errors[i] · |Ŵ_i|`` of the exact ones.

    Each 1×1 convolution is ``W_i ⊗ S_i`` with ``S_i`` a position map reading at most one input
    per output and feeding at most one output per input (``‖S_i‖ ≤ 1``); they commute, so
    ``A = (W_m ⋯ W_1) ⊗ (S_m ⋯ S_1)`` and ``‖A‖ ≤ ‖W_m ⋯ W_1‖``. The product ``M̂`` is formed in
    float64 while an entrywise bound ``E ≥ |M̂ − W_m ⋯ W_1|`` is carried:
    ``E' = |Ŵ|E + Err_Ŵ |M̂| + Err_Ŵ E + γ_{n+2}|Ŵ||M̂| + 2(n+1)η`` for each new factor
    (:func:`~lipreg.functional.lmi.product_radius` for the rounding of ``Ŵ M̂``), every
    non-negative product inflated by ``(1 + γ_{n+2})``. Then ``‖A‖ ≤ cert(M̂) + ‖E‖_F``, with
    ``cert`` the dense certificate (:func:`~lipreg.functional.certify.matrix_norm_certificate`).
    """
    product = weights[0].detach().to(torch.float64)
    err = kernel_errors[0] * product.abs()
    for w, rel in zip(weights[1:], kernel_errors[1:], strict=True):
        w = w.detach().to(torch.float64)
        inflate = 1 + gamma(w.shape[1] + 2)
        w_abs, w_err = w.abs(), rel * w.abs()
        err = (
            w_abs @ err * inflate
            + w_err @ product.abs() * inflate
            + w_err @ err * inflate
            + product_radius(w, product)
        ) * _SUM_SAFETY
        product = w @ product
    frob = sqrt_up(float((err * err).sum()) * _SUM_SAFETY)
    cert = matrix_norm_certificate(product)
    return (cert.bound + frob) * (1 + 4 * UNIT_ROUNDOFF)
