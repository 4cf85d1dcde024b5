"""Cost of monitoring and regularising the Lipschitz constant during training (issue 3).

Prints, on CPU with MNIST-shaped synthetic batches (128 x 1 x 28 x 28):
- the wall-time ratio of a Lightning fit with ``LipschitzCallback`` (AutoLip every 50 steps)
  to the same fit without it, for an MNIST-sized MLP (784-1000-1000-1000-10) and the paper's
  4-layer MNIST CNN (target <= 1.05); also with the certified bound every 100 steps;
- the ratio of a training step with ``LipschitzPenalty`` (AutoLip, 1 power iteration per step)
  to a plain step (target <= 1.5);
- iterations per warm estimate versus the cold first one.

Runs alternate (without, with, without, ...) and the best of ``--repeats`` is kept, because the
machine is shared. Run: OMP_NUM_THREADS=1 python benchmarks/training_overhead.py [--steps N]
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import print_table, setup_threads
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lipreg
from lipreg.models import mnist_cnn4


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 1000),
        nn.ReLU(),
        nn.Linear(1000, 1000),
        nn.ReLU(),
        nn.Linear(1000, 1000),
        nn.ReLU(),
        nn.Linear(1000, 10),
    )


class Classifier(pl.LightningModule):
    def __init__(self, make, penalty_weight: float = 0.0) -> None:
        super().__init__()
        self.net = make()
        self.penalty = (
            lipreg.LipschitzPenalty(self.net, (1, 28, 28), weight=penalty_weight)
            if penalty_weight
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.penalty is not None:
            loss = loss + self.penalty()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128 * steps, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (128 * steps,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=128)


def fit_time(make, steps: int, callbacks: list, penalty_weight: float = 0.0) -> float:
    torch.manual_seed(0)
    model = Classifier(make, penalty_weight)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    data = loader(steps)
    start = time.perf_counter()
    trainer.fit(model, data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup_threads()
    rows = []
    for name, make in (("MLP 784-1000x3-10", mlp), ("MNIST CNN-4", mnist_cnn4)):
        fit_time(make, 5, [])  # warm-up (imports, allocator)
        base, mon, cert, pen = [], [], [], []
        last_cb = None
        for _ in range(args.repeats):
            base.append(fit_time(make, args.steps, []))
            last_cb = lipreg.LipschitzCallback(
                methods=["autolip"],
                every_n_train_steps=50,
                input_shape=(1, 28, 28),
                certify_every_n_train_steps=0,
            )
            mon.append(fit_time(make, args.steps, [last_cb]))
            cert.append(
                fit_time(
                    make,
                    args.steps,
                    [
                        lipreg.LipschitzCallback(
                            methods=["autolip"],
                            every_n_train_steps=50,
                            input_shape=(1, 28, 28),
                            certify_every_n_train_steps=100,
                        )
                    ],
                )
            )
            pen.append(fit_time(make, args.steps, [], penalty_weight=1e-3))
        b = min(base)
        rows.append([name, "fit, no callback", b, 1.0, ""])
        rows.append(
            [
                name,
                "fit + LipschitzCallback(AutoLip every 50 steps)",
                min(mon),
                min(mon) / b,
                "target <= 1.05",
            ]
        )
        rows.append([name, "  ... + certified bound every 100 steps", min(cert), min(cert) / b, ""])
        rows.append(
            [
                name,
                "fit + LipschitzPenalty (AutoLip, 1 iteration/step)",
                min(pen),
                min(pen) / b,
                "target <= 1.5",
            ]
        )
        cold = lipreg.AutoLip(Classifier(make).net, (1, 28, 28), certify=False)
        first = cold()
        rows.append([name, "iterations: cold first estimate", first.n_iter, "", ""])
        if last_cb is not None:
            rows.append(
                [
                    name,
                    "iterations: warm estimate in the fit (last)",
                    int(last_cb.last_metrics.get("lipschitz/autolip_iterations", -1)),
                    "",
                    "",
                ]
            )
    print_table(["network", "what", "time (s) / count", "ratio", "note"], rows)


if __name__ == "__main__":
    main()
