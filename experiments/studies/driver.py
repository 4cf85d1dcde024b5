"""The shared driver of the studies: one training loop, one way to finish a study.

* :func:`study` makes a function ``fn(cfg, **params) -> summary`` a Hydra-instantiable study
  (``_partial_: true`` or not) and handles ``study.publish``.
* :func:`train_runs` is THE loop of the training studies: for each run, fit it through the
  normal path (:func:`experiments.run.build`: LitModel + Trainer + loggers +
  LipschitzCallback), let the study measure it (``evaluate``), log the final bounds to the
  run's loggers, rewrite the study's tables and plots (``write``), then log a summary.
* :func:`finish_study` ends every study: the summary to the loggers, the list of files written
  (``study.json``, written last: a killed run has none, and cannot be published), and the
  optional publication into ``results/``.

Outputs go to the Hydra run directory (``paths.output_dir``), never to the committed
``results/``: publishing is the explicit step of :mod:`experiments.studies.publish`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from torch import nn

import lipreg
from experiments.reporting import CURVE_KEYS, atomic_write, cell, columns_of, csv_text, num

__all__ = [
    "CONF_DIR",
    "MANIFEST",
    "QUICK_CALLBACK",
    "BoundRecorder",
    "FitResult",
    "RunSpec",
    "callback_updates",
    "description",
    "finish_study",
    "fit",
    "load_group",
    "mark_substitute",
    "output_dir",
    "run_cfg",
    "study",
    "test_inputs",
    "train_runs",
    "write_curves",
]

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
MANIFEST = "study.json"  # written last by finish_study: the run finished, these files are its
PUBLISHED_SUFFIXES = (".md", ".csv", ".png")
QUICK_CALLBACK = {  # LipschitzCallback schedule of the quick image studies: every few steps
    "every_n_train_steps": 1,
    "certify_every_n_train_steps": 2,
    "seqlip_every_n_train_steps": 2,
    "lower_bound_points": 4,
}


# ------------------------------------------------------------------------------------------
# The study decorator and configs
# ------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def study(fn: Callable[..., dict[str, float]]) -> Callable[..., Any]:
    """``study(cfg, **params)`` runs; ``study(**params)`` (Hydra without ``_partial_``)
    returns the study bound to its parameters, to be called with ``cfg``. Besides ``fn``'s own
    parameters it takes ``publish`` (default false): copy the finished tables into
    ``<paths.results_dir>/<task_name>/`` (see :mod:`experiments.studies.publish`)."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig | None = None, /, **params: Any) -> Any:
        params = {k: _plain(v) for k, v in params.items()}
        if cfg is None:
            return functools.partial(wrapper, **params)
        publish = bool(params.pop("publish", False))
        summary = fn(cfg, **params)
        if publish:
            from experiments.studies.publish import publish as publish_run

            publish_run(output_dir(cfg), Path(str(cfg.paths.results_dir)))
        return summary

    sig = inspect.signature(fn)
    extra = inspect.Parameter("publish", inspect.Parameter.KEYWORD_ONLY, default=False)
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])  # type: ignore[attr-defined]
    return wrapper


def output_dir(cfg: DictConfig) -> Path:
    """The run directory (``paths.output_dir``, Hydra's run dir) where a study writes."""
    try:
        path = Path(str(cfg.paths.output_dir))
    except Exception as exc:  # ${hydra:...} outside a Hydra run
        raise ValueError(
            "a study writes into its run directory, paths.output_dir, which did not resolve "
            f"({exc}); run it through `python experiments/train.py experiment=...` or set "
            "paths.output_dir=/some/folder."
        ) from exc
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_group(group: str, name: str) -> DictConfig:
    """``conf/<group>/<name>.yaml`` as a config (a model or data option of another run)."""
    return OmegaConf.load(CONF_DIR / group / f"{name}.yaml")  # type: ignore[return-value]


def run_cfg(
    cfg: DictConfig,
    run: str,
    updates: dict[str, Any] | None = None,
    *,
    model: DictConfig | None = None,
    data: DictConfig | None = None,
) -> DictConfig:
    """A copy of ``cfg`` for one training run: no study, run-specific logger names and
    checkpoint folders, the given dotted-key ``updates``."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.study = None
        if model is not None:
            out.model = copy.deepcopy(model)
        if data is not None:
            out.data = copy.deepcopy(data)
        for key, value in (updates or {}).items():
            OmegaConf.update(out, key, value, merge=False)
        for lg in (out.get("logger") or {}).values():
            if isinstance(lg, DictConfig) and "name" in lg:
                lg.name = f"{lg.name}/{run}"
        has_checkpoint = False
        for cb in (out.get("callbacks") or {}).values():
            if isinstance(cb, DictConfig) and "dirpath" in cb:
                cb.dirpath = f"{cb.dirpath}/{run}"
            if isinstance(cb, DictConfig) and "ModelCheckpoint" in str(cb.get("_target_", "")):
                has_checkpoint = True
        if "trainer" in out:
            out.trainer.enable_checkpointing = has_checkpoint
    return out


def callback_updates(cfg: DictConfig, **values: Any) -> dict[str, Any]:
    """Dotted updates of ``callbacks.lipschitz.*`` (only if that callback is configured)."""
    if not (cfg.get("callbacks") and "lipschitz" in cfg.callbacks):
        return {}
    return {f"callbacks.lipschitz.{k}": v for k, v in values.items()}


def _hparams(cfg: DictConfig) -> dict[str, Any]:
    plain = {k: cfg[k] for k in cfg if k != "hydra"}
    try:
        return OmegaConf.to_container(OmegaConf.create(plain), resolve=True)  # type: ignore
    except Exception:  # an interpolation that only resolves inside Hydra: keep it as text
        return OmegaConf.to_container(OmegaConf.create(plain), resolve=False)  # type: ignore


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for pattern in (
            ".*does not have many workers.*",
            ".*log_every_n_steps.*",
            ".*Checkpoint directory.*",
            ".*LightningModule.*has parameters that were not used.*",
        ):
            warnings.filterwarnings("ignore", pattern)
        yield


def mark_substitute(datamodule: Any, paper_data: str | None) -> None:
    """Label image data that stands in for the paper's data set."""
    if paper_data is None or not hasattr(datamodule, "substitute_for"):
        return
    if getattr(datamodule, "name", None) == paper_data.lower():
        return  # the real thing (torchvision MNIST)
    if hasattr(datamodule, "image_size"):  # image data
        datamodule.substitute_for = paper_data


def description(datamodule: Any) -> str:
    return str(getattr(datamodule, "description", type(datamodule).__name__))


def test_inputs(datamodule: Any, max_points: int) -> torch.Tensor:
    """The first ``max_points`` inputs of the test set."""
    xs: list[torch.Tensor] = []
    n = 0
    for batch in datamodule.test_dataloader():
        xs.append(batch[0])
        n += len(batch[0])
        if n >= max_points:
            break
    return torch.cat(xs)[:max_points]


# ------------------------------------------------------------------------------------------
# One training run
# ------------------------------------------------------------------------------------------


class BoundRecorder(Callback):
    """Keeps every set of values :class:`lipreg.LipschitzCallback` computes (its
    ``last_metrics`` only holds the latest one), with the step it was computed at."""

    def __init__(self, source: lipreg.LipschitzCallback) -> None:
        super().__init__()
        self.source = source
        self.rows: list[dict[str, float]] = []
        self._seen: Any = None

    def _grab(self, trainer: pl.Trainer) -> None:
        metrics = self.source.last_metrics
        if metrics and metrics is not self._seen:
            self._seen = metrics
            row = {
                "step": float(self.source.last_step),
                **{k: float(v) for k, v in metrics.items()},
            }
            if self.rows and self.rows[-1]["step"] == row["step"]:
                self.rows[-1] = row  # the callback added values at the same step (fit end)
            else:
                self.rows.append(row)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._grab(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._grab(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._grab(trainer)  # the certified bound the callback computes at the end of a fit


@dataclass
class FitResult:
    run: str
    net: nn.Module
    datamodule: Any
    trainer: pl.Trainer
    metrics: dict[str, float]
    curve: list[dict[str, float]]
    train_time: float
    weights_path: Path


def fit(cfg: DictConfig, run: str, paper_data: str | None) -> FitResult:
    """Train one configuration through the normal LitModel + Trainer path, test it, save the
    weights to ``<output_dir>/weights/<run>.pt``; the loggers stay open for the final bounds."""
    from experiments.run import build

    pl.seed_everything(int(cfg.seed), workers=True)
    datamodule, model, trainer = build(cfg)
    mark_substitute(datamodule, paper_data)
    source = next((c for c in trainer.callbacks if isinstance(c, lipreg.LipschitzCallback)), None)
    recorder = BoundRecorder(source) if source is not None else None
    if recorder is not None:
        trainer.callbacks.append(recorder)
    for logger in trainer.loggers:
        logger.log_hyperparams(_hparams(cfg))
    log.info("training %s", run)
    start = time.perf_counter()
    with _quiet():
        trainer.fit(model, datamodule=datamodule)
    train_time = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    with _quiet():
        trainer.test(model, datamodule=datamodule, verbose=False)
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    weights_path = output_dir(cfg) / "weights" / f"{run}.pt"
    buf = io.BytesIO()
    torch.save(model.net.state_dict(), buf)
    atomic_write(weights_path, buf.getvalue())
    curve = recorder.rows if recorder is not None else []
    return FitResult(run, model.net, datamodule, trainer, metrics, curve, train_time, weights_path)


def write_curves(out: Path, fits: Sequence[FitResult]) -> None:
    """``curves.csv``: every bound the LipschitzCallback computed, per run and step."""
    keys = ["step", *CURVE_KEYS]
    rows = [{"run": f.run, **{k: r.get(k) for k in keys}} for f in fits for r in f.curve]
    if rows:
        atomic_write(out / "curves.csv", csv_text(rows))


def _finish_wandb(loggers: Iterable[Any]) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()


def _close_loggers(loggers: Sequence[Any], metrics: dict[str, Any], step: int) -> None:
    values = {k: f for k, v in metrics.items() if (f := num(v)) is not None}
    for logger in loggers:
        logger.log_metrics(values, step=step)
        logger.save()
        logger.finalize("success")
    _finish_wandb(loggers)


# ------------------------------------------------------------------------------------------
# The loop and the end of a study
# ------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """One training run of a study: its name, its config (see :func:`run_cfg`) and the data
    set the paper used, when ours stands in for it (the tables then say so)."""

    name: str
    cfg: DictConfig
    paper_data: str | None = None


Row = dict[str, Any]
Evaluate = Callable[[FitResult, RunSpec], tuple[Row, dict[str, Any]]]
Write = Callable[[Path, list[Row], list[FitResult]], None]


def train_runs(cfg: DictConfig, runs: Iterable[RunSpec], evaluate: Evaluate, write: Write) -> dict:
    """Fit every run, measure it (``evaluate`` returns its table row and its final values),
    log the final values to its loggers, rewrite the outputs after each run (``write``), and
    finish the study; returns the summary ``{"<run>/<key>": value}``.

    The runs stay in one process rather than a Hydra multirun: the study's table and plots
    need every run's results together, and each multirun job would pay the imports again
    (torch + Lightning + Hydra + lipreg: 14 s measured on this 2-core machine, more than a
    quick study's whole fit). Independent runs remain one command away; see the configs.
    """
    out = output_dir(cfg)
    rows: list[Row] = []
    fits: list[FitResult] = []
    summary: dict[str, float] = {}
    for spec in runs:
        result = fit(spec.cfg, spec.name, spec.paper_data)
        fits.append(result)
        row, final = evaluate(result, spec)
        rows.append(row)
        final_metrics = {f"final/{k}": v for k, v in final.items()}
        _close_loggers(result.trainer.loggers, final_metrics, result.trainer.global_step)
        summary.update(
            {f"{spec.name}/{k}": f for k, v in final.items() if (f := num(v)) is not None}
        )
        log.info("%s: %s", spec.name, {k: num(v) for k, v in final.items()})
        write(out, rows, fits)
    return finish_study(cfg, rows, summary)


def finish_study(cfg: DictConfig, rows: list[Row], summary: dict[str, Any]) -> dict[str, float]:
    """Log the study's table and summary (a 'summary' run of the configured loggers), then
    write the manifest ``study.json`` listing the finished outputs; returns the summary."""
    summary = {k: float(v) for k, v in summary.items() if num(v) is not None}
    _log_summary(cfg, rows, summary)
    out = output_dir(cfg)
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.suffix in PUBLISHED_SUFFIXES)
    manifest = {
        "study": str(cfg.task_name),
        "quick": bool((cfg.get("study") or {}).get("quick", False)),
        "files": files,
    }
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return summary


def _log_summary(cfg: DictConfig, rows: list[Row], metrics: dict[str, float]) -> None:
    from lightning.pytorch.loggers import WandbLogger

    from experiments.run import instantiate_group

    try:
        loggers = instantiate_group(run_cfg(cfg, "summary").get("logger"))
    except Exception as exc:  # a logger that cannot start must not lose the tables
        log.warning("could not create the loggers for the summary: %s", exc)
        return
    for logger in loggers:
        logger.log_hyperparams(_hparams(run_cfg(cfg, "summary")))
        if isinstance(logger, WandbLogger) and rows:
            columns = columns_of(rows)
            data = [[cell(r.get(c), True) for c in columns] for r in rows]
            logger.log_table(key="study/table", columns=columns, data=data)
    _close_loggers(loggers, metrics, step=0)
