"""Tests of ``lipreg.callback.LipschitzCallback``: DDP, options refused at construction,
failures reported (never raised), and networks built in ``configure_model``.

Real ``lightning.pytorch`` Trainers on CPU, as in ``test_callback.py`` (split from it);
ground truths are independent of lipreg (products of the layers' float64 spectral norms).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lipreg.callback import LipschitzCallback
from tests._lightning_helpers import (
    RegressionModule,
    csv_step,
    fit_recording,
    lipschitz_rows,
    loader,
    make_mlp,
    make_trainer,
    norm_product,
    rel,
)
from tests.helpers import Residual

torch.set_num_threads(1)
# Every test starts from the same global RNG state (weights independent of test order).
pytestmark = pytest.mark.usefixtures("seeded")

TESTS_DIR = Path(__file__).resolve().parent


# ---------------------------------------------------------------- 1. DDP
@pytest.mark.slow
def test_ddp_spawn_two_cpu_ranks_agree(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(var, None)
    # run_ddp (tests/_lightning_helpers.py) builds the callback with max_overhead=None: the
    # step cadences of its 6-step fit are asserted below
    code = f"import _lightning_helpers as h; h.run_ddp({str(tmp_path)!r})"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the DDP workers die with it
    )
    try:
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"DDP run did not finish in 120 s:\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [6, 6]
    assert ranks[0]["pid"] != ranks[1]["pid"]  # two processes
    m0, m1 = ranks[0]["last_metrics"], ranks[1]["last_metrics"]
    assert "lipschitz/autolip" in m0 and "lipschitz/lower_bound" in m0
    assert m0 == m1  # exactly the same floats (rank 0's, broadcast)
    assert ranks[0]["callback_metrics"] == ranks[1]["callback_metrics"]
    # callback_metrics also keeps keys of earlier steps (the full certificate's time at the
    # anchor step); the last step's values are there, unchanged
    assert {k: ranks[0]["callback_metrics"][k] for k in m0} == m0

    (metrics_csv,) = (tmp_path / "ddp").glob("version_*/metrics.csv")
    with open(metrics_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lipschitz/autolip")]
    # each step once (rank 0 writes), at Lightning's index of optimizer steps 2, 4, 6
    assert [int(r["step"]) for r in rows] == [csv_step(s) for s in (2, 4, 6)]
    assert float(rows[-1]["lipschitz/autolip"]) == pytest.approx(m0["lipschitz/autolip"], rel=1e-12)


# ---------------------------------------------------------------- 2. options and failures
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"methods": ["autolip", "sqlip"]}, ValueError, r"methods must be .*'sqlip'"),
        ({"methods": "upper_bound"}, ValueError, "methods must be"),
        ({"methods": []}, ValueError, "methods must be"),
        ({"methods": ["autolip", 3]}, TypeError, "methods must be"),
        ({"methods": 3}, TypeError, r"methods must be .*got 3 \(int\)"),
        ({"every_n_train_steps": 0}, ValueError, "every_n_train_steps must be an int >= 1"),
        ({"every_n_train_steps": -3}, ValueError, "every_n_train_steps must be"),
        ({"every_n_train_steps": 2.0}, TypeError, r"every_n_train_steps .*got 2.0 \(float\)"),
        ({"every_n_train_steps": True}, TypeError, "every_n_train_steps must be"),
        ({"every_n_train_steps": None, "every_n_epochs": 0}, ValueError, "every_n_epochs"),
        ({"every_n_train_steps": None, "every_n_epochs": None}, ValueError, "both None"),
        ({"every_n_epochs": "1"}, TypeError, "every_n_epochs must be"),
        ({"on_nonfinite": "ignore"}, ValueError, r"on_nonfinite must be one of \['warn'"),
        ({"on_nonfinite": None}, TypeError, "on_nonfinite must be"),
        ({"seqlip_method": "fast"}, ValueError, r"seqlip_method .*'fast'"),
        ({"seqlip_top_k": 0}, ValueError, r"seqlip_top_k must be an int >= 1 or None, got 0"),
        ({"seqlip_top_k": "x"}, TypeError, "seqlip_top_k must be .*'x' \\(str\\)"),
        ({"seqlip_max_iter": 0}, ValueError, r"seqlip_max_iter must be an int >= 1, got 0"),
        ({"seed": "x"}, TypeError, r"seed must be an int >= 0, got 'x'"),
        ({"seed": -1}, ValueError, "seed must be an int >= 0"),
        ({"seed": 1.5}, TypeError, "seed must be"),
        ({"tol": -1}, ValueError, r"tol must be a positive finite number .*got -1"),
        ({"tol": 0.0}, ValueError, "tol must be"),
        ({"tol": math.nan}, ValueError, "tol must be"),
        ({"tol": "1e-4"}, TypeError, "tol must be"),
        ({"max_iter": 0}, ValueError, "max_iter must be an int >= 1"),
        ({"max_iter": 10.0}, TypeError, "max_iter must be"),
        ({"lower_bound_points": 1.5}, TypeError, r"lower_bound_points .*got 1.5 \(float\)"),
        ({"lower_bound_points": -1}, ValueError, "lower_bound_points must be an int >= 0"),
        ({"certify_dense_limit": -3}, ValueError, r"certify_dense_limit .*got -3"),
        ({"certify_dense_limit": None}, TypeError, "certify_dense_limit must be"),
        ({"certify_every_n_train_steps": -1}, ValueError, "certify_every_n_train_steps"),
        ({"seqlip_every_n_train_steps": "5"}, TypeError, "seqlip_every_n_train_steps"),
        ({"log_layers": "yes"}, TypeError, r"log_layers must be True or False, got 'yes'"),
        ({"log_layers": 1}, TypeError, "log_layers must be"),
        ({"model_attr": 3}, TypeError, r"model_attr must be .*got 3 \(int\)"),
        ({"model_attr": ""}, ValueError, "model_attr must be"),
        ({"model_attr": "net.0"}, ValueError, "model_attr must be"),
        ({"input_shape": (0, 28)}, ValueError, r"input_shape must be .*\(0, 28\)"),
        ({"input_shape": ()}, ValueError, "input_shape must be"),
        ({"input_shape": (1.0, 28)}, ValueError, "input_shape must be"),
        ({"input_shape": "28"}, TypeError, "input_shape must be"),
        ({"input_shape": torch.zeros(3)}, TypeError, "input_shape must be"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        LipschitzCallback(**kwargs)
    assert str(info.value).startswith("LipschitzCallback: ")


def test_good_arguments_are_accepted():
    callback = LipschitzCallback(
        "lower_bound", 5, 2, input_shape=torch.Size([1, 8, 8]), model_attr="model.encoder"
    )
    assert callback.methods == ["lower_bound"]
    assert callback.input_shape == (1, 8, 8)
    assert LipschitzCallback(input_shape=6).input_shape == (6,)
    assert LipschitzCallback(methods=("autolip", "autolip")).methods == ["autolip"]


class Square(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y * y


class Normed(nn.Module):
    """A LayerNorm: refused by AutoLip (not globally Lipschitz), differentiable."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


class PerSampleLoop(nn.Module):
    """Iterates over the batch in Python: torch.fx cannot trace it; autograd can."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.net(sample) for sample in x])


@pytest.mark.parametrize(
    ("net", "cause"),
    [
        (Square, "product of two input-dependent tensors"),
        (Normed, "LayerNorm"),
    ],
    ids=["x*x", "layernorm"],
)
@pytest.mark.parametrize("input_shape", [None, (6,)], ids=["inferred", "given"])
def test_refused_model_warns_once_and_keeps_the_lower_bound(tmp_path, net, cause, input_shape):
    callback = LipschitzCallback(
        methods=["autolip", "seqlip", "lower_bound"],
        every_n_train_steps=2,
        input_shape=input_shape,
        lower_bound_points=4,
        max_overhead=None,
    )
    module = RegressionModule(net())
    trainer = make_trainer(tmp_path, [callback], max_steps=4)
    messages = fit_recording(trainer, module, loader())
    assert trainer.global_step == 4
    (message,) = messages
    assert "AutoLip cannot bound RegressionModule at input shape (6,): " in message
    assert "UnsupportedOperationError" in message and cause in message
    assert (
        "Switched off ['autolip', 'seqlip']" in message and "['lower_bound'] still run" in message
    )
    assert callback.last_metrics["lipschitz/lower_bound"] > 0
    assert not any(k.startswith("lipschitz/autolip") for k in trainer.callback_metrics)
    assert math.isfinite(float(trainer.callback_metrics["lipschitz/lower_bound"]))


def test_refused_model_at_zero_config_falls_back_to_the_lower_bound(tmp_path):
    callback = LipschitzCallback(every_n_train_steps=2, lower_bound_points=4, max_overhead=None)
    trainer = make_trainer(tmp_path, [callback], max_steps=4)
    (message,) = fit_recording(trainer, RegressionModule(Normed()), loader())
    assert "LayerNorm" in message and "Falling back to lipschitz/lower_bound" in message
    assert callback.methods == ["lower_bound"]
    assert float(trainer.callback_metrics["lipschitz/lower_bound"]) > 0


def test_only_autolip_refused_switches_the_callback_off(tmp_path):
    callback = LipschitzCallback(methods=["autolip"], every_n_train_steps=2)
    trainer = make_trainer(tmp_path, [callback], max_steps=4)
    (message,) = fit_recording(trainer, RegressionModule(Square()), loader())
    assert "product of two input-dependent tensors" in message
    assert "methods=['lower_bound'] works for any differentiable network" in message
    assert "The callback is off for this fit; training continues." in message
    assert trainer.global_step == 4
    assert callback.last_metrics == {}


def test_lower_bound_alone_never_traces(tmp_path, monkeypatch):
    """methods=["lower_bound"] works on a network fx cannot trace, without AutoLip."""

    def no_autolip(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("AutoLip was prepared although only the lower bound was asked")

    monkeypatch.setattr("lipreg.callback.AutoLip", no_autolip)
    callback = LipschitzCallback(
        methods="lower_bound", every_n_train_steps=2, lower_bound_points=4, max_overhead=None
    )
    trainer = make_trainer(tmp_path, [callback], max_steps=4)
    module = RegressionModule(PerSampleLoop())
    assert fit_recording(trainer, module, loader()) == []
    lb = callback.last_metrics["lipschitz/lower_bound"]
    assert 0 < lb <= norm_product(module.net.net) * (1 + 1e-9)


def test_a_failing_method_is_reported_once_and_the_others_go_on(tmp_path, monkeypatch):
    calls = []

    def broken_seqlip(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        raise RuntimeError("simulated SeqLip bug")

    monkeypatch.setattr("lipreg.callback_methods.seqlip", broken_seqlip)
    callback = LipschitzCallback(
        methods=["autolip", "seqlip", "lower_bound"],
        every_n_train_steps=2,
        seqlip_every_n_train_steps=2,
        certify_every_n_train_steps=2,  # everything at step 6: no separate fit-end row
        lower_bound_points=4,
        max_overhead=None,
    )
    logger = CSVLogger(tmp_path, name="csv")
    module = RegressionModule()
    trainer = make_trainer(tmp_path, [callback], max_steps=6, logger=logger)
    (message,) = fit_recording(trainer, module, loader())
    assert "computing lipschitz/seqlip failed at step 2: RuntimeError: simulated SeqLip bug" in (
        message
    )
    assert "switched off for the rest of this fit" in message
    assert len(calls) == 1  # switched off after the failure
    rows = lipschitz_rows(logger)
    assert [int(r["step"]) for r in rows] == [csv_step(s) for s in (2, 4, 6)]
    assert all(r["lipschitz/autolip"] and r["lipschitz/lower_bound"] for r in rows)
    assert all(not r.get("lipschitz/seqlip") for r in rows)
    assert rel(callback.last_metrics["lipschitz/autolip"], norm_product(module.net)) < 1e-3


def test_explicit_seqlip_on_a_residual_network_is_switched_off(tmp_path):
    callback = LipschitzCallback(methods=["autolip", "seqlip"], every_n_train_steps=2)
    trainer = make_trainer(tmp_path, [callback], max_steps=2)
    (message,) = fit_recording(trainer, RegressionModule(Residual()), loader())
    assert "asks for SeqLip" in message and "applies to sequential networks" in message
    assert "lipschitz/autolip" in callback.last_metrics
    assert "lipschitz/seqlip" not in callback.last_metrics


def test_missing_model_attr_switches_the_callback_off(tmp_path):
    callback = LipschitzCallback(every_n_train_steps=1, model_attr="encoder")
    trainer = make_trainer(tmp_path, [callback], max_steps=2)
    (message,) = fit_recording(trainer, RegressionModule(), loader())
    assert "model_attr='encoder': expected an nn.Module attribute of RegressionModule" in message
    assert "net (Sequential" in message and "model_attr='net'" in message
    assert trainer.global_step == 2 and callback.last_metrics == {}


def test_wrong_input_shape_is_reported_not_raised(tmp_path):
    callback = LipschitzCallback(every_n_train_steps=1, input_shape=(5,))
    trainer = make_trainer(tmp_path, [callback], max_steps=2)
    (message,) = fit_recording(trainer, RegressionModule(), loader())
    assert "input_shape=(5,) does not fit RegressionModule" in message
    assert "batch[0]: float32 (4, 6), batch[1]: float32 (4, 3)" in message
    assert "The callback is off for this fit; training continues." in message
    assert trainer.global_step == 2 and callback.last_metrics == {}


def test_residual_network_default_methods_drop_seqlip(tmp_path):
    callback = LipschitzCallback(every_n_train_steps=2, input_shape=(6,))
    module = RegressionModule(Residual())
    trainer = make_trainer(tmp_path, [callback], max_steps=2)
    trainer.fit(module, loader())
    assert callback.methods == ["autolip"]
    # AutoLip of x + relu(fc(x)) then out: |out| (1 + |fc|).
    fc, out = (
        torch.linalg.matrix_norm(m.weight.detach().double(), 2).item()
        for m in (module.net.fc, module.net.out)
    )
    assert rel(callback.last_metrics["lipschitz/autolip"], out * (1 + fc)) < 1e-3


def test_nan_weights_warn_and_log_nan(tmp_path):
    callback = LipschitzCallback(every_n_train_steps=3, max_overhead=None)  # exact cadence
    logger = CSVLogger(tmp_path, name="csv")
    module = RegressionModule(lr=0.01, nan_at_step=4)  # NaN appears during step 5
    trainer = make_trainer(tmp_path, [callback], max_steps=9, logger=logger)
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.fit(module, loader())
    assert trainer.global_step == 9  # the run finished

    rows = {int(r["step"]): r for r in lipschitz_rows(logger) if r["lipschitz/autolip"]}
    assert sorted(rows) == [csv_step(s) for s in (3, 6, 9)]
    assert math.isfinite(float(rows[csv_step(3)]["lipschitz/autolip"]))
    assert math.isnan(float(rows[csv_step(6)]["lipschitz/autolip"]))
    assert math.isnan(callback.last_metrics["lipschitz/autolip"])
    assert math.isnan(float(trainer.callback_metrics["lipschitz/autolip"]))


def test_nan_weights_raise_when_asked(tmp_path):
    callback = LipschitzCallback(every_n_train_steps=3, on_nonfinite="raise", max_overhead=None)
    module = RegressionModule(lr=0.01, nan_at_step=4)
    trainer = make_trainer(tmp_path, [callback], max_steps=9)
    with pytest.raises(FloatingPointError):
        trainer.fit(module, loader())
    assert trainer.global_step == 6


class RaisesNonFinite(LipschitzCallback):
    """Its estimate raises the core's non-finite error (as ``lipreg.autolip`` does on a
    non-finite result) from the third call on."""

    calls = 0

    def _run_estimator(self, network):
        self.calls += 1
        if self.calls >= 3:
            raise ValueError("non-finite value in the AutoLip result of layer 'fc'")
        return super()._run_estimator(network)


def test_a_non_finite_error_of_a_method_is_logged_as_nan_and_training_goes_on(tmp_path):
    callback = RaisesNonFinite(  # the estimator alone (no certificate answers it)
        methods=["autolip"],
        every_n_train_steps=2,
        certify_every_n_train_steps=0,
        compute_at_fit_end=False,
        max_overhead=None,
    )
    trainer = make_trainer(tmp_path, [callback], max_steps=8)
    with pytest.warns(UserWarning, match="non-finite value in the AutoLip result"):
        trainer.fit(RegressionModule(lr=0.01), loader())
    assert trainer.global_step == 8
    assert math.isnan(callback.last_metrics["lipschitz/autolip"])
    assert "autolip" not in callback._disabled  # a non-finite value is logged, not switched off


@pytest.mark.parametrize("kwargs", [{"tol": -1.0}, {"max_iter": 0}])
def test_invalid_iteration_options_rejected_before_training(tmp_path, kwargs):
    with pytest.raises(ValueError):
        callback = LipschitzCallback(every_n_train_steps=1, input_shape=(6,), **kwargs)
        module = RegressionModule(fail_if_trained=True)  # AssertionError if a step runs
        make_trainer(tmp_path, [callback], max_steps=1).fit(module, loader())


# ---------------------------------------------------------------- 3. configure_model
class LazyModule(RegressionModule):
    """Builds its network in ``configure_model`` (Lightning's pattern for large models)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = make_mlp()


def test_configure_model_network_with_inferred_input_shape(tmp_path):
    callback = LipschitzCallback(methods=["autolip"], every_n_train_steps=3)
    module = LazyModule()
    make_trainer(tmp_path, [callback], max_steps=3).fit(module, loader())
    assert rel(callback.last_metrics["lipschitz/autolip"], norm_product(module.net)) < 1e-3


@pytest.mark.parametrize("model_attr", [None, "net"])
def test_configure_model_network_with_given_input_shape(tmp_path, model_attr):
    callback = LipschitzCallback(
        methods=["autolip"], every_n_train_steps=3, input_shape=(6,), model_attr=model_attr
    )
    module = LazyModule()
    make_trainer(tmp_path, [callback], max_steps=3).fit(module, loader())
    assert rel(callback.last_metrics["lipschitz/autolip"], norm_product(module.net)) < 1e-3
