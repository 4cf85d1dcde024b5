"""Bounds on public benchmark networks and on the paper's architectures, next to published values.

For each network: AutoLip (certified upper bound), the AutoLip estimate (Lanczos layer norms,
no guarantee), exact SeqLip where the activation widths allow enumeration (certified), greedy
SeqLip (an estimate) and a certified lower bound (largest local Jacobian norm found by search).

Networks:
- LipSDP (arobey1/LipSDP): random 2-10-30-20-2 and MNIST 784-50-10, same weights as published.
- GLipSDP (ppauli/GLipSDP): FNN-2/FNN-3/CNN-2/CNN-3 on scikit-learn digits, means over 10
  seeds, logit 7 (zero-based; see lipreg.models.benchmark_nets), CNNs flattened in "whc" order
  (the order the published numbers assume). Lower bounds search from the standardised digits.
- The paper's MNIST CNNs (4/5 layers from the reference code; 7/10 layers our design) and
  torchvision's AlexNet at 224x224, with RANDOM weights (no trained weights exist offline):
  their values are not comparable with the paper's trained networks, listed for reference.

Run: OMP_NUM_THREADS=1 python benchmarks/bounds_table.py [--quick] [--skip-alexnet]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from typing import Any

import torch
from _common import print_table, setup_threads

import lipreg
from lipreg.models import (
    PUBLISHED,
    alexnet,
    default_benchmark_dir,
    load_glipsdp,
    load_lipsdp,
    mlp,
    mnist_cnn4,
    mnist_cnn5,
    mnist_cnn7,
    mnist_cnn10,
)

PAPER_CNN = {  # poster values (trained networks): AutoLip, greedy SeqLip, best lower bound
    "mnist_cnn4": (174, 86, 25.5),
    "mnist_cnn5": (790.1, 335, 22.2),
    "mnist_cnn7": (12141, 3629, 43.6),
    "mnist_cnn10": (4.5e6, 8.2e5, 107.8),
}
NAN = float("nan")


def estimate_all(
    model: torch.nn.Module,
    shape: tuple[int, ...],
    *,
    inputs: torch.Tensor | None = None,
    scale: float | None = None,
    top_k: int | None = None,
    lb_points: int = 256,
    lb_steps: int = 50,
    exact: bool = True,
) -> dict[str, Any]:
    start = time.perf_counter()
    al = lipreg.autolip(model, shape)
    out: dict[str, Any] = {
        "autolip": al.value,
        "autolip_est": al.estimate,
        "certified": al.certified,
    }
    if exact:
        try:
            ex = lipreg.seqlip(model, shape, method="exact")
            out["seqlip_exact"] = ex.value if ex.certified else NAN
        except ValueError:  # widths beyond exact_width_limit
            out["seqlip_exact"] = NAN
    else:
        out["seqlip_exact"] = NAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gr = lipreg.seqlip(model, shape, method="greedy", top_k=top_k, max_iter=30)
    out["seqlip_greedy"] = gr.value
    lb = lipreg.lower_bound(
        model, shape, inputs=inputs, n_random=lb_points, scale=scale, n_anneal_steps=lb_steps
    )
    out["lower"] = lb.value
    out["time"] = time.perf_counter() - start
    return out


def lipsdp_rows() -> list[list[Any]]:
    rows = []
    for name, shape, scale in (("random", (2,), 3.0), ("mnist", (784,), 1.0)):
        net = load_lipsdp(name).model
        r = estimate_all(net, shape, scale=scale, lb_points=2048, lb_steps=100)
        pub = PUBLISHED["lipsdp"][name]
        published = ", ".join(f"{k} {v:g}" for k, v in pub.items())
        rows.append(
            [
                f"LipSDP {name}",
                "published",
                r["autolip"],
                r["autolip_est"],
                r["seqlip_exact"],
                r["seqlip_greedy"],
                r["lower"],
                published,
                r["time"],
            ]
        )
    return rows


def digits_inputs(meta: dict[str, Any], shape: tuple[int, ...]) -> torch.Tensor | None:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        return None
    x = torch.as_tensor(load_digits().data, dtype=torch.float64)
    mean = torch.as_tensor(meta["input_mean"], dtype=torch.float64).reshape(-1)
    scale = torch.as_tensor(meta["input_scale"], dtype=torch.float64).reshape(-1)
    return ((x - mean) / scale).reshape(-1, *shape)


def glipsdp_rows(seeds: range) -> list[list[Any]]:
    rows = []
    for arch, shape in (("fnn2", (64,)), ("fnn3", (64,)), ("cnn2", (1, 8, 8)), ("cnn3", (1, 8, 8))):
        results = []
        for seed in seeds:
            loaded = load_glipsdp(arch, seed)
            inputs = digits_inputs(loaded.meta, shape)
            results.append(
                estimate_all(loaded.model, shape, inputs=inputs, lb_points=256, lb_steps=30)
            )

        def mean(key: str, results: list = results) -> float:
            vals = [r[key] for r in results]
            return NAN if any(math.isnan(v) for v in vals) else statistics.fmean(vals)

        pub = PUBLISHED["glipsdp"][arch]
        published = ", ".join(f"{k} {v:g}" for k, v in pub.items())
        rows.append(
            [
                f"GLipSDP {arch} (mean of {len(results)})",
                "published",
                mean("autolip"),
                mean("autolip_est"),
                mean("seqlip_exact"),
                mean("seqlip_greedy"),
                mean("lower"),
                published,
                sum(r["time"] for r in results),
            ]
        )
    return rows


def mlp_rows(quick: bool) -> list[list[Any]]:
    """The paper's MLP architecture (2-D input, 20 ReLU units per layer), random init: exact
    SeqLip is feasible at width 20 and shows how greedy and AutoLip compare to it."""
    rows = []
    for n_hidden in (3,) if quick else (3, 4):
        torch.manual_seed(0)
        net = mlp(2, (20,) * n_hidden, 1).double()
        r = estimate_all(net, (2,), scale=4.0, lb_points=4096, lb_steps=100)
        rows.append(
            [
                f"MLP 2-{'-'.join(['20'] * n_hidden)}-1 ({n_hidden + 1} linear layers)",
                "random init",
                r["autolip"],
                r["autolip_est"],
                r["seqlip_exact"],
                r["seqlip_greedy"],
                r["lower"],
                "paper (trained): see issue 4",
                r["time"],
            ]
        )
    return rows


def paper_rows(skip_alexnet: bool, quick: bool) -> list[list[Any]]:
    rows = []
    builders = [("mnist_cnn4", mnist_cnn4), ("mnist_cnn5", mnist_cnn5)]
    if not quick:
        builders += [("mnist_cnn7", mnist_cnn7), ("mnist_cnn10", mnist_cnn10)]
    for name, make in builders:
        torch.manual_seed(0)
        r = estimate_all(make(), (1, 28, 28), top_k=200, lb_points=128, lb_steps=20, exact=False)
        al, gsl, lb = PAPER_CNN[name]
        rows.append(
            [
                name,
                "random init",
                r["autolip"],
                r["autolip_est"],
                r["seqlip_exact"],
                r["seqlip_greedy"],
                r["lower"],
                f"paper (trained): AutoLip {al:g}, greedy SeqLip {gsl:g}, LB {lb:g}",
                r["time"],
            ]
        )
    if not skip_alexnet:
        torch.manual_seed(0)
        r = estimate_all(
            alexnet(),
            (3, 224, 224),
            top_k=50 if quick else 200,
            lb_points=16,
            lb_steps=0,
            exact=False,
        )
        rows.append(
            [
                "AlexNet 224x224",
                "random init",
                r["autolip"],
                r["autolip_est"],
                r["seqlip_exact"],
                r["seqlip_greedy"],
                r["lower"],
                "paper (pretrained): AutoLip 3.62e7, greedy SeqLip 5.45e6",
                r["time"],
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, fewer networks")
    parser.add_argument("--skip-alexnet", action="store_true")
    args = parser.parse_args()
    setup_threads()
    rows: list[list[Any]] = []
    if default_benchmark_dir().is_dir():
        rows += lipsdp_rows()
        rows += glipsdp_rows(range(3) if args.quick else range(10))
    else:
        print(
            f"benchmark networks not found in {default_benchmark_dir()}: skipping them "
            "(set LIPREG_BENCHMARK_NETS to their folder)."
        )
    rows += mlp_rows(args.quick)
    rows += paper_rows(args.skip_alexnet, args.quick)
    print_table(
        [
            "network",
            "weights",
            "AutoLip (certified)",
            "AutoLip est.",
            "SeqLip exact",
            "SeqLip greedy (est.)",
            "lower bound",
            "published",
            "time (s)",
        ],
        rows,
    )
    print(
        "\nAutoLip (certified) and SeqLip exact are guaranteed upper bounds; 'AutoLip est.' "
        "and greedy SeqLip are estimates; the lower bound is certified from below. "
        "'–' = not computed (exact SeqLip needs every activation width <= 20)."
    )


if __name__ == "__main__":
    main()
