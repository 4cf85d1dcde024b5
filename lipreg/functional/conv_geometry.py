r"""The geometry half of :mod:`lipreg.functional.conv_bounds`: argument checks and torus plans.

:func:`conv_geometry` checks the arguments of a ``ConvNd`` / ``ConvTransposeNd`` layer the way
PyTorch does and reads a transposed convolution as the adjoint of a plain one (same norm).
:func:`plan_axes` then finds, per spatial axis, the torus embeddings of sections 1, 4 and 5 of
:mod:`lipreg.functional.conv_bounds` (each a proven isometry up to the factor
``sqrt(AxisPlan.mult)``), the copy count of the im2col bound (section 6) and the taps that only
ever read padding zeros (dropping them is exact).
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PADDING_MODES", "AxisPlan", "ConvGeometry", "conv_geometry", "plan_axes"]

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")


@dataclass(frozen=True)
class AxisPlan:
    """How one spatial axis is embedded in a torus.

    ``sigma``: stride of the torus convolution (the layer stride for the polyphase form, or 1);
    ``size``: torus length ``N`` (a multiple of ``sigma``); ``mult``: product of the largest
    copy counts of the input-duplication and output-repetition 0/1 maps, so the axis contributes
    the factor ``sqrt(mult)``.
    """

    sigma: int
    size: int
    mult: int


@dataclass(frozen=True)
class ConvGeometry:
    """A checked convolution, read as a plain (not transposed) ``ConvNd``.

    ``spatial``: input size of that conv (for a transposed layer, of its adjoint conv);
    ``n_used``: per axis, how many of the conv's outputs the layer uses (``None``: all);
    ``pads``: per axis ``(left, right)`` padding; the rest as in PyTorch.
    """

    spatial: tuple[int, ...]
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    n_used: tuple[int | None, ...]
    groups: int
    padding_mode: str


def conv_geometry(
    weight: torch.Tensor,
    input_spatial: Sequence[int],
    stride: Sequence[int] | int,
    padding: Sequence[int] | int | str,
    dilation: Sequence[int] | int,
    groups: int,
    padding_mode: str,
    transposed: bool,
    output_padding: Sequence[int] | int,
) -> ConvGeometry:
    """Check the arguments of :func:`~lipreg.functional.conv_bounds.conv_operator_norm_bound`
    (raising ``ValueError`` for what PyTorch would reject or a non-finite weight) and return the
    geometry of the plain convolution whose norm bounds the layer's.

    A ``ConvTransposeNd`` on inputs of length ``n`` is the adjoint of ``ConvNd`` with the same
    weight on inputs of length ``n_T = (n - 1) s - 2 p + k_eff + output_padding``, restricted to
    that conv's first ``n`` outputs (adjoints have the same norm).
    """
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}.")
    spatial = _positive_sizes(input_spatial)
    kernel = _kernel_of(weight, spatial)
    dims = len(spatial)
    groups = _as_int(groups, "groups")
    if groups < 1 or weight.shape[0] % groups != 0:
        raise ValueError(
            f"groups must be a positive divisor of weight.shape[0]={weight.shape[0]}, got {groups}."
        )
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}.")
    stride_t = _int_tuple(stride, dims, "stride", minimum=1)
    dilation_t = _int_tuple(dilation, dims, "dilation", minimum=1)
    out_pad_t = _int_tuple(output_padding, dims, "output_padding", minimum=0)
    transposed = bool(transposed)
    pads = _resolve_padding(padding, dims, kernel, dilation_t, stride_t, transposed)
    if not bool(torch.isfinite(weight.detach()).all()):
        raise ValueError("weight contains NaN or infinite entries; no finite bound exists.")
    n_used: tuple[int | None, ...] = (None,) * dims
    if transposed:
        if padding_mode != "zeros":
            raise ValueError(
                "transposed convolutions only support padding_mode='zeros' (as in PyTorch), "
                f"got {padding_mode!r}."
            )
        n_used = spatial  # the transposed op is the adjoint of the conv's first ``n`` outputs
        spatial = _adjoint_input_sizes(spatial, pads, kernel, dilation_t, stride_t, out_pad_t)
    elif any(out_pad_t):
        raise ValueError(
            f"output_padding={out_pad_t} only applies to transposed convolutions; pass "
            "transposed=True or output_padding=0."
        )
    return ConvGeometry(
        spatial, kernel, stride_t, dilation_t, tuple(pads), n_used, groups, padding_mode
    )


def plan_axes(geometry: ConvGeometry) -> tuple[list[list[AxisPlan]], int, list[list[int]]]:
    """Per axis, the candidate torus plans (:func:`axis_plans`); the product over axes of the
    im2col copy counts; per axis, the taps that never read an input entry."""
    candidates: list[list[AxisPlan]] = []
    window_copies = 1
    dead_taps: list[list[int]] = []
    g = geometry
    for axis in range(len(g.spatial)):
        plans, copies, dead = axis_plans(
            n=g.spatial[axis],
            pad_l=g.pads[axis][0],
            pad_r=g.pads[axis][1],
            k=g.kernel[axis],
            d=g.dilation[axis],
            s=g.stride[axis],
            n_out=g.n_used[axis],
            mode=g.padding_mode,
        )
        candidates.append(plans)
        window_copies *= copies
        dead_taps.append(dead)
    return candidates, window_copies, dead_taps


# ----------------------------------------------------------------------------- validation


def _kernel_of(weight: torch.Tensor, spatial: tuple[int, ...]) -> tuple[int, ...]:
    dims = len(spatial)
    if weight.dim() != dims + 2:
        raise ValueError(
            f"weight has {weight.dim()} dimensions but input_spatial {spatial} has {dims} "
            f"spatial dims: expected a Conv{dims}d weight with {dims + 2} dimensions "
            "(out_channels, in_channels/groups, *kernel)."
        )
    if weight.is_complex() or not weight.is_floating_point():
        raise ValueError(f"weight must be a real floating-point tensor, got {weight.dtype}.")
    kernel = tuple(int(k) for k in weight.shape[2:])
    if min(kernel) < 1:
        raise ValueError(f"kernel size must be positive in every dimension, got {kernel}.")
    return kernel


def _adjoint_input_sizes(
    spatial: tuple[int, ...],
    pads: list[tuple[int, int]],
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
    output_padding: tuple[int, ...],
) -> tuple[int, ...]:
    """``n_T = (n - 1) s - 2 p + d (k - 1) + output_padding + 1`` per axis."""
    sizes = []
    for n, (pl, _), k, d, s, op in zip(
        spatial, pads, kernel, dilation, stride, output_padding, strict=True
    ):
        if op >= max(s, d):
            raise ValueError(
                f"output_padding {output_padding} must be smaller than stride or dilation "
                f"(stride={stride}, dilation={dilation}) in every dimension."
            )
        size = (n - 1) * s - 2 * pl + d * (k - 1) + op + 1
        if size < 1:
            raise ValueError(
                f"transposed conv output size would be {size} (< 1) for input {spatial}: "
                "reduce padding or enlarge the input."
            )
        sizes.append(size)
    return tuple(sizes)


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got a bool.")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}.") from None


def _positive_sizes(input_spatial: Sequence[int]) -> tuple[int, ...]:
    if isinstance(input_spatial, int | str) or not isinstance(input_spatial, Sequence):
        raise ValueError(
            "input_spatial must be a sequence of 1 to 3 positive ints (the spatial size of one "
            f"input without batch/channel dims), got {input_spatial!r}."
        )
    sizes = tuple(_as_int(v, "input_spatial entries") for v in input_spatial)
    if not 1 <= len(sizes) <= 3 or min(sizes) < 1:
        raise ValueError(
            f"input_spatial must hold 1 to 3 positive sizes, got {sizes}; e.g. (32, 32) for a "
            "Conv2d on 32x32 images."
        )
    return sizes


def _int_tuple(value: Sequence[int] | int, dims: int, name: str, minimum: int) -> tuple[int, ...]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        out = tuple(_as_int(v, name) for v in value)
        if len(out) != dims:
            raise ValueError(f"{name} has {len(out)} entries, expected {dims} (or one int).")
    else:
        out = (_as_int(value, name),) * dims
    if min(out) < minimum:
        raise ValueError(f"{name} entries must be >= {minimum}, got {out}.")
    return out


def _resolve_padding(
    padding: Sequence[int] | int | str,
    dims: int,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
    transposed: bool,
) -> list[tuple[int, int]]:
    """Per-axis (left, right) padding, following PyTorch's rules for the string forms."""
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * dims
        if padding != "same":
            raise ValueError(f"padding string must be 'valid' or 'same', got {padding!r}.")
        if transposed:
            raise ValueError("padding='same' is not supported for transposed convolutions.")
        if any(s != 1 for s in stride):
            raise ValueError(
                f"padding='same' requires stride 1 (as in PyTorch), got stride={stride}."
            )
        # PyTorch puts the odd extra zero on the right.
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in _int_tuple(padding, dims, "padding", minimum=0)]


# ----------------------------------------------------------------------------- axis plans


def _source(a: int, n: int, mode: str) -> int | None:
    """Input index copied to padded position ``a`` (relative to the input start), or None."""
    if 0 <= a < n:
        return a
    if mode == "zeros":
        return None
    if mode == "circular":
        return a % n
    if mode == "replicate":
        return min(max(a, 0), n - 1)
    return -a if a < 0 else 2 * (n - 1) - a  # reflect (PyTorch requires padding < n)


def _embeds(reads: list[int], labels: list[int | None], size: int) -> bool:
    """Whether placing label ``labels[i]`` at torus position ``reads[i] mod size`` is a
    well-defined injective embedding that keeps every padding zero off occupied positions."""
    position_of: dict[int, int] = {}
    label_at: dict[int, int] = {}
    zero_positions = set()
    for j, label in zip(reads, labels, strict=True):
        pos = j % size
        if label is None:
            zero_positions.add(pos)
        elif position_of.setdefault(label, pos) != pos or label_at.setdefault(pos, label) != label:
            return False
    return zero_positions.isdisjoint(label_at)


def _check_axis(n: int, pad_l: int, pad_r: int, k_eff: int, mode: str) -> None:
    """Raise for the padding/kernel sizes PyTorch rejects on one axis."""
    if mode == "reflect" and max(pad_l, pad_r) >= n:
        raise ValueError(
            f"reflect padding ({pad_l}, {pad_r}) must be smaller than the input size {n} "
            "(PyTorch rejects it); use a smaller padding or 'replicate'."
        )
    if mode == "circular" and max(pad_l, pad_r) > n:
        raise ValueError(
            f"circular padding ({pad_l}, {pad_r}) may not exceed the input size {n} "
            "(PyTorch rejects wrapping more than once)."
        )
    if n + pad_l + pad_r < k_eff:
        raise ValueError(
            f"dilated kernel size {k_eff} exceeds the padded input size {n + pad_l + pad_r} "
            f"(input {n}, padding ({pad_l}, {pad_r})): the convolution has no output. Enlarge "
            "the input or padding."
        )


def _output_multiplicity(s: int, n_out: int, size: int) -> int:
    """Largest repetition of the output positions ``s i mod size`` (the norm² of ``D``)."""
    if s * (n_out - 1) < size:
        return 1
    return max(Counter((s * i) % size for i in range(n_out)).values())


def _smallest_embedding(
    reads: list[int], labels: list[int | None], sigma: int, in_mult: int, s: int, n_out: int
) -> AxisPlan | None:
    """Smallest multiple of sigma giving an embedding; prefers the least multiplicity."""
    n_labels = len({a for a in labels if a is not None})
    extent = reads[-1] + 1  # read window [0, extent): always embeddable without wrap-around
    start = -(-n_labels // sigma) * sigma
    stop = -(-extent // sigma) * sigma
    best: AxisPlan | None = None
    for size in range(start, stop + 1, sigma):
        if not _embeds(reads, labels, size):
            continue
        mult = in_mult * _output_multiplicity(s, n_out, size)
        if best is None or mult < best.mult:
            best = AxisPlan(sigma, size, mult)
        if mult == in_mult:
            break
    return best


def axis_plans(
    n: int, pad_l: int, pad_r: int, k: int, d: int, s: int, n_out: int | None, mode: str
) -> tuple[list[AxisPlan], int, list[int]]:
    """Torus embeddings of one axis, im2col copy count and dead taps.

    Returns the candidate plans (all sound; empty if the axis reads padding zeros only), the
    largest number of (output, live tap) pairs reading one input entry (im2col bound) and the
    taps that never read an input entry (only possible with zero padding).
    """
    k_eff = d * (k - 1) + 1
    _check_axis(n, pad_l, pad_r, k_eff, mode)
    if n_out is None:
        n_out = (n + pad_l + pad_r - k_eff) // s + 1
    live = [
        t
        for t in range(k)
        if any(_source(s * i + d * t - pad_l, n, mode) is not None for i in range(n_out))
    ]
    if not live:
        return [], 0, []
    dead = sorted(set(range(k)) - set(live))
    # Reads of dead taps are irrelevant (their weights are zeroed), so they impose nothing.
    reads = sorted({s * i + d * t for i in range(n_out) for t in live})
    sources = [_source(j - pad_l, n, mode) for j in reads]
    window_copies = Counter(
        _source(s * i + d * t - pad_l, n, mode) for i in range(n_out) for t in live
    )
    window_copies.pop(None, None)
    dup = max(Counter(a for a in sources if a is not None).values())

    direct = _smallest_embedding(reads, sources, s, 1, s, n_out)
    if direct is not None and direct.mult == 1:
        return [direct], max(window_copies.values()), dead
    # Fallbacks: the duplication argument (labels are the read positions themselves, always
    # embeddable without wrap-around) and, for strided convs, the stride-1 torus with a row
    # restriction. Keep the best plan for each torus stride.
    own = [j if a is not None else None for j, a in zip(reads, sources, strict=True)]
    candidates = [direct]
    if dup > 1:
        candidates.append(_smallest_embedding(reads, own, s, dup, s, n_out))
    if s > 1:
        candidates.append(_smallest_embedding(reads, sources, 1, 1, s, n_out))
        if dup > 1:
            candidates.append(_smallest_embedding(reads, own, 1, dup, s, n_out))
    best_per_sigma: dict[int, AxisPlan] = {}
    for plan in candidates:
        if plan is None:
            continue
        cur = best_per_sigma.get(plan.sigma)
        if cur is None or (plan.mult, plan.size) < (cur.mult, cur.size):
            best_per_sigma[plan.sigma] = plan
    return list(best_per_sigma.values()), max(window_copies.values()), dead
