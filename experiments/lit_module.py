"""The LightningModule of the experiments: a network, its task loss and an optional penalty."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

import lipreg


class LitModel(pl.LightningModule):
    """Train ``net`` for classification (cross-entropy) or regression (MSE).

    Args:
        net: the network (injected by Hydra).
        task: ``"classification"`` or ``"regression"``.
        num_classes: number of classes (classification).
        input_shape: shape of one input (for the penalty and the callback).
        lr, weight_decay, optimizer: ``"adam"`` or ``"sgd"``.
        penalty: a factory ``(net, input_shape) -> LipschitzPenalty`` (a Hydra partial), or
            ``None``.
        lower_bound_metric: also track ``val/lipschitz_lower_bound`` (a certified lower bound
            over the validation samples).
    """

    def __init__(
        self,
        net: nn.Module,
        task: str = "classification",
        num_classes: int | None = 10,
        input_shape: tuple[int, ...] | list[int] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        penalty: Callable[..., lipreg.LipschitzPenalty] | None = None,
        lower_bound_metric: bool = False,
    ) -> None:
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}.")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}.")
        self.save_hyperparameters(ignore=["net", "penalty"])
        self.net = net
        self.task = task
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.penalty = penalty(net, self.input_shape) if penalty is not None else None
        if task == "classification":
            self.train_acc = MulticlassAccuracy(num_classes=num_classes)
            self.val_acc = MulticlassAccuracy(num_classes=num_classes)
            self.test_acc = MulticlassAccuracy(num_classes=num_classes)
        self.lower_bound = lipreg.LipschitzLowerBound(net) if lower_bound_metric else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return F.cross_entropy(out, y)
        return F.mse_loss(out.reshape(y.shape), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        loss = self._loss(out, y)
        self.log("train/loss", loss, prog_bar=True)
        if self.task == "classification":
            self.train_acc(out, y)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        if self.penalty is not None:
            pen = self.penalty()
            self.log("train/lipschitz_penalty", pen)
            loss = loss + pen
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = batch
        out = self.net(x)
        self.log(f"{stage}/loss", self._loss(out, y), prog_bar=stage == "val")
        if self.task == "classification":
            acc = self.val_acc if stage == "val" else self.test_acc
            acc(out, y)
            self.log(f"{stage}/acc", acc, prog_bar=stage == "val")
        if stage == "val" and self.lower_bound is not None:
            self.lower_bound.update(x)
            self.log("val/lipschitz_lower_bound", self.lower_bound)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.net.parameters()
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay
            )
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
