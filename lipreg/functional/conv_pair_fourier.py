r"""Geometry and spectrum of a conv–activation–conv pair on a common torus.

The maths (why the torus bound bounds the zero-padded pair) is in
:mod:`lipreg.functional.conv_pairs`; this module only builds the objects of its sections 1–3:

* :func:`pair_torus` finds, per spatial axis, the smallest *coarse* torus length ``M`` on which
  both zero-padded convolutions are restrictions of circular ones (input torus ``s1 s2 M``,
  hidden torus ``s2 M``), checking every read explicitly, and the polyphase kernels: both
  convolutions become *stride-1* circular convolutions on ``Z_M`` (per axis), the first from
  ``c0 · (s1 s2)^d`` input phase channels to ``c1 · s2^d`` hidden phase channels, the second from
  those hidden phase channels to ``c2`` outputs.
* :func:`pair_spectrum` evaluates their DFT matrices ``K1(ω)``, ``K2(ω)`` on the half spectrum,
  and :func:`spectrum_error` the entrywise bound on the rounding of those matrices.

Channel layouts: hidden index ``c1 · S2 + r2`` (``S2 = s2^d`` hidden phases, row-major over
axes), input index ``c0 · S12 + ρ`` (``S12 = (s1 s2)^d`` input phases).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import torch
from torch import Tensor

from lipreg.functional.lmi import UNIT_ROUNDOFF, gamma
from lipreg.functional.specs import ConvData

__all__ = [
    "PairTorus",
    "UnsupportedPairError",
    "conv_output_shape",
    "half_spectrum",
    "pair_spectrum",
    "pair_torus",
    "spectrum_error",
]

#: Bound on ``|fl(exp(iθ)) − exp(iθ)|`` for our DFT coefficients: the angle ``2π m / L`` is
#: formed from an exact integer ``m < L`` (``≤ 3u · 2π ≈ 19u`` absolute error) and ``cos``/``sin``
#: are accurate to a few ulps (``≤ 2u`` each); ``√2 (19 + 2) u < 30 u``, doubled for safety.
EXP_ERROR = 64 * UNIT_ROUNDOFF


class UnsupportedPairError(ValueError):
    """The pair's geometry is outside what the Fourier-block certificate handles."""


@dataclass(frozen=True)
class PairTorus:
    """Both convolutions as stride-1 circular convolutions on the coarse torus ``Z_M``.

    ``coarse``: ``M`` per axis; ``w1``: ``(Q1, n_h, n_in)`` polyphase taps of the first conv at
    the integer offsets ``q1`` (``(Q1, d)``, reduced mod ``M``); ``w2``: ``(Q2, c2, n_h)`` at
    ``q2``; ``taps1``/``taps2``: kernel taps per conv (for the rounding bound); ``fake_hidden``:
    whether the hidden torus has positions outside the real hidden map (slope 0 there).
    """

    coarse: tuple[int, ...]
    w1: Tensor
    q1: Tensor
    w2: Tensor
    q2: Tensor
    taps1: int
    taps2: int
    fake_hidden: bool

    @property
    def n_in(self) -> int:
        return self.w1.shape[2]

    @property
    def n_hidden(self) -> int:
        return self.w1.shape[1]

    @property
    def frequencies(self) -> int:
        """Number of half-spectrum frequencies (real kernels: ``K(−ω) = conj K(ω)``)."""
        *head, last = self.coarse
        return math.prod(head) * (last // 2 + 1)


def conv_output_shape(conv: ConvData) -> tuple[int, ...]:
    """``(c_out, *spatial)`` of a zero-padded convolution on ``conv.in_shape``."""
    spatial = []
    for n, k, s, p, d in zip(
        conv.in_shape[1:],
        conv.weight.shape[2:],
        conv.stride,
        conv.padding,
        conv.dilation,
        strict=True,
    ):
        size = (n + 2 * p - d * (int(k) - 1) - 1) // s + 1
        if size < 1:
            raise UnsupportedPairError(f"convolution {tuple(conv.weight.shape)} has no output")
        spatial.append(size)
    return (int(conv.weight.shape[0]), *spatial)


def _dense_weight(conv: ConvData) -> Tensor:
    """The ``(c_out, c_in, *kernel)`` float64 weight of a grouped conv (zeros across groups)."""
    w = conv.weight.detach().to(device="cpu", dtype=torch.float64)
    g = conv.groups
    if g == 1:
        return w
    c_out, c_in_g = w.shape[:2]
    dense = w.new_zeros(c_out, c_in_g * g, *w.shape[2:])
    per = c_out // g
    for k in range(g):
        dense[k * per : (k + 1) * per, k * c_in_g : (k + 1) * c_in_g] = w[k * per : (k + 1) * per]
    return dense


def _axis_valid(m: int, ax: dict[str, int]) -> bool:
    """Whether coarse length ``m`` embeds both convs on one axis (module docstring of
    :mod:`lipreg.functional.conv_pairs`, section 1): every padding read lands off the real
    entries, and real hidden / output positions stay distinct."""
    s1, s2 = ax["s1"], ax["s2"]
    n_in_torus, n_hid_torus = s1 * s2 * m, s2 * m
    n0, n1, n2 = ax["n0"], ax["n1"], ax["n2"]
    if n_in_torus < n0 or n_hid_torus < n1 or m < n2:
        return False
    for i in range(n1):
        for t in range(ax["k1"]):
            a = s1 * i + ax["d1"] * t - ax["p1"]  # input index read (x[a] sits at a + p1)
            if not 0 <= a < n0 and 0 <= a % n_in_torus < n0:
                return False
    for o in range(n2):
        for t in range(ax["k2"]):
            h = s2 * o + ax["d2"] * t - ax["p2"]  # hidden index read (h[i] sits at i)
            if not 0 <= h < n1 and 0 <= h % n_hid_torus < n1:
                return False
    return True


def _smallest_coarse(ax: dict[str, int]) -> int:
    """Smallest valid ``M``; the no-wrap size (tori at least the padded lengths) always works."""
    s1, s2 = ax["s1"], ax["s2"]
    low = max(1, -(-ax["n0"] // (s1 * s2)), -(-ax["n1"] // s2), ax["n2"])
    high = max(low, -(-(ax["n0"] + 2 * ax["p1"]) // (s1 * s2)), -(-(ax["n1"] + 2 * ax["p2"]) // s2))
    for m in range(low, high + 1):
        if _axis_valid(m, ax):
            return m
    raise AssertionError(f"no torus embeds the pair on axis {ax}: a bug, please report")


def pair_torus(first: ConvData, second: ConvData) -> PairTorus:
    """The common coarse torus and the polyphase kernels of ``second ∘ φ ∘ first``.

    Raises:
        UnsupportedPairError: mismatched shapes or channels (with what was expected).
    """
    dims = len(first.in_shape) - 1
    if len(second.in_shape) - 1 != dims or not 1 <= dims <= 3:
        raise UnsupportedPairError(
            f"both convolutions must have the same 1-3 spatial dims, got in_shapes "
            f"{tuple(first.in_shape)} and {tuple(second.in_shape)}"
        )
    hidden = conv_output_shape(first)
    if tuple(second.in_shape) != hidden:
        raise UnsupportedPairError(
            f"second.in_shape {tuple(second.in_shape)} must equal the first convolution's output "
            f"shape {hidden} (channels, *spatial); the pair must be conv -> activation -> conv"
        )
    out = conv_output_shape(second)
    axes = []
    for a in range(dims):
        axes.append(
            dict(
                n0=first.in_shape[1 + a], n1=hidden[1 + a], n2=out[1 + a],
                k1=int(first.weight.shape[2 + a]), d1=first.dilation[a], s1=first.stride[a],
                p1=first.padding[a], k2=int(second.weight.shape[2 + a]),
                d2=second.dilation[a], s2=second.stride[a], p2=second.padding[a],
            )
        )  # fmt: skip
    coarse = tuple(_smallest_coarse(ax) for ax in axes)
    w1, q1 = _first_polyphase(_dense_weight(first), axes, coarse)
    w2, q2 = _second_polyphase(_dense_weight(second), axes, coarse)
    fake = math.prod(ax["s2"] * m for ax, m in zip(axes, coarse, strict=True)) > math.prod(
        hidden[1:]
    )
    taps1 = math.prod(first.weight.shape[2:])
    taps2 = math.prod(second.weight.shape[2:])
    return PairTorus(coarse, w1, q1, w2, q2, taps1, taps2, fake)


def _scatter(
    entries: list[tuple[tuple[int, ...], int, int, tuple[int, ...]]],
    weight: Tensor,
    shape: tuple[int, int, int, int],
) -> tuple[Tensor, Tensor]:
    """Accumulate ``weight[:, :, *tap]`` into ``out[q, :, row_phase, :, col_phase]``.

    ``entries``: ``(q vector mod M, row phase, column phase, tap)``. Returns the taps as
    ``(Q, rows · row_phases, cols · col_phases)`` (channel-major) and the ``(Q, d)`` offsets.
    """
    qs = sorted({e[0] for e in entries})
    index = {q: i for i, q in enumerate(qs)}
    rows, row_ph, cols, col_ph = shape
    out = weight.new_zeros(len(qs), rows, row_ph, cols, col_ph)
    for q, rp, cp, tap in entries:
        out[index[q], :, rp, :, cp] += weight[(slice(None), slice(None), *tap)]
    flat = out.reshape(len(qs), rows * row_ph, cols * col_ph)
    return flat, torch.tensor(qs, dtype=torch.long).reshape(len(qs), -1)


def _phases(sizes: list[int]) -> list[tuple[int, ...]]:
    return list(product(*(range(s) for s in sizes)))


def _flat(index: tuple[int, ...], sizes: list[int]) -> int:
    out = 0
    for i, s in zip(index, sizes, strict=True):
        out = out * s + i
    return out


def _first_polyphase(
    w: Tensor, axes: list[dict[str, int]], coarse: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """First conv: hidden phase ``r2``, tap ``t``: ``s1 r2 + d1 t = s1 s2 q + ρ`` per axis."""
    s2s = [ax["s2"] for ax in axes]
    s12 = [ax["s1"] * ax["s2"] for ax in axes]
    entries = []
    for r2 in _phases(s2s):
        for tap in _phases([int(k) for k in w.shape[2:]]):
            q, rho = [], []
            for ax, r, t, m in zip(axes, r2, tap, coarse, strict=True):
                pos = ax["s1"] * r + ax["d1"] * t
                q.append((pos // (ax["s1"] * ax["s2"])) % m)
                rho.append(pos % (ax["s1"] * ax["s2"]))
            entries.append((tuple(q), _flat(r2, s2s), _flat(tuple(rho), s12), tap))
    shape = (w.shape[0], math.prod(s2s), w.shape[1], math.prod(s12))
    return _scatter(entries, w, shape)


def _second_polyphase(
    w: Tensor, axes: list[dict[str, int]], coarse: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """Second conv: tap ``t`` reads hidden ``s2 o + d2 t − p2 = s2 (o + q) + r`` per axis."""
    s2s = [ax["s2"] for ax in axes]
    entries = []
    for tap in _phases([int(k) for k in w.shape[2:]]):
        q, r = [], []
        for ax, t, m in zip(axes, tap, coarse, strict=True):
            pos = ax["d2"] * t - ax["p2"]
            q.append((pos // ax["s2"]) % m)
            r.append(pos % ax["s2"])
        entries.append((tuple(q), 0, _flat(tuple(r), s2s), tap))
    shape = (w.shape[0], 1, w.shape[1], math.prod(s2s))
    return _scatter(entries, w, shape)


def half_spectrum(coarse: tuple[int, ...]) -> Tensor:
    """``(F, d)`` integer frequencies: all of ``Z_M`` on leading axes, ``[0, M//2]`` on the last."""
    ranges = [range(m) for m in coarse[:-1]] + [range(coarse[-1] // 2 + 1)]
    return torch.tensor(list(product(*ranges)), dtype=torch.long).reshape(-1, len(coarse))


def _phase_factors(freqs: Tensor, offsets: Tensor, coarse: tuple[int, ...]) -> Tensor:
    """``exp(2πi Σ_a ω_a q_a / M_a)`` as ``(F, Q)`` complex128, angles reduced exactly in
    integers (common denominator ``L = lcm(M)``), so each factor is within ``EXP_ERROR``."""
    lcm = math.lcm(*coarse)
    if lcm >= 2**52:
        raise UnsupportedPairError(f"torus {coarse} too large for exact angle reduction")
    numer = torch.zeros(freqs.shape[0], offsets.shape[0], dtype=torch.long)
    for a, m in enumerate(coarse):
        numer += ((freqs[:, None, a] * offsets[None, :, a]) % m) * (lcm // m)
    angle = (numer % lcm).to(torch.float64) * (2 * math.pi / lcm)
    return torch.complex(torch.cos(angle), torch.sin(angle))


def pair_spectrum(torus: PairTorus, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """``K1(ω)`` ``(F, n_h, n_in)`` and ``K2(ω)`` ``(F, c2, n_h)`` (complex128) with
    ``K(ω) = Σ_q W_q exp(2πi ω·q / M)``: a circular conv ``z[i] = Σ_q W_q x[i + q]`` maps the
    Fourier mode ``e_ω ⊗ v`` to ``e_ω ⊗ K(ω) v``, with the same convention for both convs."""
    out = []
    for w, q in ((torus.w1, torus.q1), (torus.w2, torus.q2)):
        phase = _phase_factors(freqs, q, torus.coarse)
        flat = w.reshape(w.shape[0], -1)
        # Two real matmuls: the rounding bound of :func:`spectrum_error` is for this order.
        k = torch.complex(phase.real @ flat, phase.imag @ flat)
        out.append(k.reshape(freqs.shape[0], *w.shape[1:]))
    return out[0], out[1]


def spectrum_error(w: Tensor, taps: int) -> tuple[Tensor, float]:
    """Majorant ``S = Σ_q |W_q|`` (``≥ |K(ω)|`` entrywise for every ω) and ``c`` such that
    ``|fl K(ω) − K(ω)| ≤ c S`` entrywise (modulus).

    Real and imaginary parts are ``fl(Σ_q cos̃_q W_q)`` with ``|cos̃ − cos| ≤ EXP_ERROR``: error
    ``≤ (EXP_ERROR + γ_Q (1 + EXP_ERROR)) S``; the polyphase taps are sums of at most ``taps``
    kernel taps (folding), adding ``γ_taps S``; the modulus adds ``√2``.
    """
    majorant = w.abs().sum(0) * (1 + 1e-9)  # covers the rounding of this sum (≤ γ_Q)
    c = math.sqrt(2) * (EXP_ERROR + 1.01 * gamma(w.shape[0] + taps + 1))
    return majorant, c
