"""ECLipsE-Fast against its worked example (exact rationals), brute-force activation patterns and
the values of the design note's independent prototype."""

from __future__ import annotations

import math

import pytest
import torch

from lipreg.functional.eclipse import eclipse_fast
from lipreg.models.benchmark_nets import load_glipsdp, load_lipsdp
from tests.functional.chain_helpers import linear_weights, max_over_patterns

W1 = torch.tensor([[1.0, 2.0], [-1.0, 1.0], [0.5, -2.0]], dtype=torch.float64)
W2 = torch.tensor([[1.0, -1.0, 2.0]], dtype=torch.float64)


def test_worked_example() -> None:
    cert = eclipse_fast([W1, W2], [(0.0, 1.0)])
    closed_form = math.sqrt(477 / 14)  # 5.8370736308
    assert closed_form <= cert.value <= closed_form * (1 + 1e-9)
    assert cert.method == "eclipse-fast" and cert.steps == 0
    assert cert.value >= math.sqrt(29)  # the exact Lipschitz constant
    assert cert.value <= 3 * math.sqrt(6)  # product of norms
    # T_E = (ρ_E λ_1 / 2) I with λ_1 = 2/9: ρ_E λ_1 / 2 = (477/14)/9
    assert torch.allclose(cert.multipliers[0], torch.full((3,), 477 / 14 / 9, dtype=torch.float64))


def test_float32_weights_are_converted_exactly() -> None:
    a = eclipse_fast([W1.float(), W2.float()], [(0.0, 1.0)])
    b = eclipse_fast([W1, W2], [(0.0, 1.0)])
    assert a.value == b.value


@pytest.mark.parametrize(("name", "expected"), [("random", 39.901501), ("mnist", 26.808870)])
def test_lipsdp_nets_match_the_independent_prototype(name: str, expected: float) -> None:
    ws = linear_weights(load_lipsdp(name).model)
    cert = eclipse_fast(ws, [(0.0, 1.0)] * (len(ws) - 1))
    assert cert.value == pytest.approx(expected, rel=2e-7)


@pytest.mark.parametrize(("arch", "expected"), [("fnn2", 5.906757), ("fnn3", 11.383195)])
def test_glipsdp_seed0_matches_the_independent_prototype(arch: str, expected: float) -> None:
    ws = linear_weights(load_glipsdp(arch, 0).model)
    cert = eclipse_fast(ws, [(0.0, 1.0)] * (len(ws) - 1))
    assert cert.value == pytest.approx(expected, rel=2e-7)


@pytest.mark.parametrize("slopes", [(0.0, 1.0), (0.1, 1.0), (0.0, 0.25), (0.5, 0.5)])
@pytest.mark.parametrize("seed", range(3))
def test_bounds_every_activation_pattern(slopes: tuple[float, float], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ws = [
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(2, 3, generator=g, dtype=torch.float64),
    ]
    cert = eclipse_fast(ws, [slopes, slopes])
    lower = max_over_patterns(ws, [slopes, slopes])
    assert cert.value >= lower
    if slopes[0] == 0.0:
        # [0, b]: b × the ReLU recursion, which never exceeds the product of norms. (With
        # a b > 0 the closed form can be looser than b² Π‖W_k‖, e.g. 2.6× for a = b.)
        prod = math.prod(float(torch.linalg.matrix_norm(W, 2)) for W in ws) * slopes[1] ** 2
        assert cert.value <= prod * (1 + 1e-9)


def test_refuses_slopes_of_both_signs() -> None:
    with pytest.raises(ValueError, match="one sign"):
        eclipse_fast([W1, W2], [(-0.1, 1.1)])


def test_single_layer_is_the_spectral_norm() -> None:
    cert = eclipse_fast([W1], [])
    assert 3.0 <= cert.value <= 3.0 * (1 + 1e-12)  # ‖W1‖ = 3


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="chain"):
        eclipse_fast([W1, W1], [(0.0, 1.0)])
    with pytest.raises(ValueError, match="slope interval per hidden layer"):
        eclipse_fast([W1, W2], [])
    with pytest.raises(ValueError, match="a <= b"):
        eclipse_fast([W1, W2], [(1.0, 0.0)])
    with pytest.raises(ValueError, match="non-finite"):
        eclipse_fast([W1 * math.inf, W2], [(0.0, 1.0)])
