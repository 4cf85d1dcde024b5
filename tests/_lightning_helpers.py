"""Module-level (hence picklable) Lightning pieces for the callback and penalty tests.

Shared by ``test_callback.py``, ``test_callback_shapes.py`` and ``test_penalty.py``: quiet
Trainers, small MLPs and regression data, the independent float64 truths (spectral norms of
the final weights), CSV readers and warning/log collectors.
``ddp_spawn`` pickles the LightningModule, the callbacks and the dataloaders into fresh
processes, so everything a DDP test uses lives here; :func:`run_ddp` is what the DDP test
runs in a subprocess (``python -c "import _lightning_helpers; ..."``) under a timeout.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

D_IN, D_OUT = 6, 3


def make_trainer(root: Path, callbacks: list, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer (no logger, no progress bar, checkpointing only if asked)."""
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


def callback_warnings(records: Any) -> list[str]:
    """Messages of the ``LipschitzCallback: ...`` warnings among recorded warnings."""
    return [str(w.message) for w in records if str(w.message).startswith("LipschitzCallback")]


def fit_recording(trainer: pl.Trainer, module: pl.LightningModule, data: Any, **kwargs: Any):
    """Fit and return the LipschitzCallback warnings emitted (every one, not deduplicated)."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(module, data, **kwargs)
    return callback_warnings(records)


@contextlib.contextmanager
def capture_logs(logger: logging.Logger) -> Iterator[list[str]]:
    """Collect the messages of ``logger`` (and its children) at INFO and above."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def linear_norms(net: nn.Module) -> list[float]:
    """Spectral norms of the Linear weights, in float64 (the independent truth)."""
    return [
        torch.linalg.matrix_norm(m.weight.detach().double(), 2).item()
        for m in net.modules()
        if isinstance(m, nn.Linear)
    ]


def norm_product(net: nn.Module) -> float:
    """AutoLip of a Linear/ReLU MLP: the product of the spectral norms (float64 truth)."""
    return math.prod(linear_norms(net))


def csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    """The rows of the CSVLogger's ``metrics.csv``, as written on disk."""
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def lipschitz_rows(logger: CSVLogger) -> list[dict[str, str]]:
    """The rows of ``metrics.csv`` holding at least one ``lipschitz/`` value."""
    return [
        r for r in csv_rows(logger) if any(k.startswith("lipschitz/") and v for k, v in r.items())
    ]


def csv_step(global_step: int) -> int:
    """The ``step`` Lightning writes for values logged after optimizer step ``global_step``
    (one optimizer): the number of batches that stepped before the current one."""
    return global_step - 1


def saved_callback_state(ckpt: str | Path) -> tuple[dict[str, Any], str]:
    """The checkpoint (loaded with ``weights_only=True``) and the key of its one
    LipschitzCallback entry in ``checkpoint["callbacks"]``."""
    saved = torch.load(ckpt, weights_only=True)
    (key,) = [k for k in saved["callbacks"] if k.startswith("LipschitzCallback")]
    return saved, key


def loader(n: int = 40, batch_size: int = 4, *, dict_batches: bool = False, **kw) -> DataLoader:
    """Batches of :func:`regression_data` (tuples, or ``{"x", "y"}`` dicts)."""
    data = regression_data(n)
    return DataLoader(DictDataset(data) if dict_batches else data, batch_size=batch_size, **kw)


def make_mlp(
    widths: tuple[int, ...] = (D_IN, 16, 16, D_OUT),
    *,
    dropout: float = 0.0,
    batchnorm: bool = False,
) -> nn.Sequential:
    """Linear (+BatchNorm1d) + ReLU (+Dropout) blocks, a Linear at the end."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            if batchnorm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def regression_data(n: int = 40, seed: int = 0, d_in: int = D_IN, d_out: int = D_OUT):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randn(n, d_out, generator=g)
    return TensorDataset(x, y)


class DictDataset(Dataset):
    """Samples as ``{"x": ..., "y": ...}`` dicts (batches collate to a dict)."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.base[i]
        return {"x": x, "y": y}


class RegressionModule(pl.LightningModule):
    """MSE regression of ``net`` with plain SGD.

    ``penalty``: an optional ``lipreg.LipschitzPenalty`` built on ``net`` and owned by this
    module (added to the loss). ``nan_at_step``: set one weight of ``net`` to NaN in the
    training step at that ``global_step`` (before the forward pass).
    """

    def __init__(
        self,
        net: nn.Module | None = None,
        *,
        lr: float = 0.05,
        penalty: nn.Module | None = None,
        nan_at_step: int | None = None,
        fail_if_trained: bool = False,
    ) -> None:
        super().__init__()
        self.net = net if net is not None else make_mlp()
        self.penalty = penalty
        self.lr = lr
        self.nan_at_step = nan_at_step
        self.fail_if_trained = fail_if_trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_if_trained:
            raise AssertionError("a training step ran")
        if self.nan_at_step is not None and self.global_step == self.nan_at_step:
            weight = next(p for p in self.net.parameters() if p.ndim == 2)
            with torch.no_grad():
                weight[0, 0] = math.nan
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        loss = nn.functional.mse_loss(self(x).float(), y.float())
        if self.penalty is not None:
            loss = loss + self.penalty()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DumpLipschitzMetrics(Callback):
    """On ``on_train_end``, each rank writes the LipschitzCallback's ``last_metrics`` and
    the ``lipschitz/`` entries of ``trainer.callback_metrics`` to ``rank{r}.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lipreg.callback import LipschitzCallback

        (cb,) = [c for c in trainer.callbacks if isinstance(c, LipschitzCallback)]
        record = {
            "last_metrics": cb.last_metrics,
            "callback_metrics": {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("lips")
            },
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "pid": os.getpid(),
        }
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))


def run_ddp(out_dir: str) -> None:
    """Two CPU processes (gloo, ``ddp_spawn``), the callback with AutoLip + lower bound.

    The lower bound searches from the rank's own batch (ranks see different shards) and the
    timings differ per rank: identical values on both ranks require the broadcast. The DDP
    test asserts the step cadences of this 6-step fit, so the cost budget is off
    (``max_overhead=None``: every scheduled value is computed; ``ddp_spawn`` pickles the
    instance, so every rank has it).
    """
    from lipreg.callback import LipschitzCallback

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    pl.seed_everything(0, verbose=False)
    module = RegressionModule(make_mlp())
    callback = LipschitzCallback(
        methods=["autolip", "lower_bound"],
        every_n_train_steps=2,
        certify_every_n_train_steps=2,
        lower_bound_points=4,
        max_overhead=None,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=6,
        logger=CSVLogger(out_dir, name="ddp"),
        callbacks=[callback, DumpLipschitzMetrics(out_dir)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=50,
    )
    loader = DataLoader(regression_data(48), batch_size=4, shuffle=False)
    trainer.fit(module, loader)


# ---------------------------------------------------------------- FSDP2 (fully_shard) fits
FSDP_STEPS = 6


class ShardedRegressionModule(RegressionModule):
    """:class:`RegressionModule` whose ``net`` is sharded with FSDP2 in ``configure_model``
    (``fully_shard`` on each Linear, then on ``net``, over the data-parallel mesh of
    ``ModelParallelStrategy``): every parameter is a ``DTensor`` row shard."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class DumpShardedReference(Callback):
    """On ``on_train_end`` (after the LipschitzCallback's fit-end certificate), each rank
    gathers the final weights (``full_tensor()``, a collective every rank runs), loads them
    into an unsharded copy of ``make_mlp()`` and writes ``lipreg.autolip(copy,
    certify=True)`` (the independent reference), whether the parameters were ``DTensor``
    shards and their sizes to ``ref{r}.json``; also the same certificate warm-started from the
    callback's vectors as they were before the last step's computation (a certificate hands
    its own vectors on to the estimator), and the product of the exact float64 spectral
    norms."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.warnings: list[str] = []
        self.warm_before: dict = {}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        (cb,) = [c for c in trainer.callbacks if type(c).__name__ == "LipschitzCallback"]
        if cb._estimator is not None:
            self.warm_before = dict(cb._estimator.state)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import lipreg

        params = dict(pl_module.net.named_parameters())
        full = {k: p.full_tensor().detach().clone() for k, p in params.items()}
        copy = make_mlp()
        copy.load_state_dict(full)
        # the same certificate from the callback's own warm-start vectors (same node names:
        # the copy wrapped like the LightningModule); the cold one starts elsewhere
        warm = lipreg.autolip(RegressionModule(copy), (D_IN,), certify=True, state=self.warm_before)
        record = {
            "reference": lipreg.autolip(copy, (D_IN,), certify=True).value,
            "reference_warm": warm.value,
            "norm_product": norm_product(copy),
            "sharded": [type(p).__name__ for p in params.values()],
            "local_rows": [int(p.to_local().shape[0]) for p in params.values()],
            "full_rows": [int(p.shape[0]) for p in params.values()],
        }
        path = Path(self.out_dir) / f"ref{trainer.global_rank}.json"
        path.write_text(json.dumps(record))


def fsdp_trainer(out_dir: str, callbacks: list) -> pl.Trainer:
    """Two CPU processes (gloo), ``ModelParallelStrategy(data_parallel_size=2,
    tensor_parallel_size=1)`` (Lightning relaunches the calling script: run it as a script,
    not with ``-c``), :data:`FSDP_STEPS` steps, seeded."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=FSDP_STEPS,
        logger=CSVLogger(out_dir, name="fsdp"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=50,
    )


def fsdp_loader(batch_size: int = 4) -> DataLoader:
    """48 regression samples in order (each of the 2 ranks gets every other one)."""
    return DataLoader(regression_data(48), batch_size=batch_size, shuffle=False)


def run_fsdp(out_dir: str, max_overhead: float | None = None) -> None:
    """:func:`fsdp_trainer` with ``fully_shard`` in ``configure_model`` and the
    LipschitzCallback with its defaults except a cadence of 3 steps and no cost budget
    (``max_overhead=None`` unless given, so that the computed steps are the scheduled ones).
    Each rank writes ``rank{r}.json`` (:class:`DumpLipschitzMetrics`), ``ref{r}.json``
    (:class:`DumpShardedReference`) and ``warn{r}.json`` (every LipschitzCallback warning
    it raised: rank 0 only, by design)."""
    from lipreg.callback import LipschitzCallback

    trainer = fsdp_trainer(
        out_dir,
        [
            LipschitzCallback(every_n_train_steps=3, max_overhead=max_overhead),
            DumpLipschitzMetrics(out_dir),
            DumpShardedReference(out_dir),
        ],
    )
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        trainer.fit(ShardedRegressionModule(make_mlp()), fsdp_loader())
    path = Path(out_dir) / f"warn{trainer.global_rank}.json"
    path.write_text(json.dumps(callback_warnings(records)))


#: The penalty of the penalised FSDP2 fit (and of its one-process reference).
FSDP_PENALTY = {"form": "linear", "weight": 0.1}
#: Its batch: each rank's whole half of the 48 samples at every step, so that the two ranks'
#: batches together are the whole data set whatever the sampler's split.
FSDP_FULL_BATCH = 24


class DumpFullWeights(Callback):
    """Each rank writes ``weights{r}.pt``: ``net``'s full weights (gathered with
    ``full_tensor()``, a collective every rank runs) at the start and at the end of the fit,
    and the penalty's buffers at the end."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.start: dict[str, torch.Tensor] = {}

    @staticmethod
    def _full(module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {k: p.full_tensor().detach().clone() for k, p in module.net.named_parameters()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self._full(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {
            "start": self.start,
            "end": self._full(pl_module),
            "buffers": {k: b.clone() for k, b in pl_module.penalty.named_buffers()},
            "sharded": [type(p).__name__ for p in pl_module.net.parameters()],
        }
        torch.save(record, Path(self.out_dir) / f"weights{trainer.global_rank}.pt")


def run_fsdp_penalty(out_dir: str) -> None:
    """:func:`fsdp_trainer` fitting ``loss + LipschitzPenalty`` (:data:`FSDP_PENALTY`, built
    on the network before ``configure_model`` shards it); each rank writes
    ``weights{r}.pt`` (:class:`DumpFullWeights`)."""
    from lipreg.penalty import LipschitzPenalty

    trainer = fsdp_trainer(out_dir, [DumpFullWeights(out_dir)])
    net = make_mlp()
    penalty = LipschitzPenalty(net, (D_IN,), **FSDP_PENALTY)
    trainer.fit(ShardedRegressionModule(net, penalty=penalty), fsdp_loader(FSDP_FULL_BATCH))
