"""Why incremental certificates are loose on batch-norm networks trained in TRAIN mode, and how
much the per-chain bounds gain: torchvision resnet18 (num_classes=10) at 3x32x32, batch 32 of
N(0, 1) inputs with random labels, SGD (lr 0.1, momentum 0.9) or Adam (lr 1e-3), trained in
train mode (running statistics move), certified in eval mode. ``WARMUP`` steps, then an anchor
(``certified_anchor``), then after k = 1, 10, 50, 100 further steps: the full certificate
(``lipreg.autolip``, warm state), the incremental one (``incremental_autolip``, with
estimates) and per chain the anchor's factor, the fresh factor, the incremental one, which
bound won, the BN scale ratio ``r = r_out r_in`` of (2') and the ratio bound's increment. Optional
arguments: the Gram-iteration budget of the increments and ``refresh_slack`` (per-chain
refresh, ``incremental_autolip``).

Run from the repo root:
OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/bn_train_slack.py \
    [sgd|adam] [warmup] [gram_flops] [refresh_slack]
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

import lipreg
from lipreg.functional.incremental import certified_anchor, incremental_autolip, slack
from lipreg.functional.incremental_bounds import GRAM_ITERATION_FLOPS

SHAPE = (3, 32, 32)
STEPS = (1, 10, 50, 100)


def train(model, opt, gen, n: int) -> None:
    model.train()
    for _ in range(n):
        x = torch.randn(32, *SHAPE, generator=gen)
        y = torch.randint(0, 10, (32,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def main(opt_name: str, warmup: int, gram_flops: float, refresh: float | None) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    train(model, opt, gen, warmup)
    t0 = time.perf_counter()
    anchor, first = certified_anchor(model, SHAPE, ritz=0)
    print(
        f"# {opt_name}, warm-up {warmup}, gram_flops {gram_flops:g}, refresh_slack {refresh}: "
        f"anchor {first.value:.4g} "
        f"estimate {first.estimate:.4g} ({time.perf_counter() - t0:.1f} s)"
    )
    done = 0
    for k in STEPS:
        train(model, opt, gen, k - done)
        done = k
        t0 = time.perf_counter()
        fresh = lipreg.autolip(model, SHAPE, certify=True, state=first.state)
        t_fresh = time.perf_counter() - t0
        t0 = time.perf_counter()
        inc = incremental_autolip(
            model, SHAPE, anchor, gram_flops=gram_flops, refresh_slack=refresh
        )
        t_inc = time.perf_counter() - t0
        refreshed = sum("incremental" in lb.extra for lb in inc.layers)
        print(
            f"## k={k}: fresh {fresh.value:.4g} (est {fresh.estimate:.4g}, {t_fresh:.1f} s), "
            f"incremental {inc.value:.4g} ({t_inc:.1f} s, {refreshed} chains refreshed): "
            f"inc/fresh-1 "
            f"{inc.value / fresh.value - 1:.4g}, inc/est-1 {slack(inc):.4g}"
        )
        fresh_layers = {lb.name: lb for lb in fresh.layers if lb.kind == "affine"}
        for lb in inc.layers:
            if lb.kind != "affine" or lb.name not in anchor.chains:
                continue
            sig = anchor.chains[lb.name].sigma
            fr = fresh_layers[lb.name]
            e = lb.extra
            r = (e.get("ratio", float("nan")) - e.get("ratio_increment", 0.0)) / sig
            print(
                f"  {lb.name:32s} anchor {sig:9.4g} fresh {fr.value:9.4g} ({fr.method[:14]:14s}) "
                f"inc {lb.value:9.4g} inc/fresh {lb.value / fr.value:7.4f} "
                f"fresh/anchor {fr.value / sig:7.4f} r {r:7.4f} "
                f"ratio-incr/anchor {e.get('ratio_increment', 0.0) / sig:8.4g} "
                f"1st/fresh {e.get('first_order', math.nan) / fr.value:9.4g} "
                f"incremental/fresh {e.get('incremental', lb.value) / fr.value:7.4f} [{lb.method}]"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        args[0] if args else "sgd",
        int(args[1]) if len(args) > 1 else 5,
        float(args[2]) if len(args) > 2 else GRAM_ITERATION_FLOPS,
        float(args[3]) if len(args) > 3 else None,
    )
