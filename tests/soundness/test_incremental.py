"""Incremental certificates in the soundness harness: the harness's random architectures (every
rule family) and a few torchvision networks are anchored (certified AutoLip + weight copies),
their weights and batch-norm statistics perturbed (also by ×0.01..×100 per channel, with γ = 0
channels switched on), and the incremental certificate of the new
weights checked against the independent oracle's certified lower bound (and, for chains small
enough, against the exact float64 norm of each incremental factor). Bounding must leave the
model bit-identical."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lipreg
from lipreg.functional.analysis import analyse
from lipreg.functional.chains import chain_linear_map, find_affine_chains
from lipreg.functional.incremental import IncrementalAnchor, certified_anchor, incremental_autolip
from tests.soundness.generator import generate
from tests.soundness.harness import REL_TOL
from tests.soundness.oracle import fingerprint_diff, model_fingerprint, oracle_lower_bound
from tests.soundness.zoo import autolip_options, build, input_shape

SEEDS = range(0, 292, 6)  # every family appears as a first block about once
HOWS = ("random", "large", "sign")
DENSE_CHECK_LIMIT = 600  # chains with both sides at most this get an exact SVD check


def perturb(model: nn.Module, how: str, seed: int, shape: tuple[int, ...] = ()) -> None:
    """Change every floating parameter (relative noise, or a sign flip) and the batch-norm
    running statistics, in place, from a private generator; ``how="train"``: real SGD steps
    in train mode on inputs of ``shape`` (:func:`train_steps`)."""
    if how == "train":
        train_steps(model, shape, seed)
        return
    g = torch.Generator().manual_seed(10_000 + seed)
    rel = {"random": 1e-2, "large": 0.5, "sign": 0.0, "stats": 1e-2}[how]
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_floating_point():
                continue
            if how == "sign":
                p.neg_()
            else:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                p.add_(rel * (float(p.abs().mean()) + 1e-3) * noise)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                if how == "stats":  # scales ×0.01..×100, γ = 0 channels switched on
                    factor = 10.0 ** (8 * torch.rand(m.running_var.shape, generator=g) - 4)
                    m.running_var.mul_(factor)
                    if m.weight is not None:
                        m.weight[m.weight == 0] = 1.0
                else:
                    m.running_var.mul_(0.5 + torch.rand(m.running_var.shape, generator=g))
                m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=g))


def train_steps(model: nn.Module, shape: tuple[int, ...], seed: int, steps: int = 3) -> None:
    """Real SGD steps (lr 0.1, momentum 0.9, gradients clipped to norm 1) in TRAIN mode on
    random inputs and targets: weights move and batch-norm running statistics follow the
    batches (issue 10: incremental certificates of train-mode batch-norm networks). The
    model's own mode is restored."""
    params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    g = torch.Generator().manual_seed(20_000 + seed)
    was_training = model.training
    model.train()
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9) if params else None
    for _ in range(steps):
        x = torch.randn(8, *shape, generator=g)
        out = model(x)
        loss = (out - torch.randn(out.shape, generator=g)).square().mean()
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    model.train(was_training)


def exact_chain_norms(model: nn.Module, shape: tuple[int, ...]) -> dict[str, float]:
    """Float64 SVD of every chain small enough to materialise (the chain's own ops applied to
    the identity; independent of the certificates)."""
    analysis = analyse(model, shape, dtype=torch.float64)
    norms = {}
    for chain in find_affine_chains(analysis).values():
        op = chain_linear_map(analysis, chain)
        if max(op.in_features, op.out_features) <= DENSE_CHECK_LIMIT:
            norms[chain.name] = float(torch.linalg.matrix_norm(op.to_dense(), 2))
    return norms


def check_incremental(
    model: nn.Module,
    shape: tuple[int, ...],
    how: str,
    seed: int,
    options: dict | None = None,
    oracle_options: dict | None = None,
    incremental_options: dict | None = None,
) -> IncrementalAnchor | None:
    """Anchor, perturb, certify incrementally and judge (module docstring); ``None`` when
    lipreg refuses the network (the plain harness checks refusals)."""
    options = options or {}
    try:
        anchor, _ = certified_anchor(model, shape, **options)
    except (lipreg.UnsupportedOperationError, lipreg.TraceError):
        return None
    perturb(model, how, seed, shape)
    before = model_fingerprint(model)
    result = incremental_autolip(model, shape, anchor, **options, **(incremental_options or {}))
    assert not fingerprint_diff(before, model_fingerprint(model))
    assert result.certified and result.kind == "upper"
    assert math.isfinite(result.value)
    oracle = oracle_lower_bound(model, shape, seed=seed, **(oracle_options or {}))
    assert result.value >= oracle.lower * (1 - REL_TOL), (result.value, oracle.lower)
    # refreshed chains (refresh_slack) carry their incremental value in extra: judged too
    incremental = {
        lb.name: lb
        for lb in result.layers
        if lb.method.startswith("incremental") or "incremental" in lb.extra
    }
    assert set(incremental) <= set(anchor.chains)
    if anchor.chains:
        assert incremental, "no anchored chain was certified incrementally"
    if oracle_options is None:  # small networks: every incremental factor vs its exact norm
        exact = exact_chain_norms(model, shape)
        for name, lb in incremental.items():
            if name in exact:
                assert lb.value >= exact[name], (name, lb.value, exact[name], lb.method)
    return anchor


@pytest.mark.parametrize("seed", SEEDS)
def test_random_architecture_incremental(seed: int) -> None:
    g = generate(seed)
    check_incremental(g.model, g.input_shape, HOWS[seed % len(HOWS)], seed)


def switch_off_first_channels(model: nn.Module) -> None:
    """γ = 0 on the first channel of every affine batch norm (zero rows at the anchor)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight[0] = 0.0


@pytest.mark.parametrize("seed", range(3, 292, 12))
def test_random_architecture_moving_batch_norm_statistics(seed: int) -> None:
    """Batch-norm scales moved by ×0.01..×100 per channel and γ = 0 channels switched on (the
    ratio bound (2') and the merged-kernel difference both in play)."""
    g = generate(seed)
    switch_off_first_channels(g.model)
    check_incremental(g.model, g.input_shape, "stats", seed)


@pytest.mark.parametrize("seed", range(5, 292, 12))
def test_random_architecture_train_mode_sgd_steps(seed: int) -> None:
    """Three real SGD steps (lr 0.1, momentum 0.9) in train mode after the anchor: the
    live-tap increments and the scale-weighted ratio bound (2'') of incremental.md §9 against
    the oracle and the exact chain norms."""
    g = generate(seed)
    check_incremental(g.model, g.input_shape, "train", seed)


@pytest.mark.parametrize("seed", range(11, 292, 24))
def test_random_architecture_per_chain_refresh(seed: int) -> None:
    """``refresh_slack=0``: every chain above its estimate also certified in full, the
    smaller value kept (incremental.md §9), against the same ground truths."""
    g = generate(seed)
    check_incremental(
        g.model, g.input_shape, "train", seed, incremental_options={"refresh_slack": 0.0}
    )


ZOO_SAMPLE = ["shufflenet_v2_x0_5", "squeezenet1_0", "resnet18", "mobilenet_v2", "mnasnet0_5"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_SAMPLE)
def test_zoo_incremental(name: str) -> None:
    model = build(name)
    oracle = {"n_random": 2, "scales": (0.01, 1.0), "n_ascent": 0}
    anchor = check_incremental(
        model, input_shape(name), "random", 0, autolip_options(name), oracle_options=oracle
    )
    assert anchor is not None and anchor.chains
