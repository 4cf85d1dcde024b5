"""Cost of the Ritz anchor (bound (5)) with block Krylov instead of an eigendecomposition, and
the slack after 1 / 10 / 50 SGD steps on the MLP 784-1000x3-10 (setting of h5_slack.py: MLP
row, SGD lr 0.01, anchor at step 200), with a cold anchor and one warm-started from an anchor
10 steps earlier (``certified_anchor(previous=...)``).

Run from the repo root:
OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/h5_ritz_krylov.py [--eigh]

``--eigh``: the previous method (a full eigendecomposition of every Gram side), for comparison.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "docs/design/issue10/prototypes")
from h5_slack import SHAPE, bare, timed
from training_overhead import mlp

import lipreg
from lipreg.functional import incremental_ritz
from lipreg.functional.incremental import certified_anchor


def main() -> None:
    torch.set_num_threads(1)
    if "--eigh" in sys.argv:
        incremental_ritz.DENSE_EIGH_SIDE = 10**9
    torch.manual_seed(0)
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        x = torch.randn(128, *SHAPE, generator=g)
        y = torch.randint(0, 10, (128,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(190):
        step()
    net.eval()
    earlier, _ = certified_anchor(net, SHAPE)
    net.train()
    for _ in range(10):
        step()
    net.eval()
    (_plain, first), t_plain = timed(lambda: certified_anchor(net, SHAPE, ritz=0))
    ritz, t_ritz = timed(lambda: certified_anchor(net, SHAPE)[0])
    warm, t_warm = timed(lambda: certified_anchor(net, SHAPE, previous=earlier)[0])
    print(f"anchor s: plain {t_plain:.2f} / Ritz cold {t_ritz:.2f} / Ritz warm {t_warm:.2f}")
    print(
        f"Ritz layers: {sum(c.ritz is not None for c in ritz.chains.values())} cold, "
        f"{sum(c.ritz is not None for c in warm.chains.values())} warm"
    )
    done = 0
    for k in (1, 10, 50):
        net.train()
        while done < k:
            step()
            done += 1
        net.eval()
        fresh = lipreg.autolip(net, SHAPE, certify=True, state=first.state)
        cold, t_cold = timed(lambda: bare(net, ritz))
        hot = bare(net, warm)
        print(
            f"k={k}: slack cold {cold.value / fresh.value - 1:.4%} ({t_cold:.2f} s), "
            f"warm {hot.value / fresh.value - 1:.4%}"
        )


if __name__ == "__main__":
    main()
