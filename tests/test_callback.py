"""Tests of ``lipreg.callback.LipschitzCallback`` inside real Lightning runs.

Real ``lightning.pytorch`` Trainers on CPU, real CSVLoggers and checkpoints under ``tmp_path``,
small regression data written here. Ground truths are independent of lipreg: for MLPs made of
Linear + ReLU layers, AutoLip is the product of the layers' spectral norms, computed with
``torch.linalg.matrix_norm(W.double(), 2)`` from the final weights.
"""

from __future__ import annotations

import logging
import math
import random
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
        # iterations of the call that gave the estimate: the estimator's, or a certificate's
        # (which answers it); an anchor of these tiny layers is a dense eigen-solve
        anchor = r.get("lipschitz/full_certificate_time_s") or r.get(
            "lipschitz/quick_certificate_time_s"
        )
        assert float(r["lipschitz/autolip_iterations"]) >= 1 or anchor
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
    callback = LipschitzCallback(methods=["autolip"], every_n_train_steps=3, max_overhead=None)
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


# exact cadences (the budget would stretch them on these millisecond steps)
CONFIG = {"methods": ["autolip", "seqlip"], "every_n_train_steps": 2, "max_overhead": None}


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
    # a cold start with the callback's options (same seed, tolerance and cap)
    cold = lipreg.autolip(
        module.net, (6,), certify=False, tol=resumed.tol, max_iter=resumed.max_iter
    )
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


# ---------------------------------------------------------------- 5. steps, fit end, layer keys
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
    callback = LipschitzCallback(
        every_n_train_steps=3, certify_every_n_train_steps=30, max_overhead=None
    )  # certificate and SeqLip every 30 steps
    assert callback.compute_at_fit_end and callback.seqlip_every_n_train_steps == 30
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

    off = LipschitzCallback(
        every_n_train_steps=3,
        certify_every_n_train_steps=30,
        compute_at_fit_end=False,
        max_overhead=None,
    )
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
        every_n_train_steps=3,
        seqlip_every_n_train_steps=3,
        certify_every_n_train_steps=30,
        max_overhead=None,
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
