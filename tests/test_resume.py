"""Resuming a Hydra run (``ckpt_path=``) with real Trainers: the fit continues at the
checkpoint's step, with the network, the penalty's and the LipschitzCallback's state of the
checkpoint, and its logs continue where the first run stopped; a run killed with SIGKILL
leaves a loadable ``last.ckpt`` (saved every few steps) to resume from.
"""

from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

import lipreg
from experiments.run import build, check_ckpt_path, train
from tests.hydra_helpers import ROOT, clear_hydra, compose_config

# A small, fast fit: the MLP on 200 digits (12 optimizer steps per epoch), CSV logs every
# step, the callback every 2 steps, last.ckpt every 3 steps, with the AutoLip penalty.
BASE = [
    "logger=csv",
    "model=mlp",
    "data.limit=200",
    "data.batch_size=16",
    "trainer.max_epochs=1000",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.lipschitz.every_n_train_steps=2",
    "callbacks.lipschitz.max_overhead=null",  # the exact cadence is asserted
    "callbacks.periodic_checkpoint.every_n_train_steps=3",
    "penalty=autolip",
    "test=false",
    "final_bounds=[autolip]",
]

PROBES: list[dict[str, Any]] = []  # what ResumeProbe saw when each fit started training


class ResumeProbe(pl.Callback):
    """Records the step and the state a resumed fit starts from, when training starts
    (Lightning restores the loops, hence the step, only after ``on_fit_start``)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        (lip,) = [c for c in trainer.callbacks if isinstance(c, lipreg.LipschitzCallback)]
        PROBES.append(
            {
                "global_step": trainer.global_step,
                "lipschitz": lip.state_dict(),
                "model": copy.deepcopy(pl_module.state_dict()),
            }
        )


@pytest.fixture(autouse=True)
def _no_wandb_network(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    PROBES.clear()
    yield
    clear_hydra()


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    (path,) = (run_dir / "csv").glob("version_*/metrics.csv")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def steps_with(rows: list[dict[str, str]], key: str) -> list[int]:
    return [int(r["step"]) for r in rows if r.get(key)]


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same(a: Any, b: Any, where: str) -> None:
    """Nested dicts/lists of tensors and numbers are equal (tensors exactly)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def differs(a: Any, b: Any) -> bool:
    try:
        assert_same(a, b, "")
    except AssertionError:
        return True
    return False


def lipschitz_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("LipschitzCallback")]
    return ckpt["callbacks"][key]


def resume_and_check(tmp_path: Path, ckpt: Path, more_steps: int) -> None:
    """Resume from ``ckpt`` into ``tmp_path/run2`` for ``more_steps`` steps and check that the
    fit, its state and its logs continue (none restart from step 0)."""
    saved = load(ckpt)
    start = saved["global_step"]
    assert start >= 2
    fresh_cfg = compose_config(BASE, tmp_path, run_subdir="fresh")
    _, fresh, _ = build(fresh_cfg)  # what a fit that did NOT resume would start from
    cfg = compose_config(
        [
            *BASE,
            f"trainer.max_steps={start + more_steps}",
            f"ckpt_path={ckpt}",
            "+callbacks.probe._target_=tests.test_resume.ResumeProbe",
        ],
        tmp_path,
        run_subdir="run2",
    )
    train(cfg)
    (probe,) = PROBES
    assert probe["global_step"] == start
    # the network and the penalty's buffers are the checkpoint's, not a fresh start's
    assert_same(saved["state_dict"], probe["model"], "state_dict")
    penalty_keys = [k for k in saved["state_dict"] if k.startswith("penalty.")]
    assert penalty_keys, "the penalty keeps no state in the checkpoint"
    fresh_state = fresh.state_dict()
    assert any(differs(saved["state_dict"][k], fresh_state[k]) for k in penalty_keys)
    assert any(differs(v, fresh_state[k]) for k, v in saved["state_dict"].items())
    # the LipschitzCallback's warm state and last step are the checkpoint's
    assert_same(lipschitz_state(saved), probe["lipschitz"], "LipschitzCallback")
    assert lipschitz_state(saved)["last_step"] >= 2
    # the resumed fit ran to its new end and saved it
    end = load(tmp_path / "run2" / "checkpoints" / "last.ckpt")["global_step"]
    assert end == start + more_steps
    # its logs continue: Lightning's rows of steps start+1 ... (index = step - 1), nothing
    # from step 0; the callback's values at its cadence after the checkpoint
    rows = csv_rows(tmp_path / "run2")
    assert steps_with(rows, "train/loss") == list(range(start, start + more_steps))
    lip_steps = steps_with(rows, "lipschitz/autolip")
    assert lip_steps and min(lip_steps) >= start, lip_steps
    expected = {s - 1 for s in range(start + 1, start + more_steps + 1) if s % 2 == 0}
    assert expected <= set(lip_steps), (expected, lip_steps)


def test_ckpt_path_is_checked_before_anything_is_built(tmp_path):
    cfg = compose_config(["logger=csv", f"ckpt_path={tmp_path}/missing.ckpt"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"expected a Lightning checkpoint.*last\.ckpt"):
        train(cfg)
    cfg = compose_config(["logger=csv", f"ckpt_path={tmp_path}"], tmp_path)
    with pytest.raises(FileNotFoundError, match="found a folder"):
        train(cfg)
    assert not (tmp_path / "csv").exists() and not (tmp_path / "checkpoints").exists()
    assert check_ckpt_path(compose_config(["ckpt_path=last"], tmp_path)) == "last"
    assert check_ckpt_path(compose_config([], tmp_path)) is None


def test_ckpt_path_with_a_study_is_refused(tmp_path):
    cfg = compose_config(["experiment=paper_random", f"ckpt_path={tmp_path}/x.ckpt"], tmp_path)
    with pytest.raises(ValueError, match="study"):
        train(cfg)


def test_a_stopped_run_resumes_from_last_ckpt(tmp_path):
    """Run 1 stops after 7 steps (last.ckpt at steps 3, 6 and at the end, 7); run 2 resumes
    from it with ``ckpt_path=`` up to step 15, across an epoch boundary (12 steps/epoch)."""
    train(compose_config([*BASE, "trainer.max_steps=7"], tmp_path, run_subdir="run1"))
    first = csv_rows(tmp_path / "run1")
    assert steps_with(first, "train/loss") == list(range(7))
    ckpt = tmp_path / "run1" / "checkpoints" / "last.ckpt"
    assert load(ckpt)["global_step"] == 7
    resume_and_check(tmp_path, ckpt, more_steps=8)


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_periodic_last_ckpt(tmp_path):
    """``python experiments/train.py`` (from a foreign directory) killed with SIGKILL as soon
    as its periodic last.ckpt exists: the file loads, and a run resumed from it continues."""
    run1 = tmp_path / "run1"
    ckpt = run1 / "checkpoints" / "last.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    args = [*BASE, "trainer.max_steps=100000", f"hydra.run.dir={run1}"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "experiments" / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 600
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ckpt.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() else "timeout"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    assert load(ckpt)["global_step"] % 3 == 0  # a periodic save, complete
    resume_and_check(tmp_path, ckpt, more_steps=5)
