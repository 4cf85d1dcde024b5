# ruff: noqa: B023  (lambdas are called at once, inside the loop)
"""Cost of a certified ``lipreg.autolip`` vs one forward+backward pass of one sample, and where
the time goes (cProfile). Research script for issue 10 (not part of the library).

Run from /work/main:
    OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/profile_certify.py \
        [--nets smallcnn alexnet resnet18 mlp] [--reps 3] [--top 15]
CPU time (time.process_time), medians of ``--reps``; the load average is printed.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import os
import pstats
import statistics
import time

import torch
import torchvision
from torch import nn

import lipreg


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 32 * 32, 10),
    )


def mlp(depth: int = 10, width: int = 1024, d_in: int = 1024, d_out: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


NETS = {
    "smallcnn": (small_cnn, (3, 32, 32)),
    "alexnet": (lambda: torchvision.models.alexnet(weights=None), (3, 224, 224)),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (3, 64, 64)),
    "mlp": (mlp, (1024,)),
}


def cpu(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t = time.process_time()
        out = fn()
        times.append(time.process_time() - t)
    return statistics.median(times), out


def fb_time(model: nn.Module, shape) -> float:
    x = torch.randn(1, *shape)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    for _ in range(3):
        step()
    n = 20
    t, _ = cpu(lambda: [step() for _ in range(n)], 3)
    model.zero_grad(set_to_none=True)
    return t / n


def profile(fn, top: int) -> str:
    pr = cProfile.Profile(time.process_time)
    pr.enable()
    fn()
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("cumulative").print_stats(top)
    s.write("\n--- by tottime ---\n")
    st.sort_stats("tottime").print_stats(top)
    return s.getvalue()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nets", nargs="+", default=list(NETS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--no-profile", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    print("load before:", os.getloadavg())
    for name in a.nets:
        make, shape = NETS[name]
        torch.manual_seed(0)
        model = make().eval()
        fb = fb_time(model, shape)
        t_cold, cold = cpu(lambda: lipreg.autolip(model, shape, certify=False, state={}), a.reps)
        est = lipreg.AutoLip(copy.deepcopy(model), shape, certify=False)
        first = est()
        saved = first.state
        t_warm, _ = cpu(lambda: est(state=dict(saved)), a.reps)  # same weights: lower end
        t_cert, cert = cpu(lambda: lipreg.autolip(model, shape, certify=True), a.reps)
        print(f"\n=== {name} {shape}: fwd+bwd {fb * 1e3:.2f} ms")
        print(f"estimate cold {t_cold:.3f}s = {t_cold / fb:.1f}x  (value {cold.value:.6g})")
        print(f"estimate warm (same weights) {t_warm:.3f}s = {t_warm / fb:.1f}x")
        print(f"certified {t_cert:.3f}s = {t_cert / fb:.1f}x  (value {cert.value:.6g})")
        for lb in cert.layers:
            if lb.kind == "affine":
                print(
                    f"   {lb.name:40s} {lb.method:45s} {lb.value:.6g} n_iter={lb.n_iter} "
                    f"{ {k: v for k, v in lb.extra.items() if k != 'residual'} }"
                )
        print("load:", os.getloadavg())
        if not a.no_profile:
            print(profile(lambda: lipreg.autolip(model, shape, certify=True), a.top))


if __name__ == "__main__":
    main()
