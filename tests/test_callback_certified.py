"""``lipschitz/certified``: the callback's tightest certified value, in a real fit."""

from __future__ import annotations

import warnings

import torch

import lipreg.callback_methods as methods_module
from lipreg import LipschitzCallback
from tests._lightning_helpers import D_IN, RegressionModule, callback_warnings, loader, make_trainer
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
