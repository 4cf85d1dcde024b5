# ruff: noqa: B023  (closures are called at once, inside the loop)
"""Issue 10 (H1b): CPU time of the block-banded Gram test against its predicted cost
(``GramPlan.cost``) and one forward+backward of the convolution, to calibrate the ladder's
cost budget (``ladder.GRAM_COST_RATIO``, ``GRAM_FREE_COST``). Run:
    OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/h1b_gram_cost.py"""

import os
import statistics
import time

import torch
import torch.nn.functional as F

from lipreg.functional.banded_gram import (
    certify_conv_norm,
    conv_linear_map,
    conv_pass_flops,
    gram_plan,
)
from lipreg.functional.power_iteration import operator_norm
from lipreg.functional.specs import ConvData

torch.set_num_threads(1)
CASES = [  # (c_in, c_out, spatial, k, stride, pad)
    ((3, 6), (9, 8), 3, 1, 1),
    ((6, 8), (5, 6, 5), 3, 2, 1),
    ((8, 8), (6, 6), 3, 1, 1),
    ((16, 16), (8, 8), 3, 1, 1),
    ((3, 16), (32, 32), 3, 1, 1),
    ((16, 16), (16, 16), 3, 1, 1),
    ((64, 64), (8, 8), 3, 1, 1),
    ((16, 16), (32, 32), 3, 1, 1),
    ((256, 256), (4, 4), 3, 1, 1),
]


def cpu(fn, reps=3):
    ts = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        ts.append(time.process_time() - t)
    return statistics.median(ts)


print("load", os.getloadavg())
print("| conv | plan.cost | cost/pass flops | Gram test s | fwd+bwd ms | test/fwd+bwd |")
print("|---|---|---|---|---|---|")
for (ci, co), sp, k, s, p in CASES:
    w = torch.randn(co, ci, *([k] * len(sp)), dtype=torch.float64) / (ci * k) ** 0.5
    conv = ConvData(w, (s,) * len(sp), (p,) * len(sp), (1,) * len(sp), 1, (ci, *sp))
    sigma = operator_norm(conv_linear_map(conv), tol=1e-10, max_iter=500).sigma
    plan = gram_plan(conv)
    t_gram = cpu(
        lambda: certify_conv_norm(conv, sigma, refine=False), reps=1 if plan.cost > 1e9 else 3
    )
    x = torch.randn(1, ci, *sp, requires_grad=True)
    w32 = w.float().requires_grad_(True)
    fn = (F.conv1d, F.conv2d, F.conv3d)[len(sp) - 1]

    def fb():
        for _ in range(20):
            fn(x, w32, None, s, p).sum().backward()

    t_fb = cpu(fb) / 20
    ratio = plan.cost / conv_pass_flops(conv)
    print(
        f"| {ci}->{co} {sp} k{k} s{s} | {plan.cost:.3g} | {ratio:.0f} | {t_gram:.4f} | "
        f"{t_fb * 1e3:.3f} | {t_gram / t_fb:.0f} |"
    )
print("load", os.getloadavg())
