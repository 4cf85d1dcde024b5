r"""Certified bounds on conv → activation → conv pairs by Fourier blocks (issue 9, item 4).

:func:`conv_pair_certificate` returns a float ``L`` with

    ``‖second(φ(first(x) + c)) − second(φ(first(x') + c))‖₂ ≤ L ‖x − x'‖₂``

for every elementwise ``φ`` whose difference quotients lie in ``[a, b]`` (ReLU: ``[0, 1]``) and
every bias ``c``; both convolutions are zero-padded, forward, bias-free
(:class:`~lipreg.functional.specs.ConvData`). Since ``φ(z) − φ(z') = D (z − z')`` with ``D``
diagonal, ``D_ii ∈ [a, b]``, it suffices to bound ``sup_D ‖K2 D K1‖`` (``K1``, ``K2`` the two
convolutions as matrices); ``L`` bounds that supremum, which can exceed the Lipschitz constant.

1. **Torus embedding of the pair.** Per spatial axis pick a coarse length ``M`` and tori
   ``Z_{s1 s2 M}`` (input), ``Z_{s2 M}`` (hidden). Place input entry ``x[a]`` at ``a + p1``
   and hidden entry ``h[i]`` at ``i``. The circular convolutions
   ``C1 z[i] = Σ_t w1[t] x_T[s1 i + d1 t]`` and ``C2 u[o] = Σ_t w2[t] h_T[s2 o + d2 t − p2]``
   reproduce the real ones at the real positions provided (checked read by read in
   :func:`~lipreg.functional.conv_pair_fourier.pair_torus`): every read of a padding zero lands
   on a torus position holding no real entry, the real hidden positions ``0..n1−1`` are distinct
   (``s2 M ≥ n1``), and the real outputs ``0..n2−1`` are distinct (``M ≥ n2``). Then, with ``E0``
   the (isometric) embedding of the input, ``R2`` the restriction to the real outputs (norm
   ``≤ 1``) and ``D̃`` the diagonal on the hidden torus equal to ``D`` at real positions and
   **0 at the other ("fake") positions** (they hold zeros: padding for ``C2``),

       ``K2 D K1 = R2 C2 D̃ C1 E0``,   so   ``‖K2 D K1‖ ≤ ‖C2 D̃ C1‖``.

   ``D̃`` has entries in ``[a', b'] = [min(a, 0), max(b, 0)]``; that is the slope interval used
   on the torus when fake positions exist (no loss for ReLU), else ``[a, b]`` itself. A torus
   always exists (tori at least as long as the padded lengths: no wrap at all); we take the
   smallest valid ``M`` per axis (coarser spectra usually give smaller maxima).
2. **Strides (polyphase).** Splitting each torus into phases (a permutation of coordinates, so
   orthogonal, and diagonal matrices stay diagonal) makes ``C1`` a *stride-1* circular
   convolution on ``Z_M`` from ``c0 (s1 s2)^d`` input phase channels to ``c1 s2^d`` hidden phase
   channels (``s1 r2 + d1 t = s1 s2 q + ρ``) and ``C2`` a stride-1 one from the hidden phase
   channels to ``c2`` (``d2 t − p2 = s2 q + r``).
3. **The LMI and its Fourier blocks.** For a diagonal ``T ⪰ 0`` on the hidden phase channels,
   the same at every position of ``Z_M`` (so a channel-wise multiplier, allowed to differ per
   phase), the one-hidden-layer LipSDP LMI (docs/design/issue9/lipsdp_first_order.md §4)

       ``P = [[ρI + 2a'b' C1ᴴTC1, −(a'+b') C1ᴴT], [−(a'+b') TC1, 2T − C2ᴴC2]] ⪰ 0``

   implies ``‖C2 D̃ C1‖ ≤ √ρ`` for every diagonal ``D̃`` with entries in ``[a', b']`` (put ``x`` and
   ``v = D̃ C1 x`` into the form: the neuron terms ``t_i (d_i − a')(b' − d_i)(C1 x)_i² ≥ 0``).
   ``T`` commutes with translations, so ``P`` is block-circulant and the unitary DFT maps it to
   ``⊕_ω P(ω)`` with ``P(ω)`` the same matrix built from the per-frequency symbols
   ``K(ω) = Σ_q W_q e^{2πi ω·q/M}`` (``(c1 s2^d) × (c0 (s1 s2)^d)`` and ``c2 × (c1 s2^d)``); hence
   ``P ⪰ 0 ⇔ P(ω) ⪰ 0`` for all ``ω``. Real kernels give ``P(−ω) = conj P(ω)``: the half spectrum
   suffices.
4. **Optimisation** (any method; it only chooses ``T``). With ``S(ω) = 2T − K2ᴴK2 ≻ 0`` the least
   ``ρ`` is ``ρ*(ω) = λ_max(K1ᴴ[(a'+b')² T S⁻¹ T − 2a'b' T] K1)``; we minimise a smooth maximum
   (log-sum-exp of ``log ρ*``) over ``ω`` in ``θ = log t`` with Adam and a domain guard, from the
   best uniform ``t = σ max_ω λ_max(K2ᴴK2)`` on a grid of ``σ`` (``σ = 1`` is at most ``a'²+b'²``
   times the torus product of norms) or a warm start.
5. **Certificate.** ``t`` is snapped to float64 (exact data). ``ρ_c = ρ̂ (1 + δ)`` with ``ρ̂`` the
   float64 ``max_ω ρ*(ω)``; every half-spectrum block ``P̂(ω)`` (complex128, exactly Hermitian)
   must pass :func:`~lipreg.functional.lmi.certify_hermitian_psd` with an entrywise radius
   covering (a) the DFT symbols (``|fl K − K| ≤ c S``, ``S = Σ_q |W_q|``, see
   :func:`~lipreg.functional.conv_pair_fourier.spectrum_error`), (b) the products ``K1ᴴTK1``,
   ``K2ᴴK2`` (``|fl(AᴴB) − AᴴB| ≤ √2 γ_{n+1}|A|ᵀ|B|`` via real matmuls), the symmetrisation and
   the scalings. ``δ`` grows ×8 from ``1e-10`` until all blocks pass at the same ``ρ_c``;
   ``L = sqrt_up(ρ_c)``. The result is the smaller of that and the product of the two
   convolutions' certified norms times ``max(|a|, |b|)``
   (:func:`~lipreg.functional.conv_bounds.conv_operator_norm_bound`); ``method`` says which.

**Where it is tight.** The torus lets the fake hidden positions (where the real network has
padding zeros) carry activations, so on tiny maps the bound is loose: 1.2–1.7× the exact
``max_D ‖K2 D K1‖`` on 4×4–6×6 maps, where the dense per-position LMI is within 2 %; for such
small layers the dense LipSDP block is the better certificate. On real layers (measured, ReLU,
random weights): MNIST CNN-4/5 pairs 0.53–0.76× the product of the certified conv norms and
1.13–1.29× a lower bound on ``max_D``; AlexNet conv3→conv4 at 13×13: 0.68× the product,
1.15× the lower bound.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lipreg.functional.analysis import Analysis
from lipreg.functional.chains import AffineChain
from lipreg.functional.conv_bounds import conv_operator_norm_bound
from lipreg.functional.conv_chain import merged_conv
from lipreg.functional.conv_pair_fourier import (
    PairTorus,
    UnsupportedPairError,
    half_spectrum,
    pair_spectrum,
    pair_torus,
    spectrum_error,
)
from lipreg.functional.lmi import UNIT_ROUNDOFF, certify_hermitian_psd, gamma, sqrt_up
from lipreg.functional.rounding import merged_kernel_error, perturbed_bound
from lipreg.functional.specs import ConvData

__all__ = [
    "ConvPairCertificate",
    "chain_pair_certificate",
    "conv_pair_certificate",
]

_SIGMA_GRID = (0.52, 0.6, 0.75, 1.0, 1.5)
_PATIENCE, _MIN_GAIN = 15, 1e-5  # stop when ρ̂ improved by < 1e-5 (relative) in 15 steps
_TEMPERATURE = 0.01  # log-sum-exp temperature on log ρ*(ω): overshoots max by ≤ 0.01 log F
_DELTA_START, _DELTA_GROWTH, _DELTA_TRIES = 1e-10, 8.0, 14


@dataclass(frozen=True)
class ConvPairCertificate:
    """A certified bound on ``sup_D ‖K2 D K1‖`` (hence on the pair's Lipschitz constant).

    Attributes:
        value: the certified bound (``min(lmi_value, product_bound)``).
        multipliers: ``log t`` per hidden phase channel (float64), to warm-start the next call.
        estimate: ``√ρ̂`` before the certificate's inflation (not certified); ``value`` when
            the product of norms is smaller.
        seconds: wall time of the call.
        method: ``"fourier-lmi"`` or ``"norm-product"`` (whichever gave ``value``).
        lmi_value: the Fourier-block LMI certificate (``inf`` if it could not be certified).
        product_bound: ``max(|a|,|b|) · ‖first‖ · ‖second‖`` (certified conv norms).
        torus: the coarse torus ``M`` per axis; frequencies: blocks certified.
    """

    value: float
    multipliers: Tensor
    estimate: float
    seconds: float
    method: str
    lmi_value: float
    product_bound: float
    torus: tuple[int, ...]
    frequencies: int


@dataclass
class _Problem:
    """Per-frequency data of the optimisation (float64/complex128, no autograd)."""

    k1: Tensor  # (F, n_h, n_in)
    h2: Tensor  # (F, n_h, n_h) = K2ᴴK2 (Hermitian)
    h1: Tensor | None  # (F, n_h, n_h) = K1 K1ᴴ when the hidden form is used
    alpha: float  # a' + b'
    beta: float  # 2 a' b'


def _hermitian(m: Tensor) -> Tensor:
    """``(m + mᴴ)/2``: exactly Hermitian in floating point (sums commute, ``fl(−x) = −fl(x)``)."""
    return (m + m.mH) * 0.5


def _herm_product(a: Tensor, b: Tensor) -> Tensor:
    """``aᴴ b`` by four real matmuls (the order :func:`_kappa`'s bound is written for)."""
    ar, ai, br, bi = a.real, a.imag, b.real, b.imag
    at_r, at_i = ar.mT, ai.mT
    return torch.complex(at_r @ br + at_i @ bi, at_r @ bi - at_i @ br)


def _top_eigpair(m: Tensor) -> tuple[Tensor, Tensor]:
    """Largest eigenvalue ``(F,)`` and a unit top eigenvector ``(F, n, 1)`` of Hermitian ``m``:
    ``eigvalsh``, then three steps of inverse iteration with the shift ``μ = λ + 1e-4 |λ|``
    (about 4x cheaper than ``eigh``; near-ties give a vector in the top eigenspaces, a fine
    ascent direction). Falls back to ``eigh`` if ``μI − m`` is not numerically positive."""
    lam = torch.linalg.eigvalsh(m)[..., -1]
    mu = lam + 1e-4 * lam.abs() + 1e-30
    eye = torch.eye(m.shape[-1], dtype=m.dtype)
    chol, info = torch.linalg.cholesky_ex(mu[:, None, None].to(m.dtype) * eye - m)
    if bool((info != 0).any()):
        values, vectors = torch.linalg.eigh(m)
        return values[..., -1], vectors[..., -1:]
    x = torch.ones(*m.shape[:-1], 1, dtype=m.dtype)
    x[..., ::2, :] = -0.5  # any fixed start with components along every eigenvector
    for _ in range(3):
        x = torch.cholesky_solve(x, chol)
        x = x / torch.linalg.vector_norm(x, dim=-2, keepdim=True)
    return lam, x


def _rho_star(t: Tensor, prob: _Problem, grad: bool = False) -> tuple[Tensor, Tensor | None] | None:
    """``ρ*(ω)`` for every frequency and, with ``grad``, ``∂ρ*(ω)/∂t`` ``(F, n_h)``; ``None``
    outside the domain (some ``S(ω) = 2T − K2ᴴK2`` not positive definite).

    Gradient (closed form, no autograd): with ``v`` the top unit eigenvector of
    ``M = K1ᴴ(α² T S⁻¹ T − β T)K1``, ``w = K1 v`` and ``g = S⁻¹ T w``, differentiating
    ``T S⁻¹ T`` (``∂S/∂t_i = 2 e_i e_iᵀ``) gives
    ``∂λ/∂t_i = α² (2 Re(w̄_i g_i) − 2 |g_i|²) − β |w_i|²`` (exact where ``λ`` is simple).
    """
    tc = t.to(prob.k1.dtype)
    s = torch.diag_embed(2 * tc) - prob.h2
    chol, info = torch.linalg.cholesky_ex(s)
    if bool((info != 0).any()):
        return None
    if prob.h1 is None:  # input-size form: α² YᴴY − β K1ᴴTK1, Y = L⁻¹ T K1
        y = torch.linalg.solve_triangular(chol, tc[:, None] * prob.k1, upper=False)
        m = prob.alpha**2 * (y.mH @ y)
        if prob.beta != 0.0:
            m = m - prob.beta * (prob.k1.mH @ (tc[:, None] * prob.k1))
        lam, vec = _top_eigpair(_hermitian(m))
        w = prob.k1 @ vec
    else:  # hidden-size form (β ≤ 0): G = ZᴴZ, Z = [α L⁻¹T; √−β T^½], λ(K1ᴴGK1) = λ(Z H1 Zᴴ)
        z = prob.alpha * torch.linalg.solve_triangular(chol, torch.diag_embed(tc), upper=False)
        if prob.beta != 0.0:
            root = torch.diag_embed(torch.sqrt(-prob.beta * tc)).expand_as(z)
            z = torch.cat([z, root], dim=-2)
        lam, vec = _top_eigpair(_hermitian(z @ prob.h1 @ z.mH))
        # top eigenvector of M is K1ᴴZᴴu / √λ, so w = K1 v = H1 Zᴴ u / √λ
        w = prob.h1 @ (z.mH @ vec) / lam[:, None, None].clamp_min(1e-300).sqrt()
    rho = lam.real.to(torch.float64).clamp_min(1e-300)
    if not grad:
        return rho, None
    g = torch.cholesky_solve(tc[:, None] * w, chol)
    w, g = w[..., 0], g[..., 0]
    d = prob.alpha**2 * (2 * (w.conj() * g).real - 2 * g.abs().square())
    if prob.beta != 0.0:
        d = d - prob.beta * w.abs().square()
    return rho, d.to(torch.float64)


def _smooth_max_log(rho: Tensor, d_rho: Tensor, t: Tensor) -> Tensor:
    """Gradient in ``θ = log t`` of ``τ logsumexp(log ρ(ω) / τ)`` (a smooth ``max log ρ``)."""
    weights = torch.softmax(torch.log(rho) / _TEMPERATURE, dim=0)
    return ((weights / rho)[:, None] * d_rho).sum(0) * t


def _initial_theta(prob: _Problem, warm: Tensor | None) -> tuple[Tensor, float]:
    """Best uniform ``t = σ λ_max`` on :data:`_SIGMA_GRID` (and ``warm`` if given): ``(θ, ρ̂)``."""
    top = float(torch.linalg.eigvalsh(prob.h2)[..., -1].max())
    n_h = prob.h2.shape[-1]
    candidates = [
        torch.full((n_h,), math.log(max(s * top, 1e-300)), dtype=torch.float64) for s in _SIGMA_GRID
    ]
    if warm is not None:
        if tuple(warm.shape) != (n_h,):
            raise ValueError(
                f"warm must hold log t for the {n_h} hidden phase channels (as returned in "
                f"ConvPairCertificate.multipliers), got shape {tuple(warm.shape)}"
            )
        candidates.insert(0, warm.detach().to(dtype=torch.float64, device="cpu"))
    best, best_rho = candidates[-1], math.inf
    for theta in candidates:
        out = _rho_star(torch.exp(theta), prob)
        if out is not None and float(out[0].max()) < best_rho:
            best, best_rho = theta, float(out[0].max())
    return best.clone(), best_rho


def _optimise(prob: _Problem, theta: Tensor, rho0: float, steps: int, lr: float) -> Tensor:
    """Adam (written out: β₁ = 0.9, β₂ = 0.999) on ``θ = log t`` minimising the smooth max of
    ``log ρ*(ω)``; on leaving the domain go back to the last feasible ``θ`` and halve the step.
    Stops early when the true maximum improved by less than ``_MIN_GAIN`` (relative) over
    ``_PATIENCE`` steps. Returns the best ``θ`` seen (by the true maximum)."""
    best, best_rho = theta.clone(), rho0
    m1, m2 = torch.zeros_like(theta), torch.zeros_like(theta)
    last_ok = theta.clone()
    stall = 0
    for k in range(1, steps + 1):
        t = torch.exp(theta)
        out = _rho_star(t, prob, grad=True)
        if out is None:
            theta, lr = last_ok.clone(), lr * 0.5
            continue
        rho, d_rho = out
        last_ok = theta.clone()
        if float(rho.max()) < best_rho * (1 - _MIN_GAIN):
            stall = 0
        stall += 1
        if float(rho.max()) < best_rho:
            best, best_rho = theta.clone(), float(rho.max())
        if stall > _PATIENCE:
            break
        g = _smooth_max_log(rho, d_rho, t)  # type: ignore[arg-type]
        m1 = 0.9 * m1 + 0.1 * g
        m2 = 0.999 * m2 + 0.001 * g.square()
        step = (m1 / (1 - 0.9**k)) / ((m2 / (1 - 0.999**k)).sqrt() + 1e-12)
        theta = theta - lr * step
    return best


def _problem(torus: PairTorus, alpha: float, beta: float, dtype: torch.dtype) -> _Problem:
    k1, k2 = pair_spectrum(torus, half_spectrum(torus.coarse))
    h2 = _hermitian(k2.mH @ k2)
    hidden_form = torus.n_in > torus.n_hidden and beta <= 0.0
    h1 = _hermitian(k1 @ k1.mH).to(dtype) if hidden_form else None
    return _Problem(k1.to(dtype), h2.to(dtype), h1, alpha, beta)


# ----------------------------------------------------------------------------- certificate


def _kappa(c: float, inner: int) -> float:
    """``|fl(K̂ᴴ fl(t K̂)) − KᴴTK| ≤ κ SᵀTS`` entrywise when ``|K̂ − K| ≤ c S``, ``|K| ≤ S``:
    ``(2c + c²)`` from the symbols, ``(1 + c)² u`` from ``fl(t K̂)``, ``√2 γ_{n+1} (1 + c)²(1+u)``
    from the complex product by real matmuls (each component ``≤ γ_{n+1} |A|ᵀ|B|``)."""
    u = UNIT_ROUNDOFF
    return 1.01 * (2 * c + c * c + (1 + c) ** 2 * (u + math.sqrt(2) * gamma(inner + 1) * (1 + u)))


@dataclass
class _BlockData:
    """What every frequency block shares: float64 multipliers, slopes and fixed radii."""

    t: Tensor
    alpha: float
    beta: float
    beta_zero: bool
    r11: Tensor  # (n_in, n_in) part of the radius of P11 not depending on P̂
    r21: Tensor  # (n_h, n_in)
    r22: Tensor  # (n_h, n_h)


def _block_data(torus: PairTorus, t: Tensor, a: float, b: float) -> _BlockData:
    """Slopes as computed floats and the frequency-independent radius parts (module docstring,
    section 5); every factor carries a 1.01 safety."""
    u = UNIT_ROUNDOFF
    alpha, beta = a + b, 2.0 * a * b
    s1, c1 = spectrum_error(torus.w1, torus.taps1)
    s2, c2 = spectrum_error(torus.w2, torus.taps2)
    beta_abs = abs(beta) * (1 + 4 * u) + 1e-300
    r11 = beta_abs * _kappa(c1, torus.n_hidden) * (s1.mT @ (t[:, None] * s1)) * 1.01
    r21 = abs(alpha) * (1 + 4 * u) * (c1 + 4 * u) * (1 + c1) * (t[:, None] * s1) * 1.01
    r22 = _kappa(c2, torus.w2.shape[1]) * (s2.mT @ s2) * 1.01
    return _BlockData(t, alpha, beta, a == 0.0 or b == 0.0, r11, r21, r22)


def _block(k1: Tensor, k2: Tensor, rho: float, data: _BlockData) -> tuple[Tensor, Tensor]:
    """The float64 block ``P̂(ω)`` (complex128, exactly Hermitian) and its entrywise radius."""
    u = UNIT_ROUNDOFF
    n_in = k1.shape[-1]
    t = data.t
    eye = torch.eye(n_in, dtype=torch.complex128)
    if data.beta_zero:  # 2a'b' = 0 exactly: P11 = ρ I exactly
        p11, r11 = rho * eye, torch.zeros(n_in, n_in, dtype=torch.float64)
    else:
        h = _hermitian(_herm_product(k1, t[:, None] * k1))
        p11 = data.beta * h + rho * eye
        r11 = data.r11 + 4.01 * u * (abs(data.beta) * h.abs() + p11.abs())
    p21 = (-(data.alpha * t))[:, None] * k1
    h2 = _hermitian(_herm_product(k2, k2))
    p22 = torch.diag_embed(2 * t).to(torch.complex128) - h2
    r22 = data.r22 + 1.01 * u * (h2.abs() + p22.abs())
    p = torch.cat([torch.cat([p11, p21.mH], 1), torch.cat([p21, p22], 1)], 0)
    rad = torch.cat([torch.cat([r11, data.r21.mT], 1), torch.cat([data.r21, r22], 1)], 0)
    return p, rad


@dataclass(frozen=True)
class _Certified:
    value: float  # inf when not certified
    estimate: float


def _certify(torus: PairTorus, t: Tensor, a: float, b: float) -> _Certified:
    """Section 5: ``ρ_c = ρ̂(1 + δ)``, ``δ`` ×8 from ``1e-10`` until every half-spectrum block
    passes Rump's test at the same ``ρ_c``; blocks with the largest ``ρ*(ω)`` are tried first."""
    k1, k2 = pair_spectrum(torus, half_spectrum(torus.coarse))
    alpha, beta = a + b, 2.0 * a * b
    prob = _Problem(k1, _hermitian(_herm_product(k2, k2)), None, alpha, beta)
    out = _rho_star(t, prob)
    if out is None:
        return _Certified(math.inf, math.inf)
    rho = out[0]
    rho_hat = float(rho.max())
    data = _block_data(torus, t, a, b)
    order = torch.argsort(rho, descending=True).tolist()
    delta = _DELTA_START
    for _ in range(_DELTA_TRIES):
        rho_c = rho_hat * (1.0 + delta) + 1e-300
        failed = next(
            (f for f in order if not certify_hermitian_psd(*_block(k1[f], k2[f], rho_c, data))),
            None,
        )
        if failed is None:
            return _Certified(sqrt_up(rho_c), math.sqrt(rho_hat))
        order.remove(failed)
        order.insert(0, failed)  # the hardest block first next time
        delta *= _DELTA_GROWTH
    return _Certified(math.inf, math.sqrt(rho_hat))


# ----------------------------------------------------------------------------- public API


def _slopes(slope: tuple[float, float]) -> tuple[float, float]:
    a, b = float(slope[0]), float(slope[1])
    if not (math.isfinite(a) and math.isfinite(b) and a <= b):
        raise ValueError(f"slope must be a finite interval (a, b) with a <= b, got {slope}")
    return a, b


def _product_bound(first: ConvData, second: ConvData, a: float, b: float) -> float:
    """``max(|a|, |b|) ‖first‖ ‖second‖`` with the certified conv norms, rounded up."""
    norms = [
        conv_operator_norm_bound(
            c.weight, c.in_shape[1:], c.stride, c.padding, c.dilation, c.groups
        )
        for c in (first, second)
    ]
    return max(abs(a), abs(b)) * norms[0] * norms[1] * (1 + 4 * UNIT_ROUNDOFF)


def conv_pair_certificate(
    first: ConvData,
    slope: tuple[float, float],
    second: ConvData,
    *,
    warm: Tensor | None = None,
    max_steps: int = 60,
    lr: float = 0.05,
    dtype: torch.dtype = torch.complex64,
) -> ConvPairCertificate:
    """Certified upper bound on the Lipschitz constant of ``x ↦ second(φ(first(x)))`` for every
    elementwise ``φ`` with slopes in ``slope = (a, b)`` (module docstring, sections 1–5).

    Args:
        first, second: zero-padded convolutions; ``second.in_shape`` must equal the first's
            output shape ``(c_out, *spatial)``.
        slope: the activation's slope interval ``(a, b)`` (ReLU ``(0, 1)``).
        warm: ``log t`` from a previous :attr:`ConvPairCertificate.multipliers` (same shapes).
        max_steps, lr: Adam steps and learning rate on ``log t`` (0 steps: uniform ``t`` only).
        dtype: complex dtype of the optimiser (``complex64``, the default, is about 1.7x
            faster than ``complex128`` and reached the same values in our measurements); the
            certificate is always complex128/float64.

    Raises:
        UnsupportedPairError: (from :mod:`~lipreg.functional.conv_pair_fourier`, a
            ``ValueError``) mismatched shapes/channels or dimensions (the message says which).
        ValueError: a malformed slope or warm start.
    """
    start = time.perf_counter()
    a, b = _slopes(slope)
    if int(second.weight.shape[1]) * second.groups != int(second.in_shape[0]):
        raise UnsupportedPairError(
            f"second conv weight {tuple(second.weight.shape)} with groups={second.groups} "
            f"expects {int(second.weight.shape[1]) * second.groups} input channels, but its "
            f"in_shape is {tuple(second.in_shape)}"
        )
    torus = pair_torus(first, second)
    if torus.fake_hidden:  # fake hidden positions carry slope 0 (section 1)
        a, b = min(a, 0.0), max(b, 0.0)
    product = _product_bound(first, second, *_slopes(slope))
    theta = torch.zeros(torus.n_hidden, dtype=torch.float64)
    cert = _Certified(math.inf, math.inf)
    if a == b == 0.0 or product == 0.0:
        cert = _Certified(0.0, 0.0)
    else:
        prob = _problem(torus, a + b, 2.0 * a * b, dtype)
        theta, rho0 = _initial_theta(prob, warm)
        theta = _optimise(prob, theta, rho0, max_steps, lr)
        cert = _certify(torus, torch.exp(theta).detach(), a, b)
        if not math.isfinite(cert.value):
            warnings.warn(
                f"conv pair {tuple(first.weight.shape)} -> {tuple(second.weight.shape)}: the "
                f"Fourier-block LMI did not pass the float64 certificate (estimate "
                f"{cert.estimate:.6g}); returning the certified product of norms {product:.6g}. "
                "More optimisation steps (max_steps) or complex128 may help.",
                stacklevel=2,
            )
    value, method = (
        (cert.value, "fourier-lmi") if cert.value <= product else (product, "norm-product")
    )
    return ConvPairCertificate(
        value=value,
        multipliers=theta.detach(),
        estimate=min(cert.estimate, value),
        seconds=time.perf_counter() - start,
        method=method,
        lmi_value=cert.value,
        product_bound=product,
        torus=torus.coarse,
        frequencies=torus.frequencies,
    )


def chain_pair_certificate(
    analysis64: Analysis,
    chain1: AffineChain,
    slope: tuple[float, float],
    chain2: AffineChain,
    **kwargs: object,
) -> ConvPairCertificate | None:
    """:func:`conv_pair_certificate` for two affine chains (``[scale]* conv [scale]*`` each,
    merged by :func:`~lipreg.functional.conv_chain.merged_conv` from ``analysis64.specs``), or
    ``None`` when either chain is not one convolution. ``kwargs`` go to
    :func:`conv_pair_certificate`.

    The merged kernels are computed (batch-norm scales folded in, in float64): the value is
    widened to the exact kernels by :func:`~lipreg.functional.rounding.perturbed_bound` with
    :func:`~lipreg.functional.rounding.merged_kernel_error` and the certified torus norms of
    the merged convolutions."""
    convs = [merged_conv([analysis64.specs[n] for n in chain.nodes]) for chain in (chain1, chain2)]
    if convs[0] is None or convs[1] is None:
        return None
    cert = conv_pair_certificate(convs[0], slope, convs[1], **kwargs)  # type: ignore[arg-type]
    errors = [
        merged_kernel_error(conv, len(chain.nodes) - 1)
        for conv, chain in zip(convs, (chain1, chain2), strict=True)
    ]
    if not any(errors):
        return cert
    norms = [
        conv_operator_norm_bound(
            c.weight,
            c.in_shape[1:],
            stride=c.stride,
            padding=c.padding,
            dilation=c.dilation,
            groups=c.groups,
        )
        for c in convs
        if c is not None
    ]
    lip = max(abs(slope[0]), abs(slope[1]))
    return replace(cert, value=perturbed_bound(cert.value, norms, errors, lip))
