"""The paper's studies (Scaman & Virmaux, NeurIPS 2018), each selectable as a Hydra experiment.

    python experiments/train.py experiment=paper_mlp logger=csv      # §3.2, trained MLPs
    python experiments/train.py experiment=paper_cnn logger=csv      # §3.3, CNNs (digits)
    python experiments/train.py experiment=paper_alexnet             # §3.4, bounds only
    python experiments/train.py experiment=paper_random              # §3.1, ideal scenario
    python experiments/train.py experiment=penalty_sweep logger=csv  # accuracy vs bound
    python experiments/train.py experiment=penalty_sweep_mlp         # SeqLip penalty, MLP

Every study is a function ``study(cfg, **params) -> dict`` (``experiments/train.py`` calls
``instantiate(cfg.study, _recursive_=False)(cfg)``; the configs set ``_partial_: true``, and a
study called without ``cfg`` returns itself bound to its parameters, so both styles work).
``quick=True`` shrinks every study for the tests.

Each study writes into ``<paths.results_dir>/<task_name>/``: ``table.md`` and ``table.csv``
(one row per network, the paper's numbers beside ours, ``–`` where a quantity was not
computed), PNG plots and, for training studies, ``curves.csv`` (the bound curves recorded from
:class:`lipreg.LipschitzCallback`). Every file is written to a temporary name and renamed, so a
crash never leaves a half-written table. Trained weights go to
``<paths.output_dir>/weights/<run>.pt`` (the Hydra run directory, not ``results/``).

Every number is labelled: **certified upper** bounds (AutoLip with certified layer norms,
exact SeqLip with full SVDs, the Frobenius product), **estimates** (AutoLip with Lanczos layer
norms, greedy SeqLip, top-k truncation) and **certified lower** bounds (largest local Jacobian
norm found). Rows say when the data stand in for the paper's (digits for MNIST) and when the
weights are random.

Each training run goes through the normal path (``experiments.train.build``: LitModel +
Trainer + loggers + LipschitzCallback), with a run-specific logger name and checkpoint folder.
"""

from __future__ import annotations

import copy
import csv
import functools
import io
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from torch import nn

import lipreg
from lipreg.functional.graph import eval_function
from lipreg.models import mlp

__all__ = [
    "PAPER_ALEXNET",
    "PAPER_CNN",
    "PAPER_MLP",
    "PAPER_RANDOM",
    "BoundRecorder",
    "haar_orthogonal",
    "paper_alexnet",
    "paper_cnn",
    "paper_mlp",
    "paper_random",
    "penalty_sweep",
    "random_spectrum_mlp",
    "theorem3_ratio_bound",
]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
DASH = "–"

# ------------------------------------------------------------------------------------------
# The paper's numbers (poster tables, paper.md §3.1-3.4)
# ------------------------------------------------------------------------------------------

PAPER_MLP: dict[int, dict[str, float]] = {  # §3.2; key: number of layers ("# layers")
    4: {
        "frob": 648.2,
        "autolip": 33.04,
        "seqlip": 21.47,
        "greedy": 21.47,
        "lb_data": 4.36,
        "lb_annealing": 4.55,
        "lb_grid": 6.56,
    },
    5: {
        "frob": 4283.1,
        "autolip": 134.4,
        "seqlip": 72.87,
        "greedy": 72.87,
        "lb_data": 6.77,
        "lb_annealing": 5.8,
        "lb_grid": 7.1,
    },
    7: {
        "frob": 22341.0,
        "autolip": 294.6,
        "seqlip": 130.2,
        "greedy": 130.2,
        "lb_data": 5.4,
        "lb_annealing": 5.27,
        "lb_grid": 6.51,
    },
    10: {
        "frob": 7343800.0,
        "autolip": 19248.2,
        "seqlip": 2463.44,
        "greedy": 2463.36,
        "lb_data": 10.04,
        "lb_annealing": 5.77,
        "lb_grid": 17.1,
    },
}
PAPER_CNN: dict[int, dict[str, float]] = {  # §3.3; key: number of conv layers
    4: {"autolip": 174.0, "greedy": 86.0, "ratio": 2.0, "lb_data": 12.64, "lb_annealing": 25.5},
    5: {"autolip": 790.1, "greedy": 335.0, "ratio": 2.4, "lb_data": 16.79, "lb_annealing": 22.2},
    7: {"autolip": 12141.0, "greedy": 3629.0, "ratio": 3.3, "lb_data": 31.22, "lb_annealing": 43.6},
    10: {"autolip": 4.5e6, "greedy": 8.2e5, "ratio": 5.4, "lb_data": 38.26, "lb_annealing": 107.8},
}
PAPER_ALEXNET = {"autolip": 3.62e7, "greedy": 5.45e6}  # §3.4 (pretrained AlexNet)
# §3.1: SeqLip/AutoLip read off the poster's plot (about ±15%), for 1..10 layers.
PAPER_RANDOM: dict[float, list[float]] = {
    0.5: [1.0, 0.71, 0.51, 0.38, 0.30, 0.21, 0.15, 0.12, 0.087, 0.058],
    0.1: [1.0, 0.40, 0.21, 0.083, 0.038, 0.015, 0.0075, 0.0038, 0.0019, 8.5e-4],
    0.01: [1.0, 0.36, 0.16, 0.068, 0.030, 0.0062, 0.0027, 6.8e-4, 5.5e-4, 8.7e-5],
}

CNN_MODELS = {  # model config name -> (number of conv layers, provenance)
    "cnn": (4, "the paper's (reference code models/mnist_4.py)"),
    "cnn5": (5, "the paper's (reference code models/mnist_5.py)"),
    "cnn7": (7, "OUR design (the paper's 7-layer CNN is not recoverable)"),
    "cnn10": (10, "OUR design (the paper's 10-layer CNN is not recoverable)"),
}

LEGEND = (
    "Kinds: '(certified upper)' = guaranteed upper bound on the Lipschitz constant; "
    "'(estimate)' = no guarantee either way (iterative layer norms, greedy or top-k SeqLip); "
    "'(certified lower)' = the largest local Jacobian norm found, a guaranteed lower bound. "
    f"'{DASH}' = not computed (or not reported by the paper)."
)


# ------------------------------------------------------------------------------------------
# Plumbing: study decorator, files, configs
# ------------------------------------------------------------------------------------------


def _study(fn: Callable[..., dict[str, float]]) -> Callable[..., Any]:
    """``study(cfg, **params)`` runs; ``study(**params)`` (Hydra without ``_partial_``)
    returns the study bound to its parameters, to be called with ``cfg``."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig | None = None, /, **params: Any) -> Any:
        params = {k: _plain(v) for k, v in params.items()}
        if cfg is None:
            return functools.partial(fn, **params)
        return fn(cfg, **params)

    return wrapper


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _results_dir(cfg: DictConfig) -> Path:
    out = Path(str(cfg.paths.results_dir)) / str(cfg.task_name)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _run_dir(cfg: DictConfig) -> Path:
    """The Hydra run directory (``paths.output_dir``), or the results folder without Hydra."""
    try:
        path = Path(str(cfg.paths.output_dir))
    except Exception:  # ${hydra:...} outside a Hydra run
        path = _results_dir(cfg) / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig: Any, path: Path) -> None:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    _atomic_write(path, buf.getvalue())


def _num(v: Any) -> float | None:
    """A finite float, or ``None`` (not computed)."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _cell(v: Any, csv_cell: bool) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float) or v is None:
        f = _num(v)
        if f is None:
            return DASH
        return repr(f) if csv_cell else f"{f:.4g}"
    text = str(v)
    return text if csv_cell else text.replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub-flavoured Markdown table (numbers to 4 significant digits)."""
    columns = _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c), False) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    columns = _columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c), True) for c in columns])
    return buf.getvalue()


def write_table(
    out: Path,
    title: str,
    rows: Sequence[dict[str, Any]],
    notes: Iterable[str] = (),
    extra_md: str = "",
) -> None:
    """``table.md`` (title, notes, table) and ``table.csv`` (the same rows), atomically."""
    md = f"# {title}\n\n" + "".join(f"- {n}\n" for n in [*notes, LEGEND]) + "\n"
    md += markdown_table(rows) + extra_md
    _atomic_write(out / "table.md", md)
    _atomic_write(out / "table.csv", _csv_text(rows))


def _load_group(group: str, name: str) -> DictConfig:
    return OmegaConf.load(CONF_DIR / group / f"{name}.yaml")  # type: ignore[return-value]


def _run_cfg(
    cfg: DictConfig,
    run: str,
    updates: dict[str, Any] | None = None,
    *,
    model: DictConfig | None = None,
    data: DictConfig | None = None,
) -> DictConfig:
    """A copy of ``cfg`` for one training run: no study, run-specific logger names and
    checkpoint folders, the given dotted-key ``updates``."""
    run_cfg = copy.deepcopy(cfg)
    with open_dict(run_cfg):
        run_cfg.study = None
        if model is not None:
            run_cfg.model = copy.deepcopy(model)
        if data is not None:
            run_cfg.data = copy.deepcopy(data)
        for key, value in (updates or {}).items():
            OmegaConf.update(run_cfg, key, value, merge=False)
        for lg in (run_cfg.get("logger") or {}).values():
            if isinstance(lg, DictConfig) and "name" in lg:
                lg.name = f"{lg.name}/{run}"
        has_checkpoint = False
        for cb in (run_cfg.get("callbacks") or {}).values():
            if isinstance(cb, DictConfig) and "dirpath" in cb:
                cb.dirpath = f"{cb.dirpath}/{run}"
            if isinstance(cb, DictConfig) and "ModelCheckpoint" in str(cb.get("_target_", "")):
                has_checkpoint = True
        if "trainer" in run_cfg:
            run_cfg.trainer.enable_checkpointing = has_checkpoint
    return run_cfg


def _has_lipschitz_callback(cfg: DictConfig) -> bool:
    return bool(cfg.get("callbacks")) and "lipschitz" in cfg.callbacks


def _callback_updates(cfg: DictConfig, **values: Any) -> dict[str, Any]:
    """Dotted updates of ``callbacks.lipschitz.*`` (only if that callback is configured)."""
    if not _has_lipschitz_callback(cfg):
        return {}
    return {f"callbacks.lipschitz.{k}": v for k, v in values.items()}


def _hparams(cfg: DictConfig) -> dict[str, Any]:
    plain = {k: cfg[k] for k in cfg if k != "hydra"}
    try:
        return OmegaConf.to_container(OmegaConf.create(plain), resolve=True)  # type: ignore
    except Exception:
        return OmegaConf.to_container(OmegaConf.create(plain), resolve=False)  # type: ignore


@contextmanager
def _quiet() -> Any:
    with warnings.catch_warnings():
        for pattern in (
            ".*does not have many workers.*",
            ".*log_every_n_steps.*",
            ".*Checkpoint directory.*",
            ".*LightningModule.*has parameters that were not used.*",
        ):
            warnings.filterwarnings("ignore", pattern)
        yield


def _mark_substitute(datamodule: Any, paper_data: str | None) -> None:
    """Label image data that stands in for the paper's data set."""
    if paper_data is None or not hasattr(datamodule, "substitute_for"):
        return
    if getattr(datamodule, "name", None) == paper_data.lower():
        return  # the real thing (torchvision MNIST)
    if hasattr(datamodule, "image_size"):  # image data
        datamodule.substitute_for = paper_data


def _description(datamodule: Any) -> str:
    return str(getattr(datamodule, "description", type(datamodule).__name__))


# ------------------------------------------------------------------------------------------
# Training runs and bound curves
# ------------------------------------------------------------------------------------------


class BoundRecorder(Callback):
    """Keeps every set of values :class:`lipreg.LipschitzCallback` computes (its
    ``last_metrics`` only holds the latest one), with the global step."""

    def __init__(self, source: Callback) -> None:
        super().__init__()
        self.source = source
        self.rows: list[dict[str, float]] = []
        self._seen: Any = None

    def _grab(self, trainer: pl.Trainer) -> None:
        metrics = getattr(self.source, "last_metrics", None)
        if metrics and metrics is not self._seen:
            self._seen = metrics
            step = getattr(self.source, "_last_step", trainer.global_step)
            self.rows.append({"step": float(step), **{k: float(v) for k, v in metrics.items()}})

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._grab(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._grab(trainer)


@dataclass
class FitResult:
    run: str
    net: nn.Module
    datamodule: Any
    trainer: pl.Trainer
    metrics: dict[str, float]
    curve: list[dict[str, float]]
    train_time: float
    weights_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _fit(run_cfg: DictConfig, run: str, paper_data: str | None) -> FitResult:
    """Train one configuration through the normal LitModel + Trainer path, test it, save the
    weights; the loggers stay open for :func:`_finish_run`."""
    from experiments.train import build

    pl.seed_everything(int(run_cfg.seed), workers=True)
    datamodule, model, trainer = build(run_cfg)
    _mark_substitute(datamodule, paper_data)
    source = next((c for c in trainer.callbacks if isinstance(c, lipreg.LipschitzCallback)), None)
    recorder = BoundRecorder(source) if source is not None else None
    if recorder is not None:
        trainer.callbacks.append(recorder)
    for logger in trainer.loggers:
        logger.log_hyperparams(_hparams(run_cfg))
    log.info("training %s", run)
    start = time.perf_counter()
    with _quiet():
        trainer.fit(model, datamodule=datamodule)
    train_time = time.perf_counter() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    with _quiet():
        trainer.test(model, datamodule=datamodule, verbose=False)
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    weights_dir = _run_dir(run_cfg) / "weights"
    weights_dir.mkdir(parents=True, exist_ok=True)
    weights_path = weights_dir / f"{run}.pt"
    buf = io.BytesIO()
    torch.save(model.net.state_dict(), buf)
    _atomic_write(weights_path, buf.getvalue())
    return FitResult(
        run=run,
        net=model.net,
        datamodule=datamodule,
        trainer=trainer,
        metrics=metrics,
        curve=recorder.rows if recorder is not None else [],
        train_time=train_time,
        weights_path=weights_path,
    )


def _finish_run(trainer: pl.Trainer, final: dict[str, Any]) -> None:
    """Log the final bounds to the run's loggers and close them (W&B: one run per fit)."""
    values = {f"final/{k}": f for k, v in final.items() if (f := _num(v)) is not None}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=trainer.global_step)
        logger.save()
        logger.finalize("success")
    _finish_wandb(trainer.loggers)


def _finish_wandb(loggers: Iterable[Any]) -> None:
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()


def _log_summary(cfg: DictConfig, rows: list[dict[str, Any]], metrics: dict[str, float]) -> None:
    """The study's table and summary metrics to the configured loggers (a 'summary' run)."""
    from lightning.pytorch.loggers import WandbLogger

    from experiments.train import instantiate_group

    run_cfg = _run_cfg(cfg, "summary")
    try:
        loggers = instantiate_group(run_cfg.get("logger"))
    except Exception as exc:  # a logger that cannot start must not lose the tables
        log.warning("could not create the loggers for the summary: %s", exc)
        return
    for logger in loggers:
        logger.log_hyperparams(_hparams(run_cfg))
        logger.log_metrics({k: v for k, v in metrics.items() if _num(v) is not None}, step=0)
        if isinstance(logger, WandbLogger) and rows:
            columns = _columns(rows)
            logger.log_table(
                key="study/table",
                columns=columns,
                data=[[_cell(r.get(c), True) for c in columns] for r in rows],
            )
        logger.save()
        logger.finalize("success")
    _finish_wandb(loggers)


CURVE_KEYS = {
    "lipschitz/autolip": ("AutoLip estimate", "-"),
    "lipschitz/autolip_certified": ("AutoLip certified", "o"),
    "lipschitz/seqlip": ("greedy SeqLip (estimate)", "-"),
    "lipschitz/lower_bound": ("lower bound (certified)", "-"),
}


def _write_curves(out: Path, fits: Sequence[FitResult]) -> None:
    keys = ["step", *CURVE_KEYS]
    rows = [{"run": f.run, **{k: r.get(k) for k in keys}} for f in fits for r in f.curve]
    if rows:
        _atomic_write(out / "curves.csv", _csv_text(rows))


def _plot_curves(path: Path, fits: Sequence[FitResult], title: str) -> None:
    """One panel per run: the callback's bounds vs global step (log y)."""
    plt = _pyplot()
    n = max(len(fits), 1)
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.0 * nrows), squeeze=False)
    for ax, fit in zip(axes.flat, fits, strict=False):
        for key, (label, style) in CURVE_KEYS.items():
            pts = [(r["step"], r[key]) for r in fit.curve if _num(r.get(key)) and r[key] > 0]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            if style == "o":
                ax.plot(xs, ys, "o", ms=5, mfc="none", label=label)
            else:
                ax.plot(xs, ys, style, marker=".", ms=5, lw=1.6, label=label)
        if not fit.curve:
            ax.text(0.5, 0.5, "no LipschitzCallback values", ha="center", transform=ax.transAxes)
        else:
            ax.set_yscale("log")
        ax.set_title(fit.run)
        ax.set_xlabel("global step")
        ax.set_ylabel("Lipschitz bound")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(fits) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    _save_fig(fig, path)


def _ratio(a: Any, b: Any) -> float | None:
    a, b = _num(a), _num(b)
    if a is None or b is None or b == 0:
        return None
    return a / b


def _certified_value(result: lipreg.LipschitzResult) -> float | None:
    return float(result.value) if result.certified else None


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _linear_layers(net: nn.Module) -> list[nn.Linear]:
    return [m for m in net.modules() if isinstance(m, nn.Linear)]


def _exact_seqlip(net: nn.Module, shape: tuple[int, ...]) -> lipreg.LipschitzResult | None:
    """Exact SeqLip when every activation width allows enumeration, else ``None``."""
    try:
        result, _ = _timed(lipreg.seqlip, net, shape, method="exact")
    except (ValueError, lipreg.NotSequentialError):
        return None
    return result if result.certified else None


def _test_inputs(datamodule: Any, max_points: int) -> torch.Tensor:
    xs: list[torch.Tensor] = []
    n = 0
    for batch in datamodule.test_dataloader():
        xs.append(batch[0])
        n += len(batch[0])
        if n >= max_points:
            break
    return torch.cat(xs)[:max_points]


# ------------------------------------------------------------------------------------------
# 1. paper_mlp (§3.2)
# ------------------------------------------------------------------------------------------


def grid_lower_bound(net: nn.Module, lo: Sequence[float], hi: Sequence[float], size: int) -> float:
    """Largest Jacobian norm of a 2-D-input network on a ``size × size`` grid over the box
    ``[lo, hi]`` (float64 copy, evaluation semantics): a certified lower bound."""
    net64 = copy.deepcopy(net).double()
    fn, _ = eval_function(net64)
    gx = torch.linspace(float(lo[0]), float(hi[0]), size, dtype=torch.float64)
    gy = torch.linspace(float(lo[1]), float(hi[1]), size, dtype=torch.float64)
    pts = torch.cartesian_prod(gx, gy)
    best = 0.0
    gen = torch.Generator().manual_seed(0)
    for chunk in pts.split(8192):
        sig, _ = lipreg.jacobian_norms(fn, chunk, n_iter=30, tol=1e-10, generator=gen)
        best = max(best, float(sig.max()))
    return best


@_study
def paper_mlp(
    cfg: DictConfig,
    *,
    depths: Sequence[int] = (4, 5, 7, 10),
    epochs: int = 400,
    width: int | None = None,
    exact_seqlip: bool = True,
    grid_size: int = 200,
    anneal_points: int = 256,
    anneal_steps: int = 100,
    quick: bool = False,
    quick_depths: Sequence[int] = (3,),
    quick_epochs: int = 2,
    quick_width: int = 8,
) -> dict[str, float]:
    """ReLU MLPs (2-D input, ``width`` units, ``depth`` linear layers) trained on the GP set:
    Frobenius product, AutoLip, exact and greedy SeqLip, lower bounds (data, annealing, grid)
    next to the poster's table; bound curves over training and AutoLip/SeqLip vs depth."""
    out = _results_dir(cfg)
    width = int(width if width is not None else cfg.model.get("width", 20))
    if quick:
        depths, epochs, width = quick_depths, quick_epochs, quick_width
        grid_size, anneal_points, anneal_steps = min(grid_size, 40), 32, 10
    shape = tuple(int(s) for s in cfg.model.input_shape)
    rows: list[dict[str, Any]] = []
    fits: list[FitResult] = []
    summary: dict[str, float] = {}
    for depth in depths:
        run = f"depth{depth}"
        updates = {"model.depth": int(depth), "model.width": width, "trainer.max_epochs": epochs}
        if quick:
            updates.update(
                _callback_updates(
                    cfg,
                    every_n_train_steps=5,
                    certify_every_n_train_steps=10,
                    seqlip_every_n_train_steps=5,
                )
            )
        fit = _fit(_run_cfg(cfg, run, updates), run, paper_data=None)
        fits.append(fit)
        net, dm = fit.net, fit.datamodule
        t0 = time.perf_counter()
        frob = math.prod(
            float(torch.linalg.matrix_norm(m.weight.detach().double(), "fro"))
            for m in _linear_layers(net)
        )
        al, _ = _timed(lipreg.autolip, net, shape)
        t_exact = time.perf_counter()
        sl = _exact_seqlip(net, shape) if exact_seqlip else None
        t_exact = time.perf_counter() - t_exact
        gsl, _ = _timed(lipreg.seqlip, net, shape, method="greedy")
        x_train = dm.train_dataset.tensors[0]
        lb_data, _ = _timed(
            lipreg.lower_bound, net, shape, inputs=x_train, n_random=0, n_anneal_steps=0
        )
        lb_anneal, _ = _timed(
            lipreg.lower_bound,
            net,
            shape,
            n_random=anneal_points,
            scale=float(dm.scale),
            n_anneal_steps=anneal_steps,
        )
        x_all = dm.x
        lb_grid = grid_lower_bound(net, x_all.min(0).values, x_all.max(0).values, grid_size)
        bounds_time = time.perf_counter() - t0
        seq = sl.value if sl is not None else gsl.value
        best_lb = max(lb_data.value, lb_anneal.value, lb_grid)
        paper = PAPER_MLP.get(int(depth), {})
        row = {
            "network": f"MLP 2-{width}x{depth - 1}-1 ({depth} linear layers, ReLU)",
            "data": _description(dm),
            "weights": f"trained {epochs} epochs (Adam lr {cfg.lr:g}, MSE, seed {cfg.seed})",
            "test MSE": fit.metrics.get("test/loss"),
            "Frobenius product (certified upper)": frob,
            "AutoLip (certified upper)": _certified_value(al),
            "AutoLip estimate": al.estimate,
            "SeqLip exact (certified upper)": sl.value if sl is not None else None,
            "greedy SeqLip (estimate)": gsl.value,
            "LB data (certified lower)": lb_data.value,
            "LB annealing (certified lower)": lb_anneal.value,
            "LB grid (certified lower)": lb_grid,
            "AutoLip/SeqLip": _ratio(al.value, seq),
            "SeqLip/best LB": _ratio(seq, best_lb),
            "train time (s)": fit.train_time,
            "exact SeqLip time (s)": t_exact if sl is not None else None,
            "bounds time (s)": bounds_time,
            "paper Frobenius": paper.get("frob"),
            "paper AutoLip": paper.get("autolip"),
            "paper SeqLip": paper.get("seqlip"),
            "paper greedy SeqLip": paper.get("greedy"),
            "paper LB data": paper.get("lb_data"),
            "paper LB annealing": paper.get("lb_annealing"),
            "paper LB grid": paper.get("lb_grid"),
            "paper AutoLip/SeqLip": _ratio(paper.get("autolip"), paper.get("seqlip")),
        }
        rows.append(row)
        final = {
            "frobenius": frob,
            "autolip_certified": _certified_value(al),
            "autolip_estimate": al.estimate,
            "seqlip_exact": row["SeqLip exact (certified upper)"],
            "seqlip_greedy": gsl.value,
            "lb_data": lb_data.value,
            "lb_annealing": lb_anneal.value,
            "lb_grid": lb_grid,
        }
        _finish_run(fit.trainer, final)
        summary.update({f"{run}/{k}": v for k, v in final.items() if _num(v) is not None})
        log.info("%s: %s", run, {k: _num(v) for k, v in final.items()})
        _write_mlp_outputs(out, cfg, rows, fits, epochs, anneal_points, anneal_steps, grid_size)
    _log_summary(cfg, rows, summary)
    return summary


def _write_mlp_outputs(
    out: Path,
    cfg: DictConfig,
    rows: list[dict[str, Any]],
    fits: list[FitResult],
    epochs: int,
    anneal_points: int,
    anneal_steps: int,
    grid_size: int,
) -> None:
    notes = [
        "Paper: Scaman & Virmaux (NeurIPS 2018), poster table 'AutoLip and SeqLip for MLPs of "
        "various size' (paper.md §3.2). 'paper *' columns are the poster's values for the "
        "paper's own trained networks (the paper's '# layers' is taken as linear layers; its "
        "data set size, ~15k points, and epochs are not recoverable).",
        "Data: the paper's synthetic protocol (2-D GP sample) regenerated here (not the "
        "paper's exact sample); weights: trained here from a seeded random init.",
        "LB data: lower_bound(inputs=training points, n_random=0, n_anneal_steps=0). "
        f"LB annealing: {anneal_points} random N(0, scale²) points + {anneal_steps} annealing "
        f"steps (16 chains), no data. LB grid: max Jacobian norm on a {grid_size}x{grid_size} "
        "grid over the data's bounding box (float64).",
        "AutoLip/SeqLip and SeqLip/best LB use exact SeqLip when computed, else greedy.",
        f"Training: {epochs} epochs, Adam lr {cfg.lr:g}, batch {cfg.data.get('batch_size')}; "
        "bound curves from lipreg.LipschitzCallback in bound_curves.png / curves.csv.",
    ]
    write_table(out, "paper_mlp: AutoLip and SeqLip for MLPs of various size", rows, notes)
    _write_curves(out, fits)
    _plot_curves(out / "bound_curves.png", fits, "MLPs on the GP set: bounds during training")
    _plot_mlp_depth(out / "ratio_vs_depth.png", rows, fits)


def _plot_mlp_depth(path: Path, rows: list[dict[str, Any]], fits: list[FitResult]) -> None:
    plt = _pyplot()
    depths = [int(f.run.removeprefix("depth")) for f in fits]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    series = [  # (ours, paper, label, colour, marker size): exact SeqLip drawn larger, as
        # greedy SeqLip usually coincides with it
        ("Frobenius product (certified upper)", "paper Frobenius", "Frobenius", "C4", 6),
        ("AutoLip (certified upper)", "paper AutoLip", "AutoLip", "C0", 6),
        ("SeqLip exact (certified upper)", "paper SeqLip", "SeqLip exact", "C1", 11),
        ("greedy SeqLip (estimate)", "paper greedy SeqLip", "greedy SeqLip", "C2", 5),
        ("LB grid (certified lower)", "paper LB grid", "LB grid", "C3", 6),
    ]
    for ours, paper, label, color, ms in series:
        pts = [(d, _num(r.get(ours))) for d, r in zip(depths, rows, strict=True)]
        pts = [(d, v) for d, v in pts if v]
        if pts:
            ax1.plot(*zip(*pts, strict=True), "-o", color=color, ms=ms, label=f"{label} (ours)")
        ppts = [(d, PAPER_MLP[d][_paper_key(paper)]) for d in depths if d in PAPER_MLP]
        if ppts:
            ax1.plot(
                *zip(*ppts, strict=True),
                "--s",
                color=color,
                ms=ms,
                mfc="none",
                alpha=0.7,
                label=f"{label} (paper)",
            )
    ax1.set_yscale("log")
    ax1.set_xlabel("depth (linear layers)")
    ax1.set_ylabel("Lipschitz bound")
    ax1.set_title("bounds vs depth (solid: ours, dashed: paper)")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7, ncol=2)
    ours = [(d, _num(r.get("AutoLip/SeqLip"))) for d, r in zip(depths, rows, strict=True)]
    ours = [(d, v) for d, v in ours if v]
    if ours:
        ax2.plot(*zip(*ours, strict=True), "-o", label="ours: AutoLip / SeqLip")
    pap = [(d, v["autolip"] / v["seqlip"]) for d, v in sorted(PAPER_MLP.items())]
    ax2.plot(*zip(*pap, strict=True), "--s", mfc="none", label="paper: AutoLip / SeqLip")
    ax2.set_xlabel("depth (linear layers)")
    ax2.set_ylabel("AutoLip / SeqLip")
    ax2.set_title("improvement of SeqLip over AutoLip")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def _paper_key(column: str) -> str:
    return {
        "paper Frobenius": "frob",
        "paper AutoLip": "autolip",
        "paper SeqLip": "seqlip",
        "paper greedy SeqLip": "greedy",
        "paper LB grid": "lb_grid",
    }[column]


# ------------------------------------------------------------------------------------------
# 2. paper_cnn (§3.3)
# ------------------------------------------------------------------------------------------


def _cnn_data(cfg: DictConfig, prefer_fashion_mnist: bool, limit: int | None) -> DictConfig | None:
    """Fashion-MNIST from Debian's package instead of digits, when it is installed."""
    from experiments.data import DEFAULT_FASHION_MNIST_ROOT, fashion_mnist_available

    target = str(cfg.data.get("_target_", ""))
    if not (prefer_fashion_mnist and target.endswith("DigitsDataModule")):
        return None
    if not fashion_mnist_available(DEFAULT_FASHION_MNIST_ROOT):
        return None
    data = _load_group("data", "fashion_mnist_local")
    with open_dict(data):
        data.root = DEFAULT_FASHION_MNIST_ROOT
        data.limit = limit
        data.batch_size = cfg.data.get("batch_size", 128)
    return data


def _image_bounds(
    net: nn.Module,
    shape: tuple[int, ...],
    x_test: torch.Tensor,
    *,
    top_k: int | None,
    lb_random: int,
    lb_anneal_steps: int,
    exact: bool = False,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    al, t_al = _timed(lipreg.autolip, net, shape)
    sl = _exact_seqlip(net, shape) if exact else None
    gsl, t_gsl = _timed(lipreg.seqlip, net, shape, method="greedy", top_k=top_k, max_iter=30)
    lb_data, _ = _timed(lipreg.lower_bound, net, shape, inputs=x_test, n_random=0, n_anneal_steps=0)
    lb_anneal, _ = _timed(
        lipreg.lower_bound,
        net,
        shape,
        inputs=x_test,
        n_random=lb_random,
        n_anneal_steps=lb_anneal_steps,
    )
    return {
        "autolip": al,
        "seqlip_exact": sl,
        "greedy": gsl,
        "lb_data": lb_data,
        "lb_anneal": lb_anneal,
        "time": time.perf_counter() - t0,
        "time_autolip": t_al,
        "time_greedy": t_gsl,
    }


@_study
def paper_cnn(
    cfg: DictConfig,
    *,
    models: Sequence[str] = ("cnn", "cnn5", "cnn7", "cnn10"),
    epochs: int = 10,
    top_k: int = 200,
    prefer_fashion_mnist: bool = True,
    fashion_limit: int | None = 12000,
    lb_points: int = 512,
    lb_random: int = 256,
    lb_anneal_steps: int = 30,
    quick: bool = False,
    quick_models: Sequence[str] = ("cnn",),
    quick_epochs: int = 1,
    quick_top_k: int = 10,
    quick_limit: int = 300,
) -> dict[str, float]:
    """The MNIST CNNs (4, 5 layers: the paper's; 7, 10: ours) trained a few epochs on digits
    (or Fashion-MNIST), a substitute for MNIST: AutoLip, greedy SeqLip (top-k), lower bounds
    (data, annealing) next to the poster's table; bounds vs depth and over training."""
    out = _results_dir(cfg)
    updates: dict[str, Any] = {}
    if quick:
        models, epochs, top_k = quick_models, quick_epochs, quick_top_k
        lb_points, lb_random, lb_anneal_steps = 32, 8, 2
        updates["data.limit"] = quick_limit
        updates.update(
            _callback_updates(
                cfg,
                every_n_train_steps=1,
                certify_every_n_train_steps=2,
                seqlip_top_k=top_k,
                seqlip_every_n_train_steps=2,
                lower_bound_points=4,
            )
        )
    data = _cnn_data(cfg, prefer_fashion_mnist, quick_limit if quick else fashion_limit)
    rows: list[dict[str, Any]] = []
    fits: list[FitResult] = []
    summary: dict[str, float] = {}
    for name in models:
        n_layers, provenance = CNN_MODELS.get(name, (None, "not from the paper"))
        model_cfg = _load_group("model", name)
        run_cfg = _run_cfg(
            cfg, name, {"trainer.max_epochs": epochs, **updates}, model=model_cfg, data=data
        )
        fit = _fit(run_cfg, name, paper_data="MNIST")
        fits.append(fit)
        shape = tuple(int(s) for s in run_cfg.model.input_shape)
        x_test = _test_inputs(fit.datamodule, lb_points)
        b = _image_bounds(
            fit.net,
            shape,
            x_test,
            top_k=top_k,
            lb_random=lb_random,
            lb_anneal_steps=lb_anneal_steps,
        )
        al, gsl = b["autolip"], b["greedy"]
        best_lb = max(b["lb_data"].value, b["lb_anneal"].value)
        paper = PAPER_CNN.get(n_layers or -1, {})
        row = {
            "network": f"{run_cfg.model.name} ({n_layers} conv layers; {provenance})",
            "data": _description(fit.datamodule),
            "weights": f"trained {epochs} epochs (Adam lr {cfg.lr:g}, cross-entropy, seed "
            f"{cfg.seed})",
            "test accuracy": fit.metrics.get("test/acc"),
            "AutoLip (certified upper)": _certified_value(al),
            "AutoLip estimate": al.estimate,
            "SeqLip exact (certified upper)": None,
            f"greedy SeqLip top-{top_k} (estimate)": gsl.value,
            "LB data (certified lower)": b["lb_data"].value,
            "LB annealing (certified lower)": b["lb_anneal"].value,
            "AutoLip/greedy SeqLip": _ratio(al.value, gsl.value),
            "greedy SeqLip/best LB": _ratio(gsl.value, best_lb),
            "train time (s)": fit.train_time,
            "greedy SeqLip time (s)": b["time_greedy"],
            "bounds time (s)": b["time"],
            "paper AutoLip": paper.get("autolip"),
            "paper greedy SeqLip": paper.get("greedy"),
            "paper ratio": paper.get("ratio"),
            "paper LB data": paper.get("lb_data"),
            "paper LB annealing": paper.get("lb_annealing"),
        }
        rows.append(row)
        final = {
            "autolip_certified": _certified_value(al),
            "autolip_estimate": al.estimate,
            "seqlip_greedy": gsl.value,
            "lb_data": b["lb_data"].value,
            "lb_annealing": b["lb_anneal"].value,
            "test_acc": fit.metrics.get("test/acc"),
        }
        _finish_run(fit.trainer, final)
        summary.update({f"{name}/{k}": v for k, v in final.items() if _num(v) is not None})
        log.info("%s: %s", name, {k: _num(v) for k, v in final.items()})
        notes = [
            "Paper: poster table 'AutoLip and SeqLip for MNIST-CNNs of various size' "
            "(paper.md §3.3); 'paper *' columns are for the paper's networks trained on real "
            "MNIST (24-39 epochs). The 7- and 10-layer rows compare different architectures.",
            "DATA IS A SUBSTITUTE for MNIST (see the data column): our networks are trained "
            f"only {epochs} epochs on it, so magnitudes are not comparable with the paper's.",
            f"Greedy SeqLip: top-{top_k} singular triplets per convolution (the reference "
            "code's 200), rank-one-update greedy per pair: an estimate, not a bound.",
            f"LB data: the first {len(x_test)} test images, no search. LB annealing: the same "
            f"images + {lb_random} random points, then {lb_anneal_steps} annealing steps.",
        ]
        write_table(
            out, "paper_cnn: AutoLip and SeqLip for MNIST-CNNs of various size", rows, notes
        )
        _write_curves(out, fits)
        _plot_curves(out / "bound_curves.png", fits, "CNNs: bounds during training")
        _plot_cnn_depth(out / "bounds_vs_depth.png", rows, fits, top_k)
    _log_summary(cfg, rows, summary)
    return summary


def _plot_cnn_depth(
    path: Path, rows: list[dict[str, Any]], fits: list[FitResult], top_k: int
) -> None:
    plt = _pyplot()
    depths = [CNN_MODELS.get(f.run, (i + 1, ""))[0] for i, f in enumerate(fits)]
    fig, ax = plt.subplots(figsize=(7, 4.6))
    best = [max(r["LB data (certified lower)"], r["LB annealing (certified lower)"]) for r in rows]
    series = [
        ([r.get("AutoLip (certified upper)") for r in rows], "autolip", "AutoLip", "C0"),
        (
            [r.get(f"greedy SeqLip top-{top_k} (estimate)") for r in rows],
            "greedy",
            "greedy SeqLip",
            "C2",
        ),
        (best, "lb_annealing", "best lower bound", "C3"),
    ]
    for values, key, label, color in series:
        pts = [(d, v) for d, v in zip(depths, values, strict=True) if _num(v)]
        if pts:
            ax.plot(*zip(*pts, strict=True), "-o", color=color, label=f"{label} (ours)")
        ppts = [(d, PAPER_CNN[d][key]) for d in sorted(PAPER_CNN)]
        ax.plot(
            *zip(*ppts, strict=True),
            "--s",
            color=color,
            mfc="none",
            alpha=0.7,
            label=f"{label} (paper, MNIST)",
        )
    ax.set_yscale("log")
    ax.set_xlabel("conv layers")
    ax.set_ylabel("Lipschitz bound")
    ax.set_title("CNN bounds vs depth (ours: substitute data, few epochs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    _save_fig(fig, path)


# ------------------------------------------------------------------------------------------
# 3. paper_alexnet (§3.4)
# ------------------------------------------------------------------------------------------


def _alexnet(num_classes: int, weights: str | None, seed: int) -> tuple[nn.Module, str, bool]:
    from experiments.models import alexnet

    if weights:
        try:
            net = alexnet(num_classes=num_classes, weights=weights)
            return net, f"pretrained ({weights})", True
        except (RuntimeError, FileNotFoundError) as exc:
            log.warning("AlexNet weights unavailable: %s", exc)
            reason = "pretrained weights not downloadable here"
            if isinstance(exc, FileNotFoundError):
                reason = f"weights file {weights!r} not found"
    else:
        reason = "weights=null requested"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = alexnet(num_classes=num_classes, weights=None)
    return net, f"RANDOM weights (torchvision init, seed {seed}): {reason}", False


@_study
def paper_alexnet(
    cfg: DictConfig,
    *,
    weights: str | None = "imagenet",
    top_k: int = 50,
    n_images: int = 8,
    n_random: int = 8,
    anneal_steps: int = 0,
    seed: int = 0,
    quick: bool = False,
    quick_size: int = 64,
    quick_top_k: int = 5,
    quick_hidden: int = 64,
) -> dict[str, float]:
    """Bounds of torchvision's AlexNet (no training): AutoLip (certified, with the factor 2 of
    each overlapping max-pool), the reference code's product of the 8 layer norms, greedy
    SeqLip (top-k) and a lower bound from a few digits images resized to 224 + random points.

    ``quick``: a ``quick_size``² input and a narrow classifier (``quick_hidden`` units), random
    weights — a smoke test of the pipeline, not AlexNet's numbers."""
    out = _results_dir(cfg)
    num_classes = int(cfg.model.get("num_classes") or 1000)
    shape = tuple(int(s) for s in cfg.model.input_shape)
    if quick:
        net, weights_text, _ = _alexnet(10, None, seed)
        net.classifier[1] = nn.Linear(net.classifier[1].in_features, quick_hidden)
        net.classifier[4] = nn.Linear(quick_hidden, quick_hidden)
        net.classifier[6] = nn.Linear(quick_hidden, 10)
        shape = (shape[0], quick_size, quick_size)
        weights_text = f"QUICK TEST: narrow classifier ({quick_hidden} units), {weights_text}"
        top_k, n_images, n_random, anneal_steps = quick_top_k, 2, 2, 0
        network = f"AlexNet features + {quick_hidden}-unit classifier at {shape} (quick mode)"
    else:
        net, weights_text, _ = _alexnet(num_classes, weights, seed)
        network = f"torchvision AlexNet ({num_classes} classes) at {shape}"
    net.eval()
    data_cfg = copy.deepcopy(cfg.data)
    with open_dict(data_cfg):
        if "image_size" in data_cfg:
            data_cfg.image_size = list(shape[1:])
            data_cfg.channels = shape[0]
    datamodule = instantiate(data_cfg)
    datamodule.setup("test")
    _mark_substitute(datamodule, "ImageNet")
    x_imgs = _test_inputs(datamodule, n_images)

    al, t_al = _timed(lipreg.autolip, net, shape)
    affine = [lb for lb in al.layers if lb.kind == "affine"]
    pools = [lb for lb in al.layers if lb.kind == "nonlinear"]
    pool_factor = math.prod(lb.value for lb in pools)
    ref_product = math.prod(lb.estimate if lb.estimate is not None else lb.value for lb in affine)
    gsl, t_gsl = _timed(lipreg.seqlip, net, shape, method="greedy", top_k=top_k, max_iter=30)
    gsl_pools = math.prod(lb.value for lb in gsl.layers if lb.kind == "nonlinear")
    lb_res, t_lb = _timed(
        lipreg.lower_bound,
        net,
        shape,
        inputs=x_imgs,
        n_random=n_random,
        n_anneal_steps=anneal_steps,
        batch_size=8,
    )
    row = {
        "network": network,
        "data": f"lower bound only: {len(x_imgs)} images of "
        + _description(datamodule)
        + f" + {n_random} random points",
        "weights": weights_text,
        "AutoLip (certified upper)": _certified_value(al),
        "max-pool factors": pool_factor,
        "AutoLip estimate": al.estimate,
        f"product of the {len(affine)} layer norms (reference-code style, estimate)": ref_product,
        "SeqLip exact (certified upper)": None,
        f"greedy SeqLip top-{top_k} (estimate)": gsl.value,
        "greedy SeqLip without max-pool factors (reference-code style)": gsl.value / gsl_pools,
        "LB (certified lower)": lb_res.value,
        "AutoLip/greedy SeqLip": _ratio(al.value, gsl.value),
        "greedy SeqLip/LB": _ratio(gsl.value, lb_res.value),
        "AutoLip time (s)": t_al,
        "greedy SeqLip time (s)": t_gsl,
        "LB time (s)": t_lb,
        "paper AutoLip (product of 8 layer norms)": PAPER_ALEXNET["autolip"],
        "paper greedy SeqLip": PAPER_ALEXNET["greedy"],
        "paper AutoLip/greedy SeqLip": PAPER_ALEXNET["autolip"] / PAPER_ALEXNET["greedy"],
    }
    layer_rows = [
        {
            "factor": lb.name,
            "kind": lb.kind,
            "AutoLip factor (certified upper)": lb.value if lb.certified else None,
            "estimate": lb.estimate,
            "method": lb.method,
        }
        for lb in al.layers
        if lb.kind != "activation"
    ] + [
        {
            "factor": f"SeqLip: {lb.name}",
            "kind": lb.kind,
            "AutoLip factor (certified upper)": None,
            "estimate": lb.value,
            "method": f"{lb.method} (top-{top_k})",
        }
        for lb in gsl.layers
        if lb.kind != "activation"
    ]
    pool_text = " × ".join(f"{lb.value:g}" for lb in pools) or "none"
    notes = [
        "Paper: poster table 'AutoLip and SeqLip for AlexNet' (paper.md §3.4), ImageNet-"
        "pretrained AlexNet: AutoLip 3.62e7, greedy SeqLip 5.45e6. The paper's 'AutoLip' is "
        "the reference code's product of the 8 layer spectral norms, with max-pools counted "
        "as 1 — compare it with our 'product of the layer norms' column.",
        f"Our certified AutoLip multiplies in each overlapping 3x3/2 max-pool's true constant "
        f"({pool_text} = {pool_factor:g}; a max-pool is 2-Lipschitz when an input feeds 4 "
        "windows), so it is the reference product × this factor (up to certification).",
        f"Weights: {weights_text}.",
        f"Greedy SeqLip: top-{top_k} singular triplets per map (the paper's code: 200); "
        "pairs across a max-pool are not coupled (as in the reference code), the pools' "
        "factors are included in our greedy value (the next column divides them out).",
        "Data: only for the lower bound; digits are a SUBSTITUTE for ImageNet images.",
    ]
    extra = "\n## Per-factor breakdown\n\n" + markdown_table(layer_rows)
    write_table(out, "paper_alexnet: AutoLip and SeqLip for AlexNet", [row], notes, extra)
    _atomic_write(out / "layers.csv", _csv_text(layer_rows))
    _plot_alexnet(out / "bounds.png", row, al, top_k)
    summary = {
        "autolip_certified": _num(_certified_value(al)),
        "autolip_estimate": al.estimate,
        "reference_product": ref_product,
        "max_pool_factor": pool_factor,
        "seqlip_greedy": gsl.value,
        "seqlip_greedy_reference_style": gsl.value / gsl_pools,
        "lower_bound": lb_res.value,
    }
    summary = {k: float(v) for k, v in summary.items() if _num(v) is not None}
    _log_summary(cfg, [row], summary)
    return summary


def _plot_alexnet(path: Path, row: dict[str, Any], al: lipreg.LipschitzResult, top_k: int) -> None:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    layers = [lb for lb in al.layers if lb.kind != "activation"]
    names = [lb.name if len(lb.name) <= 22 else lb.name[:10] + "…" + lb.name[-10:] for lb in layers]
    xs = range(len(layers))
    ax1.bar([x - 0.2 for x in xs], [lb.value for lb in layers], 0.4, label="certified factor")
    ax1.bar(
        [x + 0.2 for x in xs],
        [lb.estimate or lb.value for lb in layers],
        0.4,
        label="estimate (Lanczos)",
    )
    ax1.set_xticks(list(xs), names, rotation=45, ha="right", fontsize=8)
    ax1.set_ylabel("factor (layer norm or pooling constant)")
    ax1.set_title("AutoLip factors of AlexNet")
    ax1.grid(True, axis="y", alpha=0.3)
    ax1.legend(fontsize=8)
    bars = [
        ("AutoLip\ncertified", row["AutoLip (certified upper)"], "C0"),
        (
            "layer-norm\nproduct",
            next(v for k, v in row.items() if k.startswith("product of")),
            "C0",
        ),
        (f"greedy SeqLip\ntop-{top_k}", row[f"greedy SeqLip top-{top_k} (estimate)"], "C2"),
        ("lower\nbound", row["LB (certified lower)"], "C3"),
        ("paper\nAutoLip", PAPER_ALEXNET["autolip"], "0.6"),
        ("paper greedy\nSeqLip", PAPER_ALEXNET["greedy"], "0.6"),
    ]
    bars = [(n, v, c) for n, v, c in bars if _num(v)]
    ax2.bar(range(len(bars)), [v for _, v, _ in bars], color=[c for _, _, c in bars])
    ax2.set_xticks(range(len(bars)), [n for n, _, _ in bars], fontsize=8)
    ax2.set_yscale("log")
    ax2.set_title(
        f"totals ({row['weights'][:40]}…)"
        if len(row["weights"]) > 40
        else f"totals ({row['weights']})",
        fontsize=9,
    )
    ax2.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    _save_fig(fig, path)


# ------------------------------------------------------------------------------------------
# 4. paper_random (§3.1, the "ideal scenario")
# ------------------------------------------------------------------------------------------


def haar_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-distributed ``n × n`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return q * d


def random_spectrum_mlp(
    n_layers: int, ratio: float, width: int = 100, seed: int = 0, d_in: int = 2, d_out: int = 1
) -> nn.Sequential:
    """ReLU MLP ``d_in → width × (n_layers − 1) → d_out`` (float64, zero biases) whose every
    weight is ``U diag(1, r, ..., r) Vᵀ`` with Haar-random ``U``, ``V``: every layer has
    spectral norm 1 and second singular value ``ratio``. ``U``, ``V`` depend on
    ``(seed, n_layers)`` only, so the ratios share them."""
    net = mlp(d_in, (width,) * (n_layers - 1), d_out).double()
    gen = torch.Generator().manual_seed(10_007 * seed + n_layers)
    with torch.no_grad():
        for layer in _linear_layers(net):
            n_out, n_in = layer.weight.shape
            u, v = haar_orthogonal(n_out, gen), haar_orthogonal(n_in, gen)
            k = min(n_out, n_in)
            s = torch.full((k,), float(ratio), dtype=torch.float64)
            s[0] = 1.0
            layer.weight.copy_(u[:, :k] @ torch.diag(s) @ v[:, :k].T)
            layer.bias.zero_()
    return net


def theorem3_ratio_bound(net: nn.Module) -> float:
    """Theorem 3's bound on SeqLip/AutoLip (paper.md §2.9) from the weights:
    ``Π_k sqrt((1 − r_k − r_{k+1}) m_k² + r_k + r_{k+1} + r_k r_{k+1})`` with
    ``m_k = max_σ |⟨σ·v_{k+1}, u_k⟩|``."""
    svds = [torch.linalg.svd(m.weight.detach().double()) for m in _linear_layers(net)]
    r = [float(S[1] / S[0]) if S.numel() > 1 else 0.0 for _, S, _ in svds]
    bound = 1.0
    for k in range(len(svds) - 1):
        u_k = svds[k][0][:, 0]
        v_next = svds[k + 1][2][0, :]
        prod = u_k * v_next
        m = max(float(prod.clamp_min(0).sum()), float((-prod).clamp_min(0).sum()))
        a, b = r[k], r[k + 1]
        bound *= math.sqrt(max((1 - a - b) * m * m + a + b + a * b, 0.0))
    return bound


@_study
def paper_random(
    cfg: DictConfig,
    *,
    width: int = 100,
    max_layers: int = 10,
    ratios: Sequence[float] = (0.5, 0.1, 0.01),
    seeds: int = 5,
    quick: bool = False,
    quick_max_layers: int = 3,
    quick_seeds: int = 1,
) -> dict[str, float]:
    """Random MLPs with normalised spectra (the ideal scenario): AutoLip (= 1 by construction,
    certified) and greedy SeqLip vs the number of linear layers, for several ratios r of the
    second to the first singular value; against 1/π^(K−1) and the poster's curves."""
    out = _results_dir(cfg)
    if quick:
        max_layers, seeds = quick_max_layers, quick_seeds
    rows: list[dict[str, Any]] = []
    summary: dict[str, float] = {}
    start = time.perf_counter()
    for ratio in ratios:
        for n_layers in range(1, max_layers + 1):
            als, gsls, thm = [], [], []
            t0 = time.perf_counter()
            for seed in range(seeds):
                net = random_spectrum_mlp(n_layers, ratio, width, seed)
                al, _ = _timed(lipreg.autolip, net, (2,))
                gsl, _ = _timed(lipreg.seqlip, net, (2,), method="greedy")
                if not al.certified:
                    raise RuntimeError(f"AutoLip could not be certified: {al.notes}")
                als.append(al.value)
                gsls.append(gsl.value)
                thm.append(theorem3_ratio_bound(net))
            ratios_k = [g / a for g, a in zip(gsls, als, strict=True)]
            poster = PAPER_RANDOM.get(float(ratio), [])
            rows.append(
                {
                    "network": f"MLP 2-{width}x{n_layers - 1}-1 ({n_layers} linear layers)",
                    "data": "none (bounds of the weights only)",
                    "weights": f"RANDOM: U·diag(1, r, …, r)·Vᵀ, Haar U, V; seeds 0..{seeds - 1}",
                    "r (s2/s1)": float(ratio),
                    "linear layers K": n_layers,
                    "seeds": seeds,
                    "AutoLip (certified upper), mean": sum(als) / seeds,
                    "SeqLip exact (certified upper)": None,
                    "greedy SeqLip (estimate), mean": sum(gsls) / seeds,
                    "SeqLip/AutoLip mean": sum(ratios_k) / seeds,
                    "SeqLip/AutoLip min": min(ratios_k),
                    "SeqLip/AutoLip max": max(ratios_k),
                    "Theorem 3 bound on SeqLip/AutoLip (mean)": sum(thm) / seeds,
                    "1/π^(K−1)": math.pi ** -(n_layers - 1),
                    "poster reading (±15%)": poster[n_layers - 1]
                    if n_layers <= len(poster)
                    else None,
                    "time (s)": time.perf_counter() - t0,
                }
            )
            summary[f"r{ratio:g}/K{n_layers}/seqlip_over_autolip"] = sum(ratios_k) / seeds
        log.info("ratio %g done (%.1f s)", ratio, time.perf_counter() - start)
    notes = [
        "Setup (paper.md §3.1, reference lip_cst_comparison.py): MLP with input 2, output 1, "
        f"hidden width {width}, K = number of LINEAR layers (K − 1 hidden ReLU layers), "
        "K = 1 is a single Linear(2, 1). Every weight is U·S·Vᵀ with Haar-random orthogonal "
        "U, V (QR of a Gaussian, sign-fixed, seeded) and S = diag(1, r, ..., r); zero biases.",
        "AutoLip = product of spectral norms = 1 by construction (certified). Greedy SeqLip "
        f"uses full SVDs (width {width} is beyond exact enumeration); mean over {seeds} seeds.",
        "Theorem 3 (paper.md §2.9) bounds exact SeqLip/AutoLip from above, hence also greedy.",
        "Poster readings: approximate values read off the poster's plot (about ±15%); the "
        "poster's exact setup is uncertain (see paper.md §3.1).",
        f"Total time {time.perf_counter() - start:.1f} s.",
    ]
    write_table(out, "paper_random: SeqLip in the ideal scenario (random weights)", rows, notes)
    _plot_random(out / "ratio_vs_layers.png", rows, ratios, max_layers)
    _log_summary(cfg, rows, summary)
    return summary


def _plot_random(
    path: Path, rows: list[dict[str, Any]], ratios: Sequence[float], max_layers: int
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ks = list(range(1, max_layers + 1))
    ax.plot(ks, [1.0] * len(ks), ":", color="k", label="AutoLip (= 1)")
    ax.plot(ks, [math.pi ** -(k - 1) for k in ks], "--", color="k", label="1/π^(K−1) (limit)")
    for i, ratio in enumerate(ratios):
        sel = [r for r in rows if r["r (s2/s1)"] == float(ratio)]
        k = [r["linear layers K"] for r in sel]
        color = f"C{i}"
        ax.plot(
            k,
            [r["SeqLip/AutoLip mean"] for r in sel],
            "-o",
            color=color,
            ms=4,
            label=f"greedy SeqLip / AutoLip, r = {ratio:g} (ours)",
        )
        ax.fill_between(
            k,
            [r["SeqLip/AutoLip min"] for r in sel],
            [r["SeqLip/AutoLip max"] for r in sel],
            color=color,
            alpha=0.15,
        )
        poster = PAPER_RANDOM.get(float(ratio), [])
        pk = [kk for kk in ks if kk <= len(poster)]
        ax.plot(
            pk,
            [poster[kk - 1] for kk in pk],
            "s",
            color=color,
            mfc="none",
            ms=7,
            label=f"poster reading, r = {ratio:g}",
        )
    ax.set_yscale("log")
    ax.set_xlabel("number of linear layers K")
    ax.set_ylabel("SeqLip / AutoLip")
    ax.set_title("SeqLip in the ideal scenario (random orthogonal layers, width 100)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, path)


# ------------------------------------------------------------------------------------------
# 5. penalty_sweep
# ------------------------------------------------------------------------------------------


@_study
def penalty_sweep(
    cfg: DictConfig,
    *,
    weights: Sequence[float] = (0.0, 1e-3, 1e-2, 1e-1),
    epochs: int = 10,
    top_k: int | None = 200,
    lb_points: int = 512,
    lb_random: int = 128,
    lb_anneal_steps: int = 30,
    quick: bool = False,
    quick_weights: Sequence[float] = (0.0, 0.1),
    quick_epochs: int = 1,
    quick_limit: int = 300,
    quick_width: int = 8,
) -> dict[str, float]:
    """Accuracy vs Lipschitz bound: the same network, data, seed and epochs for every
    ``penalty.weight`` in ``weights`` (``cfg.penalty`` gives the method and form)."""
    if not cfg.get("penalty"):
        raise ValueError("penalty_sweep needs a penalty: penalty=autolip or penalty=seqlip.")
    out = _results_dir(cfg)
    classification = cfg.model.task == "classification"
    updates: dict[str, Any] = {}
    if quick:
        weights, epochs = quick_weights, quick_epochs
        lb_points, lb_random, lb_anneal_steps = 32, 8, 2
        top_k = 10 if top_k is not None else None
        if "limit" in cfg.data:
            updates["data.limit"] = quick_limit
        elif "n_train" in cfg.data:
            updates["data.n_train"] = quick_limit
        if "width" in cfg.model:  # the paper MLP: exact SeqLip in milliseconds
            updates["model.width"] = quick_width
        updates.update(
            _callback_updates(
                cfg,
                every_n_train_steps=1,
                certify_every_n_train_steps=2,
                seqlip_top_k=top_k,
                seqlip_every_n_train_steps=2,
                lower_bound_points=4,
            )
        )
    shape = tuple(int(s) for s in cfg.model.input_shape)
    method, form = cfg.penalty.get("method", "autolip"), cfg.penalty.get("form", "log")
    is_mnist_model = str(cfg.model.get("name")).startswith("mnist")
    paper_data = "MNIST" if classification and is_mnist_model else None
    rows: list[dict[str, Any]] = []
    fits: list[FitResult] = []
    summary: dict[str, float] = {}
    for weight in weights:
        run = f"weight{weight:g}"
        run_cfg = _run_cfg(
            cfg, run, {"penalty.weight": float(weight), "trainer.max_epochs": epochs, **updates}
        )
        fit = _fit(run_cfg, run, paper_data=paper_data)
        fits.append(fit)
        x_test = _test_inputs(fit.datamodule, lb_points)
        b = _image_bounds(
            fit.net,
            shape,
            x_test,
            top_k=top_k,
            lb_random=lb_random,
            lb_anneal_steps=lb_anneal_steps,
            exact=True,
        )
        al, gsl, sl = b["autolip"], b["greedy"], b["seqlip_exact"]
        best_lb = max(b["lb_data"].value, b["lb_anneal"].value)
        seq = sl.value if sl is not None else gsl.value
        metric = "test accuracy" if classification else "test MSE"
        row = {
            "network": str(cfg.model.get("name")),
            "data": _description(fit.datamodule),
            "weights": f"trained {epochs} epochs (Adam lr {cfg.lr:g}, seed {cfg.seed}) with "
            f"penalty {method}/{form}",
            "penalty weight": float(weight),
            metric: fit.metrics.get("test/acc" if classification else "test/loss"),
            "final penalty term": fit.metrics.get("train/lipschitz_penalty"),
            "AutoLip (certified upper)": _certified_value(al),
            "AutoLip estimate": al.estimate,
            "SeqLip exact (certified upper)": sl.value if sl is not None else None,
            "greedy SeqLip (estimate)": gsl.value,
            "LB data (certified lower)": b["lb_data"].value,
            "LB annealing (certified lower)": b["lb_anneal"].value,
            "AutoLip/SeqLip": _ratio(al.value, seq),
            "SeqLip/best LB": _ratio(seq, best_lb),
            "train time (s)": fit.train_time,
            "bounds time (s)": b["time"],
        }
        rows.append(row)
        final = {
            "autolip_certified": _certified_value(al),
            "autolip_estimate": al.estimate,
            "seqlip_exact": row["SeqLip exact (certified upper)"],
            "seqlip_greedy": gsl.value,
            "lb_data": b["lb_data"].value,
            "lb_annealing": b["lb_anneal"].value,
            "test_metric": row[metric],
        }
        _finish_run(fit.trainer, final)
        summary.update({f"{run}/{k}": v for k, v in final.items() if _num(v) is not None})
        log.info("%s: %s", run, {k: _num(v) for k, v in final.items()})
        notes = [
            "Not in the paper (the paper claims regularisation in its abstract only): the "
            "trade-off between test performance and the Lipschitz bound when training with "
            f"lipreg.LipschitzPenalty(method={method!r}, form={form!r}) × weight.",
            f"Same seed ({cfg.seed}), data and {epochs} epochs for every weight; weight 0 "
            "trains with the penalty module but adds nothing to the loss.",
            f"Greedy SeqLip: top-{top_k} singular triplets on maps too large for a full SVD. "
            "SeqLip exact only where every activation width is <= 20.",
            f"LB data: {len(x_test)} test inputs; LB annealing: the same + {lb_random} random "
            f"points + {lb_anneal_steps} annealing steps.",
        ]
        if paper_data:
            notes.append("DATA IS A SUBSTITUTE for MNIST (see the data column).")
        write_table(out, f"penalty_sweep: {method} penalty on {cfg.model.get('name')}", rows, notes)
        _write_curves(out, fits)
        _plot_curves(out / "bound_curves.png", fits, "bounds during training, per weight")
        _plot_tradeoff(out / "accuracy_vs_bound.png", rows, metric)
    _log_summary(cfg, rows, summary)
    return summary


def _plot_tradeoff(path: Path, rows: list[dict[str, Any]], metric: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, marker, label in (
        ("AutoLip (certified upper)", "o", "AutoLip (certified)"),
        ("greedy SeqLip (estimate)", "^", "greedy SeqLip (estimate)"),
    ):
        pts = [
            (r[key], r[metric], r["penalty weight"])
            for r in rows
            if _num(r.get(key)) and _num(r.get(metric)) is not None
        ]
        if not pts:
            continue
        xs, ys, _ = zip(*pts, strict=True)
        ax.plot(xs, ys, marker + "-", label=label, alpha=0.85)
        if key.startswith("AutoLip"):
            for x, y, w in pts:
                ax.annotate(
                    f"w={w:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
    ax.set_xscale("log")
    ax.set_xlabel("Lipschitz bound of the trained network")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs Lipschitz bound (penalty weight sweep)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)
