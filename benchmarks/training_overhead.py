"""Cost of monitoring and regularising the Lipschitz constant during training (issues 3, 10).

Prints, with synthetic batches (N(0, 1) inputs, random labels), for every optimiser of
``--optimizers`` (SGD lr 0.01 and Adam lr 1e-3 by default), the time of a Lightning fit and its
ratio to the same fit without callback, for:

- an MNIST-sized MLP (784-1000-1000-1000-10) and the paper's 4-layer MNIST CNN (batches of
  128 x 1 x 28 x 28, ``--steps`` steps), with
  - ``LipschitzCallback(AutoLip every 50 steps)`` (``compute_at_fit_end=False``: the cadence
    alone; target <= 1.05), then with the certificate at the fit end, and with one every 100
    steps (issue 3's rows);
  - ``LipschitzPenalty`` (AutoLip, 1 power iteration per step; target <= 1.5);
- the same two networks and torchvision's resnet18 at 3 x 32 x 32 (batches of
  ``--resnet-batch``, ``--resnet-steps`` steps) with ``LipschitzCallback(every_n_train_steps=
  1 | 10 | 50)`` and every other option at the library's default, including its cost budget
  ``max_overhead`` when this version of the callback has one (passed explicitly as 0.05, its
  issue-10 default, so that the row says what it ran with); issue 10's targets: <= 1.10 at
  every step, <= 1.05 every 10 steps. When the callback reports them (``last_metrics`` or
  ``trainer.callback_metrics``), the certified value's slack and the number of full
  certificates of the last fit are printed in the note;
- iterations per warm estimate versus the cold first one.

Runs alternate (without, with each callback, with penalty, without, ...) for ``--repeats``
rounds, because the machine is shared: times are medians over the rounds and each ratio is the
median over rounds of (time with / time without in the same round). The machine load is
printed under the table. A fit is one long run on a fresh Trainer, so it is timed by hand
(``_common.single_run``, wall time, the device synchronised), not by ``torch.utils.benchmark``.
Run: OMP_NUM_THREADS=1 python benchmarks/training_overhead.py [--steps N] [--repeats R]
     [--optimizers sgd adam] [--networks mlp cnn4 resnet18] [--device cuda]
(``--quick``: 21 steps, one round, to check that the script runs; not for published figures.)
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import median
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from _common import (
    add_device_argument,
    machine_load,
    print_footer,
    print_table,
    resolve_device,
    setup_threads,
    single_run,
)
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import lipreg
from lipreg.models import mnist_cnn4

# Issue 10's default cost budget; passed only to a callback whose constructor accepts it.
MAX_OVERHEAD = 0.05
# Keys the callback may report about its certified value (printed when present).
REPORTED_KEYS = {
    "lipschitz/certified_slack": "certified slack",
    "lipschitz/full_certificates": "full certificates",
}


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


def resnet18() -> nn.Module:
    """torchvision's resnet18 with random weights and 10 classes (imported lazily)."""
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=10)


@dataclass(frozen=True)
class Fit:
    """One network's fit: the model, its input, batch and length, and whether it gets the
    issue-3 rows (the penalty and the AutoLip-only callbacks) besides the default cadences."""

    name: str
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    batch: int
    steps: int
    issue3_rows: bool


class Classifier(pl.LightningModule):
    def __init__(
        self,
        make: Callable[[], nn.Module],
        shape: tuple[int, ...],
        optimizer: str,
        penalty_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.net = make()
        self.optimizer = optimizer
        self.penalty = (
            lipreg.LipschitzPenalty(self.net, shape, weight=penalty_weight)
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
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=0.01)


#: Distinct synthetic batches held in memory; a fit of more steps samples them with
#: replacement (2000 distinct MNIST-sized batches of 128 would hold 0.8 GB per fit).
POOL_BATCHES = 64


def loader(fit: Fit, steps: int) -> DataLoader:
    """``steps`` seeded batches of N(0, 1) inputs and random labels drawn from a pool of
    :data:`POOL_BATCHES` batches, on the CPU (Lightning moves each batch to the device, as
    in a real fit)."""
    g = torch.Generator().manual_seed(0)
    pool = fit.batch * min(steps, POOL_BATCHES)
    x = torch.randn(pool, *fit.shape, generator=g)
    y = torch.randint(0, 10, (pool,), generator=g)
    data = TensorDataset(x, y)
    sampler = RandomSampler(data, replacement=True, num_samples=fit.batch * steps, generator=g)
    return DataLoader(data, batch_size=fit.batch, sampler=sampler)


def quiet_trainer(steps: int, device: torch.device, callbacks: list) -> pl.Trainer:
    """A Trainer of ``steps`` optimizer steps on ``device`` with ``callbacks`` and nothing
    else (no logger, checkpoint, progress bar or model summary: only what is timed)."""
    return pl.Trainer(
        max_steps=steps,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def fit_time(
    fit: Fit,
    optimizer: str,
    device: torch.device,
    callbacks: list,
    *,
    steps: int | None = None,
    penalty_weight: float = 0.0,
) -> tuple[float, pl.Trainer]:
    """Wall time of one fit on a fresh seeded model and Trainer, and the Trainer."""
    torch.manual_seed(0)
    steps = fit.steps if steps is None else steps
    model = Classifier(fit.make, fit.shape, optimizer, penalty_weight)
    trainer = quiet_trainer(steps, device, callbacks)
    data = loader(fit, steps)
    seconds, _ = single_run(lambda: trainer.fit(model, data), device)
    return seconds, trainer


def accepts(option: str) -> bool:
    """Whether this version of ``LipschitzCallback`` takes ``option`` (read from its
    signature, so the script runs before and after the option exists)."""
    return option in inspect.signature(lipreg.LipschitzCallback.__init__).parameters


def autolip_callback(
    shape: tuple[int, ...], certify_every: int, at_fit_end: bool = False
) -> lipreg.LipschitzCallback:
    """AutoLip every 50 steps; the certified bound every ``certify_every`` steps (0: never)
    and, with ``at_fit_end`` (the callback's default), once more at the end of the fit."""
    return lipreg.LipschitzCallback(
        methods=["autolip"],
        every_n_train_steps=50,
        input_shape=shape,
        certify_every_n_train_steps=certify_every,
        compute_at_fit_end=at_fit_end,
    )


def default_callback(every: int) -> lipreg.LipschitzCallback:
    """The callback with every option at its default but the cadence (and the cost budget
    stated explicitly when it exists)."""
    budget = {"max_overhead": MAX_OVERHEAD} if accepts("max_overhead") else {}
    return lipreg.LipschitzCallback(every_n_train_steps=every, **budget)


@dataclass(frozen=True)
class Variant:
    """One row: its label, note, callbacks (a fresh list per fit) and penalty weight."""

    label: str
    note: str
    callbacks: Callable[[], list]
    penalty_weight: float = 0.0


def variants(fit: Fit) -> list[Variant]:
    """The rows of ``fit``, in the order of the interleaved fits."""
    out = [Variant("fit, no callback", "", list)]
    if fit.issue3_rows:
        s = fit.shape
        out += [
            Variant(
                "fit + LipschitzCallback(AutoLip every 50 steps)",
                "target <= 1.05",
                lambda: [autolip_callback(s, certify_every=0)],
            ),
            Variant(
                "  ... + certified bound at the fit end",
                "one certificate per fit",
                lambda: [autolip_callback(s, certify_every=0, at_fit_end=True)],
            ),
            Variant(
                "  ... + certified bound every 100 steps",
                "",
                lambda: [autolip_callback(s, certify_every=100)],
            ),
            Variant(
                "fit + LipschitzPenalty (AutoLip, 1 iteration/step)",
                "target <= 1.5",
                list,
                penalty_weight=1e-3,
            ),
        ]
    budget = f", max_overhead={MAX_OVERHEAD}" if accepts("max_overhead") else ""
    for every, target in ((1, "target <= 1.10"), (10, "target <= 1.05"), (50, "")):
        out.append(
            Variant(
                f"fit + LipschitzCallback(every_n_train_steps={every}{budget}), defaults",
                target,
                lambda every=every: with_log(default_callback(every)),
            )
        )
    return out


class CertifiedLog(pl.Callback):
    """After a ``LipschitzCallback`` in the list: records every certified value it logs (the
    step, its slack, whether it came with a new anchor, i.e. the count of full certificates
    rose), for the increments' slack and the re-anchor rate of the note (:func:`reported`)."""

    def __init__(self, watched: lipreg.LipschitzCallback) -> None:
        self.watched = watched
        self.seen: dict | None = None
        self.anchors = 0.0
        self.entries: list[tuple[int, float, bool]] = []  # (step, slack, new anchor)

    def _read(self, trainer: pl.Trainer) -> None:
        metrics = self.watched.last_metrics
        if metrics is self.seen:  # a new dict at every step the callback logged something
            return
        self.seen = metrics
        count = metrics.get("lipschitz/full_certificates")
        if count is None:
            return
        slack = metrics.get("lipschitz/certified_slack", math.nan)
        self.entries.append((trainer.global_step, float(slack), count > self.anchors))
        self.anchors = count

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._read(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read(trainer)  # the fit end's certificate

    def summary(self) -> str:
        """``certified at k steps (a anchors, i increments); increment slack median m, max M``."""
        increments = [s for _, s, anchored in self.entries if not anchored and math.isfinite(s)]
        anchors = sum(1 for *_, anchored in self.entries if anchored)
        text = f"certified at {len(self.entries)} step(s) ({anchors} anchor(s))"
        if increments:
            text += f"; increment slack median {median(increments):.3g}, max {max(increments):.3g}"
        return text


def with_log(callback: lipreg.LipschitzCallback) -> list[pl.Callback]:
    """``[callback, CertifiedLog(callback)]``."""
    return [callback, CertifiedLog(callback)]


def reported(trainer: pl.Trainer) -> str:
    """The callback's reports on its certified value (slack, full certificates), if any."""
    found: dict[str, float] = {}
    for cb in trainer.callbacks:
        if isinstance(cb, lipreg.LipschitzCallback):
            found.update({k: float(v) for k, v in cb.last_metrics.items() if k in REPORTED_KEYS})
    for key in REPORTED_KEYS:
        if key not in found and key in trainer.callback_metrics:
            found[key] = float(trainer.callback_metrics[key])
    parts = [f"{REPORTED_KEYS[k]} {v:.4g}" for k, v in found.items()]
    parts += [cb.summary() for cb in trainer.callbacks if isinstance(cb, CertifiedLog)]
    for cb in trainer.callbacks:  # how often each computation ran (the budget's count)
        budget = getattr(cb, "budget", None)
        if budget is not None and budget.runs:
            parts.append("runs " + ", ".join(f"{name} {n}" for name, n in budget.runs.items()))
            # the callback's own time over the training time, by its clock: less sensitive
            # to the machine's load than the ratio of two fits
            own = budget.own / max(budget.training_seconds(), 1e-12)
            parts.append(f"own time {own:.1%} of training")
    return "; ".join(parts)


def overhead_rows(fit: Fit, optimizer: str, repeats: int, device: torch.device) -> list[list]:
    """Interleaved fits of every variant, ``repeats`` rounds; medians and per-round ratios."""
    fit_time(fit, optimizer, device, [], steps=5)  # warm-up (imports, allocator)
    rows_of = variants(fit)
    times: list[list[float]] = [[] for _ in rows_of]
    owns: list[list[float]] = [[] for _ in rows_of]  # the callbacks' own seconds per fit
    notes: list[str] = ["" for _ in rows_of]
    watched: pl.Trainer | None = None  # the trainer of the iteration rows (no other is kept)
    for _ in range(repeats):
        for i, v in enumerate(rows_of):
            seconds, trainer = fit_time(
                fit, optimizer, device, v.callbacks(), penalty_weight=v.penalty_weight
            )
            times[i].append(seconds)
            owns[i].append(
                sum(getattr(getattr(cb, "budget", None), "own", 0.0) for cb in trainer.callbacks)
            )
            notes[i] = reported(trainer)
            watched = trainer if i == 1 else watched
            del trainer
    base = times[0]
    rows = []
    for i, v in enumerate(rows_of):
        ratio = median(t / b for t, b in zip(times[i], base, strict=True))
        note = "; ".join(n for n in (v.note, notes[i]) if n)
        if any(owns[i]):  # what the fit lost outside the callback's hooks (caches, GC, noise)
            rest = median((t - o) / b for t, o, b in zip(times[i], owns[i], base, strict=True))
            note += f"; wall minus own time {rest:.3f}x the fit without"
        rows.append([fit.name, optimizer, v.label, median(times[i]), ratio, note])
    if fit.issue3_rows:
        assert watched is not None
        rows += iteration_rows(fit, optimizer, watched)
    return rows


def iteration_rows(fit: Fit, optimizer: str, trainer: pl.Trainer) -> list[list]:
    """Lanczos iterations of a cold first estimate and of the last warm one of the fit."""
    cold = lipreg.AutoLip(Classifier(fit.make, fit.shape, optimizer).net, fit.shape, certify=False)
    rows: list[list] = [[fit.name, optimizer, "iterations: cold first estimate", cold().n_iter]]
    for cb in trainer.callbacks:
        if isinstance(cb, lipreg.LipschitzCallback):
            warm = cb.last_metrics.get("lipschitz/autolip_iterations", math.nan)
            rows.append([fit.name, optimizer, "iterations: warm estimate in the fit (last)", warm])
    return [[*r, "", ""] for r in rows]


def mnist_fit(name: str, steps: int, issue3_rows: bool) -> Fit:
    """The MNIST-sized fit of ``name`` (``"mlp"`` or ``"cnn4"``): batches of 128 x 1 x 28 x 28."""
    if name == "mlp":
        return Fit("MLP 784-1000x3-10", mlp, (1, 28, 28), 128, steps, issue3_rows)
    return Fit("MNIST CNN-4", mnist_cnn4, (1, 28, 28), 128, steps, issue3_rows)


def resnet_fit(steps: int, batch: int) -> Fit:
    """resnet18 on batches of ``batch`` x 3 x 32 x 32 (train-mode batch norm)."""
    return Fit("resnet18 3x32x32", resnet18, (3, 32, 32), batch, steps, False)


def fits(args: argparse.Namespace) -> list[Fit]:
    issue3 = not getattr(args, "defaults_only", False)
    table = {
        "mlp": mnist_fit("mlp", args.steps, issue3),
        "cnn4": mnist_fit("cnn4", args.steps, issue3),
        "resnet18": resnet_fit(args.resnet_steps, args.resnet_batch),
    }
    return [table[name] for name in args.networks]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps of the MLP and CNN-4 fits")
    parser.add_argument("--resnet-steps", type=int, default=100)
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--defaults-only",
        action="store_true",
        help="only the fits without callback and with the library's default callback "
        "(every_n_train_steps 1, 10, 50): issue 10's rows, without issue 3's",
    )
    parser.add_argument("--optimizers", nargs="+", choices=("sgd", "adam"), default=["sgd", "adam"])
    parser.add_argument(
        "--networks",
        nargs="+",
        choices=("mlp", "cnn4", "resnet18"),
        default=["mlp", "cnn4", "resnet18"],
    )
    add_device_argument(parser)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="21 steps (resnet18: 11 steps of 8), one round: checks that the script runs; "
        "NOT for published figures",
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.resnet_steps, args.resnet_batch, args.repeats = 21, 11, 8, 1
    return args


def main() -> None:
    args = parse_args()
    setup_threads()
    device = resolve_device(args.device)
    load_before = machine_load()
    rows: list[list[Any]] = []
    for fit in fits(args):
        for optimizer in args.optimizers:
            rows += overhead_rows(fit, optimizer, args.repeats, device)
    print_table(["network", "optimizer", "what", "time (s) / count", "ratio", "note"], rows)
    print()
    print(
        f"Fits of {args.steps} steps (resnet18: {args.resnet_steps} steps of {args.resnet_batch}),"
        f" {args.repeats} interleaved round(s); medians; wall time."
    )
    if not accepts("max_overhead"):
        print(
            "This LipschitzCallback has no max_overhead option: "
            "the default rows ran without a cost budget."
        )
    print_footer(load_before, "21 steps, one round" if args.quick else None, device)


if __name__ == "__main__":
    main()
