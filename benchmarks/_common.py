"""Shared helpers of the benchmark scripts (timing, machine load, table printing).

Short statements are timed with ``torch.utils.benchmark`` (``Timer.blocked_autorange``: warm-up,
blocks sized so the timer's own overhead is negligible, the median of the replicates). Several
statements whose times are compared are timed in interleaved rounds (a, b, c, a, b, c, ...), so
that a change in the machine's load hits them alike; each one's figure is the median over all
rounds (``Measurement.merge``). The machine is shared: the scripts print its load next to the
figures.

Every script takes ``--device`` (:func:`add_device_argument`, default ``cpu``): models and data
are created on that device, and every timer synchronises it (``torch.cuda.synchronize``) before
reading the clock, so the ratios printed on a GPU mean the same as on a CPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.benchmark import Measurement, Timer


def setup_threads() -> None:
    """Pin the thread count (OMP_NUM_THREADS, default 1): this machine is shared and noisy."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--device`` option shared by the scripts (``cpu`` by default, ``cuda`` when there
    is one); :func:`resolve_device` turns its value into a ``torch.device``."""
    parser.add_argument(
        "--device",
        default="cpu",
        help="where models, data and computations live: cpu (default), cuda or cuda:N",
    )


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, refusing a CUDA device this machine does not have (a clear exit
    rather than a stack trace from the first ``.to(device)``)."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device {name}: torch.cuda.is_available() is False on this machine "
            "(CPU-only torch build or no GPU); run with --device cpu."
        )
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: only cpu and cuda are supported, got {device.type}.")
    return device


def synchronize(device: torch.device | None) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously: without this a timer
    reads the launch time, not the run time). A no-op on the CPU."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def clock_name(device: torch.device) -> str:
    """What :func:`cost_run` measures on ``device``, for the scripts' footers."""
    if device.type == "cuda":
        return f"synchronized wall time on {device}"
    return "CPU time of the process (time.process_time)"


def machine_load() -> str:
    """The load averages (1, 5, 15 min) and core count, to judge how disturbed a run was."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


@dataclass
class Timing:
    """The median time of one statement over all rounds, and its last output."""

    median: float
    output: Any
    measurements: list[Measurement] = field(default_factory=list)


def interleaved_medians(
    statements: dict[str, Callable[[], Any]], *, rounds: int, min_run_time: float
) -> dict[str, Timing]:
    """Time every statement in ``rounds`` interleaved rounds of ``Timer.blocked_autorange``.

    Each round runs ``blocked_autorange(min_run_time)`` on every statement in turn (it includes
    ``torch.utils.benchmark``'s own warm-up call); the result per statement is the median of
    the replicates of all its rounds, with the output of its last call.
    """
    outputs: dict[str, Any] = {}
    measured: dict[str, list[Measurement]] = {name: [] for name in statements}
    for _ in range(rounds):
        for name, fn in statements.items():

            def run(name: str = name, fn: Callable[[], Any] = fn) -> None:
                outputs[name] = fn()

            timer = Timer(
                stmt="run()", globals={"run": run}, label=name, num_threads=torch.get_num_threads()
            )
            measured[name].append(timer.blocked_autorange(min_run_time=min_run_time))
    return {
        name: Timing(Measurement.merge(ms)[0].median, outputs[name], ms)
        for name, ms in measured.items()
    }


def single_run(fn: Callable[[], Any], device: torch.device | None = None) -> tuple[float, Any]:
    """Wall time of ONE call and its output (``device`` synchronised before and after).

    For runs of seconds to minutes (a certified bound, a greedy SeqLip, a whole fit)
    ``torch.utils.benchmark`` does not fit: ``blocked_autorange`` first calls the statement to
    size its blocks (a discarded call that doubles a 100 s run) and ``timeit`` warms up with
    two calls; and a fit cannot be re-run on the same Trainer. The callers repeat such runs
    themselves, interleaved, and report medians.
    """
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def cost_run(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """The cost of ONE call and its output: CPU time (``time.process_time``) on the CPU, which
    leaves out the time the process waited for a core on a shared machine; synchronised wall
    time on CUDA (the GPU's work is not CPU time)."""
    if device.type == "cuda":
        return single_run(fn, device)
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def forward_backward_step(
    model: torch.nn.Module, input_shape: tuple[int, ...], device: torch.device | None = None
) -> Callable[[], None]:
    """One forward + backward pass on ONE sample (grads freed first), the benchmarks' unit.
    The sample lives on ``device`` (default: the CPU), where the model must be."""
    x = torch.randn(1, *input_shape, device=device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    return step


def library_version() -> str:
    """Which lipreg the figures are of: its directory and, in a git checkout, the commit and
    whether ``lipreg/`` has uncommitted changes (a half-changed library must be labelled)."""
    import lipreg

    where = Path(lipreg.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"lipreg from {where} (not a git checkout)"
    state = " + uncommitted changes in lipreg/" if dirty else ""
    return f"lipreg from {where} at commit {commit}{state}"


def print_footer(
    load_before: str, quick_note: str | None, device: torch.device | None = None
) -> None:
    """The machine load before and after the run, under the table; when ``device`` is given,
    the device and the library's version (:func:`library_version`); and the ``--quick``
    warning (``quick_note``: what the quick run did, or ``None`` for a full run)."""
    print()
    print(f"Machine load before: {load_before}; after: {machine_load()}.")
    if device is not None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"Device: {device} ({name}), {torch.get_num_threads()} CPU thread(s).")
        print(f"Library: {library_version()}.")
    if quick_note is not None:
        print(f"--quick: {quick_note}, not for published figures.")


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """A GitHub-flavoured Markdown table on stdout."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        if c != c:  # NaN
            return "–"
        return f"{c:.4g}"
    return str(c)
