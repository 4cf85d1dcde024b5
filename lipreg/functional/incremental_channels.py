"""A per-channel bound on ``‖R A_s‖₂`` for the ratio bound of incremental certificates
(:mod:`lipreg.functional.incremental_scaled`), when the batch-norm scales after a map move by
very different factors across channels (``docs/design/issue10/incremental.md`` §9).

Let ``A_s`` be the anchor's core map with output channels ``o`` (row blocks ``A_{s,o}``: every
output position of channel ``o``), ``R = diag(r_o)`` (each ``r_o`` repeated over the channel's
positions) with ``r_o ≥ |d_{t,o}/d_{s,o}|``. Since ``(R A_s)ᵀ(R A_s) = Σ_o r_o² A_{s,o}ᵀA_{s,o}``
and ``r_o² ≤ t² + (r_o² − t²)₊`` for any ``t ≥ 0``,

.. math::
    ‖R A_s‖_2^2 \\le t^2 ‖A_s‖_2^2 + \\sum_o (r_o^2 − t^2)_+ ‖A_{s,o}‖_2^2
    \\qquad \\text{for every } t ≥ 0                                           (2r)

(``λ_max`` of a sum of positive semi-definite terms is at most the sum of their ``λ_max``).
``t = max r_o`` gives the ratio bound's ``max_o r_o ‖A_s‖``; a smaller ``t`` wins when the
channels that grew most carry little of the map. The channel norms are bounded by im2col: the
row block of one output channel is ``w_o ∘ U`` with ``w_o`` the channel's (scaled) kernel as a
row and ``U`` copying each input entry into at most ``c`` patches, so
``‖A_{s,o}‖ ≤ √c ‖w_o‖₂`` (live taps and ``c`` from
:func:`~lipreg.functional.incremental_bounds.live_taps` when the geometry is known; a dense
row: ``c = 1``, exact).

**Rounding.** ``w_o = d_out,o K[o] d_in`` is formed in float64 (relative ``ρ``, the caller's
radius of the scales plus ``4u``, so ``‖w_o‖`` exact ``≤ (1 + ρ)`` computed); the sums of
squares carry ``γ_{n+2}`` and ``η`` per term (underflow); ``t²`` is any float (the inequality
holds for every ``t``, so the computed value IS the ``t`` used); every other operation is
covered by a factor ``1 + 8u`` per term and ``1 + γ_{C+8}`` on each sum, rounded up.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lipreg.functional.incremental_bounds import live_taps, window_copies
from lipreg.functional.lmi import ETA, UNIT_ROUNDOFF, gamma, sqrt_up

__all__ = ["channel_norms_squared", "threshold_ratio_bound"]

#: At most this many values of ``t`` are tried (quantiles of the ratios; any ``t`` is valid).
MAX_THRESHOLDS = 256


def channel_norms_squared(weighted: Tensor, conv: tuple | None, rho: float) -> Tensor:
    """Upper bounds on ``‖A_{s,o}‖₂²`` per output channel ``o`` for the computed float64
    scaled kernel ``weighted`` (conv ``(c_out, c_in/groups, *k)`` or dense ``(out, in)``),
    within relative ``rho`` of the exact one; ``conv`` as in
    :class:`~lipreg.functional.incremental_scaled.ScaledCore` (module docstring)."""
    copies = 1
    w = weighted
    if conv is not None:
        stride, dilation = conv[0], conv[1]
        copies = window_copies(w.shape[2:], stride, dilation)
        if len(conv) == 5:
            live, copies = live_taps(w.shape[2:], stride, conv[3], dilation, conv[4])
            if copies == 0:
                return torch.zeros(w.shape[0], dtype=torch.float64)
            for axis, taps in enumerate(live):
                w = w.index_select(2 + axis, torch.tensor(taps, dtype=torch.long))
    rows = w.reshape(w.shape[0], -1)
    n = rows.shape[1]
    squares = (rows * rows).sum(1) + n * ETA
    factor = (1.0 + gamma(n + 2)) * (1.0 + rho) ** 2 * copies * (1.0 + 8.0 * UNIT_ROUNDOFF)
    return squares * factor


def threshold_ratio_bound(sigma: float, ratios: Tensor, norms2: Tensor, scale: float) -> float:
    """``min_t sqrt(t²σ² + scale² Σ_o (r_o² − t²)₊ n_o²)``, a certified upper bound on
    ``c‖R A_s‖₂`` (bound (2r), module docstring) for ``sigma ≥ c‖A_s‖``, ``scale ≥ c``,
    per-channel ratios ``r_o`` (upper bounds, 0 for channels without a ratio) and
    ``norms2 ≥ ‖A_{s,o}‖²``; ``t`` runs over 0 and up to :data:`MAX_THRESHOLDS` quantiles of
    the ratios. ``math.inf`` when an input is not finite."""
    r = ratios.to(torch.float64)
    if not (math.isfinite(sigma) and bool(torch.isfinite(r).all())):
        return math.inf
    if not bool(torch.isfinite(norms2).all()):
        return math.inf
    u = UNIT_ROUNDOFF
    sorted_r = torch.sort(r).values
    picks = torch.linspace(0, r.numel() - 1, min(r.numel(), MAX_THRESHOLDS)).round().long()
    t2 = torch.cat([torch.zeros(1, dtype=torch.float64), sorted_r[picks] ** 2])
    r2 = r * r * (1.0 + 4.0 * u)
    excess = (r2[None, :] - t2[:, None]).clamp(min=0.0) * (1.0 + 8.0 * u)
    sums = (excess * norms2[None, :]).sum(1) * (1.0 + gamma(r.numel() + 8))
    c2 = scale * scale * (1.0 + 8.0 * u)
    totals = (t2 * (sigma * sigma * (1.0 + 8.0 * u)) + c2 * sums) * (1.0 + 8.0 * u)
    return sqrt_up(math.nextafter(float(totals.min()), math.inf))
