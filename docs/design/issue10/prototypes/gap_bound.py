"""Prototype (issue 10, item 2): a second-order incremental bound (Rayleigh-Ritz + gap), NOT certified here.

sigma(A_t)^2 = lambda_max(G_t), G_t = M_t^T M_t (M = A on its smaller Gram side). With V (n x k,
orthonormal: the anchor's top-k eigenvectors of G_s), in the basis [V, V_perp]:
  lambda_max(G_t) <= lambda_max([[a, g], [g, b]]),  a = lambda_max(V^T G_t V) (k x k),
  g = ||(I - V V^T) G_t V||_2, b = lambda_max(G_s restricted to V_perp) + ||G_t - G_s||_2,
  ||G_t - G_s|| <= 2 ||M_s|| ||D|| + ||D||^2,  ||D|| <= min(cheap, Gram-iteration) bound of the change.
(unit x = V y + z, z _|_ V: x^T G_t x <= a|y|^2 + 2 g |y||z| + b |z|^2.) Slack ~ g^2 / (a - b).
In the library: b certified once per anchor (Rump Cholesky test of beta I - G_s + tau V V^T), a and
g computed from 2k matvecs with A_t with rounding radii, V orthonormality error carried as eps.
Here lambda_{k+1}(G_s), a and g are plain float64 (only the slack is measured). Layers are
materialised (MLP and CNN-4 of benchmarks/training_overhead.py are small enough).
Run: OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/gap_bound.py
"""

# ruff: noqa: E501  (prototype: long formula lines; step() runs inside its loop)
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, "benchmarks")
sys.path.insert(0, "docs/design/issue10/prototypes")
from incremental_slack import conv_bounds, dense_bounds
from training_overhead import mlp

from lipreg.models import mnist_cnn4

SHAPES = {"CNN-4": [(1, 28, 28), (32, 12, 12), (64, 5, 5), (128, 2, 2)]}


def operator(m: nn.Module, in_shape) -> torch.Tensor:
    W = m.weight.detach().double()
    if isinstance(m, nn.Linear):
        return W
    n = math.prod(in_shape)
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    return F.conv2d(eye, W, stride=m.stride).reshape(n, -1).T


def side(A: torch.Tensor) -> torch.Tensor:
    return A if A.shape[1] <= A.shape[0] else A.T


def anchor(A: torch.Tensor, k: int):
    M = side(A)
    ev, U = torch.linalg.eigh(M.T @ M)
    k = min(k, len(ev) - 1)
    return U[:, -k:], float(ev[-k - 1]), float(ev[-1])


def gap_bound(A_t: torch.Tensor, anc, d: float) -> float:
    V, lam_rest, lam1 = anc
    M = side(A_t)
    GV = M.T @ (M @ V)
    a = float(torch.linalg.eigvalsh(V.T @ GV)[-1])
    g = float(torch.linalg.matrix_norm(GV - V @ (V.T @ GV), 2))
    b = lam_rest + 2 * math.sqrt(lam1) * d + d * d
    return math.sqrt(0.5 * (a + b + math.sqrt((a - b) ** 2 + 4 * g * g)))


def run(name: str, make, opt_name: str, warm: int, ks=(1, 10, 50, 100)) -> None:
    torch.manual_seed(0)
    net = make()
    lin = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    shapes = SHAPES.get(name, [None] * len(lin))
    opt = (
        torch.optim.SGD(net.parameters(), lr=0.01)
        if opt_name == "SGD"
        else torch.optim.Adam(net.parameters(), lr=1e-3)
    )
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        x = torch.randn(128, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(warm):
        step()
    Ws = [m.weight.detach().double().clone() for m in lin]
    A_s = [operator(m, s) for m, s in zip(lin, shapes, strict=True)]
    ancs = {k: [anchor(A, k) for A in A_s] for k in (1, 16)}
    sig_s = [math.sqrt(a[2]) for a in ancs[1]]
    done = 0
    for k in ks:
        while done < k:
            step()
            done += 1
        rows = {"top-1": [], "top-16": [], "first-order": []}
        for m, W0, s, sh, i in zip(lin, Ws, sig_s, shapes, range(len(lin)), strict=True):
            D = m.weight.detach().double() - W0
            db = conv_bounds(D, m.stride) if isinstance(m, nn.Conv2d) else dense_bounds(D)
            d = min(db["cheap"], db["gram2"])
            A_t = operator(m, sh)
            true = float(torch.linalg.matrix_norm(A_t, 2))
            rows["top-1"].append(gap_bound(A_t, ancs[1][i], d) / true)
            rows["top-16"].append(gap_bound(A_t, ancs[16][i], d) / true)
            rows["first-order"].append((s + d) / true)
        cells = [
            " ".join(f"{x:.4f}" for x in r) + f" (prod {math.prod(r):.4f})" for r in rows.values()
        ]
        print(f"| {name} | {opt_name} | {warm} | {k} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    if "--long" in sys.argv:  # how long the second-order bound lasts: SGD, anchor at step 200
        for name, make in (("MLP", mlp), ("CNN-4", mnist_cnn4)):
            run(name, make, "SGD", 200, ks=(200, 500, 1000))
            run(name, make, "Adam", 200, ks=(2, 5))
        return
    print(
        "| net | opt | anchor step | k | gap top-1 / true | gap top-16 / true |"
        " first-order min(cheap,gram2) / true |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, make in (("MLP", mlp), ("CNN-4", mnist_cnn4)):
        for opt_name in ("SGD", "Adam"):
            for warm in (0, 200):
                run(name, make, opt_name, warm)


if __name__ == "__main__":
    main()
