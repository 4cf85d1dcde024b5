"""Speed of AutoLip and SeqLip, as multiples of one forward+backward pass on one sample.

Prints, for torchvision's AlexNet (random init, 3x224x224) and the paper's 4-layer MNIST CNN:
- one forward+backward pass of the network on one sample (the unit);
- AutoLip cold (Lanczos and the paper's power method, relative tolerance 1e-4, estimates);
- AutoLip warm-started after one optimizer step (SGD lr 1e-3 and Adam lr 1e-3), through the
  reusable ``lipreg.AutoLip`` estimator: time, iterations, and warm/cold iteration ratio;
- AutoLip certified (FFT/dense/Schur certificates, the sound number);
- greedy SeqLip with top-k singular triplets.

Targets (issue 2): cold ≤ 50x, warm ≤ 5x, warm iterations ≤ 1/10 of cold. Run:
    OMP_NUM_THREADS=1 python benchmarks/speed.py [--quick]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from _common import best_time, forward_backward_time, print_table, setup_threads

import lipreg
from lipreg.models import alexnet, mnist_cnn4


def one_step(model: torch.nn.Module, shape: tuple[int, ...], opt_name: str) -> None:
    """One optimizer step on a random batch (seeded), in place."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, *shape, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    opt = (
        torch.optim.SGD(model.parameters(), lr=1e-3)
        if opt_name == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    F.cross_entropy(model(x), y).backward()
    opt.step()
    model.zero_grad(set_to_none=True)


def bench(name: str, make, shape: tuple[int, ...], top_k: int, quick: bool) -> list[list]:
    torch.manual_seed(0)
    base = make()
    fb = forward_backward_time(base, shape)
    rows: list[list] = [[name, "forward+backward, 1 sample", fb, 1.0, "", "", ""]]
    for method in ("lanczos", "power"):
        model = copy.deepcopy(base)
        est = lipreg.AutoLip(model, shape, certify=False, tol=1e-4, method=method, max_iter=2000)
        t_cold, cold = best_time(lambda est=est: est(state={}), repeat=1 if quick else 2)
        est.state = cold.state
        rows.append(
            [name, f"AutoLip cold ({method})", t_cold, t_cold / fb, cold.n_iter, cold.value, ""]
        )
        for opt_name in ("sgd", "adam"):
            m2 = copy.deepcopy(model)
            est2 = lipreg.AutoLip(m2, shape, certify=False, tol=1e-4, method=method, max_iter=2000)
            est2.state = {k: v.clone() for k, v in cold.state.items()}
            one_step(m2, shape, opt_name)
            saved = est2.state
            t_warm, warm = best_time(
                lambda est2=est2, saved=saved: est2(state=dict(saved)), repeat=1 if quick else 3
            )
            rows.append(
                [
                    name,
                    f"AutoLip warm ({method}, 1 {opt_name} step)",
                    t_warm,
                    t_warm / fb,
                    warm.n_iter,
                    warm.value,
                    f"{warm.n_iter / cold.n_iter:.3f}",
                ]
            )
    t_cert, cert = best_time(lambda: lipreg.autolip(base, shape, certify=True), repeat=1)
    rows.append([name, "AutoLip certified", t_cert, t_cert / fb, cert.n_iter, cert.value, ""])
    t_sl, sl = best_time(
        lambda: lipreg.seqlip(base, shape, method="greedy", top_k=top_k, max_iter=30),
        repeat=1,
    )
    rows.append([name, f"SeqLip greedy (top-{top_k})", t_sl, t_sl / fb, sl.n_iter, sl.value, ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    setup_threads()
    rows = bench("MNIST CNN-4", mnist_cnn4, (1, 28, 28), top_k=200, quick=args.quick)
    rows += bench("AlexNet", alexnet, (3, 224, 224), top_k=50, quick=args.quick)
    print_table(
        ["network", "what", "time (s)", "x fwd+bwd", "iterations", "value", "warm/cold iters"],
        rows,
    )


if __name__ == "__main__":
    main()
