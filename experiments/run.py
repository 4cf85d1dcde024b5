"""Build and fit one Hydra configuration, then report its final bounds (the body of train.py).

:func:`train` is what ``python experiments/train.py ...`` runs: a study when ``cfg.study`` is
set, otherwise :func:`fit_one`:

1. :func:`check_ckpt_path` and :func:`check_devices` refuse a bad ``ckpt_path`` or device
   request before anything is built;
2. :func:`build` instantiates the datamodule, the :class:`~experiments.lit_module.LitModel` and
   the Trainer (loggers and callbacks from their config groups);
3. ``trainer.fit(..., ckpt_path=cfg.ckpt_path)`` (a resumed fit continues at the checkpoint's
   ``global_step``), then ``trainer.test``;
4. :func:`~experiments.bounds.final_bounds` of the trained network go to
   ``<output_dir>/bounds.json`` and ``bounds.md`` (``reporting.atomic_write``) and, through
   :func:`log_final_bounds`, to every logger (metrics ``final/<method>`` at the last step; the
   W&B run summary too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from experiments.bounds import final_bounds
from experiments.lit_module import LitModel
from experiments.reporting import atomic_write
from lipreg.callback_records import lightning_step

# conf/paths/default.yaml reads PROJECT_ROOT (data/ and results/ live in the checkout, which the
# editable install points at), whatever the working directory.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))

GUARANTEE_UPPER = "certified upper bound"
GUARANTEE_LOWER = "certified lower bound"


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


def check_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from (``cfg.ckpt_path``), checked before anything is built.

    ``null`` starts a new fit; ``last`` is passed to Lightning as is (the newest ``last.ckpt``
    of this run's checkpoint folder; Lightning warns and starts at step 0 when there is none,
    which is what a re-queued job with a fixed ``hydra.run.dir`` wants); any other value must
    be an existing checkpoint file, returned as an absolute path (relative paths are taken
    from the working directory, as Hydra does not change it).
    """
    ckpt = cfg.get("ckpt_path")
    if ckpt is None or str(ckpt) == "last":
        return None if ckpt is None else "last"
    path = Path(str(ckpt)).expanduser().resolve()
    if not path.is_file():
        found = "a folder" if path.is_dir() else "nothing"
        raise FileNotFoundError(
            f"ckpt_path={ckpt}: expected a Lightning checkpoint file, found {found} at {path}. "
            "A run saves <output_dir>/checkpoints/last.ckpt (see conf/callbacks/default.yaml); "
            "pass that file, e.g. ckpt_path=outputs/train/<date>/checkpoints/last.ckpt, or "
            "ckpt_path=last together with hydra.run.dir=<that run's folder>."
        )
    return str(path)


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


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without Hydra's own node (present when composed in tests)."""
    return {
        k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
        for k, v in cfg.items_ex(resolve=False)
        if k != "hydra"
    }


def scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The Trainer's scalar ``callback_metrics`` as floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test one configuration, or run a study; returns the final metrics."""
    if cfg.get("study"):
        if cfg.get("ckpt_path") is not None:
            raise ValueError(
                f"ckpt_path={cfg.ckpt_path} resumes a single fit, but experiment "
                f"{cfg.task_name!r} is a study (many fits); drop ckpt_path."
            )
        return instantiate(cfg.study, _recursive_=False)(cfg)
    return fit_one(cfg)


def fit_one(cfg: DictConfig) -> dict[str, float]:
    """Fit (or resume, ``cfg.ckpt_path``) and test one configuration; report its final bounds.

    Returns the scalar metrics of fit and test, plus ``final/<method>`` for every final bound.
    """
    ckpt_path = check_ckpt_path(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved_config(cfg))  # the resolved config is the W&B run config
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = scalar_metrics(trainer)
    fast_dev_run = bool(cfg.trainer.get("fast_dev_run"))
    if cfg.get("test") and not fast_dev_run:
        trainer.test(model, datamodule=datamodule)
        metrics.update(scalar_metrics(trainer))
    if trainer.is_global_zero and cfg.get("final_bounds") and not fast_dev_run:
        metrics.update(report_final_bounds(cfg, trainer, datamodule, model, metrics))
    finish_wandb(trainer)
    return metrics


def report_final_bounds(
    cfg: DictConfig,
    trainer: pl.Trainer,
    datamodule: pl.LightningDataModule,
    model: LitModel,
    metrics: dict[str, float],
) -> dict[str, float]:
    """Compute the final bounds, write ``bounds.json``/``bounds.md``, log them to every logger.

    Returns ``{"final/<method>": value}`` (the values also logged as metrics).
    """
    x = next(iter(datamodule.val_dataloader()))[0]
    bounds = final_bounds(model.net, tuple(cfg.model.input_shape), list(cfg.final_bounds), x)
    out = Path(cfg.paths.output_dir)
    atomic_write(out / "bounds.json", json.dumps({"metrics": metrics, "bounds": bounds}, indent=2))
    atomic_write(out / "bounds.md", bounds_markdown(cfg, bounds, metrics))
    log_layer_table(trainer, bounds)
    return log_final_bounds(trainer, bounds)


def guarantee(method: str, entry: dict[str, Any]) -> str:
    """What a final bound guarantees: an upper bound only when it says ``certified``, a lower
    bound only when it is a certified ``kind="lower"`` value; anything else is an estimate."""
    if method == "lower_bound":
        return GUARANTEE_LOWER if entry.get("kind") == "lower" else "estimate"
    return GUARANTEE_UPPER if entry.get("certified") else "estimate"


def bounds_markdown(cfg: DictConfig, bounds: dict[str, Any], metrics: dict[str, float]) -> str:
    """A short human-readable report of the final bounds."""
    lines = [
        f"# {cfg.task_name}: {cfg.model.name} on {cfg.data._target_.rsplit('.', 1)[-1]}",
        "",
        "| quantity | value | guarantee |",
        "|---|---|---|",
    ]
    for key, entry in bounds.items():
        if "value" not in entry:
            continue
        lines.append(f"| {key} | {entry['value']:.6g} | {guarantee(key, entry)} |")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


def final_metrics(bounds: dict[str, Any]) -> dict[str, float]:
    """``final/<method>`` for every computed bound, and ``final/<method>_certified`` (1 or 0)
    saying whether it carries the guarantee of its kind (see :func:`guarantee`)."""
    out: dict[str, float] = {}
    for key, entry in bounds.items():
        if "value" in entry:
            out[f"final/{key}"] = float(entry["value"])
            out[f"final/{key}_certified"] = float(guarantee(key, entry) != "estimate")
    return out


def log_final_bounds(trainer: pl.Trainer, bounds: dict[str, Any]) -> dict[str, float]:
    """Log the final bounds to every logger of ``trainer`` at the fit's last step index.

    CSV/TensorBoard/W&B get them as metrics (``final/autolip``, ``final/seqlip``,
    ``final/lower_bound`` and ``..._certified``); a W&B run also keeps them in its summary,
    where the run table shows them. Returns the logged values.
    """
    values = final_metrics(bounds)
    if not values:
        return values
    # Lightning's step index of the fit's last values (where the callback's end-of-fit bound
    # is logged too), so that the final bounds share their row; the global step if unknown
    step = lightning_step(trainer, in_batch=False)
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(values)
        logger.save()
    return values


def log_layer_table(trainer: pl.Trainer, bounds: dict[str, Any]) -> None:
    """Per-layer certified norms as a W&B table (other loggers: skipped).

    The ``layer`` column is ``LayerBound.name`` unchanged, as in the callback's
    ``lipschitz/layer/<name>`` scalars (:func:`lipreg.callback_records.layer_key`).
    """
    layers = bounds.get("autolip", {}).get("layers", {})
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and layers:
            logger.log_table(
                key="lipschitz/layers",
                columns=["layer", "norm_or_constant"],
                data=[[k, v] for k, v in layers.items()],
            )


def finish_wandb(trainer: pl.Trainer) -> None:
    """Close W&B runs so that offline files are complete (and sweeps start fresh runs).

    The run exists by then (:func:`fit_one` logs the config first); on other DDP ranks
    ``experiment`` is Lightning's no-op stand-in."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
