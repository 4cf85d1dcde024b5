"""Overhead of ``LipschitzCallback`` under its default cost budget (issue 10, item 1).

Fits the MNIST MLP 784-1000x3-10 and the paper's CNN-4 (``lipreg.models.mnist_cnn4``) on
synthetic MNIST-shaped batches (128 x 1 x 28 x 28, SGD) for ``--steps`` steps (default 300),
without callback and with ``LipschitzCallback(every_n_train_steps=n)`` for n = 1, 10, 50 and
the default ``max_overhead=0.05`` (the default methods: AutoLip, its certificate every 10n
steps, greedy SeqLip every 10n steps, one certificate at the fit end), plus n = 10 without
the fit-end certificate (``compute_at_fit_end=False``) to show what that one certificate
costs. Targets (issue 10): n = 1 <= 1.10x, n = 10 <= 1.05x the fit without callback.

Fits alternate (without, n=1, n=10, n=50, n=10 no fit end, without, ...) for ``--repeats``
rounds, because the machine is shared: times are medians over rounds and each ratio is the
median over rounds of (time with / time without in the same round). The table also gives
what the callback ran in its last fit (runs of the certificate and SeqLip; its own time as a
share of the training time, by its own clock) and the machine load before and after.
Run: OMP_NUM_THREADS=1 python benchmarks/callback_budget.py [--steps N] [--repeats R]
(``--quick``: 60 steps, one round, to check that the script runs; not for published figures.)
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from statistics import median

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import machine_load, print_footer, print_table, setup_threads, single_run
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lipreg
from lipreg.models import mnist_cnn4

BATCH = 128
#: (label, every_n_train_steps, compute_at_fit_end) of the callback fits, in run order.
CONFIGS = [
    ("every_n_train_steps=1", 1, True),
    ("every_n_train_steps=10", 10, True),
    ("every_n_train_steps=50", 50, True),
    ("every_n_train_steps=10, compute_at_fit_end=False", 10, False),
]
TARGETS = {1: "target <= 1.10", 10: "target <= 1.05"}


def mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(784, 1000), nn.ReLU()]
    layers += [nn.Linear(1000, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(1000, 10))


class Classifier(pl.LightningModule):
    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.net = make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit_time(make: Callable[[], nn.Module], steps: int, callbacks: list) -> float:
    """Wall time of one fit of ``steps`` seeded batches on a fresh seeded model."""
    torch.manual_seed(0)
    model = Classifier(make)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * steps, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (BATCH * steps,), generator=g)
    data = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    seconds, _ = single_run(lambda: trainer.fit(model, data))
    return seconds


def ran(callback: lipreg.LipschitzCallback) -> str:
    """What the callback's last fit ran (runs per method) and its own share of the time."""
    budget = callback.budget
    runs = ", ".join(f"{name} {n}" for name, n in budget.runs.items())
    share = budget.own / max(budget.training_seconds(), 1e-12)
    return f"{runs}; own time {share:.1%} of training"


def rows_for(name: str, make: Callable[[], nn.Module], steps: int, repeats: int) -> list[list]:
    base: list[float] = []
    times: dict[str, list[float]] = {label: [] for label, _, _ in CONFIGS}
    notes: dict[str, str] = {}
    for r in range(repeats):
        base.append(fit_time(make, steps, []))
        print(f"# {name} round {r + 1}: no callback {base[-1]:.2f} s", flush=True)
        for label, every, at_end in CONFIGS:
            callback = lipreg.LipschitzCallback(
                every_n_train_steps=every, compute_at_fit_end=at_end
            )
            times[label].append(fit_time(make, steps, [callback]))
            notes[label] = ran(callback)
            print(f"#   {label}: {times[label][-1]:.2f} s ({notes[label]})", flush=True)
    rows = [[name, "fit, no callback", median(base), 1.0, ""]]
    for label, every, at_end in CONFIGS:
        ratio = median(t / b for t, b in zip(times[label], base, strict=True))
        target = TARGETS.get(every, "") if at_end else ""
        rows.append([name, label, median(times[label]), ratio, f"{target} {notes[label]}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="60 steps, one round (a check)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 60, 1
    setup_threads()
    warnings.filterwarnings("ignore")  # Lightning's notes on tiny loaders and workers
    load_before = machine_load()
    rows: list[list] = []
    for name, make in (("MLP 784-1000x3-10", mlp), ("MNIST CNN-4", mnist_cnn4)):
        rows += rows_for(name, make, args.steps, args.repeats)
    print_table(["network", "fit", "time (s)", "ratio", "note (last fit of the row)"], rows)
    print_footer(load_before, "60 steps, one round" if args.quick else None)
    print(
        f"\n{args.steps}-step fits, batch {BATCH}, SGD, {args.repeats} interleaved rounds; "
        "medians. Default budget max_overhead=0.05."
    )


if __name__ == "__main__":
    main()
