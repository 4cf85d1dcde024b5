# ruff: noqa: B023  (lambdas are called at once, inside the loop)
"""Cost of certified AutoLip on convolutional networks, as multiples of ONE forward+backward of
ONE sample (issue 10, items 3-4: the conv side of the certificate ladder).

Networks: the small CNN (conv3×3 3→16 pad 1 + ReLU, two conv3×3 16→16 + ReLU, flatten, linear
16384→10, input 3×32×32), torchvision ``resnet18`` at 3×64×64 (evaluation mode: batch norms
folded), AlexNet's convolutional part (``alexnet().features``, 3×224×224). Per network:

* ``cold``: ``lipreg.autolip(model, shape, certify=True)`` without state;
* ``warm``: the same call with the cold call's ``state`` (weights unchanged);
* ``warm+sgd``: with the cold call's ``state`` after 100 SGD steps (lr 0.01, batch 2, random
  inputs and targets, evaluation mode so batch-norm statistics stay) on a copy of the model.

CPU time (``time.process_time``), one thread, medians of ``--reps`` interleaved repetitions
(cold, warm, warm+sgd, cold, ...; the first cold call is the one whose state the warm calls
use, timed as one of the ``--reps`` cold repetitions); ``--runs`` picks some. The machine's
load is printed before and after.
``--tightness`` also prints certified/estimate per network for the default ladder and for
:data:`lipreg.functional.ladder.TIGHTEST_LADDER` (the Gram test at any cost), on the small
CNN, resnet18 and mobilenet_v2 at 64×64 (randomised batch norms, as ``certified_gap.py``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/conv_certificates.py [--nets ...] [--reps 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable

import torch
import torchvision
from _common import machine_load, setup_threads
from certified_gap import make as make_torchvision
from torch import nn

import lipreg
from lipreg.functional import ladder


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 32 * 32, 10),
    )


NETS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "smallcnn": (small_cnn, (3, 32, 32)),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (3, 64, 64)),
    "alexnet-features": (lambda: torchvision.models.alexnet(weights=None).features, (3, 224, 224)),
}


def cpu_seconds(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def forward_backward(model: nn.Module, shape: tuple[int, ...]) -> float:
    """CPU seconds of one forward+backward of one sample (median of 3 blocks of 20)."""
    x = torch.randn(1, *shape)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    for _ in range(3):
        step()
    times = [cpu_seconds(lambda: [step() for _ in range(20)])[0] / 20 for _ in range(3)]
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def sgd_copy(model: nn.Module, shape: tuple[int, ...], steps: int = 100) -> nn.Module:
    """A copy of ``model`` after ``steps`` SGD steps (lr 0.01) on random data (eval mode)."""
    trained = copy.deepcopy(model)
    opt = torch.optim.SGD(trained.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, *shape, generator=g)
        out = trained(x)
        loss = ((out - torch.randn(out.shape, generator=g)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return trained.eval()


def methods(result) -> str:
    counts = Counter(lb.method for lb in result.layers if lb.kind == "affine")
    return ", ".join(f"{m}: {n}" for m, n in counts.most_common())


def cost_rows(name: str, reps: int, chosen: list[str]) -> None:
    make, shape = NETS[name]
    torch.manual_seed(0)
    model = make().eval()
    fb = forward_backward(model, shape)
    first_time, first = cpu_seconds(lambda: lipreg.autolip(model, shape, certify=True))
    trained = sgd_copy(model, shape) if "warm+sgd" in chosen else model
    runs = {
        "cold": lambda: lipreg.autolip(model, shape, certify=True),
        "warm": lambda: lipreg.autolip(model, shape, certify=True, state=dict(first.state)),
        "warm+sgd": lambda: lipreg.autolip(trained, shape, certify=True, state=dict(first.state)),
    }
    runs = {k: fn for k, fn in runs.items() if k in chosen}
    times: dict[str, list[float]] = {k: [] for k in runs}
    outs: dict[str, object] = {"cold": first}
    if "cold" in runs:  # the first call is a cold call: its time is one of the repetitions
        times["cold"].append(first_time)
    for rep in range(reps):
        for key, fn in runs.items():
            if key == "cold" and rep == reps - 1:
                continue  # ``reps`` cold calls in all, the first one included
            seconds, outs[key] = cpu_seconds(fn)
            times[key].append(seconds)
    print(f"\n### {name} {shape}: one forward+backward {fb * 1e3:.3f} ms, load {machine_load()}")
    print("| run | CPU s (median) | × fwd+bwd | certified | value | estimate | certificates |")
    print("|---|---|---|---|---|---|---|")
    for key in runs:
        r, t = outs[key], statistics.median(times[key])
        print(
            f"| {key} | {t:.3f} | {t / fb:.0f}× | {r.certified} | {r.value:.7g} | "
            f"{r.estimate:.7g} | {methods(r)} |"
        )
    sys.stdout.flush()


def tightness_rows() -> None:
    print("\n### certified / estimate: default ladder vs TIGHTEST_LADDER (Gram test at any cost)")
    print("| network | ladder | CPU s | certified | estimate | certified/estimate | certificates |")
    print("|---|---|---|---|---|---|---|")
    nets = {
        "smallcnn": (lambda: small_cnn().eval(), (3, 32, 32)),
        "resnet18": (lambda: make_torchvision("resnet18"), (3, 64, 64)),
        "mobilenet_v2": (lambda: make_torchvision("mobilenet_v2"), (3, 64, 64)),
    }
    tightest = getattr(ladder, "TIGHTEST_LADDER", None)
    for name, (make, shape) in nets.items():
        torch.manual_seed(0)
        model = make()
        for label, chosen in (("default", None), ("tightest", tightest)):
            if label == "tightest" and chosen is None:
                continue
            t, r = cpu_seconds(lambda: lipreg.autolip(model, shape, ladder=chosen))
            print(
                f"| {name} | {label} | {t:.2f} | {r.value:.7g} | {r.estimate:.7g} | "
                f"{r.value / r.estimate:.6f} | {methods(r)} |"
            )
            sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=["cold", "warm", "warm+sgd"],
        default=["cold", "warm", "warm+sgd"],
    )
    parser.add_argument("--tightness", action="store_true")
    args = parser.parse_args()
    setup_threads()
    print(f"lipreg from {lipreg.__file__}; load before: {machine_load()}")
    for name in args.nets:
        cost_rows(name, args.reps, args.runs)
    if args.tightness:
        tightness_rows()
    print(f"\nload after: {machine_load()}")


if __name__ == "__main__":
    main()
