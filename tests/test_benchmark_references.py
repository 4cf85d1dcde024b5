"""The benchmark's reference implementations (``benchmarks/references``) against independent
ground truths: the worked example of ``docs/design/issue9/eclipse.md`` (rational closed
forms), brute-force maxima over activation patterns, the dense Jacobian of a small network;
and a smoke run of ``benchmarks/tightness.py --quick``.

No test here needs cvxpy except one (skipped without it), which is not the only test of
anything: the verifier it uses is tested without cvxpy below.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"

W1 = np.array([[1.0, 2.0], [-1.0, 1.0], [0.5, -2.0]])
W2 = np.array([[1.0, -1.0, 2.0]])
FAST = math.sqrt(477 / 14)  # eclipse.md §4: ECLipsE-Fast of this net, exactly
EXACT = math.sqrt(29)  # max over D ∈ {0,1}³ of ‖W2 D W1‖ (= the Lipschitz constant)


@pytest.fixture(scope="module")
def refs() -> dict[str, ModuleType]:
    """The reference modules, imported with ``benchmarks/`` on ``sys.path`` only meanwhile
    (the benchmark scripts import them as ``references.*``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        names = ("lipsdp_lmi", "eclipse_reference", "dense_chain")
        return {n: importlib.import_module(f"references.{n}") for n in names}


def pattern_maximum(weights: list[np.ndarray], slopes: list[tuple[float, float]]) -> float:
    """``max ‖W_L D_{L-1} ⋯ D_1 W_1‖`` over diagonal ``D_k`` with entries in ``{a_k, b_k}``:
    the maximum over the box ``[a_k, b_k]`` (the norm is convex in each entry), a lower
    bound on every LipSDP-type certificate, by enumeration."""
    choices = [
        itertools.product((a, b), repeat=w.shape[0])
        for w, (a, b) in zip(weights[:-1], slopes, strict=True)
    ]
    best = 0.0
    for pattern in itertools.product(*(list(c) for c in choices)):
        m = weights[0]
        for d, w in zip(pattern, weights[1:], strict=True):
            m = w @ (np.asarray(d)[:, None] * m)
        best = max(best, float(np.linalg.norm(m, 2)))
    return best


def random_chain(seed: int, sizes: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((o, i)) for i, o in itertools.pairwise(sizes)]


def test_eclipse_fast_worked_example(refs: dict[str, ModuleType]) -> None:
    ecl = refs["eclipse_reference"]
    value, lambdas = ecl.eclipse_fast_value([W1, W2], [(0.0, 1.0)])
    assert value == pytest.approx(FAST, rel=1e-13)
    assert lambdas == [pytest.approx(2 / 9, rel=1e-13)]  # λ_1 = 2/σ_1, σ_1 = λ_max(W1W1ᵀ) = 9
    result = ecl.eclipse_fast_reference([W1, W2], [(0.0, 1.0)])
    assert result.verified.passed
    assert FAST <= result.verified.value <= FAST * (1 + 1e-9)
    assert EXACT < FAST < 3 * math.sqrt(6)  # exact < Fast < product of norms (eclipse.md)


@pytest.mark.parametrize(
    ("seed", "sizes", "slopes"),
    [
        (0, (3, 4, 5, 2), (0.0, 1.0)),
        (1, (2, 3, 3, 3, 1), (0.0, 1.0)),
        (2, (4, 6, 5, 3), (0.1, 1.0)),
        (3, (3, 8, 2), (0.25, 0.5)),
    ],
)
def test_eclipse_fast_is_above_every_pattern(
    refs: dict[str, ModuleType], seed: int, sizes: tuple[int, ...], slopes: tuple[float, float]
) -> None:
    weights = random_chain(seed, sizes)
    per_layer = [slopes] * (len(weights) - 1)
    truth = pattern_maximum(weights, per_layer)
    result = refs["eclipse_reference"].eclipse_fast_reference(weights, per_layer)
    assert result.value >= truth * (1 - 1e-12)
    assert result.verified.passed and result.verified.value >= truth


def test_verifier_accepts_eclipse_point_and_rejects_below(refs: dict[str, ModuleType]) -> None:
    """ECLipsE-Fast is the LipSDP point T = (ρ_E λ/2) I with ρ*(T) = ρ_E exactly, so the
    verifier must accept ρ_E(1 + 1e-9) and reject ρ_E(1 − 1e-6) for that T."""
    lmi = refs["lipsdp_lmi"]
    rho_e = FAST**2
    t = [np.full(3, rho_e * (2 / 9) / 2)]
    assert lmi.rho_star([W1, W2], [(0.0, 1.0)], t) == pytest.approx(rho_e, rel=1e-12)
    assert lmi.verify_lipsdp([W1, W2], [(0.0, 1.0)], t, rho_e * (1 + 1e-9))
    assert not lmi.verify_lipsdp([W1, W2], [(0.0, 1.0)], t, rho_e * (1 - 1e-6))
    assert not lmi.verify_lipsdp([W1, W2], [(0.0, 1.0)], [-t[0]], 1e6)  # T ⪰ 0 is required


def test_verified_rho_is_never_below_the_patterns(refs: dict[str, ModuleType]) -> None:
    """Whatever multipliers it is given, a passed verification is ≥ every pattern norm; a
    start below ρ*(T) is raised (and the raise reported); multipliers too small for the
    lower Schur blocks are refused at any ρ."""
    lmi = refs["lipsdp_lmi"]
    rng = np.random.default_rng(5)
    weights = random_chain(4, (3, 5, 4, 2))
    slopes = [(0.0, 1.0)] * 2
    truth = pattern_maximum(weights, slopes)
    # Scales that keep the lower Schur blocks PD (as the product-of-norms point does), times
    # random per-neuron factors: varied, feasible multipliers.
    s2 = np.linalg.norm(weights[2], 2) ** 2
    s1 = 4 * s2 * np.linalg.norm(weights[1], 2) ** 2
    for _ in range(5):
        t = [s1 * rng.uniform(1.0, 3.0, 5), s2 * rng.uniform(1.0, 3.0, 4)]
        rho = lmi.rho_star(weights, slopes, t)
        got = lmi.verified_rho(weights, slopes, t, rho * (1 - 1e-3))
        assert got.passed and got.inflation > 0
        assert got.value >= truth and got.value**2 >= rho
    small = [np.full(5, 1e-3), np.full(4, 1e-3)]
    assert lmi.rho_star(weights, slopes, small) == math.inf
    assert not lmi.verified_rho(weights, slopes, small, 1e6).passed


def test_dense_chain_is_the_networks_map(refs: dict[str, ModuleType]) -> None:
    """The chain's matrices, with the ReLU pattern they induce, reproduce the bias-free
    network's output (a small CNN: conv, ReLU, flatten, linear)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 4, bias=False),
    ).double()
    weights, slopes = refs["dense_chain"].dense_chain(model, (2, 5, 5))
    assert [w.shape for w in weights] == [(75, 50), (18, 75), (4, 18)]
    assert slopes == [(0.0, 1.0)] * 2
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    h = x.reshape(-1).numpy()
    for w in weights[:-1]:
        h = np.maximum(w @ h, 0.0)
    expected = model(x[None]).detach().numpy().reshape(-1)
    np.testing.assert_allclose(weights[-1] @ h, expected, rtol=1e-12, atol=1e-12)


def test_lipsdp_cvxpy_worked_example(refs: dict[str, ModuleType]) -> None:
    """LipSDP-Neuron is tight on the worked example (eclipse.md §4): verified value within
    1e-6 of √29 and never below it."""
    pytest.importorskip("cvxpy")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        cvx = importlib.import_module("references.lipsdp_cvxpy")
    sol = cvx.lipsdp_neuron_cvxpy([W1, W2], [(0.0, 1.0)])
    assert sol.verified.passed
    assert EXACT <= sol.verified.value <= EXACT * (1 + 1e-6)


def test_stored_solve_is_reverified(refs: dict[str, ModuleType], tmp_path: Path) -> None:
    """A stored solve is used only for the same chain and is verified again on loading: a
    stored ρ below the true value comes back raised to a valid bound (no cvxpy needed: the
    module imports it only to solve)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        cvx = importlib.import_module("references.lipsdp_cvxpy")
    lmi = refs["lipsdp_lmi"]
    chain = ([W1, W2], [(0.0, 1.0)])
    t = [np.full(3, FAST**2 / 9)]  # the ECLipsE-Fast point, ρ*(t) = 477/14
    stored = cvx.LipSDPSolution(
        solver_value=5.0,  # a "solver" claiming 5 < √29: below the Lipschitz constant
        verified=lmi.VerifiedRho(True, 25.0, 5.0, 0.0),
        solver="SCS",
        status="optimal",
        cpu_solve=1.0,
        cpu_verify=0.0,
        t=t,
    )
    path = tmp_path / "solves.json"
    cvx.save_solution(path, "tiny", cvx.chain_digest(*chain), stored)
    got = cvx.load_solution(path, "tiny", *chain)
    assert got is not None and got.status == "optimal (cached)"
    assert got.verified.passed and FAST <= got.verified.value <= FAST * (1 + 1e-9)
    assert got.verified.inflation > 0.16  # from 5 up to √(477/14) ≈ 5.837
    assert cvx.load_solution(path, "tiny", [W1, 2 * W2], chain[1]) is None
    assert cvx.load_solution(path, "other", *chain) is None


def test_input_reduction_keeps_the_lmi_value(refs: dict[str, ModuleType]) -> None:
    """The cvxpy reference solves with a wide W_1 replaced by Rᵀ (W_1ᵀ = QR): for the same
    multipliers the smallest feasible ρ is the same (brute force: ρ*(T) on both chains)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        cvx = importlib.import_module("references.lipsdp_cvxpy")
    lmi = refs["lipsdp_lmi"]
    weights = random_chain(7, (9, 3, 4, 2))
    slopes = [(0.0, 1.0), (0.1, 1.0)]
    reduced = cvx.reduce_input(weights)
    assert reduced[0].shape == (3, 3)
    np.testing.assert_allclose(reduced[0] @ reduced[0].T, weights[0] @ weights[0].T, atol=1e-12)
    s2 = np.linalg.norm(weights[2], 2) ** 2
    t = [40 * s2 * np.linalg.norm(weights[1], 2) ** 2 * np.ones(3), 2 * s2 * np.ones(4)]
    full = lmi.rho_star(weights, slopes, t)
    assert math.isfinite(full)
    assert lmi.rho_star(reduced, slopes, t) == pytest.approx(full, rel=1e-10)


@pytest.mark.slow
def test_tightness_quick_runs() -> None:
    """``benchmarks/tightness.py --quick --no-cvxpy`` prints its tables (≈ 10 s CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "tightness.py"), "--quick", "--no-cvxpy"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Upper bound / best lower bound" in out.stdout
    assert "39.9015" in out.stdout  # ECLipsE-Fast of the LipSDP random net (eclipse.md §3)
    assert "--quick" in out.stdout
