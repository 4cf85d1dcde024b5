"""Tests of the Gram-matrix greedy SeqLip search (:mod:`lipreg.functional.seqlip_greedy`).

Ground truths: (1) brute force over all ``2^n`` activation patterns on tiny pairs: the exact
pair maximum is at least the greedy value, which is the norm of the returned feasible pattern;
(2) a plain loop-based implementation of the local search, written here for the test (dense
products with ``M`` and an explicit matrix per candidate flip, no Gram matrix): same patterns
and the same values on random pairs of both orientations, Gram matrices kept up to date or
stale; (3) ``seqlip(traced=..., analysis=...)`` equals a fresh call, and with an
``AnalysisCache`` never re-traces nor re-probes an unchanged model (the tracer and the probe
counted with ``unittest.mock``).
"""

from __future__ import annotations

import itertools
from unittest import mock

import pytest
import torch
from torch import Tensor, nn

import lipreg
from lipreg.functional import analysis as analysis_module
from lipreg.functional import analysis_cache as cache_module
from lipreg.functional import seqlip_greedy
from lipreg.functional.analysis_cache import AnalysisCache
from lipreg.functional.probe import ProbeInterpreter
from lipreg.functional.seqlip_greedy import ALWAYS_GRAM, SweepGains, pair_norm_greedy
from lipreg.functional.trace import trace

F64 = torch.float64


def _norm(M: Tensor) -> float:
    return float(torch.linalg.svdvals(M)[0])


def _ref_top_pair(M: Tensor, v: Tensor | None) -> tuple[float, Tensor, Tensor]:
    """Power iteration on the right vectors of ``M`` (tolerance 1e-10 on ``s``, 500 steps)."""
    v = M.sum(0) if v is None else v
    v = v / v.norm()
    s_prev = 0.0
    for _ in range(500):
        u = M @ v
        s = float(u.norm())
        u = u / s
        v = M.T @ u
        v = v / v.norm()
        if abs(s - s_prev) <= 1e-10 * s:
            break
        s_prev = s
    u = M @ v
    s = float(u.norm())
    return s, u / s, v


def _ref_flip(A, B, lo, hi, sigma, M, s, v, gain, n_cand=64) -> int | None:
    """The best single flip, one candidate at a time: 8 power steps on ``M + d a bᵀ``."""
    delta = torch.where(
        sigma == hi, torch.tensor(lo - hi, dtype=F64), torch.tensor(hi - lo, dtype=F64)
    )
    order = torch.argsort(delta * gain, descending=True)[:n_cand]
    best, best_j = -1.0, None
    for j in order.tolist():
        Mj = M + float(delta[j]) * torch.outer(A[:, j], B[j])
        x = v.clone()
        for _ in range(8):
            x = Mj.T @ (Mj @ x)
            x = x / x.norm()
        value = float((Mj @ x).norm())
        if value > best:
            best, best_j = value, j
    return best_j if best > s * (1 + 1e-10) else None


def _ref_from(A: Tensor, B: Tensor, lo: float, hi: float, sigma: Tensor) -> tuple[float, Tensor]:
    """The local search from one start, with dense matrices only."""
    hi_t, lo_t = torch.tensor(hi, dtype=F64), torch.tensor(lo, dtype=F64)
    M = (A * sigma) @ B
    s, u, v = _ref_top_pair(M, None)
    for _ in range(50):
        gain = (A.T @ u) * (B @ v)
        proposal = torch.where(gain > 0, hi_t, lo_t)
        if bool((proposal != sigma).any()):
            M_new = (A * proposal) @ B
            s_new, u_new, v_new = _ref_top_pair(M_new, v)
            if s_new > s * (1 + 1e-12):
                sigma, M, s, u, v = proposal, M_new, s_new, u_new, v_new
                continue
        j = _ref_flip(A, B, lo, hi, sigma, M, s, v, gain)
        if j is None:
            break
        sigma = sigma.clone()
        sigma[j] = lo if sigma[j] == hi else hi
        M = (A * sigma) @ B
        s, u, v = _ref_top_pair(M, v)
    return _norm(M), sigma


def _ref_greedy(A: Tensor, B: Tensor, lo: float, hi: float, seed: int) -> tuple[float, Tensor]:
    """All-``hi`` start and two random starts (the generator draws of ``pair_norm_greedy``)."""
    n = A.shape[1]
    gen = torch.Generator().manual_seed(seed)
    starts = [torch.full((n,), hi, dtype=F64)]
    for _ in range(2):
        coin = torch.rand(n, generator=gen) < 0.5
        starts.append(torch.where(coin, torch.tensor(hi, dtype=F64), torch.tensor(lo, dtype=F64)))
    best, best_sigma = -1.0, starts[0]
    for sigma in starts:
        value, sigma = _ref_from(A, B, lo, hi, sigma)
        if value > best:
            best, best_sigma = value, sigma
    return best, best_sigma


def _pair(r1: int, n: int, r2: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r1, n, generator=g, dtype=F64), torch.randn(n, r2, generator=g, dtype=F64)


@pytest.mark.parametrize("box", [(0.0, 1.0), (-0.3, 1.0), (0.25, 1.0)])
@pytest.mark.parametrize("seed", range(4))
def test_greedy_below_brute_force_maximum_and_feasible(box: tuple[float, float], seed: int) -> None:
    lo, hi = box
    A, B = _pair(3 + seed % 2, 10, 4 - seed % 2, seed)
    patterns = torch.tensor(list(itertools.product((lo, hi), repeat=10)), dtype=F64)
    exact = float(torch.linalg.matrix_norm((A[None] * patterns[:, None, :]) @ B, 2).max())
    value, sigma = pair_norm_greedy(A, B, lo, hi, generator=torch.Generator().manual_seed(seed))
    assert bool(((sigma == lo) | (sigma == hi)).all())
    assert value == pytest.approx(_norm((A * sigma) @ B), rel=1e-12)
    assert value <= exact * (1 + 1e-12)
    assert value >= _norm(hi * A @ B) * (1 - 1e-12)  # never below the all-hi start


@pytest.mark.parametrize(
    "shape",
    [
        (6, 40, 9),  # left Gram (MMᵀ), always up to date
        (9, 40, 6),  # right Gram (MᵀM)
        (ALWAYS_GRAM + 6, 90, ALWAYS_GRAM + 16),  # left, stale after large moves
        (ALWAYS_GRAM + 16, 90, ALWAYS_GRAM + 6),  # right, stale after large moves
    ],
)
@pytest.mark.parametrize("box", [(0.0, 1.0), (-0.2, 1.0)])
def test_same_search_as_a_loop_reference(shape: tuple[int, int, int], box) -> None:
    lo, hi = box
    for seed in range(2 if max(shape) < ALWAYS_GRAM else 1):
        A, B = _pair(*shape, seed=10 + seed)
        want, want_sigma = _ref_greedy(A, B, lo, hi, seed)
        value, sigma = pair_norm_greedy(A, B, lo, hi, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sigma, want_sigma)
        assert value == pytest.approx(want, rel=1e-10)


def test_single_flips_are_needed_and_followed() -> None:
    """A pair where the linearised sweep stalls: the reference takes single flips, and the
    Gram search takes the same ones (same final pattern)."""
    lo, hi = 0.0, 1.0
    taken = 0
    for seed in range(6):
        A, B = _pair(5, 30, 7, seed=100 + seed)
        want, want_sigma = _ref_greedy(A, B, lo, hi, seed)
        value, sigma = pair_norm_greedy(A, B, lo, hi, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sigma, want_sigma) and value == pytest.approx(want, rel=1e-10)
        sweep_only = _sweep_only(A, B, lo, hi)
        taken += int(sweep_only < want * (1 - 1e-9))
    assert taken > 0  # some instance needed the flips (else this test tests nothing)


def _sweep_only(A: Tensor, B: Tensor, lo: float, hi: float) -> float:
    """The all-hi start without single flips: the sweeps' fixed point."""
    sigma = torch.full((A.shape[1],), hi, dtype=F64)
    M = (A * sigma) @ B
    s, u, v = _ref_top_pair(M, None)
    for _ in range(50):
        proposal = torch.where(
            (A.T @ u) * (B @ v) > 0, torch.tensor(hi, dtype=F64), torch.tensor(lo, dtype=F64)
        )
        M_new = (A * proposal) @ B
        s_new, u_new, v_new = _ref_top_pair(M_new, v)
        if not s_new > s * (1 + 1e-12):
            break
        sigma, M, s, u, v = proposal, M_new, s_new, u_new, v_new
    return _norm(M)


def _near_orthogonal(x: Tensor, n: int, t: Tensor, seed: int) -> Tensor:
    """Rows ``w_j - (w_j·x̂) x̂ + t_j x̂`` (``x̂ = x/‖x‖``): ``row_j · x̂ = t_j`` up to ~1e-16."""
    g = torch.Generator().manual_seed(seed)
    unit = x / x.norm()
    W = torch.randn(n, x.numel(), generator=g, dtype=F64)
    return W - (W @ unit)[:, None] * unit + t[:, None] * unit


def test_float32_gains_keep_the_float64_signs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gains whose factors are 1e-12..1e-6 of ``‖a_j‖ ‖u‖`` (below float32's resolution), or
    exactly zero: the proposals equal the signs fixed by construction, where plain float32
    products get some of them wrong."""
    monkeypatch.setattr(seqlip_greedy, "LOW_PRECISION_GAINS", 0)
    g = torch.Generator().manual_seed(7)
    r1, r2, n = 40, 30, 600
    u, v = torch.randn(r1, generator=g, dtype=F64), torch.randn(r2, generator=g, dtype=F64)
    u, v = u / u.norm(), v / v.norm()
    size = 10.0 ** -torch.randint(6, 13, (n,), generator=g).to(F64)  # 1e-12 .. 1e-6
    ta = size * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(F64)
    tb = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(F64)
    tb[:300] *= size[:300]  # small in both factors for half of the coordinates
    ta[::50] = 0.0  # exact zeros: no gain, so σ_j = lo
    A = _near_orthogonal(u, n, ta, 1).T  # (r1, n) in seqlip's column layout
    A[:, ::50] = 0.0
    B = _near_orthogonal(v, n, tb, 2)
    want = (torch.sign(ta) * torch.sign(tb)) > 0
    gains = SweepGains(A, B)
    assert gains.low is not None  # the float32 path is the one under test
    assert torch.equal(gains.positive(u, v), want)
    plain = (A.float().T @ u.float()).double() * (B.float() @ v.float()).double() > 0
    assert bool((plain != want).any())  # float32 alone would change proposals
    # entries beyond float32's range: the float64 gains
    assert SweepGains(A * 1e35, B).low is None


@pytest.mark.parametrize("shape", [(6, 40, 9), (ALWAYS_GRAM + 16, 90, ALWAYS_GRAM + 6)])
def test_same_search_with_float32_gains(shape, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop reference's patterns and values with the float32 gains on every pair."""
    monkeypatch.setattr(seqlip_greedy, "LOW_PRECISION_GAINS", 0)
    for lo, hi in [(0.0, 1.0), (-0.2, 1.0)]:
        A, B = _pair(*shape, seed=20)
        want, want_sigma = _ref_greedy(A, B, lo, hi, 3)
        value, sigma = pair_norm_greedy(A, B, lo, hi, generator=torch.Generator().manual_seed(3))
        assert torch.equal(sigma, want_sigma)
        assert value == pytest.approx(want, rel=1e-10)


def test_degenerate_pairs() -> None:
    A, B = _pair(4, 6, 3, seed=0)
    value, sigma = pair_norm_greedy(A, torch.zeros_like(B), 0.0, 1.0)
    assert value == 0.0 and sigma.shape == (6,)
    value, _ = pair_norm_greedy(A, B, 1.0, 1.0)  # a linear activation: one pattern
    assert value == pytest.approx(_norm(A @ B), rel=1e-12)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 3))


def test_seqlip_with_a_trace_or_an_analysis_cache_equals_a_fresh_call() -> None:
    net = _net()
    fresh = lipreg.seqlip(net, (6,), method="greedy", dtype=F64)
    traced = lipreg.seqlip(net, (6,), method="greedy", dtype=F64, traced=trace(net))
    cache = AnalysisCache(net, (6,))
    cached = lipreg.seqlip(net, (6,), method="greedy", dtype=F64, analysis=cache)
    assert traced.value == fresh.value and cached.value == fresh.value
    with torch.no_grad():  # the cache re-reads the weights at every call
        net[0].weight.mul_(2.0)
    again = lipreg.seqlip(net, (6,), method="exact", dtype=F64, analysis=cache)
    assert again.value == lipreg.seqlip(net, (6,), method="exact", dtype=F64).value
    assert again.certified and cache.builds == 1


def test_seqlip_at_its_own_cadence_reuses_the_cache_without_re_tracing() -> None:
    """SeqLip calls sharing the callback's ``AnalysisCache``: the tracer runs once (when the
    cache is made), the probe once (the cache's first build), and every call still equals a
    fresh call on the current weights (issue 10, item 7)."""
    net = _net()
    tracer = mock.Mock(side_effect=trace)
    probe = mock.patch.object(
        ProbeInterpreter, "probe", autospec=True, side_effect=ProbeInterpreter.probe
    )
    with (
        mock.patch.object(cache_module, "trace", tracer),
        mock.patch.object(analysis_module, "trace", tracer),
        probe as probes,
    ):
        cache = AnalysisCache(net, (6,))
        values = []
        for scale in (1.0, 0.5, 3.0):  # training steps between SeqLip calls
            with torch.no_grad():
                net[2].weight.mul_(scale)
            values.append(lipreg.seqlip(net, (6,), method="greedy", dtype=F64, analysis=cache))
        assert tracer.call_count == 1 and probes.call_count == 1 and cache.builds == 1
    # fresh calls (outside the counters) on the final weights and on a copy at each step
    assert values[-1].value == lipreg.seqlip(net, (6,), method="greedy", dtype=F64).value
    check = _net()
    for scale, got in zip((1.0, 0.5, 3.0), values, strict=True):
        with torch.no_grad():
            check[2].weight.mul_(scale)
        assert got.value == lipreg.seqlip(check, (6,), method="greedy", dtype=F64).value


def test_seqlip_refuses_the_cache_of_another_model() -> None:
    cache = AnalysisCache(_net(), (6,))
    with pytest.raises(ValueError, match="AnalysisCache"):
        lipreg.seqlip(_net(), (6,), analysis=cache)
