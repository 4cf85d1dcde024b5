"""Certified AutoLip against its own converged estimate on torchvision networks at 64×64.

Issue 9, item 6: each affine chain's certified factor should be within 0.1 % of its Lanczos
estimate, so that the certified AutoLip is at most 1.05 × the estimated one. Prints, per
network (torchvision's own random initialisation, then batch-norm running statistics and affine
parameters randomised so that batch norm is not the identity; evaluation mode; input 3×64×64):
the estimate (product of the per-chain Lanczos values), the certified value, their ratio, the
worst chain's ratio and name, how many chains each certificate answered, and the wall and CPU
seconds of the certified run (one run, single thread; CPU seconds are the fairer figure on a
shared machine). ``--old`` also runs the ladder without the merged
conv-chain entry (the previous certificates) for comparison.

    OMP_NUM_THREADS=1 python benchmarks/certified_gap.py [--networks resnet18 ...] [--old]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
import torchvision
from _common import machine_load, print_footer, print_table, setup_threads, single_run
from torch import nn

import lipreg
from lipreg.functional import ladder

NETWORKS = ("resnet18", "mobilenet_v2", "resnet50")
INPUT = (3, 64, 64)


def make(name: str, seed: int = 0) -> nn.Module:
    """The torchvision network with seeded random weights and randomised batch norms."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                m.weight.mul_(torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0))
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.8 + 0.2)
    return model.eval()


def gap_row(name: str, model: nn.Module, label: str) -> list:
    """One table row: estimate, certified, ratios, methods, seconds."""
    cpu_start = time.process_time()
    seconds, result = single_run(lambda: lipreg.autolip(model, INPUT))
    cpu = time.process_time() - cpu_start
    affine = [layer for layer in result.layers if layer.kind == "affine"]
    worst = max(affine, key=lambda layer: layer.value / layer.estimate)
    methods = Counter(layer.method for layer in affine)
    return [
        name,
        label,
        result.estimate,
        result.value,
        f"{result.value / result.estimate:.6f}",
        f"{worst.value / worst.estimate:.6f}",
        worst.name,
        ", ".join(f"{m}: {n}" for m, n in methods.most_common()),
        seconds,
        cpu,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--old", action="store_true", help="also run the previous ladder")
    args = parser.parse_args()
    setup_threads()
    load_before = machine_load()
    rows = []
    for name in args.networks:
        model = make(name)
        rows.append(gap_row(name, model, "current"))
        if args.old:
            original = list(ladder.LADDER)
            ladder.LADDER[:] = [e for e in original if e is not ladder.merged_conv_chain]
            try:
                rows.append(gap_row(name, model, "without merged_conv_chain"))
            finally:
                ladder.LADDER[:] = original
        print_table(HEADERS, rows[-1:])  # progress: one network at a time
    print()
    print_table(HEADERS, rows)
    print_footer(load_before, None)


HEADERS = [
    "network",
    "ladder",
    "estimate",
    "certified",
    "certified/estimate",
    "worst chain ratio",
    "worst chain",
    "certificates (chains)",
    "seconds",
    "CPU seconds",
]


if __name__ == "__main__":
    main()
