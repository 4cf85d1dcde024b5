"""The one W&B integration test: an offline run file, read back with wandb's own records."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.test_configs import make_cfg

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK = 32 * 1024
HEADER = 7  # ":W&B" + version bytes; then LevelDB-style blocks of chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """Decode a ``.wandb`` transaction log into ``Record`` protobuf messages."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, payload, records = HEADER, b"", []
    while pos < len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            payload = chunk
        elif kind in (FIRST, MIDDLE):
            payload = chunk if kind == FIRST else payload + chunk
            continue
        elif kind == LAST:
            payload += chunk
        record = wandb_pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def history_rows(records: list) -> list[dict]:
    rows = []
    for rec in records:
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


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
    configs = [rec.config for rec in records if rec.WhichOneof("record_type") == "config"]
    keys = {item.key or "/".join(item.nested_key) for c in configs for item in c.update}
    assert {"model", "data", "trainer", "seed"} <= keys
