"""Tests of ``lipreg.callback.LipschitzCallback`` inside real Lightning runs.

Real ``lightning.pytorch`` Trainers on CPU, real CSVLoggers and checkpoints under ``tmp_path``,
small regression data written here. Ground truths are independent of lipreg: for MLPs made of
Linear + ReLU layers, AutoLip is the product of the layers' spectral norms, computed with
``torch.linalg.matrix_norm(W.double(), 2)`` from the final weights.
"""

from __future__ import annotations

import csv
import json
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
from torch.utils.data import DataLoader

from lipreg.callback import LipschitzCallback
from lipreg.functional import UnsupportedOperationError

try:  # tests/ as a package (tests/__init__.py) or as a plain directory on sys.path
    from tests._lightning_helpers import (
        DictDataset,
        RegressionModule,
        make_mlp,
        regression_data,
    )
except ModuleNotFoundError:
    from _lightning_helpers import (
        DictDataset,
        RegressionModule,
        make_mlp,
        regression_data,
    )

torch.set_num_threads(1)

TESTS_DIR = Path(__file__).resolve().parent
N_AFFINE = 3  # make_mlp(): three Linear layers


# ---------------------------------------------------------------- helpers
def make_trainer(root: Path, callbacks: list, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
        "default_root_dir": str(root),
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def loader(n: int = 40, batch_size: int = 4, *, dict_batches: bool = False, **kw) -> DataLoader:
    data = regression_data(n)
    return DataLoader(DictDataset(data) if dict_batches else data, batch_size=batch_size, **kw)


def linear_norms(net: nn.Module) -> list[float]:
    """Spectral norms of the Linear weights, in float64 (the independent truth)."""
    return [
        torch.linalg.matrix_norm(m.weight.detach().double(), 2).item()
        for m in net.modules()
        if isinstance(m, nn.Linear)
    ]


def norm_product(net: nn.Module) -> float:
    return math.prod(linear_norms(net))


def csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def lipschitz_rows(logger: CSVLogger) -> list[dict[str, str]]:
    return [
        r for r in csv_rows(logger) if any(k.startswith("lipschitz/") and v for k, v in r.items())
    ]


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


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
def test_cadence_keys_and_direct_logging(tmp_path):
    """Rows exactly at steps 3, 6, 9 of a 10-step run although log_every_n_steps=50."""
    callback = LipschitzCallback(every_n_train_steps=3, seqlip_every_n_train_steps=3)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [callback], max_steps=10, logger=logger, log_every_n_steps=50)
    trainer.fit(RegressionModule(), loader())
    assert trainer.global_step == 10

    rows = lipschitz_rows(logger)
    assert [int(r["step"]) for r in rows] == [3, 6, 9]
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
    for r in rows:  # every row holds every key
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
    callback = LipschitzCallback(methods=["lower_bound"], every_n_train_steps=3)
    logger = CSVLogger(tmp_path, name="csv")
    module = RegressionModule()
    trainer = make_trainer(tmp_path, [callback], max_steps=6, logger=logger)
    trainer.fit(module, loader())

    rows = lipschitz_rows(logger)
    assert [int(r["step"]) for r in rows] == [3, 6]
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

    rows = lipschitz_rows(logger)
    values = {int(r["step"]): float(r["lipschitz/autolip"]) for r in rows}
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
    callback = LipschitzCallback(every_n_train_steps=None, every_n_epochs=1)
    logger = CSVLogger(tmp_path, name="csv")
    module = RegressionModule()
    trainer = make_trainer(tmp_path, [callback], max_epochs=2, logger=logger)
    trainer.fit(module, loader(n=40, batch_size=8))  # 5 steps per epoch

    assert [int(r["step"]) for r in lipschitz_rows(logger)] == [5, 10]
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

    saved = torch.load(ckpt, weights_only=True)  # plain types only
    (key,) = [k for k in saved["callbacks"] if k.startswith("LipschitzCallback")]
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
    assert warm_iters <= 2 * N_AFFINE
    assert cold_iters > max(warm_iters, 2 * N_AFFINE)


def test_checkpoint_resume_continues_warm_with_default_methods(tmp_path):
    first = LipschitzCallback(every_n_train_steps=2)
    key_before = first.state_key
    trainer = make_trainer(tmp_path / "first", [first], max_steps=6)
    trainer.fit(RegressionModule(lr=0.02), loader())
    ckpt = str(tmp_path / "six.ckpt")
    trainer.save_checkpoint(ckpt)

    warm = LipschitzCallback(every_n_train_steps=2)
    _resume(ckpt, tmp_path / "warm", warm, max_steps=8)
    assert warm.last_metrics["lipschitz/autolip_iterations"] <= 2 * N_AFFINE
    assert first.state_key == key_before


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
    callback = LipschitzCallback(
        methods=["autolip", "seqlip", "lower_bound"],
        every_n_train_steps=3,
        certify_every_n_train_steps=3,
        seqlip_every_n_train_steps=3,
        lower_bound_points=4,
    )
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
    assert ranks[0]["callback_metrics"].keys() == m0.keys()

    (metrics_csv,) = (tmp_path / "ddp").glob("version_*/metrics.csv")
    with open(metrics_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lipschitz/autolip")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]  # each step once (rank 0 writes)
    assert float(rows[-1]["lipschitz/autolip"]) == pytest.approx(m0["lipschitz/autolip"], rel=1e-12)


# ---------------------------------------------------------------- 6. bad input
@pytest.mark.parametrize(
    "kwargs",
    [
        {"methods": ["autolip", "sqlip"]},
        {"methods": "upper_bound"},
        {"methods": []},
        {"every_n_train_steps": 0},
        {"every_n_train_steps": -3},
        {"every_n_train_steps": None, "every_n_epochs": 0},
        {"every_n_train_steps": None, "every_n_epochs": None},
        {"on_nonfinite": "ignore"},
        {"seqlip_method": "fast"},
    ],
)
def test_bad_arguments_raise_at_construction(kwargs):
    with pytest.raises(ValueError):
        LipschitzCallback(**kwargs)


class Square(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y * y


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + torch.relu(self.fc(x)))


@pytest.mark.parametrize(
    ("net", "methods", "error"),
    [
        (Square, None, UnsupportedOperationError),
        (Residual, ["seqlip"], ValueError),
    ],
    ids=["x*x", "seqlip-on-residual"],
)
def test_unsupported_model_fails_at_setup(tmp_path, net, methods, error):
    callback = LipschitzCallback(methods=methods, every_n_train_steps=1, input_shape=(6,))
    module = RegressionModule(net(), fail_if_trained=True)  # a training step would raise
    trainer = make_trainer(tmp_path, [callback], max_steps=2)
    with pytest.raises(error):
        trainer.fit(module, loader())
    assert trainer.global_step == 0


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

    rows = {int(r["step"]): r for r in lipschitz_rows(logger)}
    assert sorted(rows) == [3, 6, 9]
    assert math.isfinite(float(rows[3]["lipschitz/autolip"]))
    assert math.isnan(float(rows[6]["lipschitz/autolip"]))
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
