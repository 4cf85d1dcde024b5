"""Tests of ``lipreg.callback.LipschitzCallback`` inside real Lightning runs.

Real ``lightning.pytorch`` Trainers on CPU, real CSVLoggers and checkpoints under ``tmp_path``,
small regression data written here. Ground truths are independent of lipreg: for MLPs made of
Linear + ReLU layers, AutoLip is the product of the layers' spectral norms, computed with
``torch.linalg.matrix_norm(W.double(), 2)`` from the final weights.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lipreg
from lipreg.callback import LipschitzCallback, layer_key
from tests._lightning_helpers import (
    RegressionModule,
    capture_logs,
    csv_rows,
    csv_step,
    fit_recording,
    linear_norms,
    lipschitz_rows,
    loader,
    make_mlp,
    make_trainer,
    norm_product,
    rel,
    saved_callback_state,
)
from tests.helpers import Residual

torch.set_num_threads(1)
# Every test starts from the same global RNG state (weights independent of test order).
pytestmark = pytest.mark.usefixtures("seeded")

TESTS_DIR = Path(__file__).resolve().parent
N_AFFINE = 3  # make_mlp(): three Linear layers
# A warm Lanczos restart converges in a few products per layer: the residual stopping rule
# (power_iteration.py) needs about three after a small weight change.
WARM_PRODUCTS = 3 * N_AFFINE
# max_overhead=None: the step cadences alone (every test of a schedule turns the cost budget
# off: a few-step fit of a tiny MLP cannot afford a certificate within 5 % of its time; the
# budget has its own tests in test_callback_budget.py)
EVERY_METHOD_EVERY_3_STEPS = {
    "max_overhead": None,
    "methods": ["autolip", "seqlip", "lower_bound"],
    "every_n_train_steps": 3,
    "certify_every_n_train_steps": 3,
    "seqlip_every_n_train_steps": 3,
    "lower_bound_points": 4,
}


def assert_plain(obj: Any, where: str = "state") -> None:
    """Only plain tensors, numbers, strings, lists, dicts (str keys) and None, recursively."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return
    if isinstance(obj, torch.Tensor):
        assert type(obj) is torch.Tensor, f"{where}: {type(obj).__name__}, not a plain tensor"
        assert not obj.requires_grad, f"{where} requires grad"
        assert obj.device.type == "cpu", f"{where} on {obj.device}"
        return
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            assert_plain(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert isinstance(key, str), f"{where}: non-str key {key!r}"
            assert_plain(value, f"{where}[{key!r}]")
        return
    raise AssertionError(f"{where}: {type(obj).__name__} is not a plain type")


# ---------------------------------------------------------------- 1. cadence, keys, values
class AtStepSeven(LipschitzCallback):
    """A user schedule: AutoLip and its certificate at step 7 only."""

    def should_compute(self, method: str, step: int, epoch: int) -> bool:
        return step == 7 and method in ("autolip", "autolip_certified")


def test_an_overridden_schedule_is_the_only_gate(tmp_path):
    """should_compute is the one gate: a step that no default cadence selects (7 with
    every_n_train_steps=5) computes exactly the methods the override returns True for."""
    # compute_at_fit_end (a documented addition beside the gate) is off: the gate alone
    callback = AtStepSeven(
        every_n_train_steps=5,
        methods=["autolip", "seqlip"],
        compute_at_fit_end=False,
        max_overhead=None,
    )
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [callback], max_steps=10, logger=logger, log_every_n_steps=50)
    trainer.fit(RegressionModule(), loader())
    rows = lipschitz_rows(logger)
    assert [int(r["step"]) for r in rows] == [csv_step(7)]
    assert callback.last_step == 7
    keys = {k for k, v in rows[0].items() if v and k.startswith("lipschitz/")}
    assert {"lipschitz/autolip", "lipschitz/autolip_certified"} <= keys
    assert not any(k.startswith("lipschitz/seqlip") for k in keys)


def test_cadence_keys_and_direct_logging(tmp_path):
    """Rows exactly at steps 3, 6, 9 and at the fit end (10) of a 10-step run although
    log_every_n_steps=50 (at Lightning's step index of those optimizer steps)."""
    callback = LipschitzCallback(
        every_n_train_steps=3, seqlip_every_n_train_steps=3, max_overhead=None
    )
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [callback], max_steps=10, logger=logger, log_every_n_steps=50)
    trainer.fit(RegressionModule(), loader())
    assert trainer.global_step == 10

    rows = lipschitz_rows(logger)
    assert [int(r["step"]) for r in rows] == [csv_step(s) for s in (3, 6, 9, 10)]
    keys = {k for r in rows for k, v in r.items() if v and k.startswith("lipschitz/")}
    required = {
        "lipschitz/autolip",
        "lipschitz/seqlip",
        "lipschitz/seqlip_over_autolip",
        "lipschitz/autolip_iterations",
        "lipschitz/autolip_time_s",
    }
    assert required <= keys
    layer_keys = sorted(k for k in keys if k.startswith("lipschitz/layer/"))
    assert len(layer_keys) == N_AFFINE
    *cadence_rows, end = rows
    # the fit end adds the AutoLip estimate and certificate only (FIT_END), not SeqLip
    autolip_keys = [k for k in [*required, *layer_keys] if "seqlip" not in k]
    assert all(end[k] != "" for k in autolip_keys) and end["lipschitz/autolip_certified"], end
    assert not end["lipschitz/seqlip"], end
    for r in cadence_rows:  # every cadence row holds every key
        assert all(r[k] != "" for k in [*required, *layer_keys]), r
        assert float(r["lipschitz/seqlip_over_autolip"]) == pytest.approx(
            float(r["lipschitz/seqlip"]) / float(r["lipschitz/autolip"]), rel=1e-9
        )
        assert float(r["lipschitz/autolip_iterations"]) >= 1
        assert float(r["lipschitz/autolip_time_s"]) >= 0

    # The last row is what the callback computed last, and callback_metrics mirrors it.
    last = callback.last_metrics
    assert float(rows[-1]["lipschitz/autolip"]) == pytest.approx(
        last["lipschitz/autolip"], rel=1e-12
    )
    for key, value in last.items():
        mirrored = trainer.callback_metrics[key]
        assert isinstance(mirrored, torch.Tensor), key
        assert float(mirrored) == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_lower_bound_method_logs_its_key(tmp_path):
    callback = LipschitzCallback(methods=["lower_bound"], every_n_train_steps=3, max_overhead=None)
    logger = CSVLogger(tmp_path, name="csv")
    module = RegressionModule()
    trainer = make_trainer(tmp_path, [callback], max_steps=6, logger=logger)
    trainer.fit(module, loader())

    rows = lipschitz_rows(logger)
    assert [int(r["step"]) for r in rows] == [csv_step(3), csv_step(6)]
    assert all(r["lipschitz/lower_bound"] for r in rows)
    assert "lipschitz/autolip" not in callback.last_metrics
    lb = callback.last_metrics["lipschitz/lower_bound"]
    # A certified lower bound of a ReLU MLP: 0 < lb <= L <= product of the layer norms.
    assert 0 < lb <= norm_product(module.net) * (1 + 1e-9)
    assert float(trainer.callback_metrics["lipschitz/lower_bound"]) == pytest.approx(lb, rel=1e-6)


def test_model_checkpoint_can_monitor_autolip(tmp_path):
    callback = LipschitzCallback(methods=["autolip"], every_n_train_steps=3)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt",
        monitor="lipschitz/autolip",
        mode="min",
        save_top_k=1,
        every_n_train_steps=3,
    )
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [callback, checkpoint], max_steps=9, logger=logger)
    trainer.fit(RegressionModule(lr=0.1), loader())

    # CSV step -> global step; the fit end adds a row with the certificate alone
    global_steps = {csv_step(s): s for s in (3, 6, 9)}
    rows = [r for r in lipschitz_rows(logger) if r["lipschitz/autolip"]]
    values = {global_steps[int(r["step"])]: float(r["lipschitz/autolip"]) for r in rows}
    assert sorted(values) == [3, 6, 9]
    best_step = min(values, key=values.get)
    assert checkpoint.best_model_score is not None
    assert float(checkpoint.best_model_score) == pytest.approx(values[best_step], rel=1e-6)
    assert Path(checkpoint.best_model_path).is_file()
    saved = torch.load(checkpoint.best_model_path, weights_only=True)
    assert saved["global_step"] == best_step


def test_final_values_match_product_of_spectral_norms(tmp_path):
    """At the last step the estimate, the per-layer norms and the certificate match the
    product of the final weights' spectral norms."""
    callback = LipschitzCallback(
        every_n_train_steps=3, certify_every_n_train_steps=3, model_attr="net"
    )
    module = RegressionModule(lr=0.2)
    initial = norm_product(module.net)
    trainer = make_trainer(tmp_path, [callback], max_steps=9)
    trainer.fit(module, loader())
    assert trainer.global_step == 9  # the last estimate is at the final weights

    truth = norm_product(module.net)
    assert rel(truth, initial) > 1e-3  # training moved the weights: a stale value would fail
    m = callback.last_metrics
    assert rel(m["lipschitz/autolip"], truth) < 1e-3
    cert = m["lipschitz/autolip_certified"]
    assert truth * (1 - 1e-9) <= cert <= truth * (1 + 1e-6)
    layer_values = [m[k] for k in sorted(m) if k.startswith("lipschitz/layer/")]
    layer_truth = linear_norms(module.net)
    assert len(layer_values) == len(layer_truth) == N_AFFINE
    for est, exact in zip(layer_values, layer_truth, strict=True):
        assert rel(est, exact) < 1e-3


def test_every_n_epochs(tmp_path):
    callback = LipschitzCallback(every_n_train_steps=None, every_n_epochs=1, max_overhead=None)
    logger = CSVLogger(tmp_path, name="csv")
    module = RegressionModule()
    trainer = make_trainer(tmp_path, [callback], max_epochs=2, logger=logger)
    trainer.fit(module, loader(n=40, batch_size=8))  # 5 steps per epoch

    assert [int(r["step"]) for r in lipschitz_rows(logger)] == [csv_step(5), csv_step(10)]
    assert rel(callback.last_metrics["lipschitz/autolip"], norm_product(module.net)) < 1e-3


@pytest.mark.parametrize("dict_batches", [False, True], ids=["tuple-batch", "dict-batch"])
def test_input_shape_inferred_from_first_batch(tmp_path, dict_batches):
    callback = LipschitzCallback(methods=["autolip"], every_n_train_steps=3)
    assert callback.input_shape is None
    module = RegressionModule()
    trainer = make_trainer(tmp_path, [callback], max_steps=3)
    trainer.fit(module, loader(dict_batches=dict_batches))

    assert tuple(callback.input_shape) == (6,)
    assert rel(callback.last_metrics["lipschitz/autolip"], norm_product(module.net)) < 1e-3


# ---------------------------------------------------------------- 2. never perturbs training
def _seeded_run(root: Path, with_callback: bool) -> tuple[dict[str, torch.Tensor], Any, dict]:
    pl.seed_everything(1234, verbose=False)
    module = RegressionModule(make_mlp(dropout=0.3, batchnorm=True), lr=0.1)
    callbacks = []
    callback = None
    if with_callback:
        callback = LipschitzCallback(
            methods=["autolip", "seqlip", "lower_bound"],
            every_n_train_steps=2,
            certify_every_n_train_steps=2,
            lower_bound_points=4,
            max_overhead=None,
        )
        callbacks.append(callback)
    trainer = make_trainer(root, callbacks, max_epochs=2)
    # shuffle=True draws the permutation from the global RNG: a callback consuming it would
    # change the second epoch's order (and the dropout masks).
    trainer.fit(module, loader(n=40, batch_size=8, shuffle=True))
    assert trainer.global_step == 10
    if callback is not None:
        assert "lipschitz/lower_bound" in callback.last_metrics  # it did run
        assert "lipschitz/autolip_certified" in callback.last_metrics
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return state, rng, {"training": module.training}


def test_callback_never_perturbs_training(tmp_path):
    state_a, rng_a, mode_a = _seeded_run(tmp_path / "a", with_callback=False)
    state_b, rng_b, mode_b = _seeded_run(tmp_path / "b", with_callback=True)

    assert state_a.keys() == state_b.keys()
    assert any("running_mean" in k for k in state_a)  # BatchNorm buffers are compared too
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert torch.equal(rng_a[0], rng_b[0])
    assert rng_a[1][0] == rng_b[1][0] and np.array_equal(rng_a[1][1], rng_b[1][1])
    assert rng_a[1][2:] == rng_b[1][2:]
    assert rng_a[2] == rng_b[2]
    assert mode_a == mode_b


# ---------------------------------------------------------------- 3. checkpoint resume
class ColdLipschitzCallback(LipschitzCallback):
    """Same estimator, but ignores any checkpointed state (a cold start after resume)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _resume(ckpt: str, root: Path, callback: LipschitzCallback, max_steps: int) -> float:
    module = RegressionModule(lr=0.02)
    trainer = make_trainer(root, [callback], max_steps=max_steps)
    trainer.fit(module, loader(), ckpt_path=ckpt)
    assert trainer.global_step == max_steps
    return norm_product(module.net)


CONFIG = {"methods": ["autolip", "seqlip"], "every_n_train_steps": 2}


def six_step_checkpoint(root: Path, **options: Any) -> tuple[LipschitzCallback, Path]:
    """Fit 6 steps with a callback of ``options`` (default :data:`CONFIG`) and save a
    checkpoint; return the callback and the checkpoint's path."""
    first = LipschitzCallback(**(options or CONFIG))
    trainer = make_trainer(root / "first", [first], max_steps=6)
    trainer.fit(RegressionModule(lr=0.02), loader())
    ckpt = root / "six.ckpt"
    trainer.save_checkpoint(ckpt)
    return first, ckpt


def rewrite_state(ckpt: Path, change: Any) -> None:
    """Replace the checkpoint's LipschitzCallback entry by ``change(entry)``."""
    saved, key = saved_callback_state(ckpt)
    saved["callbacks"][key] = change(saved["callbacks"][key])
    torch.save(saved, ckpt)


def test_checkpoint_resume_continues_warm(tmp_path):
    callback = LipschitzCallback(**CONFIG)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    trainer = make_trainer(tmp_path / "first", [callback, checkpoint], max_steps=6)
    trainer.fit(RegressionModule(lr=0.02), loader())
    ckpt = checkpoint.best_model_path
    assert Path(ckpt).name.endswith("step=6.ckpt")

    state = callback.state_dict()
    assert "version" in state
    assert_plain(state)
    assert state["autolip"], "no warm-start vectors saved"

    saved, key = saved_callback_state(ckpt)  # plain types only
    saved_state = saved["callbacks"][key]
    assert saved_state["version"] == state["version"]
    assert saved_state["autolip"].keys() == state["autolip"].keys()
    for name, v in state["autolip"].items():
        assert torch.equal(saved_state["autolip"][name], v), name

    warm = LipschitzCallback(**CONFIG)
    truth_warm = _resume(ckpt, tmp_path / "warm", warm, max_steps=8)
    cold = ColdLipschitzCallback(**CONFIG)
    truth_cold = _resume(ckpt, tmp_path / "cold", cold, max_steps=8)

    # Both resumed runs saw the same weights, so they estimate the same number.
    assert truth_warm == pytest.approx(truth_cold, rel=1e-12)
    assert rel(warm.last_metrics["lipschitz/autolip"], truth_warm) < 1e-3
    assert rel(cold.last_metrics["lipschitz/autolip"], truth_cold) < 1e-3
    warm_iters = warm.last_metrics["lipschitz/autolip_iterations"]
    cold_iters = cold.last_metrics["lipschitz/autolip_iterations"]
    assert warm_iters <= WARM_PRODUCTS
    assert cold_iters > warm_iters


def test_checkpoint_resume_continues_warm_with_default_methods(tmp_path):
    key_before = LipschitzCallback(every_n_train_steps=2).state_key
    first, ckpt = six_step_checkpoint(tmp_path, every_n_train_steps=2)

    warm = LipschitzCallback(every_n_train_steps=2)
    _resume(str(ckpt), tmp_path / "warm", warm, max_steps=8)
    assert warm.last_metrics["lipschitz/autolip_iterations"] <= WARM_PRODUCTS
    assert first.state_key == key_before


def test_version_1_state_still_resumes_warm(tmp_path):
    _, ckpt = six_step_checkpoint(tmp_path)

    def version_1(state: dict[str, Any]) -> dict[str, Any]:
        assert state["version"] == 2
        # the version-1 layout: same entries plus the resolved methods
        return {**state, "version": 1, "methods": ["autolip", "seqlip"]}

    rewrite_state(ckpt, version_1)

    warm = LipschitzCallback(**CONFIG)
    _resume(str(ckpt), tmp_path / "warm", warm, max_steps=8)
    assert warm.last_metrics["lipschitz/autolip_iterations"] <= WARM_PRODUCTS


def test_warm_vectors_that_do_not_fit_are_dropped_not_fatal(tmp_path):
    """Vectors of the wrong size under the right input shape (e.g. a changed layer width):
    the estimate restarts cold, with a note and no warning."""
    _, ckpt = six_step_checkpoint(tmp_path)

    def one_too_long(state: dict[str, Any]) -> dict[str, Any]:
        return {
            **state,
            "autolip": {k: torch.ones(v.numel() + 1) for k, v in state["autolip"].items()},
        }

    rewrite_state(ckpt, one_too_long)

    resumed = LipschitzCallback(**CONFIG)
    module = RegressionModule(lr=0.02)
    trainer = make_trainer(tmp_path / "second", [resumed], max_steps=8)
    with capture_logs(logging.getLogger("lightning.pytorch")) as notes:
        assert fit_recording(trainer, module, loader(), ckpt_path=str(ckpt)) == []
    assert any("autolip failed with the warm-start vectors" in n for n in notes)
    cold = lipreg.autolip(module.net, (6,), certify=False)  # a cold start, same seed
    assert rel(resumed.last_metrics["lipschitz/autolip"], cold.value) < 1e-6


@pytest.mark.parametrize(
    "state",
    [
        {"version": 99, "autolip": {}},
        {"version": 2, "input_shape": ["x"], "autolip": {}},
        {"version": 2, "autolip": {"0": [1.0, 2.0]}},
    ],
    ids=["newer-version", "bad-shape", "not-a-tensor"],
)
def test_unreadable_state_is_ignored_with_a_warning(state):
    callback = LipschitzCallback(every_n_train_steps=2)
    with pytest.warns(UserWarning, match="state .* Its warm-start vectors are ignored"):
        callback.load_state_dict(state)
    assert callback._autolip_state == {} and callback.last_step == -1


class FullyConvolutional(nn.Module):
    """Convolutions, global average pooling, a linear head: any image size."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def image_loader(size: int) -> DataLoader:
    g = torch.Generator().manual_seed(size)
    x, y = torch.randn(16, 1, size, size, generator=g), torch.randn(16, 3, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def test_resume_on_another_image_size_bounds_the_new_size(tmp_path):
    """Fit on 8x8 images, resume on 12x12: the inferred input shape is re-derived (not the
    checkpoint's), the 8x8 warm vectors are dropped with a note, and the certified bound is
    AutoLip's at 12x12."""
    options = {"every_n_train_steps": 2, "certify_every_n_train_steps": 2}
    first = LipschitzCallback(**options)
    trainer = make_trainer(tmp_path / "first", [first], max_steps=4)
    trainer.fit(RegressionModule(FullyConvolutional(), lr=0.02), image_loader(8))
    assert first.input_shape == (1, 8, 8)
    ckpt = str(tmp_path / "eight.ckpt")
    trainer.save_checkpoint(ckpt)
    saved, key = saved_callback_state(ckpt)
    state = saved["callbacks"][key]
    assert state["input_shape"] == [1, 8, 8] and state["autolip"]

    resumed = LipschitzCallback(**options)
    module = RegressionModule(FullyConvolutional(), lr=0.02)
    trainer = make_trainer(tmp_path / "second", [resumed], max_steps=6)
    notes = logging.getLogger("lightning.pytorch")  # rank_zero_info's logger (no propagation)
    with capture_logs(notes) as records:
        messages = fit_recording(trainer, module, image_loader(12), ckpt_path=ckpt)
    assert messages == []
    assert any("input shape (1, 8, 8)" in r and "dropped (cold start)" in r for r in records)
    assert trainer.global_step == 6
    assert resumed.input_shape == (1, 12, 12)
    assert resumed.state_dict()["input_shape"] == [1, 12, 12]

    logged = resumed.last_metrics["lipschitz/autolip_certified"]
    at_12 = lipreg.autolip(module, (1, 12, 12)).value
    at_8 = lipreg.autolip(module, (1, 8, 8)).value
    assert rel(at_8, at_12) > 1e-3  # the check below can tell the two sizes apart
    assert rel(logged, at_12) < 1e-6
    assert float(trainer.callback_metrics["lipschitz/autolip_certified"]) == pytest.approx(
        logged, rel=1e-12
    )


# ---------------------------------------------------------------- 4. bf16
def test_bf16_mixed_matches_float32_truth(tmp_path):
    callback = LipschitzCallback(every_n_train_steps=3, certify_every_n_train_steps=3)
    module = RegressionModule(lr=0.1)
    trainer = make_trainer(tmp_path, [callback], max_steps=6, precision="bf16-mixed")
    trainer.fit(module, loader())

    assert all(p.dtype == torch.float32 for p in module.parameters())
    truth = norm_product(module.net)
    m = callback.last_metrics
    assert rel(m["lipschitz/autolip"], truth) < 1e-3
    assert truth * (1 - 1e-9) <= m["lipschitz/autolip_certified"] <= truth * (1 + 1e-6)


def test_bf16_true_runs_and_gives_finite_values(tmp_path):
    callback = LipschitzCallback(**EVERY_METHOD_EVERY_3_STEPS)
    module = RegressionModule(lr=0.1)
    trainer = make_trainer(tmp_path, [callback], max_steps=6, precision="bf16-true")
    trainer.fit(module, loader())

    assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    m = callback.last_metrics
    for key in ("lipschitz/autolip", "lipschitz/autolip_certified", "lipschitz/seqlip"):
        assert math.isfinite(m[key]) and m[key] > 0, key
    assert math.isfinite(m["lipschitz/lower_bound"])
    # bf16 -> float64 is exact, so the truth is the product of the bf16 weights' norms.
    truth = norm_product(module.net)
    assert rel(m["lipschitz/autolip"], truth) < 1e-3
    assert m["lipschitz/autolip_certified"] >= truth * (1 - 1e-9)


# ---------------------------------------------------------------- 5. DDP
@pytest.mark.slow
def test_ddp_spawn_two_cpu_ranks_agree(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(var, None)
    # run_ddp (tests/_lightning_helpers.py) asserts the step cadences of a 6-step fit: the cost
    # budget is turned off there (the constructor's default, changed before run_ddp builds
    # the callback; ddp_spawn pickles the instance, so every rank has max_overhead=None)
    code = (
        "import lipreg.callback as c; "
        "c.LipschitzCallback.__init__.__kwdefaults__['max_overhead'] = None; "
        f"import _lightning_helpers as h; h.run_ddp({str(tmp_path)!r})"
    )
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
    assert ranks[0]["callback_metrics"].keys() == m0.keys()

    (metrics_csv,) = (tmp_path / "ddp").glob("version_*/metrics.csv")
    with open(metrics_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lipschitz/autolip")]
    # each step once (rank 0 writes), at Lightning's index of optimizer steps 2, 4, 6
    assert [int(r["step"]) for r in rows] == [csv_step(s) for s in (2, 4, 6)]
    assert float(rows[-1]["lipschitz/autolip"]) == pytest.approx(m0["lipschitz/autolip"], rel=1e-12)


# ---------------------------------------------------------------- 6. options and failures
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
    callback = LipschitzCallback(every_n_train_steps=3)
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
    callback = LipschitzCallback(every_n_train_steps=3, on_nonfinite="raise")
    module = RegressionModule(lr=0.01, nan_at_step=4)
    trainer = make_trainer(tmp_path, [callback], max_steps=9)
    with pytest.raises(FloatingPointError):
        trainer.fit(module, loader())
    assert trainer.global_step == 6


@pytest.mark.parametrize("kwargs", [{"tol": -1.0}, {"max_iter": 0}])
def test_invalid_iteration_options_rejected_before_training(tmp_path, kwargs):
    with pytest.raises(ValueError):
        callback = LipschitzCallback(every_n_train_steps=1, input_shape=(6,), **kwargs)
        module = RegressionModule(fail_if_trained=True)  # AssertionError if a step runs
        make_trainer(tmp_path, [callback], max_steps=1).fit(module, loader())


# ---------------------------------------------------------------- configure_model
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


# ---------------------------------------------------------------- 7. steps, fit end, layer keys
class StepLoggingModule(RegressionModule):
    """Also logs, at every training step, the global step its optimizer step will complete:
    Lightning's own placement of a value of that optimizer step in ``metrics.csv``."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.log("completes_step", float(self.global_step + 1))
        return super().training_step(batch, batch_idx)


def test_lipschitz_values_share_lightnings_step_index(tmp_path):
    """Each Lipschitz row has the ``step`` of the row where Lightning wrote the loss of the
    same optimizer step, so merging metrics.csv by ``step`` puts them side by side."""
    callback = LipschitzCallback(
        every_n_train_steps=3, certify_every_n_train_steps=3, max_overhead=None
    )
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [callback], max_steps=9, logger=logger, log_every_n_steps=1)
    trainer.fit(StepLoggingModule(), loader())

    rows = csv_rows(logger)
    lightning = {int(float(r["completes_step"])): r for r in rows if r["completes_step"]}
    assert sorted(lightning) == list(range(1, 10))  # Lightning wrote every step
    lipschitz = [r for r in rows if r["lipschitz/autolip"]]
    assert [r["step"] for r in lipschitz] == [lightning[s]["step"] for s in (3, 6, 9)]
    assert all(lightning[s]["train_loss"] for s in (3, 6, 9))
    merged: dict[str, dict[str, str]] = {}
    for r in rows:
        merged.setdefault(r["step"], {}).update({k: v for k, v in r.items() if v})
    for s in (3, 6, 9):
        row = merged[lightning[s]["step"]]
        assert {"train_loss", "lipschitz/autolip", "lipschitz/autolip_certified"} <= row.keys()
        assert float(row["completes_step"]) == s
    assert callback.last_step == 9


def test_the_fit_end_logs_a_certified_bound_by_default(tmp_path):
    """A run shorter than every cadence of the certificate still ends with one (with the
    estimate, not SeqLip), at Lightning's index of the final step; compute_at_fit_end=False
    turns it off."""
    callback = LipschitzCallback(every_n_train_steps=3)  # certificate/SeqLip every 30 steps
    assert callback.compute_at_fit_end and callback.certify_every_n_train_steps == 30
    logger = CSVLogger(tmp_path, name="csv")
    module = RegressionModule(lr=0.2)
    trainer = make_trainer(tmp_path, [callback], max_steps=7, logger=logger)
    trainer.fit(module, loader())

    truth = norm_product(module.net)  # the final weights
    cert = callback.last_metrics["lipschitz/autolip_certified"]
    assert truth * (1 - 1e-9) <= cert <= truth * (1 + 1e-6)
    assert float(trainer.callback_metrics["lipschitz/autolip_certified"]) == pytest.approx(cert)
    assert callback.last_step == 7
    (end,) = [r for r in lipschitz_rows(logger) if r["lipschitz/autolip_certified"]]
    assert int(end["step"]) == csv_step(7)
    # the estimate and the certificate (the last cadence step was 6); SeqLip keeps its cadence
    assert end["lipschitz/autolip"] and not end.get("lipschitz/seqlip")
    assert rel(float(end["lipschitz/autolip"]), truth) < 1e-3

    off = LipschitzCallback(every_n_train_steps=3, compute_at_fit_end=False)
    logger = CSVLogger(tmp_path, name="off")
    trainer = make_trainer(tmp_path / "off", [off], max_steps=7, logger=logger)
    trainer.fit(RegressionModule(lr=0.2), loader())
    assert [int(r["step"]) for r in lipschitz_rows(logger)] == [csv_step(3), csv_step(6)]
    assert "lipschitz/autolip_certified" not in off.last_metrics
    assert off.last_step == 6


def test_the_fit_end_adds_only_what_the_last_step_lacks(tmp_path, monkeypatch):
    """The last step computed the estimate and SeqLip: the fit end certifies only, and
    last_metrics holds all of step 9."""
    calls: list[str] = []
    original = LipschitzCallback._seqlip

    def counted(self: LipschitzCallback, network: nn.Module):
        calls.append("seqlip")
        return original(self, network)

    monkeypatch.setattr(LipschitzCallback, "_seqlip", counted)
    callback = LipschitzCallback(
        every_n_train_steps=3, seqlip_every_n_train_steps=3, max_overhead=None
    )
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [callback], max_steps=9, logger=logger)
    trainer.fit(RegressionModule(), loader())
    assert len(calls) == 3  # steps 3, 6, 9; not again at the fit end
    rows = lipschitz_rows(logger)
    assert [int(r["step"]) for r in rows] == [csv_step(s) for s in (3, 6, 9, 9)]
    end = rows[-1]
    assert end["lipschitz/autolip_certified"] and not end["lipschitz/autolip"]
    m = callback.last_metrics
    assert {"lipschitz/autolip", "lipschitz/seqlip", "lipschitz/autolip_certified"} <= m.keys()
    assert m["lipschitz/autolip_certified"] >= m["lipschitz/autolip"] * (1 - 1e-6)


def test_a_fit_ending_on_a_full_step_adds_nothing(tmp_path):
    callback = LipschitzCallback(**EVERY_METHOD_EVERY_3_STEPS)
    logger = CSVLogger(tmp_path, name="csv")
    make_trainer(tmp_path, [callback], max_steps=6, logger=logger).fit(RegressionModule(), loader())
    assert [int(r["step"]) for r in lipschitz_rows(logger)] == [csv_step(3), csv_step(6)]


class BatchNormed(nn.Module):
    """Linear -> BatchNorm1d: one affine chain of two modules (one merged map)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.fc(x))))


def test_layer_keys_are_the_chain_names_unchanged(tmp_path):
    """lipschitz/layer/<LayerBound.name>, the same string a table keyed by LayerBound.name
    shows, including the name of a merged chain (Linear + BatchNorm)."""
    callback = LipschitzCallback(every_n_train_steps=2, model_attr="net")
    logger = CSVLogger(tmp_path, name="csv")
    module = RegressionModule(BatchNormed())
    trainer = make_trainer(tmp_path, [callback], max_steps=2, logger=logger)
    trainer.fit(module, loader())

    layers = [lb for lb in lipreg.autolip(module.net, (6,)).layers if lb.kind == "affine"]
    assert len(layers) == 2 and any(lb.name not in ("fc", "bn", "out") for lb in layers)
    expected = {layer_key(lb.name): lb for lb in layers}
    assert all(key == f"lipschitz/layer/{lb.name}" for key, lb in expected.items())
    logged = {k for k in callback.last_metrics if k.startswith("lipschitz/layer/")}
    assert logged == expected.keys()
    header = {k for k in csv_rows(logger)[0] if k.startswith("lipschitz/layer/")}
    assert header == expected.keys()  # the CSV column names: the same strings
    for key, lb in expected.items():  # estimates of the certified chain norms
        assert callback.last_metrics[key] <= lb.value * (1 + 1e-5)
        assert rel(callback.last_metrics[key], lb.value) < 1e-3
    out = torch.linalg.matrix_norm(module.net.out.weight.detach().double(), 2).item()
    assert rel(callback.last_metrics[layer_key("out")], out) < 1e-3
