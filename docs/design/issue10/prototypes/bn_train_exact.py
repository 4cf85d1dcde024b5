"""The terms of the incremental ratio bound on resnet18's conv→BN chains against exact float64
norms (incremental.md §9, the diagnosis table): same training as ``bn_train_slack.py`` (SGD lr
0.1, momentum 0.9, 5 warm-up steps, train mode), then after k = 1, 10, 50 steps, for every
chain whose input has at most 2048 entries (layer2–layer4 at 3×32×32): the exact norms of
``A_s``, ``A_t``, ``R A_s``, ``D_t A_ΔK`` and ``A_t − A_s`` (dense matrices from ``F.conv2d`` on
the identity, SVD), the old increment ``max|d_t|·β(ΔK)`` and the scale-weighted ``β(D_t ΔK)``
(all taps), and the exact triangle inequality ``(‖R A_s‖ + ‖D_t A_ΔK‖)/‖A_t‖``.

Run from the repo root:
OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/bn_train_exact.py
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
import torchvision
from bn_train_slack import SHAPE, train

from lipreg.functional.incremental_bounds import conv_increment_bound


def scales(bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()


def dense(w: torch.Tensor, conv: torch.nn.Conv2d, shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    out = F.conv2d(eye, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.reshape(n, -1).T


def norm(M: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(M, 2))


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    train(model, opt, gen, 5)
    shapes: dict[str, tuple[int, ...]] = {}
    mods = dict(model.named_modules())
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(i[0].shape[1:])))
        for n, m in mods.items()
        if isinstance(m, torch.nn.Conv2d)
    ]
    model(torch.zeros(1, *SHAPE))
    for h in hooks:
        h.remove()
    pairs = []
    for name, m in mods.items():
        bn = name.replace("conv", "bn") if "conv" in name else name[:-1] + "1"
        if isinstance(m, torch.nn.Conv2d) and bn in mods and math.prod(shapes[name]) <= 2048:
            pairs.append((name, bn))
    snap = {n: (mods[n].weight.detach().double().clone(), scales(mods[b])) for n, b in pairs}
    done = 0
    for k in (1, 10, 50):
        train(model, opt, gen, k - done)
        done = k
        print(f"k={k}")
        for name, bn in pairs:
            conv, (K_s, d_s) = mods[name], snap[name]
            K_t, d_t = conv.weight.detach().double(), scales(mods[bn])
            shape = shapes[name]
            A_s = dense(d_s[:, None, None, None] * K_s, conv, shape)
            A_t = dense(d_t[:, None, None, None] * K_t, conv, shape)
            s_s, s_t = norm(A_s), norm(A_t)
            ratio = (d_t / d_s).abs()
            dK = K_t - K_s
            inc = norm(dense(d_t[:, None, None, None] * dK, conv, shape))
            RA = norm(ratio.repeat_interleave(A_s.shape[0] // len(ratio))[:, None] * A_s)
            geo = (conv.stride, conv.dilation, conv.groups)
            old = float(d_t.abs().max()) * conv_increment_bound(dK, *geo)[0]
            weighted = conv_increment_bound(d_t[:, None, None, None] * dK, *geo)[0]
            print(
                f"  {name:22s} {shape} σ_s {s_s:7.3f} σ_t {s_t:7.3f} | ‖R A_s‖ {RA:7.3f} "
                f"‖D_t A_ΔK‖ {inc:7.3f} old {old:7.3f} weighted {weighted:7.3f} | "
                f"‖A_t − A_s‖ {norm(A_t - A_s):7.3f} triangle {(RA + inc) / s_t:6.3f}"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
