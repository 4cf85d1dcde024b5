"""``lipschitz/certified``: the callback's tightest certified value, in a real fit."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.autograd.functional import jacobian

import lipreg.callback_methods as methods_module
import lipreg.functional.ladder as ladder_module
from lipreg import LipschitzCallback
from tests._lightning_helpers import (
    D_IN,
    D_OUT,
    RegressionModule,
    callback_warnings,
    lipschitz_rows,
    loader,
    make_mlp,
    make_trainer,
    norm_product,
)
from tests.helpers import dense_jacobian_norms


def test_certified_is_logged_below_autolip_and_above_jacobian_norms(tmp_path):
    callback = LipschitzCallback(  # the cadence alone: a 6-step fit affords no LMI in 5 %
        every_n_train_steps=3, certify_every_n_train_steps=3, model_attr="net", max_overhead=None
    )
    module = RegressionModule(lr=0.2)
    trainer = make_trainer(tmp_path, [callback], max_steps=6)
    trainer.fit(module, loader())
    m = callback.last_metrics
    certified, autolip_certified = m["lipschitz/certified"], m["lipschitz/autolip_certified"]
    assert certified <= autolip_certified
    # the LMI certificate is strictly tighter than the product of norms on a 3-layer ReLU MLP
    assert certified < 0.99 * autolip_certified
    # independent: the Jacobian norm of the trained network at random points (a lower bound)
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(dense_jacobian_norms(module.net, x).max()) <= certified * (1 + 1e-9)
    assert callback._tight_state  # multipliers kept for the next (warm) call


@pytest.mark.usefixtures("seeded")
def test_the_tightened_value_is_rechecked_between_anchors(tmp_path, monkeypatch):
    """At the anchor the LMI multipliers are optimised; at each increment they are only
    checked again on the new weights (max_steps=0). Every tightened value stays certified:
    at most the certified AutoLip value of its step and at least the largest Jacobian norm
    of the trained network at random points (an independent lower bound)."""
    calls: list[int | None] = []
    real = methods_module.tighten

    def recording(*args, **kwargs):
        calls.append(kwargs.get("max_steps"))
        return real(*args, **kwargs)

    monkeypatch.setattr(methods_module, "tighten", recording)
    callback = LipschitzCallback(
        methods=["autolip"], every_n_train_steps=1, max_overhead=None, recertify_slack=1e9
    )
    module = RegressionModule(lr=0.05)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [callback], max_steps=5, logger=logger)
    trainer.fit(module, loader())
    assert calls == [None, 0, 0, 0, 0]  # the anchor, then four increments
    rows = [r for r in lipschitz_rows(logger) if r.get("lipschitz/certified")]
    assert len(rows) == 5
    for r in rows:
        assert float(r["lipschitz/certified"]) <= float(r["lipschitz/autolip_certified"])
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    final = callback.last_metrics["lipschitz/certified"]
    assert float(dense_jacobian_norms(module.net, x).max()) <= final * (1 + 1e-9)


def test_a_failing_tight_certificate_never_breaks_the_fit(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(methods_module, "tighten", broken)
    callback = LipschitzCallback(  # the cadence alone: a 6-step fit affords no LMI in 5 %
        every_n_train_steps=2, certify_every_n_train_steps=2, model_attr="net", max_overhead=None
    )
    module = RegressionModule()
    trainer = make_trainer(tmp_path, [callback], max_steps=6)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(module, loader())
    assert trainer.global_step == 6
    messages = [w for w in callback_warnings(records) if "lipschitz/certified failed" in w]
    assert len(messages) == 1 and "boom" in messages[0]
    assert "lipschitz/certified" not in callback.last_metrics
    assert "lipschitz/autolip_certified" in callback.last_metrics


class Recording(LipschitzCallback):
    """Records, at every certified value, the value, the kind of certificate and the exact
    AutoLip of the weights it certifies (``truth``; default the product of float64 spectral
    norms, for a ReLU MLP: independent of the certificates)."""

    def __init__(self, truth=norm_product, **kwargs) -> None:
        super().__init__(**kwargs)
        self.truth = truth
        self.seen: list[tuple[str, float, float]] = []

    def _certified(self, cert):
        kind = "incremental" if any("incremental" in n for n in cert.notes) else "full"
        self.seen.append((kind, cert.value, self.truth(self._network_cache)))
        return super()._certified(cert)


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("widths", [(D_IN, 16, 16, D_OUT), (D_IN, 40, 40, D_OUT)])
def test_a_certified_value_at_every_step_is_above_the_exact_constant(tmp_path, widths):
    """Every monitoring step logs a certified value (a full certificate once, then increments
    from it): each is above the exact AutoLip of the
    weights at that step and, after a few large steps of SGD, not far above it."""
    callback = Recording(
        methods=["autolip"], every_n_train_steps=1, max_overhead=None, recertify_slack=1e9
    )
    module = RegressionModule(make_mlp(widths), lr=0.1)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [callback], max_steps=8, logger=logger)
    trainer.fit(module, loader())
    kinds = [kind for kind, _, _ in callback.seen]
    assert kinds == ["full"] + ["incremental"] * 7  # the fit end adds nothing (done at step 8)
    for kind, value, exact in callback.seen:
        assert value >= exact, (kind, value, exact)
        # first-order increments (no Ritz space): the slack grows with ‖ΔW‖, ~30 % after 7
        # steps of lr 0.1 here; not orders of magnitude
        assert value <= exact * 1.5, (kind, value, exact)
    rows = [r for r in lipschitz_rows(logger) if r["lipschitz/autolip_certified"]]
    assert len(rows) == 8
    assert all(float(r["lipschitz/full_certificates"]) == 1 for r in rows)
    assert all(float(r["lipschitz/certified_slack"]) >= 0 for r in rows)
    # the first anchor is the quick certificate, here as tight as the full one (lone dense
    # weights: nothing to leave out), so no upgrade follows
    assert callback.budget.runs["quick_certificate"] == 1
    assert "full_certificate" not in callback.budget.runs


def small_cnn() -> nn.Sequential:
    """A ReLU CNN on the regression data (D_IN features seen as a 1 x 2 x 3 image)."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 2, 3)),
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, D_OUT),
    )


def cnn_truth(net: nn.Module) -> float:
    """AutoLip's exact value for :func:`small_cnn`: the product of the float64 operator norms
    of its affine layers (each one's Jacobian at zero: bias-free by linearity)."""
    (sequential,) = [m for m in net.modules() if isinstance(m, nn.Sequential)]
    x = torch.zeros(1, D_IN, dtype=torch.float64)
    product = 1.0
    for layer in copy.deepcopy(sequential).double():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            J = jacobian(layer, x).reshape(-1, x.numel())
            product *= float(torch.linalg.matrix_norm(J, 2))
        x = layer(x)
    return product


@pytest.mark.usefixtures("seeded")
def test_a_quick_first_anchor_is_upgraded_by_a_full_one(tmp_path, monkeypatch):
    """A quick first anchor that left the convolutions to looser certificates (the dense
    limit and the Gram test's cost budget set to zero here: their torus bounds) is replaced
    by a full certificate at the next certified step (no budget: at once), after which the
    increments go on from the full anchor; every value is above the exact AutoLip of the
    weights it certifies."""
    monkeypatch.setattr(ladder_module, "QUICK_DENSE_FLOPS", 0.0)
    monkeypatch.setattr(ladder_module, "GRAM_COST_RATIO", 0.0)
    monkeypatch.setattr(ladder_module, "GRAM_FREE_COST", 0.0)
    callback = Recording(
        truth=cnn_truth,
        methods=["autolip"],
        every_n_train_steps=1,
        max_overhead=None,
        recertify_slack=1e9,
    )
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [callback], max_steps=6, logger=logger)
    trainer.fit(RegressionModule(small_cnn(), lr=0.05), loader())
    rows = lipschitz_rows(logger)
    quick = [int(r["step"]) + 1 for r in rows if r.get("lipschitz/quick_certificate_time_s")]
    full = [int(r["step"]) + 1 for r in rows if r.get("lipschitz/full_certificate_time_s")]
    assert (quick, full) == ([1], [2])
    assert [kind for kind, _, _ in callback.seen] == ["full"] * 2 + ["incremental"] * 4
    for kind, value, exact in callback.seen:
        assert value >= exact, (kind, value, exact)
    ratios = [value / exact for _, value, exact in callback.seen]
    # the torus bounds of the quick anchor on 2 x 3 maps are loose (measured 1.65x); the full
    # anchor is exact up to rounding (dense certificates), its increments in between
    assert ratios[0] > 1.2 and ratios[1] < 1 + 1e-6 and max(ratios[2:]) < ratios[0], ratios
    assert callback.last_metrics["lipschitz/full_certificates"] == 2
    assert not callback._anchor_is_quick


@pytest.mark.usefixtures("seeded")
def test_an_uncertified_quick_certificate_hands_over_to_full_ones(tmp_path, monkeypatch):
    """When the quick ladder cannot certify (here: a ladder of the estimate alone), the quick
    row is switched off with one warning and the full certificate anchors at the next step;
    the fit goes on certified."""
    monkeypatch.setattr(methods_module, "quick_ladder", lambda: [ladder_module.estimate])
    callback = Recording(methods=["autolip"], every_n_train_steps=1, max_overhead=None)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [callback], max_steps=5, logger=logger)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(RegressionModule(lr=0.05), loader())
    notes = [w for w in callback_warnings(records) if "quick certificate" in w]
    assert len(notes) == 1 and "Full certificates take its place" in notes[0]
    rows = lipschitz_rows(logger)
    full = [int(r["step"]) + 1 for r in rows if r.get("lipschitz/full_certificate_time_s")]
    certified = [int(r["step"]) + 1 for r in rows if r.get("lipschitz/autolip_certified")]
    assert (full, certified) == ([2], [2, 3, 4, 5])
    assert "quick_certificate" in callback._disabled
    assert all(value >= exact for _, value, exact in callback.seen)


class EstimateRecording(LipschitzCallback):
    """Counts the estimator's own runs and records every logged estimate with the exact
    AutoLip of the weights at that step (float64 norm product)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.estimator_runs = 0
        self.estimates: list[tuple[float, float]] = []

    def _run_estimator(self, network):
        self.estimator_runs += 1
        return super()._run_estimator(network)

    def _autolip_estimate(self, network):
        computed = super()._autolip_estimate(network)
        self.estimates.append((computed.value, norm_product(self._network_cache)))
        return computed


@pytest.mark.usefixtures("seeded")
def test_certificates_answer_the_estimate_of_their_step(tmp_path):
    """A certified value at every step: the certificate (full, then incremental) runs the
    chains' Lanczos estimates anyway, so the estimator runs only once, for the fit's first
    (cold) estimate; every logged estimate is still the AutoLip estimate of that step's
    weights: within the Lanczos tolerance of the exact product of norms (an estimate, it may
    sit a float32 rounding above it)."""
    callback = EstimateRecording(
        methods=["autolip"], every_n_train_steps=1, max_overhead=None, tol=1e-6
    )
    trainer = make_trainer(tmp_path, [callback], max_steps=8)
    trainer.fit(RegressionModule(make_mlp((D_IN, 40, 40, D_OUT)), lr=0.1), loader())
    assert callback.estimator_runs == 1
    assert len(callback.estimates) == 8
    for value, exact in callback.estimates:
        assert value == pytest.approx(exact, rel=1e-4), (value, exact)
        assert value <= exact * (1 + 1e-5)
    assert callback.budget.runs["autolip"] == 1  # answered estimates are not timed


@pytest.mark.usefixtures("seeded")
def test_a_grown_slack_re_anchors(tmp_path):
    """recertify_slack: once the increments' slack grew by more than it since the anchor, the
    next certified value is a full certificate (a new anchor); never below the exact value."""
    tight = Recording(
        methods=["autolip"], every_n_train_steps=1, max_overhead=None, recertify_slack=1e-12
    )
    trainer = make_trainer(tmp_path, [tight], max_steps=6)
    trainer.fit(RegressionModule(lr=0.2), loader())
    kinds = [kind for kind, _, _ in tight.seen]
    # anchor, increment (its slack grew: the weights moved), anchor, increment, ...
    assert kinds == ["full", "incremental"] * 3
    assert all(value >= exact for _, value, exact in tight.seen)
    assert tight.last_metrics["lipschitz/full_certificates"] == 3
    # every anchor from the quick certificate: nothing was left to a looser certificate
    # (lone dense weights), so it is as tight as a full one and no upgrade is wanted
    assert tight.budget.runs["quick_certificate"] == 3
    assert "full_certificate" not in tight.budget.runs


def test_the_anchor_is_per_fit_and_never_checkpointed(tmp_path):
    callback = Recording(methods=["autolip"], every_n_train_steps=1, max_overhead=None)
    trainer = make_trainer(tmp_path, [callback], max_steps=3)
    trainer.fit(RegressionModule(), loader())
    assert callback._anchor is not None
    assert "anchor" not in str(sorted(callback.state_dict()))
    second = make_trainer(tmp_path / "second", [callback], max_steps=2)
    callback.seen.clear()
    second.fit(RegressionModule(), loader())  # another network: a new anchor first
    assert callback.seen[0][0] == "full"
