"""Measured slack and cost of the library's incremental certificates (issue 10 item 2,
``lipreg.functional.incremental``), in the setting of incremental.md §6.

MLP 784-1000x3-10 and CNN-4 (benchmarks/training_overhead.py fits: synthetic N(0,1) batches of
128, random labels), anchored at step 200 (``certified_anchor``, with and without the Ritz
anchor of bound (5)), then after k = 1, 10, 50 more SGD (lr 0.01) / Adam (lr 1e-3) steps:

* ``fresh``: a full certified ``lipreg.autolip`` (warm state from the anchor), value and time;
* ``(1)``: ``incremental_autolip`` with the first-order bound only (anchor ``ritz=0``) and no
  estimates (``incremental_entry(anchor, estimate=False)``): slack vs fresh and time;
* ``min((1),(5))``: the same with the top-16 Ritz anchor (second-order bound (5) for the
  dense layers): slack vs fresh and time;
* ``+gram``: the same as min((1),(5)) with the Gram-iteration bound of every dense change
  (``gram_flops=inf``; by default only layers with m·n·min(m, n) ≤ 5e7 get it);
* ``slack()``: ``incremental_autolip`` with the warm Lanczos estimates (and Ritz), its
  value/estimate − 1 (what a re-anchor trigger sees; ≥ the true slack) and time.

Run from the repo root:
OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/h5_slack.py
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
from training_overhead import mlp

import lipreg
from lipreg.functional.incremental import (
    certified_anchor,
    incremental_autolip,
    incremental_entry,
    slack,
)
from lipreg.functional.incremental_bounds import GRAM_ITERATION_FLOPS
from lipreg.functional.ladder import LADDER
from lipreg.models import mnist_cnn4

SHAPE = (1, 28, 28)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(name: str, make, opt_name: str, warm: int = 200, ks=(1, 10, 50)) -> list[str]:
    torch.manual_seed(0)
    net = make()
    opt = (
        torch.optim.SGD(net.parameters(), lr=0.01)
        if opt_name == "SGD"
        else torch.optim.Adam(net.parameters(), lr=1e-3)
    )
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        x = torch.randn(128, *SHAPE, generator=g)
        y = torch.randint(0, 10, (128,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(warm):
        step()
    net.eval()
    (plain, first), t_plain = timed(lambda: certified_anchor(net, SHAPE, step=warm, ritz=0))
    ritz, t_ritz = timed(lambda: certified_anchor(net, SHAPE, step=warm)[0])
    net.train()
    t_step = time.perf_counter()
    step()
    t_step = time.perf_counter() - t_step
    done, lines = 1, []
    for k in ks:
        while done < k:
            step()
            done += 1
        net.eval()
        fresh, t_fresh = timed(lambda: lipreg.autolip(net, SHAPE, state=first.state))
        first_order, t_1 = timed(lambda: bare(net, plain))
        second, t_5 = timed(lambda: bare(net, ritz))
        gram, t_g = timed(lambda: bare(net, ritz, math.inf))
        full, t_full = timed(lambda: incremental_autolip(net, SHAPE, ritz, state=first.state))
        net.train()
        assert first_order.certified and second.certified and second.value == full.value
        lines.append(
            f"| {name} | {opt_name} | {k} | {fresh.value / first.value - 1:+.3%} | "
            f"{first_order.value / fresh.value - 1:.3%} | {second.value / fresh.value - 1:.3%} | "
            f"{gram.value / fresh.value - 1:.3%} | {slack(full):.3%} | {t_fresh:.3f} | "
            f"{t_1:.3f} | {t_5:.3f} | {t_g:.3f} | {t_full:.3f} | "
            f"{t_plain:.2f} / {t_ritz:.2f} / {t_step:.3f} |"
        )
    return lines


def bare(net, anchor, gram_flops=GRAM_ITERATION_FLOPS):
    """The incremental certificate alone (no Lanczos estimates)."""
    ladder = [incremental_entry(anchor, estimate=False, gram_flops=gram_flops), *LADDER]
    return lipreg.autolip(net, SHAPE, ladder=ladder)


def main() -> None:
    torch.set_num_threads(1)
    print(
        "| net | opt | k | fresh vs anchor | slack (1) | slack min((1),(5)) | +gram | slack() "
        "| fresh s | (1) s | min s | +gram s | slack() s | anchor s: plain / Ritz / train step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, make in (("MLP", mlp), ("CNN-4", mnist_cnn4)):
        for opt_name in ("SGD", "Adam"):
            for line in run(name, make, opt_name):
                print(line, flush=True)


if __name__ == "__main__":
    main()
