"""The one W&B integration test: an offline run file, read back with wandb's own records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hydra_helpers import clear_hydra, compose_config

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


def summary(records: list[dict]) -> dict:
    """The run summary as W&B shows it: every summary update applied in order."""
    out: dict = {}
    for rec in records:
        if rec.get("type") == "summary":
            out.update(rec["summary"].get("update", {}))
    return out


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
    from experiments.run import train

    cfg = compose_config(
        [
            "logger=wandb",
            "data.limit=320",
            "data.batch_size=16",
            "trainer.max_epochs=1",
            "callbacks.lipschitz.every_n_train_steps=2",
            "callbacks.lipschitz.certify_every_n_train_steps=4",
            "callbacks.lipschitz.max_overhead=null",  # the exact cadences are asserted
            "final_bounds=[autolip]",
            "test=false",
        ],
        tmp_path,
    )
    try:
        train(cfg)
    finally:
        clear_hydra()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_records(run_file)
    rows = history_rows(records)
    curve = [
        (r["trainer/global_step"], r["lipschitz/autolip"]) for r in rows if "lipschitz/autolip" in r
    ]
    steps = [s for s, _ in curve]
    assert steps == sorted(steps) and len(steps) >= 3
    # computed every 2 (certified: 4) optimizer steps, logged at Lightning's step index of that
    # optimizer step (one less: Lightning's rows of step g say g - 1); the fit's end adds a
    # computation (the certified bound) at the last index
    end = max(steps)
    assert all((s + 1) % 2 == 0 for s in steps if s != end), steps
    assert all(v > 0 for _, v in curve)
    certified = [r for r in rows if "lipschitz/autolip_certified" in r]
    assert certified and certified[-1]["trainer/global_step"] == end
    assert all((r["trainer/global_step"] + 1) % 4 == 0 for r in certified[:-1]), certified
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
    # the final bounds of bounds.json: a history row at the last step, and the run summary
    final = json.loads((tmp_path / "bounds.json").read_text())["bounds"]["autolip"]
    (last,) = [r for r in rows if "final/autolip" in r]
    assert last["trainer/global_step"] == end  # the row of the fit's last values
    assert last["final/autolip"] == pytest.approx(final["value"], rel=1e-12)
    run_summary = summary(records)
    assert run_summary["final/autolip"] == pytest.approx(final["value"], rel=1e-12)
    assert run_summary["final/autolip_certified"] == 1
    # the layer table spells layers as the callback's lipschitz/layer/<name> scalars do
    prefix = "lipschitz/layer/"
    scalar_layers = {k.removeprefix(prefix) for r in rows for k in r if k.startswith(prefix)}
    (table_file,) = (tmp_path / "wandb").glob("offline-run-*/files/media/table/lipschitz/*.json")
    table = json.loads(table_file.read_text())
    table_layers = {row[table["columns"].index("layer")] for row in table["data"]}
    assert scalar_layers and scalar_layers <= table_layers, (scalar_layers, table_layers)
