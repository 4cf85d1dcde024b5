"""Warm monitoring calls (issue 10 item 7): what a reused ``lipreg.AutoLip`` estimate and a
``tighten`` after a certified AutoLip cost, as multiples of one forward+backward pass of one
sample.

Configurations, per network (MLP 784-1000x3-10, the paper's CNN-4 ``mnist_cnn4`` at
1x28x28, a small CNN at 3x32x32):

- ``warm``: ``AutoLip(certify=False)`` called again with the same weights;
- ``warm+10 SGD``: the same after 10 SGD steps (not timed) on random data;
- ``analysed per call``: ``lipreg.autolip(certify=False, traced=..., state=...)`` warm with
  the same weights: what ``AutoLip`` did before it kept its analysis (trace reused; probe,
  checks and contexts at every call), on the same code, for a same-build comparison;
- ``tighten``: ``tighten(methods=("lipsdp",), max_lmi_size=--tighten-lmi)`` after a
  certified ``AutoLip`` call, given that AutoLip's analysis when the library accepts
  ``analysis=`` (else re-analysing on its trace, as before). The default 1024 (the callback
  uses 2048, where the MLP's last LipSDP block alone takes about a minute) keeps the LMI
  solves small, so that the analysis overhead shows;
- ``tighten re-analysed``: the same with ``traced=`` instead of ``analysis=`` (a new float64
  analysis and probe, as before), on the same code.

CPU time (``time.process_time``), medians of ``--reps`` interleaved rounds (every
configuration of every network once per round), one thread; the load average is printed.
The same script runs on an older checkout (``PYTHONPATH=<checkout>``) for the "before"
column. Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/warm_calls.py [--reps 7] [--label after]
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import lipreg
from lipreg.functional.tight import tighten
from lipreg.models.paper import mnist_cnn4


def mlp() -> nn.Module:
    sizes = [784, 1000, 1000, 1000, 10]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


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
    "MLP 784-1000x3-10": (mlp, (784,)),
    "CNN-4 (mnist_cnn4)": (mnist_cnn4, (1, 28, 28)),
    "small CNN 3x32x32": (small_cnn, (3, 32, 32)),
}


def cpu(fn: Callable[[], object], n: int = 1) -> float:
    """CPU seconds of one call of ``fn`` (the mean over ``n`` back-to-back calls)."""
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n


class Bench:
    """One network's set-up and the statements timed on it."""

    def __init__(
        self, make: Callable[[], nn.Module], shape: tuple[int, ...], max_lmi_size: int
    ) -> None:
        torch.manual_seed(0)
        self.model, self.shape = make().eval(), shape
        self.x = torch.randn(1, *shape)
        self.data = torch.randn(16, *shape)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.estimator = lipreg.AutoLip(self.model, shape, certify=False)
        self.estimator()
        self.certifier = lipreg.AutoLip(self.model, shape)
        self.has_analysis = "analysis" in inspect.signature(tighten).parameters
        self.max_lmi_size = max_lmi_size

    def forward_backward(self) -> float:
        def step() -> None:
            self.model.zero_grad(set_to_none=True)
            self.model(self.x).sum().backward()

        step()
        value = cpu(step, 20)
        self.model.zero_grad(set_to_none=True)
        return value

    def warm(self) -> float:
        return cpu(self.estimator)

    def analysed_per_call(self) -> float:
        state = dict(self.estimator.state)
        traced = self.estimator.traced

        def call() -> None:
            lipreg.autolip(self.model, self.shape, certify=False, state=state, traced=traced)

        return cpu(call)

    def warm_after_sgd(self) -> float:
        for _ in range(10):
            self.opt.zero_grad()
            self.model(self.data).square().mean().backward()
            self.opt.step()
        self.model.zero_grad(set_to_none=True)
        return cpu(self.estimator)

    def tighten(self, reuse: bool = True) -> float:
        base = self.certifier()
        options = {"methods": ("lipsdp",), "max_lmi_size": self.max_lmi_size}
        if self.has_analysis and reuse:
            options["analysis"] = self.certifier.analysis
        else:
            options["traced"] = self.certifier.traced
        return cpu(lambda: tighten(self.model, self.shape, base, **options))

    def tighten_reanalysed(self) -> float:
        return self.tighten(reuse=False)


CONFIGS = {
    "fwd+bwd (ms)": Bench.forward_backward,
    "warm": Bench.warm,
    "analysed per call": Bench.analysed_per_call,
    "warm+10 SGD": Bench.warm_after_sgd,
    "tighten": Bench.tighten,
    "tighten re-analysed": Bench.tighten_reanalysed,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--label", default="")
    parser.add_argument("--tighten-lmi", type=int, default=1024)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    benches = {name: Bench(make, shape, args.tighten_lmi) for name, (make, shape) in NETS.items()}
    times: dict[tuple[str, str], list[float]] = {}
    loads = [os.getloadavg()[0]]
    for _ in range(args.reps):
        for name, bench in benches.items():
            for config, run in CONFIGS.items():
                times.setdefault((name, config), []).append(run(bench))
        loads.append(os.getloadavg()[0])
    print(f"## {args.label or 'run'}: lipreg at {os.path.dirname(lipreg.__file__)}")
    print(f"\nmedians of {args.reps} interleaved rounds, CPU time, 1 thread; load average ", end="")
    print(f"{min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} cores; tighten with ", end="")
    print(f"max_lmi_size={args.tighten_lmi}.\n")
    print("| network | fwd+bwd of 1 sample | " + " | ".join(list(CONFIGS)[1:]) + " |")
    print("|---" * len(CONFIGS) + "|---|")
    for name in benches:
        unit = statistics.median(times[(name, "fwd+bwd (ms)")])
        cells = [f"{1e3 * unit:.3f} ms"]
        for config in list(CONFIGS)[1:]:
            t = statistics.median(times[(name, config)])
            cells.append(f"{t / unit:.2f}x ({1e3 * t:.2f} ms)")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
