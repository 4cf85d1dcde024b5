"""A cheap first anchor? Cost and slack of full certificates with a lower dense limit.

The callback's first anchor was (before ``quick_ladder``, incremental.md §10) a full
certificate at the default ``dense_limit`` (2048): on the MNIST CNN-4 its four convolutions
are certified as dense maps, ~100 training steps of the
benchmark fit, more than a 1500-step fit's whole 5 % budget (training_overhead.md). This
prints, for CNN-4 (random init) and torchvision resnet18 (num_classes=10, 3×32×32, eval
mode), the cold full certificate at dense limits 2048 / 512 / 0: seconds (median of 3), value,
and its slack over the tightest (2048) value; then the same with the dense certificates limited
by cost instead (``quick_ladder(max_dense_flops)``: the Gram product's ``n · m · min(n, m)``).

Run: OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/cheap_anchor.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torchvision

from lipreg.functional.autolip import AutoLip, autolip
from lipreg.functional.ladder import quick_ladder
from lipreg.models.paper import mnist_cnn4


def measure(name: str, net: torch.nn.Module, shape: tuple[int, ...]) -> None:
    est = AutoLip(net, shape, certify=False)
    est()
    tightest = None
    for limit in (2048, 512, 0):
        seconds, result = [], None
        for _ in range(3):
            start = time.perf_counter()
            result = autolip(
                net,
                shape,
                certify=True,
                dense_limit=limit,
                state=dict(est.state),
                analysis=est.analysis,
            )
            seconds.append(time.perf_counter() - start)
        assert result is not None
        tightest = tightest or result.value
        methods = sorted({lb.method for lb in result.layers if lb.kind == "affine"})
        print(
            f"| {name} | {limit} | {statistics.median(seconds):.3f} | {result.value:.8g} | "
            f"{result.value / tightest - 1:.2e} | {', '.join(methods)} |"
        )


def measure_flops(name: str, net: torch.nn.Module, shape: tuple[int, ...]) -> None:
    est = AutoLip(net, shape, certify=False)
    est()
    tightest = None
    for flops in (float("inf"), 1e10, 4e9, 2e9, 1e9):
        seconds, result = [], None
        for _ in range(3):
            start = time.perf_counter()
            result = autolip(
                net,
                shape,
                certify=True,
                ladder=quick_ladder(flops),
                state=dict(est.state),
                analysis=est.analysis,
            )
            seconds.append(time.perf_counter() - start)
        assert result is not None
        tightest = tightest or result.value
        methods = sorted({lb.method for lb in result.layers if lb.kind == "affine"})
        print(
            f"| {name} | {flops:.0e} | {statistics.median(seconds):.3f} | {result.value:.8g} | "
            f"{result.value / tightest - 1:.2e} | {', '.join(methods)} |"
        )


if __name__ == "__main__":
    nets = {
        "CNN-4": (mnist_cnn4, (1, 28, 28)),
        "resnet18 32x32": (
            lambda: torchvision.models.resnet18(num_classes=10).eval(),
            (3, 32, 32),
        ),
    }
    torch.manual_seed(0)
    print("| network | dense limit | seconds | certified value | over the 2048 value | rungs |")
    print("|---|---|---|---|---|---|")
    made = {name: (make(), shape) for name, (make, shape) in nets.items()}
    for name, (net, shape) in made.items():
        measure(name, net, shape)
    print()
    print("| network | max dense flops | seconds | certified value | over the unlimited | rungs |")
    print("|---|---|---|---|---|---|")
    for name, (net, shape) in made.items():
        measure_flops(name, net, shape)
