"""Speed of AutoLip and SeqLip, as multiples of one forward+backward pass on one sample.

Prints, for torchvision's AlexNet (random init, 3x224x224) and the paper's 4-layer MNIST CNN:
- one forward+backward pass of the network on one sample (the unit);
- AutoLip cold (Lanczos and the paper's power method, relative tolerance 1e-4, estimates);
- AutoLip warm-started after one optimizer step (SGD lr 1e-3 and Adam lr 1e-3), through the
  reusable ``lipreg.AutoLip`` estimator: time, iterations, and warm/cold iteration ratio;
- AutoLip certified (FFT/dense/Schur certificates, the sound number);
- greedy SeqLip with top-k singular triplets.

Times are medians: the forward+backward unit and the AutoLip cold/warm runs are timed with
``torch.utils.benchmark`` in interleaved rounds (see ``_common.interleaved_medians``), so the
ratios compare runs made under the same load; the certified and SeqLip rows are one long run
each. The machine load is printed under the table. ``--device cuda`` puts the networks and
their inputs on the GPU; every timer synchronises it (``torch.utils.benchmark`` does so itself),
so the ratios mean the same there.

Targets (issue 2): cold ≤ 50x, warm ≤ 5x, warm iterations ≤ 1/10 of cold. Run:
    OMP_NUM_THREADS=1 python benchmarks/speed.py [--quick] [--networks mnist alexnet]
        [--device cuda]
(``--quick``: one short round, to check that the script runs; not for published figures.)
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from _common import (
    add_device_argument,
    forward_backward_step,
    interleaved_medians,
    machine_load,
    print_footer,
    print_table,
    resolve_device,
    setup_threads,
    single_run,
)

import lipreg
from experiments.bounds import SEQLIP_MAX_ITER
from lipreg.models import alexnet, mnist_cnn4


def one_step(
    model: torch.nn.Module, shape: tuple[int, ...], opt_name: str, device: torch.device
) -> None:
    """One optimizer step on a random batch (seeded on the CPU, so that every device sees the
    same batch), in place."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (8,), generator=gen).to(device)
    opt = (
        torch.optim.SGD(model.parameters(), lr=1e-3)
        if opt_name == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    F.cross_entropy(model(x), y).backward()
    opt.step()
    model.zero_grad(set_to_none=True)


def bench(
    name: str, make, shape: tuple[int, ...], top_k: int, quick: bool, device: torch.device
) -> list[list]:
    torch.manual_seed(0)
    base = make().to(device)
    statements = {"fb": forward_backward_step(base, shape, device)}
    colds = {}
    for method in ("lanczos", "power"):
        model = copy.deepcopy(base)
        est = lipreg.AutoLip(model, shape, certify=False, tol=1e-4, method=method, max_iter=2000)
        # The cold result whose state the warm starts begin from (its time is measured below,
        # interleaved with the others; every timed cold call starts from state={} again).
        colds[method] = cold = est(state={})
        est.state = cold.state
        statements[f"cold {method}"] = lambda est=est: est(state={})
        for opt_name in ("sgd", "adam"):
            m2 = copy.deepcopy(model)
            est2 = lipreg.AutoLip(m2, shape, certify=False, tol=1e-4, method=method, max_iter=2000)
            est2.state = {k: v.clone() for k, v in cold.state.items()}
            one_step(m2, shape, opt_name, device)
            saved = est2.state
            statements[f"warm {method} {opt_name}"] = lambda est2=est2, saved=saved: est2(
                state=dict(saved)
            )
    timed = interleaved_medians(
        statements, rounds=1 if quick else 3, min_run_time=0.2 if quick else 1.0
    )
    base.zero_grad(set_to_none=True)
    fb = timed["fb"].median
    rows: list[list] = [[name, "forward+backward, 1 sample", fb, 1.0, "", "", ""]]
    for method in ("lanczos", "power"):
        cold = colds[method]
        t_cold = timed[f"cold {method}"].median
        rows.append(
            [name, f"AutoLip cold ({method})", t_cold, t_cold / fb, cold.n_iter, cold.value, ""]
        )
        for opt_name in ("sgd", "adam"):
            t_warm = timed[f"warm {method} {opt_name}"].median
            warm = timed[f"warm {method} {opt_name}"].output
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
    # Single long runs (seconds to minutes): see _common.single_run for why not a Timer.
    t_cert, cert = single_run(lambda: lipreg.autolip(base, shape, certify=True), device)
    rows.append([name, "AutoLip certified", t_cert, t_cert / fb, cert.n_iter, cert.value, ""])
    t_sl, sl = single_run(
        lambda: lipreg.seqlip(base, shape, method="greedy", top_k=top_k, max_iter=SEQLIP_MAX_ITER),
        device,
    )
    rows.append([name, f"SeqLip greedy (top-{top_k})", t_sl, t_sl / fb, sl.n_iter, sl.value, ""])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one round of short timings: checks that the script runs; NOT for published figures",
    )
    parser.add_argument(
        "--networks",
        nargs="+",
        choices=("mnist", "alexnet"),
        default=["mnist", "alexnet"],
        help="networks to time (default: both)",
    )
    add_device_argument(parser)
    args = parser.parse_args()
    setup_threads()
    device = resolve_device(args.device)
    load_before = machine_load()
    rows = []
    if "mnist" in args.networks:
        rows += bench(
            "MNIST CNN-4", mnist_cnn4, (1, 28, 28), top_k=200, quick=args.quick, device=device
        )
    if "alexnet" in args.networks:
        rows += bench("AlexNet", alexnet, (3, 224, 224), top_k=50, quick=args.quick, device=device)
    print_table(
        ["network", "what", "time (s)", "x fwd+bwd", "iterations", "value", "warm/cold iters"],
        rows,
    )
    print_footer(load_before, "one short round of timings" if args.quick else None, device)


if __name__ == "__main__":
    main()
