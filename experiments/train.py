"""Train a network with Lipschitz monitoring (and optionally a penalty), configured by Hydra.

    python experiments/train.py                       # the paper's 4-layer CNN on digits
    python experiments/train.py model=alexnet         # AlexNet at 224x224 on digits
    python experiments/train.py model=mlp logger=csv  # an MLP, CSV logs
    python experiments/train.py experiment=paper_mlp  # a study of the paper (see conf/)
    python experiments/train.py -m penalty=autolip penalty.weight=1e-4,1e-3,1e-2

Compose, instantiate, fit, test; then write the certified bounds of the trained network to
``<output_dir>/bounds.json`` and ``bounds.md``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python experiments/train.py` from anywhere
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from experiments.bounds import final_bounds  # noqa: E402
from experiments.lit_module import LitModel  # noqa: E402


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-like config group (loggers, callbacks)."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def check_devices(cfg: DictConfig) -> None:
    """Fail early, with the fix, when more devices are requested than exist."""
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    devices = cfg.trainer.get("devices", 1)
    if accelerator in ("gpu", "cuda") and isinstance(devices, int):
        available = torch.cuda.device_count()
        if devices > available:
            raise ValueError(
                f"trainer.devices={devices} GPU(s) requested but {available} available; use "
                f"trainer.devices={max(available, 1)} or trainer=default (CPU)."
            )
    if accelerator == "cpu" and isinstance(devices, int) and devices > (os.cpu_count() or 1):
        raise ValueError(
            f"trainer.devices={devices} CPU processes requested but this machine has "
            f"{os.cpu_count()} cores; use trainer.devices={os.cpu_count()} or fewer."
        )


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, LitModel, pl.Trainer]:
    """Instantiate the datamodule, the LightningModule and the Trainer from ``cfg``."""
    check_devices(cfg)
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model.net)
    penalty = instantiate(cfg.penalty) if cfg.get("penalty") else None
    model = LitModel(
        net=net,
        task=cfg.model.task,
        num_classes=cfg.model.get("num_classes"),
        input_shape=list(cfg.model.input_shape),
        lr=cfg.lr,
        optimizer=cfg.optimizer,
        weight_decay=cfg.weight_decay,
        penalty=penalty,
        lower_bound_metric=cfg.lower_bound_metric,
    )
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    return datamodule, model, trainer


def write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file: a crash never leaves a half-written result behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test one configuration, or run a study; returns the final metrics."""
    if cfg.get("study"):
        return instantiate(cfg.study, _recursive_=False)(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    # the resolved config (without Hydra's own node, present when composed in tests)
    resolved = {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items_ex(resolve=False)
        if k != "hydra"
    }
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)  # the resolved config is the W&B run config
    trainer.fit(model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("test") and not cfg.trainer.get("fast_dev_run"):
        trainer.test(model, datamodule=datamodule)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    if trainer.is_global_zero and cfg.get("final_bounds") and not cfg.trainer.get("fast_dev_run"):
        x = next(iter(datamodule.val_dataloader()))[0]
        bounds = final_bounds(model.net, tuple(cfg.model.input_shape), list(cfg.final_bounds), x)
        out = Path(cfg.paths.output_dir)
        write_atomically(
            out / "bounds.json", json.dumps({"metrics": metrics, "bounds": bounds}, indent=2)
        )
        write_atomically(out / "bounds.md", bounds_markdown(cfg, bounds, metrics))
        log_layer_table(trainer, bounds)
        metrics.update({f"final/{k}": v["value"] for k, v in bounds.items() if "value" in v})
    finish_wandb(trainer)
    return metrics


def finish_wandb(trainer: pl.Trainer) -> None:
    """Close W&B runs so that offline files are complete (and sweeps start fresh runs)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def bounds_markdown(cfg: DictConfig, bounds: dict[str, Any], metrics: dict[str, float]) -> str:
    """A short human-readable report of the final bounds."""
    lines = [
        f"# {cfg.task_name}: {cfg.model.name} on {cfg.data._target_.rsplit('.', 1)[-1]}",
        "",
        "| quantity | value | guarantee |",
        "|---|---|---|",
    ]
    guarantee = {"autolip": "certified upper bound", "lower_bound": "certified lower bound"}
    for key, entry in bounds.items():
        if "value" not in entry:
            continue
        g = guarantee.get(key, "certified upper bound" if entry.get("certified") else "estimate")
        lines.append(f"| {key} | {entry['value']:.6g} | {g} |")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


def log_layer_table(trainer: pl.Trainer, bounds: dict[str, Any]) -> None:
    """Per-layer certified norms as a W&B table (other loggers: skipped)."""
    from lightning.pytorch.loggers import WandbLogger

    layers = bounds.get("autolip", {}).get("layers", {})
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and layers:
            logger.log_table(
                key="lipschitz/layers",
                columns=["layer", "norm_or_constant"],
                data=[[k, v] for k, v in layers.items()],
            )


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    value = metrics.get("val/loss")
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
