"""Every Hydra config composes and instantiates; every model runs a fast_dev_run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

import lipreg
from experiments.lit_module import LitModel
from experiments.run import build, train
from tests.hydra_helpers import CONF, clear_hydra, compose_config, group_options


def make_cfg(tmp_path: Path, overrides: list[str]) -> DictConfig:
    return compose_config(overrides, tmp_path)


@pytest.fixture(autouse=True)
def _no_wandb_network(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")  # no network, no W&B I/O in these tests
    yield
    clear_hydra()


@pytest.mark.parametrize("model", group_options("model"))
def test_every_model_composes_and_builds(tmp_path, model):
    data = "gp" if model == "paper_mlp" else "digits"
    cfg = make_cfg(
        tmp_path,
        [
            f"model={model}",
            f"data={data}",
            "logger=none",
            "data.limit=64" if data == "digits" else "data.n_train=64",
        ],
    )
    net = instantiate(cfg.model.net)
    x = torch.zeros(2, *cfg.model.input_shape)
    out = net(x)
    assert out.shape[0] == 2
    if cfg.model.task == "classification":
        assert out.shape[1] == cfg.model.num_classes


@pytest.mark.parametrize("group", ["data", "trainer", "logger", "callbacks", "penalty"])
def test_every_option_of_every_group_composes(tmp_path, group):
    for option in group_options(group):
        overrides = [f"{group}={option}"]
        if option == "imagefolder":
            overrides.append(f"data.root={tmp_path}")
        if group == "penalty" and option == "seqlip":
            overrides += ["model=paper_mlp", "data=gp"]
        cfg = make_cfg(tmp_path, overrides)
        assert cfg[group] is None or cfg[group] is not None  # composed without error


def test_unknown_group_option_and_key_give_clear_errors(tmp_path):
    with pytest.raises(ConfigCompositionException, match="model"):
        make_cfg(tmp_path, ["model=does_not_exist"])
    with pytest.raises(ConfigCompositionException, match="not_a_key"):
        make_cfg(tmp_path, ["trainer.not_a_key=1"])


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "none", "wandb"])
def test_loggers_and_callbacks_instantiate(tmp_path, logger):
    cfg = make_cfg(tmp_path, [f"logger={logger}", "data.limit=64"])
    _, model, trainer = build(cfg)
    assert isinstance(model, LitModel)
    names = {type(lg).__name__ for lg in trainer.loggers}
    expected = {"csv": "CSVLogger", "tensorboard": "TensorBoardLogger", "wandb": "WandbLogger"}
    assert names == ({expected[logger]} if logger != "none" else set())
    assert any(isinstance(cb, lipreg.LipschitzCallback) for cb in trainer.callbacks)


@pytest.mark.parametrize("penalty", ["autolip", "seqlip"])
def test_penalty_group_builds_a_penalty(tmp_path, penalty):
    extra = (
        ["model=paper_mlp", "data=gp", "data.n_train=64"]
        if penalty == "seqlip"
        else ["data.limit=64"]
    )
    cfg = make_cfg(tmp_path, [f"penalty={penalty}", "logger=none", *extra])
    _, model, _ = build(cfg)
    assert isinstance(model.penalty, lipreg.LipschitzPenalty)
    assert model.penalty.method == penalty


@pytest.mark.parametrize(
    "model, data",
    [
        ("cnn", "digits"),
        ("cnn5", "digits"),
        ("cnn7", "digits"),
        ("cnn10", "digits"),
        ("mlp", "digits"),
        ("alexnet", "digits"),
        ("paper_mlp", "gp"),
    ],
)
def test_fast_dev_run_of_each_model(tmp_path, model, data):
    limit = "data.n_train=64" if data == "gp" else "data.limit=64"
    cfg = make_cfg(
        tmp_path,
        [
            f"model={model}",
            f"data={data}",
            "debug=fdr",
            "logger=none",
            "callbacks=none",
            limit,
            "data.batch_size=4",
        ],
    )
    metrics = train(cfg)
    assert all(v == v for v in metrics.values())  # no NaN


def test_a_short_real_run_writes_certified_bounds(tmp_path):
    cfg = make_cfg(
        tmp_path,
        [
            "logger=csv",
            "data.limit=200",
            "trainer.max_epochs=1",
            "callbacks.lipschitz.every_n_train_steps=1",
            "callbacks.lipschitz.certify_every_n_train_steps=1",
        ],
    )
    metrics = train(cfg)
    report = json.loads((tmp_path / "bounds.json").read_text())
    bounds = report["bounds"]
    assert bounds["autolip"]["certified"] is True
    assert bounds["lower_bound"]["value"] <= bounds["seqlip"]["value"] <= bounds["autolip"]["value"]
    assert (tmp_path / "bounds.md").read_text().startswith("# train")
    assert "test/acc" in metrics
    assert "lipschitz/autolip_certified" in metrics
    # the final bounds of bounds.json reach the CSV log, as metrics
    (metrics_csv,) = (tmp_path / "csv").glob("version_*/metrics.csv")
    with open(metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    (final,) = [r for r in rows if r.get("final/autolip")]
    # at Lightning's index of the fit's last values (its last validation row); test rows follow
    assert int(final["step"]) == max(int(r["step"]) for r in rows if r.get("val/loss"))
    for method in ("autolip", "seqlip", "lower_bound"):
        assert float(final[f"final/{method}"]) == pytest.approx(bounds[method]["value"], rel=1e-12)
    assert float(final["final/autolip_certified"]) == 1.0
    assert float(final["final/lower_bound_certified"]) == 1.0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("form", ["script", "module"])
def test_entry_point_runs_from_any_directory(tmp_path, form):
    """``python experiments/train.py`` and ``python -m experiments.train`` (installed package)
    compose conf/ from a foreign working directory; ckpt_path is a key of the config."""
    script = str(CONF.parent / "experiments" / "train.py")
    entry = [script] if form == "script" else ["-m", "experiments.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run(
        [sys.executable, *entry, "ckpt_path=/some/last.ckpt", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ckpt_path: /some/last.ckpt" in out.stdout


def test_devices_beyond_the_machine_are_refused_before_training(tmp_path):
    n = (os.cpu_count() or 1) + 1
    cfg = make_cfg(tmp_path, ["logger=none", f"trainer.devices={n}"])
    with pytest.raises(ValueError, match="cores"):
        build(cfg)
    cfg = make_cfg(tmp_path, ["logger=none", "trainer=gpu", "trainer.devices=1"])
    if torch.cuda.device_count() == 0:
        with pytest.raises(ValueError, match="GPU"):
            build(cfg)


def test_missing_dataset_root_says_what_to_do(tmp_path):
    cfg = make_cfg(tmp_path, ["logger=none", "data=mnist", f"paths.data_dir={tmp_path}/none"])
    # Hydra wraps the datamodule's FileNotFoundError; the message says what to do
    with pytest.raises((FileNotFoundError, InstantiationException), match="download=True"):
        datamodule, _, _ = build(cfg)
        datamodule.setup("fit")


def test_missing_alexnet_weights_file_is_reported(tmp_path):
    cfg = make_cfg(
        tmp_path, ["logger=none", "model=alexnet", f"model.net.weights={tmp_path}/missing.pth"]
    )
    with pytest.raises(
        (FileNotFoundError, InstantiationException), match="null for random weights"
    ):
        build(cfg)


def test_slurm_launcher_and_ddp_configs_compose(tmp_path):
    clear_hydra()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=slurm", "trainer=ddp"],
            return_hydra_config=True,
        )
    assert "SlurmLauncher" in cfg.hydra.launcher._target_
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2
