"""The soundness harness: random architectures covering every rule family, the hand-written
patterns of issue 7, and exact SeqLip on small MLPs, each checked against an independent
certified lower bound (``tests/soundness/oracle.py``).

The per-family table (models, certified, refused, failed) and the refusal reasons are printed
in the terminal summary (section "lipreg soundness harness").
"""

from __future__ import annotations

import itertools
import math
import random
import warnings

import pytest
import torch
from torch import nn

import lipreg
from lipreg.functional import ladder
from lipreg.functional.ladder import quick_ladder
from tests.soundness.generator import FAMILIES, generate
from tests.soundness.harness import REL_TOL, Outcome, check_soundness
from tests.soundness.issue7 import CASES
from tests.soundness.oracle import fingerprint_diff, model_fingerprint, oracle_lower_bound

N_RANDOM = 292  # 4 appearances of each family as the first block, plus random ones
LOWER_BOUND_EVERY = 10  # lipreg.lower_bound is checked on every 10th random model


def _fail(outcome: Outcome) -> str:
    return f"{outcome.label}: {outcome.status}: {outcome.message}"


@pytest.mark.parametrize("seed", range(N_RANDOM))
def test_random_architecture(seed: int, record_property: pytest.RecordProperty) -> None:
    g = generate(seed)
    outcome = check_soundness(
        g.model,
        g.input_shape,
        label=g.describe(),
        families=g.families,
        names=g.names,
        block_names=g.block_names,
        seed=seed,
        check_lower_bound=seed % LOWER_BOUND_EVERY == 0,
    )
    record_property("families", ",".join(g.families))
    record_property("status", outcome.status)
    record_property("upper", outcome.upper)
    record_property("oracle_lower", outcome.lower)
    assert outcome.ok, _fail(outcome)


@pytest.mark.parametrize("seed", range(0, N_RANDOM, 4))
def test_fallback_certificates(seed: int) -> None:
    """The certificates used when the exact ones do not fit the memory budget (row blocks,
    Frobenius/Schur for dense maps, the im2col bound for convolutions) and the per-op product
    (``dense_limit=0``: no merged chain is materialised) hold against the oracle too."""
    g = generate(seed)
    outcome = check_soundness(
        g.model,
        g.input_shape,
        label=f"{g.describe()} [memory_limit_bytes=4096, dense_limit=0]",
        families=g.families,
        names=g.names,
        seed=seed,
        autolip_kwargs={"memory_limit_bytes": 4096, "dense_limit": 0},
    )
    assert outcome.ok, _fail(outcome)


@pytest.mark.parametrize("seed", range(2, N_RANDOM, 4))
def test_quick_ladder_certificates(seed: int) -> None:
    """The callback's first anchor (``quick_ladder``) with no dense certificate at all
    (``max_dense_flops=0``: every chain that the default ladder would materialise goes to the
    cheaper entries after it) holds against the oracle too."""
    g = generate(seed)
    outcome = check_soundness(
        g.model,
        g.input_shape,
        label=f"{g.describe()} [quick_ladder(0)]",
        families=g.families,
        names=g.names,
        seed=seed,
        autolip_kwargs={"ladder": quick_ladder(0.0)},
    )
    assert outcome.ok, _fail(outcome)


@pytest.mark.parametrize("seed", range(1, N_RANDOM, 4))
def test_certificate_only(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``estimate=False`` (the certified value alone) with every convolution's Gram test over
    its cost budget and no chain materialised (``dense_limit=0``): the torus bounds and the
    per-op products answer without an estimate, and hold against the oracle too. Some ops have
    no certificate without materialising (an upsampling, a broadcast): such a network is
    reported as an estimate, and must then be one with ``estimate=True`` as well (skipping
    estimates never costs a certificate)."""
    monkeypatch.setattr(ladder, "GRAM_FREE_COST", 0.0)
    monkeypatch.setattr(ladder, "GRAM_COST_RATIO", 0.0)
    g = generate(seed)
    options = {"estimate": False, "dense_limit": 0}
    with warnings.catch_warnings(record=True):  # an uncertified op warns
        warnings.simplefilter("always")
        try:
            full = lipreg.autolip(g.model, g.input_shape, **{**options, "estimate": True})
        except (lipreg.UnsupportedOperationError, lipreg.TraceError):
            full = None  # refused: check_soundness judges the refusal below
        if full is not None and not full.certified:
            only = lipreg.autolip(g.model, g.input_shape, **options)
            assert not only.certified and only.kind == "estimate"
            return
    outcome = check_soundness(
        g.model,
        g.input_shape,
        label=f"{g.describe()} [estimate=False, dense_limit=0, no Gram test]",
        families=g.families,
        names=g.names,
        seed=seed,
        autolip_kwargs=options,
    )
    assert outcome.ok, _fail(outcome)


@pytest.mark.parametrize("name", sorted(CASES))
def test_issue7_pattern(name: str, record_property: pytest.RecordProperty) -> None:
    case = CASES[name]()
    outcome = check_soundness(
        case.model,
        case.input_shape,
        label=f"issue7/{name}",
        families=[f"issue7/{name}"],
        names=case.names,
        check_lower_bound=True,
    )
    record_property("status", outcome.status)
    record_property("upper", outcome.upper)
    record_property("oracle_lower", outcome.lower)
    assert outcome.ok, _fail(outcome)
    if case.truth is not None and outcome.status == "certified":
        assert outcome.upper is not None
        assert outcome.upper >= case.truth * (1 - REL_TOL), (
            f"{name}: certified {outcome.upper:.6g} < exact Lipschitz constant {case.truth:.6g}"
        )


def test_every_family_is_generated() -> None:
    seen = {f for seed in range(len(FAMILIES)) for f in generate(seed).families}
    assert {f.name for f in FAMILIES} <= seen


# --------------------------------------------------------------------------------------------
# Exact SeqLip on small sequential MLPs
# --------------------------------------------------------------------------------------------

_SLOPES = {"ReLU": (0.0, 1.0), "LeakyReLU": (0.1, 1.0), "LeakyReLU2": (1.0, 2.0)}


def _act(name: str) -> nn.Module:
    return {
        "ReLU": nn.ReLU(),
        "LeakyReLU": nn.LeakyReLU(0.1),
        "LeakyReLU2": nn.LeakyReLU(2.0),
        "Tanh": nn.Tanh(),
        "Sigmoid": nn.Sigmoid(),
        "GELU": nn.GELU(),
        "ELU": nn.ELU(),
        "Softplus": nn.Softplus(),
    }[name]


def _small_mlp(seed: int) -> tuple[nn.Sequential, tuple[int, ...], list[str]]:
    rng = random.Random(1000 + seed)
    depth = rng.randint(2, 4)
    widths = [rng.randint(2, 8) for _ in range(depth + 1)]
    if seed % 3 == 0:  # one hidden layer, hidden <= input: every pattern is reachable
        depth, widths = 2, [rng.randint(4, 8), 0, rng.randint(1, 4)]
        widths[1] = rng.randint(2, widths[0])
    acts = [
        rng.choice(
            ["ReLU", "LeakyReLU", "LeakyReLU2", "Tanh", "Sigmoid", "GELU", "ELU", "Softplus"]
        )
        for _ in range(depth - 1)
    ]
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1000 + seed)
        for i in range(depth):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < depth - 1:
                layers.append(_act(acts[i]))
    return nn.Sequential(*layers).train(seed % 2 == 0), (widths[0],), acts


def _brute_force(model: nn.Sequential, act: str) -> float | None:
    """Exact L of ``W2 ρ(W1 x + b1) + b2`` when W1 is onto (every slope pattern is reachable):
    the maximum of ‖W2 diag(s) W1‖ over s in {a, b}^h (a convex function of s)."""
    if len(model) != 3 or act not in ("ReLU", "LeakyReLU", "LeakyReLU2", "Tanh"):
        return None
    w1, w2 = model[0].weight.detach().double(), model[2].weight.detach().double()
    if torch.linalg.matrix_rank(w1) < w1.shape[0]:
        return None
    lo, hi = _SLOPES.get(act, (0.0, 1.0))  # tanh' ranges over (0, 1]: same supremum as ReLU
    best = 0.0
    for s in itertools.product((lo, hi), repeat=w1.shape[0]):
        m = w2 @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ w1
        best = max(best, float(torch.linalg.matrix_norm(m, ord=2)))
    return best


@pytest.mark.parametrize("seed", range(24))
def test_seqlip_exact_small_mlp(seed: int) -> None:
    model, shape, acts = _small_mlp(seed)
    before = model_fingerprint(model)
    seq = lipreg.seqlip(model, shape, method="exact")
    auto = lipreg.autolip(model, shape)
    lower = lipreg.lower_bound(model, shape, n_random=32, n_anneal_steps=5, n_chains=2)
    assert not fingerprint_diff(before, model_fingerprint(model))
    oracle = oracle_lower_bound(model, shape, seed=seed)
    assert seq.certified and seq.kind == "upper", (seq.certified, seq.kind)
    assert math.isfinite(seq.value)
    assert seq.value >= oracle.lower * (1 - REL_TOL), (
        f"exact SeqLip {seq.value:.6g} < certified lower bound {oracle.lower:.6g} ({acts})"
    )
    assert auto.value >= oracle.lower * (1 - REL_TOL)
    assert lower.kind == "lower"
    assert lower.value <= min(seq.value, auto.value) * (1 + REL_TOL)
    truth = _brute_force(model, acts[0]) if len(acts) == 1 else None
    if truth is not None:
        assert seq.value >= truth * (1 - REL_TOL), (seq.value, truth)
        assert auto.value >= truth * (1 - REL_TOL), (auto.value, truth)
        assert lower.value <= truth * (1 + REL_TOL), (lower.value, truth)
        assert oracle.lower <= truth * (1 + REL_TOL), (oracle.lower, truth)
