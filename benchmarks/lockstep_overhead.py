"""The callback's overhead measured by fits that take turns step by step (issue 10).

``training_overhead.py`` times whole fits one after the other; on a shared machine whose speed
drifts by ±10 % between fits (identical fits without callback took 50-59 s in one session), a
single ratio of two fits cannot resolve a 5 % target. Here the fits of one network and
optimiser (without callback, and with ``LipschitzCallback(every_n_train_steps=n)`` at its
defaults for each ``n`` of ``--every``) run in one process, each in its own thread, and take
turns: a fit holds a baton from the start of one of its training batches to the start of its
next one (forward, backward, optimizer step, every callback hook, loading the next batch), then
hands it to the next fit in the cycle. A fit's time is the sum of the intervals it held the
baton, so every fit sees the same machine, a few milliseconds apart, and the drift cancels.
The callback's cost budget runs on its fit's baton time (``budget.clock``), not on
the wall clock, which would count the other fits' turns as its training time. Reported per
fit: that time, its ratio to the fit without callback (the issue's target: <= 1.10 at n = 1,
<= 1.05 at n = 10 and 50), the callback's own time over it, and the counts of its certified
values. The fits' setup and teardown (Trainer construction, the first
batch's fetch before training starts) are outside the intervals and the same for all.

``--every`` may contain 0: a second fit without callback (a control, placed after the first),
whose ratio shows what the position of a fit in the cycle costs by itself.

The allocator is pinned (``--allocator pinned``, the default: the script re-executes itself
with ``PINNED_MALLOC`` in its environment): glibc gives each thread its own malloc arena and
returns freed memory to the system as it sees fit, so one fit of the round (a random one:
with or without callback, the control too) could take 4,000-9,000 minor page faults per
resnet18 step against ~100 for the others and run 13-25 % slower. One arena that keeps its
memory (and a fixed mmap threshold) makes the fits comparable again: the control then reads
0.997-1.000. Each row's note gives its fit's minor page faults per step (its thread, while it
held the baton).

Caveat: the fits share the CPU's caches in alternation (each step evicts the other fits'
weights), which the fits of ``training_overhead.py`` do not; this costs every fit alike.

Run: OMP_NUM_THREADS=1 python benchmarks/lockstep_overhead.py [--steps N] [--every 1 10 50]
     [--networks mlp cnn4 resnet18] [--resnet-batch B] [--optimizers sgd adam] [--rounds R]
     [--allocator pinned|default] [--device cuda]
(``--quick``: 21 steps, one round, to check that the script runs; not for published figures.)
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import threading
import time
from statistics import median
from typing import Any

import lightning.pytorch as pl
import torch
from _common import (
    add_device_argument,
    machine_load,
    print_footer,
    print_table,
    resolve_device,
    setup_threads,
)
from training_overhead import (
    Classifier,
    Fit,
    default_callback,
    loader,
    mnist_fit,
    quiet_trainer,
    reported,
    resnet_fit,
    with_log,
)

#: glibc settings of ``--allocator pinned``: one malloc arena for every thread, no memory
#: returned to the system (trim threshold 1 GiB, 256 MiB kept on top), a fixed mmap
#: threshold (32 MiB, glibc's largest).
PINNED_MALLOC = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(2**30),
    "MALLOC_TOP_PAD_": str(256 * 2**20),
}


def pin_allocator() -> None:
    """Re-execute this script with :data:`PINNED_MALLOC` in its environment (glibc reads
    them at start-up), unless they are there already."""
    if all(os.environ.get(k) == v for k, v in PINNED_MALLOC.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PINNED_MALLOC})


def _thread_faults() -> int:
    """Minor page faults of the calling thread so far (Linux; 0 where unavailable)."""
    who = getattr(resource, "RUSAGE_THREAD", None)
    return 0 if who is None else resource.getrusage(who).ru_minflt


class Baton:
    """Turns between the fits of one round: fit ``i`` runs only while ``turn == i``; handing
    over passes the turn to the next fit still running."""

    def __init__(self, n: int) -> None:
        self.cond = threading.Condition()
        self.turn = 0
        self.running = [True] * n
        self.held = [0.0] * n  # seconds each fit held the baton
        self.since = [0.0] * n
        # minor page faults of each fit's thread while it held the baton (allocator effects:
        # memory returned to the system and touched again)
        self.faults = [0] * n
        self.faults_since = [0] * n

    def take(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)
            self.since[i] = time.perf_counter()
            self.faults_since[i] = _thread_faults()

    def clock(self, i: int) -> Any:
        """Fit ``i``'s own clock: the seconds it held the baton (read while it holds it).
        The callback's cost budget runs on it: with the wall clock, the other fits' turns
        would count as this fit's training time and the budget would grow with them."""
        return lambda: self.held[i] + (time.perf_counter() - self.since[i])

    def hand_over(self, i: int, finished: bool = False) -> None:
        with self.cond:
            self.held[i] += time.perf_counter() - self.since[i]
            self.faults[i] += _thread_faults() - self.faults_since[i]
            self.running[i] = not finished
            others = [j for j in range(len(self.running)) if self.running[j] and j != i]
            if others:
                after = [j for j in others if j > i]
                self.turn = (after or others)[0]
            self.cond.notify_all()


class TakeTurns(pl.Callback):
    """First in a fit's callback list: takes the baton when training starts and hands it
    over at the start of every later batch (the previous batch, its hooks and the loading of
    this one are then behind)."""

    def __init__(self, baton: Baton, i: int) -> None:
        self.baton, self.i, self.first = baton, i, True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.baton.take(self.i)

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        if self.first:
            self.first = False
            return
        self.baton.hand_over(self.i)
        self.baton.take(self.i)


class FinishTurns(pl.Callback):
    """Last in a fit's callback list: hands the baton over for good when training ends
    (after the other callbacks' fit-end work)."""

    def __init__(self, baton: Baton, i: int) -> None:
        self.baton, self.i = baton, i

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.baton.hand_over(self.i, finished=True)


def one_round(
    fit: Fit, optimizer: str, every: list[int], device: torch.device
) -> tuple[list[float], list[int], list[pl.Trainer]]:
    """The fit without callback and one per cadence of ``every``, taking turns; returns the
    seconds each held the baton, its thread's minor page faults meanwhile, and the trainers."""
    n = 1 + len(every)
    baton = Baton(n)
    trainers, modules, errors = [], [], []
    for i in range(n):
        torch.manual_seed(0)  # the same initial weights for every fit
        modules.append(Classifier(fit.make, fit.shape, optimizer))
        # 0 in `every`: a control fit without callback
        own = [] if i == 0 or every[i - 1] == 0 else with_log(default_callback(every[i - 1]))
        for callback in own[:1]:
            callback.budget.clock = baton.clock(i)
        callbacks = [TakeTurns(baton, i), *own, FinishTurns(baton, i)]
        trainers.append(quiet_trainer(fit.steps, device, callbacks))

    def run(i: int) -> None:
        try:
            trainers[i].fit(modules[i], loader(fit, fit.steps))
        except BaseException as exc:  # report it, and let the other fits go on
            errors.append(exc)
            baton.hand_over(i, finished=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return baton.held, baton.faults, trainers


def rows_for(
    fit: Fit, optimizer: str, every: list[int], rounds: int, device: torch.device
) -> list[list]:
    held: list[list[float]] = [[] for _ in range(1 + len(every))]
    faults: list[list[float]] = [[] for _ in range(1 + len(every))]  # per step
    own: list[list[float]] = [[] for _ in every]
    notes = ["" for _ in every]
    for _ in range(rounds):
        seconds, fit_faults, trainers = one_round(fit, optimizer, every, device)
        for i, s in enumerate(seconds):
            held[i].append(s)
            faults[i].append(fit_faults[i] / fit.steps)
        for j, trainer in enumerate(trainers[1:]):
            budget = next((cb.budget for cb in trainer.callbacks if hasattr(cb, "budget")), None)
            own[j].append(math.nan if budget is None else budget.own / seconds[j + 1])
            notes[j] = reported(trainer)

    def faulted(i: int) -> str:
        return f"minor page faults {median(faults[i]):.3g} per step"

    rows = [[fit.name, optimizer, "fit, no callback", median(held[0]), 1.0, "", faulted(0)]]
    for j, n in enumerate(every):
        ratio = median(w / b for w, b in zip(held[j + 1], held[0], strict=True))
        if n == 0:
            what, target, own_text = "fit, no callback (control, later in the cycle)", "", ""
        else:
            what = f"fit + LipschitzCallback(every_n_train_steps={n}), defaults"
            target = {1: "target <= 1.10; "}.get(n, "target <= 1.05; ")
            own_text = f"{median(own[j]):.1%}"
        note = "; ".join(x for x in (target + notes[j], faulted(j + 1)) if x)
        rows.append([fit.name, optimizer, what, median(held[j + 1]), ratio, own_text, note])
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--optimizers", nargs="+", choices=("sgd", "adam"), default=["sgd", "adam"])
    parser.add_argument(
        "--networks", nargs="+", choices=("mlp", "cnn4", "resnet18"), default=["mlp", "cnn4"]
    )
    parser.add_argument("--resnet-batch", type=int, default=32, help="resnet18's batch size")
    parser.add_argument("--quick", action="store_true", help="21 steps: checks the script runs")
    parser.add_argument(
        "--allocator",
        choices=("pinned", "default"),
        default="pinned",
        help="pinned (default): one glibc malloc arena that keeps its memory (module docstring)",
    )
    add_device_argument(parser)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 21, 1
    return args


def main() -> None:
    args = parse_args()
    if args.allocator == "pinned":
        pin_allocator()
    setup_threads()
    device = resolve_device(args.device)
    load_before = machine_load()
    rows: list[list[Any]] = []
    for name in args.networks:
        for optimizer in args.optimizers:
            if name == "resnet18":
                fit = resnet_fit(args.steps, args.resnet_batch)
            else:
                fit = mnist_fit(name, args.steps, issue3_rows=False)
            rows += rows_for(fit, optimizer, args.every, args.rounds, device)
    print_table(["network", "optimizer", "what", "time (s)", "ratio", "own time", "note"], rows)
    print()
    print(
        f"Fits of {args.steps} steps taking turns batch by batch, {args.rounds} round(s); "
        "time: the seconds each fit held the baton (medians over rounds); ratio: median of "
        "the per-round ratios to the fit without callback; own time: the callback's clock "
        "over the fit's time."
    )
    settings = " ".join(f"{k}={v}" for k, v in PINNED_MALLOC.items())
    pinned = all(os.environ.get(k) == v for k, v in PINNED_MALLOC.items())
    print(f"Allocator: {f'pinned ({settings})' if pinned else 'glibc defaults'}.")
    print_footer(load_before, "21 steps" if args.quick else None, device)


if __name__ == "__main__":
    main()
