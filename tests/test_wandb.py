"""The one W&B integration test: an offline run file, read back with wandb's own records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_configs import make_cfg

pytest.importorskip("wandb")


def read_records(path: Path) -> list[dict]:
    """The records of a ``.wandb`` transaction log, decoded by wandb itself.

    ``wandb leet inspect --json`` prints one JSON record per line: wandb's maintained reader
    of its own format (a hand-written LevelDB/protobuf parser broke on some files).
    """
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def history_rows(records: list[dict]) -> list[dict]:
    """Each logged row: metric name -> value (nested keys joined by ".")."""
    rows = []
    for rec in records:
        if rec.get("type") != "history":
            continue
        rows.append(_flatten(rec["history"]["item"]))
    return rows


def _flatten(item: dict, prefix: str = "") -> dict:
    flat: dict = {}
    for key, value in item.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not key.startswith("lipschitz/layers"):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def test_offline_wandb_run_holds_the_lipschitz_curves_and_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network; restored by monkeypatch
    monkeypatch.setenv("WANDB_SILENT", "true")
    from experiments.train import train

    cfg = make_cfg(
        tmp_path,
        [
            "logger=wandb",
            "data.limit=320",
            "data.batch_size=16",
            "trainer.max_epochs=1",
            "callbacks.lipschitz.every_n_train_steps=2",
            "callbacks.lipschitz.certify_every_n_train_steps=4",
            "final_bounds=[autolip]",
            "test=false",
        ],
    )
    train(cfg)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_records(run_file)
    rows = history_rows(records)
    curve = [
        (r["trainer/global_step"], r["lipschitz/autolip"]) for r in rows if "lipschitz/autolip" in r
    ]
    steps = [s for s, _ in curve]
    assert steps == sorted(steps) and len(steps) >= 3
    assert all(s % 2 == 0 for s in steps), steps  # logged at the callback's cadence
    assert all(v > 0 for _, v in curve)
    certified = [r for r in rows if "lipschitz/autolip_certified" in r]
    assert certified and all(r["trainer/global_step"] % 4 == 0 for r in certified)
    # a certified bound is never below the estimate at the same step
    by_step = {r["trainer/global_step"]: r for r in rows if "lipschitz/autolip" in r}
    for r in certified:
        est = by_step[r["trainer/global_step"]]["lipschitz/autolip"]
        assert r["lipschitz/autolip_certified"] >= est * (1 - 1e-4)
    assert any(k.startswith("lipschitz/layer/") for r in rows for k in r)
    # per-layer norms as a W&B table
    assert any(k.startswith("lipschitz/layers") for r in rows for k in r)
    # the resolved Hydra config is the run config
    configs = [rec["config"]["update"] for rec in records if rec.get("type") == "config"]
    keys = {key for c in configs for key in c}
    assert {"model", "data", "trainer", "seed"} <= keys
