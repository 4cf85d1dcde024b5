"""Prototype (issue 10, item 2): slack of incremental certificates sigma(W_t) <= sigma_cert(W_s) + bound(W_t - W_s).

Float64. Anchors: ``lipreg.autolip`` (certified) at step s; after k SGD/Adam steps of the fits of
``benchmarks/training_overhead.py`` (synthetic MNIST batches, SGD lr 0.01; Adam lr 1e-3), compares
per affine layer and for the AutoLip product the incremental bound with a fresh certificate.
Bounds on ||Delta||_2 (all with an explicit float64 rounding margin, see incremental.md):
  dense: frob = ||D||_F, schur = sqrt(||D||_1 ||D||_inf), gram2 = Gram iteration, 2 squarings;
  conv (valid, stride s, kernel k): im2col = sqrt(prod ceil(k/s)) * min(||D_mat||_F, schur(D_mat)),
        young = sqrt(max_o sum|D[o]| * max_{c,phase} sum_{o, taps in phase}|D[o,c,t]|),
        gram2 on the im2col matrix times sqrt(prod ceil(k/s)).
Run: OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/incremental_slack.py
"""

# ruff: noqa: E501, RUF059  (prototype: long formula lines; step() runs inside its loop)
from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, "benchmarks")
from training_overhead import mlp

import lipreg
from lipreg.models import mnist_cnn4

U = 2.0**-53


def up(x: float, n: int) -> float:
    """x * (1 + (n + 4) u), rounded up: covers gamma_n of an n-term float64 sum and a sqrt."""
    return math.nextafter(x * (1.0 + (n + 4) * U), math.inf)


def frob(D: torch.Tensor) -> float:
    return up(math.sqrt(float((D * D).sum())), D.numel())


def schur(D: torch.Tensor) -> float:
    """Schur test on a matrix: ||D||_2^2 <= max row abs-sum * max col abs-sum."""
    r = float(D.abs().sum(1).max())
    c = float(D.abs().sum(0).max())
    return up(math.sqrt(r * c), max(D.shape))


def gram_iter(D: torch.Tensor, k: int = 2) -> float:
    """||D||_2 <= (||G_k||_F + err)^(1/2^k), G_{i+1} = G_i^T G_i in float64.

    Each float64 product satisfies |fl(A^T A) - A^T A| <= gamma_n |A|^T |A| entrywise, hence
    ||fl - exact||_2 <= gamma_n ||A||_F^2; unrolled backwards: U_i = sqrt(U_{i+1} + e_{i+1})."""
    G = D if D.shape[0] >= D.shape[1] else D.T
    errs, scales = [], []
    for _ in range(k):
        f = float(torch.linalg.matrix_norm(G))
        if f == 0.0:
            return 0.0
        e = math.frexp(f)[1]  # exact power-of-two scaling against overflow
        G = torch.ldexp(G, torch.tensor(-e, dtype=G.dtype))
        scales.append(e)
        n = G.shape[0]
        g = 1.01 * n * U / (1 - n * U)
        errs.append(g * float((G * G).sum()) * (1 + 2 * n * U))
        G = G.T @ G
    ub = up(float(torch.linalg.matrix_norm(G)), G.numel())
    for e, err in zip(reversed(scales), reversed(errs), strict=True):
        ub = up(math.sqrt(up(ub + err, 2)), 2)  # bound of ||G_i (scaled)||_2
        ub = math.ldexp(ub, e)
    return ub


def conv_bounds(D: torch.Tensor, stride: tuple[int, int]) -> dict[str, float]:
    co, ci, kh, kw = D.shape
    copies = math.ceil(kh / stride[0]) * math.ceil(kw / stride[1])
    Dm = D.reshape(co, -1)
    im2col = up(math.sqrt(copies), 1) * min(frob(Dm), schur(Dm))
    rows = float(D.abs().sum((1, 2, 3)).max())
    cols = 0.0
    A = D.abs()
    for p in range(stride[0]):
        for q in range(stride[1]):
            cols = max(cols, float(A[:, :, p :: stride[0], q :: stride[1]].sum((0, 2, 3)).max()))
    young = up(math.sqrt(rows * cols), D.numel())
    g2 = up(math.sqrt(copies), 1) * gram_iter(Dm, 2)
    return {"frob": up(math.sqrt(copies), 1) * frob(Dm), "cheap": min(im2col, young), "gram2": g2}


def dense_bounds(D: torch.Tensor) -> dict[str, float]:
    f = frob(D)
    return {"frob": f, "cheap": min(f, schur(D)), "gram2": gram_iter(D, 2)}


def weights(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def certificate(net: nn.Module) -> tuple[float, list[float], float]:
    t = time.perf_counter()
    r = lipreg.autolip(net, (1, 28, 28))
    assert r.certified
    aff = [lb.value for lb in r.layers if lb.kind == "affine"]
    assert len(aff) == len(weights(net)), [lb.name for lb in r.layers]
    return r.value, aff, time.perf_counter() - t


def run(name: str, make, opt_name: str, warm: int, ks=(1, 10, 50, 100)) -> list[str]:
    torch.manual_seed(0)
    net = make()
    opt = (
        torch.optim.SGD(net.parameters(), lr=0.01)
        if opt_name == "SGD"
        else torch.optim.Adam(net.parameters(), lr=1e-3)
    )
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        x = torch.randn(128, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (128,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(warm):
        step()
    _, anchor, t_cert = certificate(net)
    W_s = [m.weight.detach().to(torch.float64).clone() for m in weights(net)]
    done, lines = 0, []
    for k in ks:
        while done < k:
            step()
            done += 1
        t0 = time.perf_counter()
        deltas = []
        for m, w0 in zip(weights(net), W_s, strict=True):
            D = m.weight.detach().to(torch.float64) - w0  # exact: both float32
            deltas.append(conv_bounds(D, m.stride) if isinstance(m, nn.Conv2d) else dense_bounds(D))
        t_inc = time.perf_counter() - t0
        fresh_val, fresh, _ = certificate(net)
        for kind in ("frob", "cheap", "gram2"):
            per = [(a + d[kind]) / f for a, d, f in zip(anchor, deltas, fresh, strict=True)]
            prod = math.prod(a + d[kind] for a, d in zip(anchor, deltas, strict=True))
            lines.append(
                f"| {name} | {opt_name} | {warm} | {k} | {kind} | "
                + " ".join(f"{p:.4f}" for p in per)
                + f" | {prod / fresh_val:.4f} |"
            )
        lines.append(
            f"| {name} | {opt_name} | {warm} | {k} | (fresh/anchor) | "
            + " ".join(f"{f / a:.4f}" for a, f in zip(anchor, fresh, strict=True))
            + f" | cert {t_cert:.2f}s, all deltas {t_inc:.3f}s |"
        )
    return lines


def main() -> None:
    torch.set_num_threads(1)
    print("| net | opt | anchor step | k | bound | per-layer ratio incr/fresh | product ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, make in (("MLP", mlp), ("CNN-4", mnist_cnn4)):
        for opt_name in ("SGD", "Adam"):
            for warm in (0, 200):
                for line in run(name, make, opt_name, warm):
                    print(line, flush=True)


if __name__ == "__main__":
    main()
