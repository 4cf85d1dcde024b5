"""How the cost of AutoLip grows with depth, width and input size (issue 10, item 10).

Every cost is a multiple of ONE forward+backward pass of ONE sample of the same network (eval
mode, grads freed), measured as CPU time (``time.process_time``) on the CPU and as synchronised
wall time on CUDA (``--device cuda``). Columns, for every network:

- cold estimate: a new ``lipreg.AutoLip(model, shape, certify=False)`` and its first call
  (trace, probe, Lanczos from random starts): an estimate, not a bound;
- warm estimate: the same estimator called again after ``--sgd-steps`` SGD steps (its state
  warm-starts every map);
- cold certificate: a new ``lipreg.AutoLip(model, shape, certify=True)`` and its first call,
  i.e. ``lipreg.autolip(model, shape, certify=True)``: a certified upper bound;
- certificate only: ``lipreg.autolip(model, shape, certify=True, estimate=False)``, cold: the
  certified value alone, without the chains' Lanczos estimates that no certificate needs (same
  value as the cold certificate: the "same value" column checks it); "not available" when the
  library has no such option;
- warm certificate: the same certifying estimator called again after the SGD steps, i.e. the
  same call with the previous result's ``state`` (and the traced graph);
- incremental certificate: ``lipreg.functional.incremental.incremental_autolip`` from an anchor
  made of the cold certificate (before the SGD steps) by ``make_anchor``; "not available" when
  the library has no such module.

Networks: MLPs ``width -> width`` x (depth - 1) ``-> 10`` with ReLU (depth 10, 30, 100 x width
256, 512, 1024); a small CNN (conv3x3 3->C pad 1 + ReLU, 2 x conv3x3 C->C pad 1 + ReLU,
flatten, linear -> 10) with C = 16, 32, 64, 128 at 3x32x32 and C = 16 at 3x16x16 and 3x64x64
(the input-size series); torchvision's resnet18 and mobilenet_v2 at 3x64x64 and AlexNet at
3x224x224 (random weights). Growth exponents ``b`` of ``cost ∝ size^b`` are fitted by log-log
least squares within each family and printed under the table.

**Time cap.** A call still running after ``--time-cap`` seconds (of the cost clock: CPU time
on the CPU, wall time on CUDA) is interrupted and its
cell reads "> cap"; the same column of every larger network of the family (all sizes at least
as large) is then skipped ("skipped") and its warm/incremental columns too, so the run's length
is bounded. ``--repeats R`` measures every network R times in interleaved rounds (all networks
of round 1, then of round 2, ...) and reports medians of the per-round multiples. The machine
load is printed under the table (before and after) and per row ("load (max)": the highest 1-min
load average seen at the end of the row's rounds). "cold certificate by" counts the methods
that bounded the cold certificate's affine factors (which ladder entry answered: a change of
entry between sizes breaks a growth law, so the exponents must be read with it).

Run: OMP_NUM_THREADS=1 python benchmarks/scaling.py [--quick] [--device cuda] [--time-cap S]
(``--quick``: the smallest sizes only, to check that the script runs; not for published
figures.)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import math
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from statistics import median
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    add_device_argument,
    clock_name,
    cost_run,
    forward_backward_step,
    machine_load,
    print_footer,
    print_table,
    resolve_device,
    setup_threads,
)
from torch import nn

import lipreg

COLUMNS = (
    "cold estimate",
    "warm estimate",
    "cold certificate",
    "certificate only",
    "warm certificate",
    "incremental",
)
# A warm column needs the cold result of the same kind (its state, or the anchor).
NEEDS = {
    "warm estimate": "cold estimate",
    "warm certificate": "cold certificate",
    "incremental": "cold certificate",
}
INCREMENTAL_MODULE = "lipreg.functional.incremental"
OVER_CAP, SKIPPED, MISSING = "> cap", "skipped", "not available"


class OverCap(BaseException):
    """Raised inside a call that exceeded the time cap. A BaseException, so that no
    ``except Exception`` in the library swallows it."""


@contextmanager
def time_cap(seconds: float, device: torch.device) -> Iterator[None]:
    """Interrupt the enclosed block with :class:`OverCap` after ``seconds`` of the cost clock:
    the process's CPU time on the CPU (``ITIMER_PROF``: a busy machine does not shrink the
    cap), wall time on CUDA (``ITIMER_REAL``: a GPU run is not CPU time). A Unix signal, so the
    main thread only; a running torch kernel is not interrupted, the exception comes when it
    returns."""

    def interrupt(signum: int, frame: Any) -> None:
        raise OverCap

    which, sig = (
        (signal.ITIMER_REAL, signal.SIGALRM)
        if device.type == "cuda"
        else (signal.ITIMER_PROF, signal.SIGPROF)
    )
    previous = signal.signal(sig, interrupt)
    signal.setitimer(which, seconds)
    try:
        yield
    finally:
        signal.setitimer(which, 0)
        signal.signal(sig, previous)


def mlp(depth: int, width: int) -> nn.Module:
    """``depth`` linear layers: ``width -> width`` (depth - 1 times, ReLU after each) ``-> 10``."""
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def small_cnn(channels: int, size: int) -> nn.Module:
    """conv3x3 3->C pad 1 + ReLU, 2 x (conv3x3 C->C pad 1 + ReLU), flatten, linear -> 10,
    on 3 x size x size inputs (the issue's outlier network at C = 16, size 32)."""
    c = channels
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c * size * size, 10),
    )


def torchvision_net(name: str) -> nn.Module:
    """A torchvision classifier with random weights (torchvision is imported lazily)."""
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


@dataclass(frozen=True)
class Network:
    """One row of the table: its family, the sizes the exponents are fitted in, its input."""

    family: str
    sizes: dict[str, int]
    input_shape: tuple[int, ...]
    make: Callable[[], nn.Module]

    @property
    def label(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.sizes.items()) or "-"

    def dominates(self, other: Network) -> bool:
        """Same family and every size at least ``other``'s: at least as costly to bound."""
        return (
            self.family == other.family
            and self.sizes.keys() == other.sizes.keys()
            and all(self.sizes[k] >= other.sizes[k] for k in self.sizes)
        )


def networks(quick: bool, families: list[str]) -> list[Network]:
    """The table's networks, smallest first within each family (the time cap relies on it)."""
    depths, widths = ((10, 30), (256,)) if quick else ((10, 30, 100), (256, 512, 1024))
    cnn = ((16, 16), (16, 32)) if quick else ((16, 16), (16, 32), (32, 32), (64, 32))
    cnn += () if quick else ((128, 32), (16, 64))
    out: list[Network] = []
    if "mlp" in families:
        for d in depths:
            for w in widths:
                out.append(
                    Network("MLP", {"depth": d, "width": w}, (w,), lambda d=d, w=w: mlp(d, w))
                )
    if "cnn" in families:
        for c, s in sorted(cnn, key=lambda cs: cs[0] * cs[0] * cs[1] * cs[1]):
            make = lambda c=c, s=s: small_cnn(c, s)  # noqa: E731
            out.append(Network("small CNN", {"width": c, "input": s}, (3, s, s), make))
    for name, size in (("resnet18", 64), ("mobilenet_v2", 64), ("alexnet", 224)):
        if name in families and not quick:
            make = lambda name=name: torchvision_net(name)  # noqa: E731
            out.append(Network(name, {}, (3, size, size), make))
    return out


def sgd_steps(model: nn.Module, shape: tuple[int, ...], steps: int, device: torch.device) -> None:
    """``steps`` SGD steps (lr 0.01, batch 8, N(0, 1) inputs, random labels; seeded) in train
    mode, then back to eval mode: the weights move as in a fit."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, *shape, generator=gen).to(device)
        y = torch.randint(0, 10, (8,), generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()


def unit_cost(model: nn.Module, shape: tuple[int, ...], device: torch.device) -> float:
    """Median cost of one forward+backward of one sample: 5 blocks of calls, each block long
    enough (>= 20 ms) for the clock's resolution, after one warm-up call."""
    step = forward_backward_step(model, shape, device)
    step()
    seconds, _ = cost_run(step, device)
    per_block = max(1, math.ceil(0.02 / max(seconds, 1e-6)))

    def block() -> None:
        for _ in range(per_block):
            step()

    costs = [cost_run(block, device)[0] / per_block for _ in range(5)]
    model.zero_grad(set_to_none=True)
    return median(costs)


@dataclass
class Round:
    """One measurement of one network: the unit, and per column a cost or a reason."""

    unit: float
    cost: dict[str, float | str] = field(default_factory=dict)
    value: dict[str, float] = field(default_factory=dict)
    methods: str = ""
    load: float = math.nan


def methods_summary(result: Any) -> str:
    """How the affine factors of a certified result were bounded, e.g. ``"dense 10"`` or
    ``"fft-merged (cost budget) 3, dense 1"``: which ladder entry answered (and so which cost
    the row measures), counted over the result's ``kind == "affine"`` layers."""
    counts = Counter(
        layer.method or "?" for layer in getattr(result, "layers", []) if layer.kind == "affine"
    )
    return ", ".join(f"{method} {n}" for method, n in counts.most_common())


def incremental_module() -> ModuleType | None:
    """``lipreg.functional.incremental`` when this version of the library has it."""
    if importlib.util.find_spec(INCREMENTAL_MODULE) is None:
        return None
    module = importlib.import_module(INCREMENTAL_MODULE)
    if not all(hasattr(module, name) for name in ("make_anchor", "incremental_autolip")):
        return None  # a version of the module without the two entry points used here
    return module


def measure(net: Network, device: torch.device, cap: float, skip: set[str], sgd: int) -> Round:
    """One round on a fresh seeded copy of ``net``: the unit, the cold columns, the SGD steps,
    the warm columns (in that order, each under the time cap)."""
    torch.manual_seed(0)
    model = net.make().to(device).eval()
    shape = net.input_shape
    out = Round(unit_cost(model, shape, device))
    found: dict[str, Any] = {}

    def run(column: str, call: Callable[[], Any]) -> None:
        if column in skip or (column in NEEDS and NEEDS[column] not in found):
            out.cost[column] = SKIPPED
            return
        try:
            with time_cap(cap, device):
                seconds, result = cost_run(call, device)
        except OverCap:
            out.cost[column] = OVER_CAP
            return
        out.cost[column], found[column] = seconds, result
        out.value[column] = float(getattr(result, "value", result))

    estimators: dict[str, lipreg.AutoLip] = {}

    def cold(column: str, certify: bool) -> Any:
        estimators[column] = lipreg.AutoLip(model, shape, certify=certify)
        return estimators[column]()

    run("cold estimate", lambda: cold("cold estimate", False))
    run("cold certificate", lambda: cold("cold certificate", True))
    if "estimate" in inspect.signature(lipreg.autolip).parameters:
        run("certificate only", lambda: lipreg.autolip(model, shape, estimate=False))
    else:
        out.cost["certificate only"] = MISSING
    incremental, anchor = incremental_module(), None
    if incremental is not None and "cold certificate" in found:
        traced = estimators["cold certificate"].traced  # reused, as the callback would
        anchor = incremental.make_anchor(model, shape, found["cold certificate"], traced=traced)
    sgd_steps(model, shape, sgd, device)
    run("warm estimate", lambda: estimators["cold estimate"]())
    run("warm certificate", lambda: estimators["cold certificate"]())
    if incremental is None:
        out.cost["incremental"] = MISSING
    elif anchor is not None:
        run(
            "incremental",
            lambda: incremental.incremental_autolip(model, shape, anchor, traced=traced),
        )
    else:
        out.cost["incremental"] = SKIPPED
    out.methods = methods_summary(found.get("cold certificate"))
    out.load = os.getloadavg()[0]  # the 1-min load at the end of the row: how disturbed it was
    return out


def skipped_columns(net: Network, over: dict[str, list[Network]]) -> set[str]:
    """The columns to skip on ``net``: those that went over the cap (or were skipped for it)
    on ``net`` itself in an earlier round or on a network it dominates."""
    return {c for c, nets in over.items() if any(net.dominates(q) for q in nets)}


def run_rounds(
    nets: list[Network], device: torch.device, cap: float, repeats: int, sgd: int
) -> dict[int, list[Round]]:
    """``repeats`` interleaved rounds over all networks (round 1 of every network, then round
    2, ...), with the time-cap skips propagated to larger networks of the same family."""
    rounds: dict[int, list[Round]] = {i: [] for i in range(len(nets))}
    over: dict[str, list[Network]] = {c: [] for c in COLUMNS}
    for r in range(repeats):
        for i, net in enumerate(nets):
            done = measure(net, device, cap, skipped_columns(net, over), sgd)
            rounds[i].append(done)
            for column, cost in done.cost.items():
                if cost in (OVER_CAP, SKIPPED) and column in over:
                    over[column].append(net)
            cells = "; ".join(f"{c} {fmt(cell(done, c))}" for c in COLUMNS)
            print(
                f"# round {r + 1}: {net.family} {net.label}: unit {done.unit:.3g} s; {cells}; "
                f"certificate by {done.methods or '-'}; load {done.load:.2f}",
                flush=True,
            )
    return rounds


def fmt(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.4g}x"


def warm_up(device: torch.device) -> None:
    """One certified and one estimated call on a tiny network: the first call of a process
    pays one-off costs (lazy imports, allocator, kernels' first runs) that no row should."""
    tiny = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)).to(device)
    for certify in (False, True):
        lipreg.AutoLip(tiny, (1, 4, 4), certify=certify)()


def cell(done: Round, column: str) -> float | str:
    """A column's cost as a multiple of the round's unit, or the reason it has none."""
    cost = done.cost.get(column, SKIPPED)
    return cost if isinstance(cost, str) else cost / done.unit


def multiple(rounds: list[Round], column: str) -> float | str:
    """Median over rounds of the per-round multiples; the first reason if a round has none."""
    cells = [cell(r, column) for r in rounds]
    reasons = [c for c in cells if isinstance(c, str)]
    return reasons[0] if reasons else median(cells)


def same_value(only: float | None, certified: float) -> str:
    """Whether the certificate-only value equals the cold certificate's ("" when absent)."""
    return "" if only is None else ("yes" if only == certified else f"NO ({only:.6g})")


def ratio(a: Any, b: Any) -> float | str:
    return a / b if isinstance(a, float) and isinstance(b, float) else ""


def table_rows(nets: list[Network], rounds: dict[int, list[Round]]) -> list[list[Any]]:
    """One row per network: unit, the five multiples, warm/cold certificate, the values, the
    highest 1-min load seen at the end of its rounds and how its cold certificate was made."""
    rows = []
    for i, net in enumerate(nets):
        rs = rounds[i]
        cols = {c: multiple(rs, c) for c in COLUMNS}
        values = rs[-1].value
        certified = values.get("cold certificate", math.nan)
        rows.append(
            [
                net.family,
                net.label,
                "x".join(map(str, net.input_shape)),
                median(r.unit for r in rs),
                *cols.values(),
                ratio(cols["warm certificate"], cols["cold certificate"]),
                values.get("cold estimate", math.nan),
                certified,
                ratio(values.get("incremental"), values.get("warm certificate")),
                same_value(values.get("certificate only"), certified),
                max(r.load for r in rs),
                rs[-1].methods or "-",
            ]
        )
    return rows


HEADERS = [
    "network",
    "sizes",
    "input",
    "fwd+bwd (s)",
    "cold estimate x",
    "warm estimate x",
    "cold certificate x",
    "certificate only x",
    "warm certificate x",
    "incremental x",
    "warm/cold certificate",
    "estimate (cold)",
    "certified (cold)",
    "incremental/warm certified",
    "same value",
    "load (max)",
    "cold certificate by",
]


def fit_exponents(
    points: list[tuple[dict[str, int], float]],
) -> tuple[dict[str, float], int] | None:
    """Least-squares fit of ``log y = a + Σ_k b_k log size_k`` over the sizes that vary;
    ``None`` when there are fewer points than unknowns (with exactly as many, the fit is
    exact: nothing is averaged, the table's point count says so)."""
    import numpy as np

    keys = [k for k in points[0][0] if len({p[0][k] for p in points}) > 1] if points else []
    if not keys or len(points) < len(keys) + 1:
        return None
    x = np.array([[1.0] + [math.log(s[k]) for k in keys] for s, _ in points])
    y = np.array([math.log(v) for _, v in points])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return dict(zip(keys, coef[1:].tolist(), strict=True)), len(points)


def exponent_rows(nets: list[Network], rounds: dict[int, list[Round]]) -> list[list[Any]]:
    """Per family and quantity: the fitted exponent of the time and of the multiple."""
    rows = []
    for family in dict.fromkeys(n.family for n in nets):
        members = [(n, rounds[i]) for i, n in enumerate(nets) if n.family == family]
        units = [(n.sizes, median(r.unit for r in rs)) for n, rs in members]
        unit_fit = fit_exponents(units)
        if unit_fit is not None:
            rows.append([family, "fwd+bwd (s)", *exponent_cells(unit_fit[0], None), unit_fit[1]])
        for column in COLUMNS:
            pts = [
                (n.sizes, multiple(rs, column), u)
                for (n, rs), (_, u) in zip(members, units, strict=True)
            ]
            pts = [(s, m, u) for s, m, u in pts if isinstance(m, float)]
            times = fit_exponents([(s, m * u) for s, m, u in pts])
            multiples = fit_exponents([(s, m) for s, m, _ in pts])
            if times is not None and multiples is not None:
                rows.append([family, column, *exponent_cells(times[0], multiples[0]), times[1]])
    return rows


def exponent_cells(times: dict[str, float], multiples: dict[str, float] | None) -> list[str]:
    """ "b_time / b_multiple" per size (depth, width, input), "" where the size does not vary."""
    cells = []
    for key in ("depth", "width", "input"):
        if key not in times:
            cells.append("")
        elif multiples is None:
            cells.append(f"{times[key]:.2f}")
        else:
            cells.append(f"{times[key]:.2f} / {multiples[key]:.2f}")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest sizes only (< 2 min)")
    add_device_argument(parser)
    parser.add_argument(
        "--time-cap", type=float, default=120.0, help="seconds per call (CPU time on the CPU)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds (medians)")
    parser.add_argument("--sgd-steps", type=int, default=10, help="SGD steps before warm calls")
    families = ("mlp", "cnn", "resnet18", "mobilenet_v2", "alexnet")
    parser.add_argument("--families", nargs="+", choices=families, default=list(families))
    args = parser.parse_args()
    setup_threads()
    device = resolve_device(args.device)
    load_before = machine_load()
    nets = networks(args.quick, args.families)
    warm_up(device)
    rounds = run_rounds(nets, device, args.time_cap, args.repeats, args.sgd_steps)
    print_table(HEADERS, table_rows(nets, rounds))
    print()
    print("Growth exponents b of cost ∝ size^b (log-log least squares within the family):")
    print("cells read 'b of the time (s) / b of the multiple of fwd+bwd'.")
    print_table(
        ["family", "quantity", "depth", "width", "input size", "points"],
        exponent_rows(nets, rounds),
    )
    print()
    print(f"Costs: {clock_name(device)}; multiples of one forward+backward of one sample.")
    print(
        f"Time cap {args.time_cap:g} s per call ('{OVER_CAP}': interrupted; '{SKIPPED}': a "
        f"smaller network of the family went over the cap, or its cold call did); "
        f"{args.sgd_steps} SGD steps before the warm calls; {args.repeats} round(s)."
    )
    if incremental_module() is None:
        print(f"Incremental certificates: {MISSING} ({INCREMENTAL_MODULE} not found).")
    print_footer(load_before, "smallest sizes only" if args.quick else None, device)


if __name__ == "__main__":
    main()
