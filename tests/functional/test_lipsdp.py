"""Certified LipSDP-Neuron against brute-force activation patterns on tiny nets, exact values,
the published LipSDP-Neuron values of the benchmark networks, and ECLipsE-Fast."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import lipreg.functional.lipsdp as lipsdp_module
from lipreg.functional.chain_lmi import (
    certify_multipliers,
    dense_chain,
    norm_multipliers,
    rho_star,
)
from lipreg.functional.eclipse import eclipse_fast
from lipreg.functional.lipsdp import lipsdp_neuron
from lipreg.functional.lipsdp_ipm import dense_lmi, interior_point_multipliers
from lipreg.models import PAPER_MODELS
from lipreg.models.benchmark_nets import load_glipsdp, load_glipsdp_summary, load_lipsdp
from tests.functional.chain_helpers import linear_weights, max_over_patterns

RELU = (0.0, 1.0)


def test_design_note_tiny_net_is_tight() -> None:
    # 2 → 4 → 1 ReLU of the design note (§6): exact Lipschitz constant 0.899764981
    rng = np.random.default_rng(0)
    W1 = torch.from_numpy(rng.standard_normal((4, 2)))
    W2 = torch.from_numpy(rng.standard_normal((1, 4)))
    cert = lipsdp_neuron([W1, W2], [RELU])
    brute = max_over_patterns([W1, W2], [RELU])
    assert brute == pytest.approx(0.899764981, abs=1e-9)
    assert brute <= cert.value <= brute * 1.0005
    assert cert.method == "lipsdp-neuron"


def test_eclipse_worked_example_reaches_the_exact_value() -> None:
    W1 = torch.tensor([[1.0, 2.0], [-1.0, 1.0], [0.5, -2.0]], dtype=torch.float64)
    W2 = torch.tensor([[1.0, -1.0, 2.0]], dtype=torch.float64)
    cert = lipsdp_neuron([W1, W2], [RELU])
    assert math.sqrt(29) <= cert.value <= math.sqrt(29) * (1 + 1e-4)
    assert cert.value < math.sqrt(477 / 14)  # ECLipsE-Fast


@pytest.mark.parametrize(
    "slopes", [(0.0, 1.0), (0.1, 1.0), (-0.1, 1.1), (0.0, 0.25), (-1.0, 1.0), (0.5, 0.5)]
)
@pytest.mark.parametrize("sizes", [(2, 4, 1), (3, 4, 3, 2), (2, 3, 2, 3, 1)])
def test_bounds_and_nearly_reaches_every_activation_pattern(
    sizes: tuple[int, ...], slopes: tuple[float, float]
) -> None:
    g = torch.Generator().manual_seed(sum(sizes))
    ws = [torch.randn(m, n, generator=g, dtype=torch.float64) for n, m in itertools.pairwise(sizes)]
    sl = [slopes] * (len(ws) - 1)
    cert = lipsdp_neuron(ws, sl)
    brute = max_over_patterns(ws, sl)
    assert cert.value >= brute
    if slopes == (-1.0, 1.0):
        # s = a + b = 0 decouples the LMI: its optimum is the product of norms (with scalar T)
        prod = math.prod(float(torch.linalg.matrix_norm(W, 2)) for W in ws)
        assert cert.value <= prod * 1.01
    elif slopes[0] != slopes[1]:
        assert cert.value <= 1.35 * brute  # the relaxation is close on tiny nets
    # (a = b, a linear activation: the LMI's optimum is at T → ∞; only soundness is asked)
    if slopes[0] * slopes[1] >= 0:
        assert cert.value <= eclipse_fast(ws, sl).value


def test_certificate_rejects_rho_below_the_value_and_infeasible_multipliers() -> None:
    g = torch.Generator().manual_seed(0)
    chain = dense_chain(
        [torch.randn(4, 2, generator=g).double(), torch.randn(1, 4, generator=g).double()],
        [RELU],
    )
    ts = list(lipsdp_neuron(chain.weights, [RELU]).multipliers)
    rho, _ = rho_star(chain, ts)
    assert certify_multipliers(chain, ts, rho) is not None
    # every tried ρ_c = 0.99 ρ* (1 + δ) with δ ≤ 1e-3 is below ρ*: must be rejected
    assert certify_multipliers(chain, ts, 0.99 * rho, max_inflation=1e-3) is None
    assert certify_multipliers(chain, ts, rho * (1 - 1e-9), max_inflation=1e-12) is None
    # T scaled by 0.1: 2T − W₂ᵀW₂ is indefinite, no ρ helps
    assert certify_multipliers(chain, [0.1 * t for t in ts], 1e6) is None


@pytest.mark.parametrize(("name", "exact_or_lower"), [("random", 36.482225), ("mnist", 24.299)])
def test_published_lipsdp_networks(name: str, exact_or_lower: float) -> None:
    # random: the exact constant 36.48223 (5 decimals, so ≥ 36.482225); mnist: the lower bound
    loaded = load_lipsdp(name)
    ws = linear_weights(loaded.model)
    cert = lipsdp_neuron(ws, [RELU] * (len(ws) - 1))
    published = loaded.meta["published"]["lipsdp_neuron"]
    assert exact_or_lower <= cert.value <= 1.001 * published
    assert cert.value <= eclipse_fast(ws, [RELU] * (len(ws) - 1)).value


@pytest.mark.parametrize(("arch", "factor"), [("fnn2", 1.01), ("fnn3", 1.03)])
@pytest.mark.parametrize("seed", [0, 5])
def test_published_glipsdp_networks(arch: str, factor: float, seed: int) -> None:
    summary = load_glipsdp_summary()[arch]
    ws = linear_weights(load_glipsdp(arch, seed).model)  # logit 7
    cert = lipsdp_neuron(ws, [RELU] * (len(ws) - 1))
    published = float(summary["lipsdp"]["values"][seed])
    assert float(summary["lower_bound_sampled"]["values"][seed]) <= cert.value
    assert cert.value <= factor * published
    assert cert.value <= 1.001 * published  # what we measure (≤ 1.0004 on every seed)


def test_warm_start_is_as_good_and_cheaper() -> None:
    ws = linear_weights(load_glipsdp("fnn3", 1).model)
    sl = [RELU] * (len(ws) - 1)
    cold = lipsdp_neuron(ws, sl)
    warm = lipsdp_neuron(ws, sl, warm=cold.multipliers)
    assert warm.value <= cold.value * (1 + 1e-9)
    assert warm.steps < cold.steps
    # a slightly perturbed chain (as during training) still profits from the old multipliers
    g = torch.Generator().manual_seed(0)
    moved = [W + 1e-3 * torch.randn(W.shape, generator=g, dtype=W.dtype) for W in ws]
    cold_moved = lipsdp_neuron(moved, sl)
    warm_moved = lipsdp_neuron(moved, sl, warm=cold.multipliers)
    assert warm_moved.value <= cold_moved.value * (1 + 1e-4)


def test_single_layer_is_the_spectral_norm() -> None:
    W = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cert = lipsdp_neuron([W], [])
    exact = float(torch.linalg.svdvals(W)[0])
    assert exact <= cert.value <= exact * (1 + 1e-9)
    assert cert.method == "spectral-norm"


def test_input_validation() -> None:
    W1 = torch.randn(4, 2, dtype=torch.float64)
    W2 = torch.randn(1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="chain"):
        lipsdp_neuron([W1, W1], [RELU])
    with pytest.raises(ValueError, match="slope interval per hidden layer"):
        lipsdp_neuron([W1, W2], [RELU, RELU])
    with pytest.raises(ValueError, match="a <= b"):
        lipsdp_neuron([W1, W2], [(1.0, math.nan)])
    with pytest.raises(ValueError, match="warm multipliers"):
        lipsdp_neuron([W1, W2], [RELU], warm=[torch.ones(3)])
    with pytest.raises(TypeError, match="floating-point"):
        lipsdp_neuron([W1.long(), W2], [RELU])


def test_deep_paper_mlp_reaches_the_cvxpy_value() -> None:
    # The paper's 2-20-20-20-20-1 MLP at random init (seed 0, as benchmarks/tightness.py builds
    # it). Reference: cvxpy + Clarabel's LipSDP-Neuron optimum on these weights, verified by the
    # benchmark's independent float64 test (benchmarks/results/tightness_lipsdp_solves.json,
    # "paper MLP 2-20-20-20-20-1 (random init)": ρ = 0.04327100085746075). L-BFGS on the
    # smoothed top eigenvalue stopped at 1.09x this value.
    torch.manual_seed(0)
    model = PAPER_MODELS["mlp"](2, (20,) * 4, 1).double()
    ws = linear_weights(model)
    cert = lipsdp_neuron(ws, [RELU] * 4)
    reference = math.sqrt(0.04327100085746075)
    assert cert.value <= 1.01 * reference
    assert cert.value <= 1.0001 * reference  # what we measure: 1.0000000
    # soundness against an independent lower bound: gradient norms at random inputs
    x = torch.randn(4096, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    assert float(grad.norm(dim=1).max()) <= cert.value


@pytest.mark.parametrize("slopes", [(0.0, 1.0), (-0.1, 1.1), (-1.0, 1.0), (0.5, 0.5)])
def test_dense_lmi_is_singular_exactly_at_the_value_function(slopes: tuple[float, float]) -> None:
    # The interior-point method's dense matrix Z(t, ρ) against the block elimination of
    # chain_lmi (an independent formula): Z(t, ρ*(t)) is singular and PSD, Z(t, 1.01ρ*) ≻ 0.
    g = torch.Generator().manual_seed(3)
    sizes = (5, 4, 3, 2)  # wide first layer: the reduced first block is used
    ws = [torch.randn(m, n, generator=g, dtype=torch.float64) for n, m in itertools.pairwise(sizes)]
    chain = dense_chain(ws, [slopes] * 2)
    lmi = dense_lmi(chain)
    ts = [2.0 * t for t in norm_multipliers(chain, 1.0)]  # feasible for any slopes
    rho, _ = rho_star(chain, ts)
    assert math.isfinite(rho)
    t = torch.cat(ts)
    assert abs(float(torch.linalg.eigvalsh(lmi.matrix(t, rho))[0])) <= 1e-9 * rho
    assert float(torch.linalg.eigvalsh(lmi.matrix(t, 1.01 * rho))[0]) > 0
    with pytest.raises(ValueError, match="slack"):
        interior_point_multipliers(chain, ts, rho, max_steps=5, gap=1e-6, slack=1.0)


@pytest.mark.parametrize("sizes", [(3, 4, 3, 2), (2, 3, 2, 3, 1)])
def test_first_order_path_is_sound_and_close_to_the_interior_point_one(
    sizes: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Larger LMIs use L-BFGS: forced here on tiny nets, it must stay above brute force and near
    # the interior-point optimum (which reaches cvxpy's optimum on the benchmark MLPs).
    g = torch.Generator().manual_seed(sum(sizes))
    ws = [torch.randn(m, n, generator=g, dtype=torch.float64) for n, m in itertools.pairwise(sizes)]
    sl = [RELU] * (len(ws) - 1)
    ipm = lipsdp_neuron(ws, sl)
    monkeypatch.setattr(lipsdp_module, "_DENSE_SIDE", 0)
    first_order = lipsdp_neuron(ws, sl)
    assert first_order.value >= max_over_patterns(ws, sl)
    assert ipm.value <= first_order.value * (1 + 1e-6)
    assert first_order.value <= ipm.value * 1.01
