"""Cost of monitoring and regularising the Lipschitz constant during training (issue 3).

Prints, on CPU with MNIST-shaped synthetic batches (128 x 1 x 28 x 28):
- the wall-time ratio of a Lightning fit with ``LipschitzCallback`` (AutoLip every 50 steps)
  to the same fit without it, for an MNIST-sized MLP (784-1000-1000-1000-10) and the paper's
  4-layer MNIST CNN (target <= 1.05; ``compute_at_fit_end=False``, the cadence alone); also
  with the default certificate at the end of the fit, and with one every 100 steps;
- the ratio of a training step with ``LipschitzPenalty`` (AutoLip, 1 power iteration per step)
  to a plain step (target <= 1.5);
- iterations per warm estimate versus the cold first one.

Runs alternate (without, with callback, with certified callback, with penalty, without, ...)
for ``--repeats`` rounds, because the machine is shared: times are medians over the rounds and
each ratio is the median over rounds of (time with / time without in the same round). The
machine load is printed under the table. A fit is one long run on a fresh Trainer, so it is
timed by hand (``_common.single_run``), not by ``torch.utils.benchmark``.
Run: OMP_NUM_THREADS=1 python benchmarks/training_overhead.py [--steps N] [--repeats R]
(``--quick``: 101 steps, one round, to check that the script runs; not for published figures.)
"""

from __future__ import annotations

import argparse
from statistics import median

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import machine_load, print_footer, print_table, setup_threads, single_run
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
    seconds, _ = single_run(lambda: trainer.fit(model, data))
    return seconds


def callback(certify_every: int, at_fit_end: bool = False) -> lipreg.LipschitzCallback:
    """AutoLip every 50 steps; the certified bound every ``certify_every`` steps (0: never)
    and, with ``at_fit_end`` (the callback's default), once more at the end of the fit."""
    return lipreg.LipschitzCallback(
        methods=["autolip"],
        every_n_train_steps=50,
        input_shape=(1, 28, 28),
        certify_every_n_train_steps=certify_every,
        compute_at_fit_end=at_fit_end,
    )


def overhead_rows(name: str, make, steps: int, repeats: int) -> list[list]:
    """Interleaved fits without / with the callback / with certification / with the penalty."""
    fit_time(make, 5, [])  # warm-up (imports, allocator)
    base, mon, end, cert, pen = [], [], [], [], []
    last_cb = None
    for _ in range(repeats):
        base.append(fit_time(make, steps, []))
        last_cb = callback(certify_every=0)
        mon.append(fit_time(make, steps, [last_cb]))
        end.append(fit_time(make, steps, [callback(certify_every=0, at_fit_end=True)]))
        cert.append(fit_time(make, steps, [callback(certify_every=100)]))
        pen.append(fit_time(make, steps, [], penalty_weight=1e-3))

    def ratio(times: list[float]) -> float:
        return median([t / b for t, b in zip(times, base, strict=True)])

    b = median(base)
    rows = [
        [name, "fit, no callback", b, 1.0, ""],
        [
            name,
            "fit + LipschitzCallback(AutoLip every 50 steps)",
            median(mon),
            ratio(mon),
            "target <= 1.05",
        ],
        [
            name,
            "  ... + certified bound at the fit end (the default)",
            median(end),
            ratio(end),
            "one certificate per fit",
        ],
        [name, "  ... + certified bound every 100 steps", median(cert), ratio(cert), ""],
        [
            name,
            "fit + LipschitzPenalty (AutoLip, 1 iteration/step)",
            median(pen),
            ratio(pen),
            "target <= 1.5",
        ],
    ]
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
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="101 steps, one round: checks that the script runs; NOT for published figures",
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 101, 1
    setup_threads()
    load_before = machine_load()
    rows = []
    for name, make in (("MLP 784-1000x3-10", mlp), ("MNIST CNN-4", mnist_cnn4)):
        rows += overhead_rows(name, make, args.steps, args.repeats)
    print_table(["network", "what", "time (s) / count", "ratio", "note"], rows)
    print_footer(load_before, "101 steps, one round" if args.quick else None)


if __name__ == "__main__":
    main()
