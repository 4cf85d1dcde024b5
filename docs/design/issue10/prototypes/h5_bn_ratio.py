"""Incremental certificates of batch-norm networks trained in TRAIN mode (the running
statistics move): torchvision resnet18 / mobilenet_v2 (num_classes=10) at 3x32x32, anchored
(``certified_anchor``, eval mode), then 10 SGD steps (lr 0.01, batch 8, N(0, 1) inputs, random
labels) in train mode, back to eval; prints the fresh certified AutoLip value, the incremental
one (no estimates), their ratio, how many chains took the ratio bound of incremental.md §2,
and the largest change of a folded batch-norm scale (max over scales of max_c d_t/d_s).

Run from the repo root:
OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/h5_bn_ratio.py [names...]
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F
import torchvision

import lipreg
from lipreg.functional.incremental import certified_anchor, incremental_entry
from lipreg.functional.ladder import LADDER

SHAPE = (3, 32, 32)


def bn_scales(model: torch.nn.Module) -> list[torch.Tensor]:
    out = []
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            out.append((m.weight / torch.sqrt(m.running_var + m.eps)).detach().double())
    return out


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    for name in names:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
        start = time.perf_counter()
        anchor, first = certified_anchor(model, SHAPE, ritz=0)
        t_anchor = time.perf_counter() - start
        before = bn_scales(model)
        gen = torch.Generator().manual_seed(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        model.train()
        for _ in range(10):
            x = torch.randn(8, *SHAPE, generator=gen)
            y = torch.randint(0, 10, (8,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
        change = max(
            float((a / b).abs().max()) for a, b in zip(bn_scales(model), before, strict=True)
        )
        start = time.perf_counter()
        fresh = lipreg.autolip(model, SHAPE, certify=True, state=first.state)
        t_fresh = time.perf_counter() - start
        start = time.perf_counter()
        ladder = [incremental_entry(anchor, estimate=False), *LADDER]
        inc = lipreg.autolip(model, SHAPE, certify=True, ladder=ladder)
        t_inc = time.perf_counter() - start
        methods = Counter(lb.method for lb in inc.layers if lb.kind == "affine")
        print(
            f"{name}: anchor {first.value:.4g} ({t_anchor:.1f} s), fresh {fresh.value:.4g} "
            f"({t_fresh:.1f} s), incremental {inc.value:.4g} ({t_inc:.1f} s), "
            f"incremental/fresh {inc.value / fresh.value:.4g}; max BN scale ratio {change:.3g}"
        )
        for method, n in methods.most_common():
            print(f"    {n:3d} x {method}")
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:] or ["resnet18", "mobilenet_v2"])
