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
from typing import Any

import torch
from _common import print_table, setup_threads

from experiments.bounds import network_bounds
from experiments.studies.paper_values import PAPER_ALEXNET, PAPER_CNN, paper_cnn_best_lower
from lipreg.models import (
    PAPER_INPUT_SHAPES,
    PAPER_MODELS,
    PUBLISHED,
    default_benchmark_dir,
    load_glipsdp,
    load_lipsdp,
)

CNN_LAYERS = {"mnist_cnn4": 4, "mnist_cnn5": 5, "mnist_cnn7": 7, "mnist_cnn10": 10}
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
    """Every bound of ``model`` through the studies' shared code (experiments.studies.measure):
    AutoLip, exact SeqLip when ``exact`` and feasible (else NaN), greedy SeqLip with the
    shared iteration budget, and one lower-bound search."""
    search = {"inputs": inputs, "n_random": lb_points, "scale": scale, "n_anneal_steps": lb_steps}
    b = network_bounds(model, shape, exact=exact, top_k=top_k, lower={"search": search})
    return {
        "autolip": b.autolip.value,
        "autolip_est": b.autolip.estimate,
        "certified": b.autolip.certified,
        "seqlip_exact": b.exact.value if b.exact is not None else NAN,
        "seqlip_greedy": b.greedy.value,
        "lower": b.lower["search"].value,
        "time": b.times["total"],
    }


def table_row(network: str, weights: str, r: dict[str, Any], published: str) -> list[Any]:
    """One printed row: the network, where its weights come from, its bounds, the reference."""
    keys = ("autolip", "autolip_est", "seqlip_exact", "seqlip_greedy", "lower")
    return [network, weights, *(r[k] for k in keys), published, r["time"]]


def published_text(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in values.items())


def lipsdp_rows() -> list[list[Any]]:
    rows = []
    for name, shape, scale in (("random", (2,), 3.0), ("mnist", (784,), 1.0)):
        net = load_lipsdp(name).model
        r = estimate_all(net, shape, scale=scale, lb_points=2048, lb_steps=100)
        published = published_text(PUBLISHED["lipsdp"][name])
        rows.append(table_row(f"LipSDP {name}", "published", r, published))
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
        mean = {
            k: NAN
            if any(math.isnan(r[k]) for r in results)
            else statistics.fmean(r[k] for r in results)
            for k in ("autolip", "autolip_est", "seqlip_exact", "seqlip_greedy", "lower")
        }
        mean["time"] = sum(r["time"] for r in results)
        published = published_text(PUBLISHED["glipsdp"][arch])
        name = f"GLipSDP {arch} (mean of {len(results)})"
        rows.append(table_row(name, "published", mean, published))
    return rows


def mlp_rows(quick: bool) -> list[list[Any]]:
    """The paper's MLP architecture (2-D input, 20 ReLU units per layer), random init: exact
    SeqLip is feasible at width 20 and shows how greedy and AutoLip compare to it."""
    rows = []
    for n_hidden in (3,) if quick else (3, 4):
        torch.manual_seed(0)
        net = PAPER_MODELS["mlp"](2, (20,) * n_hidden, 1).double()
        r = estimate_all(net, (2,), scale=4.0, lb_points=4096, lb_steps=100)
        name = f"MLP 2-{'-'.join(['20'] * n_hidden)}-1 ({n_hidden + 1} linear layers)"
        rows.append(table_row(name, "random init", r, "paper (trained): see issue 4"))
    return rows


def paper_rows(skip_alexnet: bool, quick: bool) -> list[list[Any]]:
    rows = []
    names = ["mnist_cnn4", "mnist_cnn5"] + ([] if quick else ["mnist_cnn7", "mnist_cnn10"])
    for name in names:
        torch.manual_seed(0)
        shape = PAPER_INPUT_SHAPES[name]
        r = estimate_all(
            PAPER_MODELS[name](), shape, top_k=200, lb_points=128, lb_steps=20, exact=False
        )
        n = CNN_LAYERS[name]
        paper = (
            f"paper (trained): AutoLip {PAPER_CNN[n]['autolip']:g}, greedy SeqLip "
            f"{PAPER_CNN[n]['greedy']:g}, LB {paper_cnn_best_lower(n):g}"
        )
        rows.append(table_row(name, "random init", r, paper))
    if not skip_alexnet:
        torch.manual_seed(0)
        r = estimate_all(
            PAPER_MODELS["alexnet"](),
            PAPER_INPUT_SHAPES["alexnet"],
            top_k=50 if quick else 200,
            lb_points=16,
            lb_steps=0,
            exact=False,
        )
        paper = (
            f"paper (pretrained): AutoLip {PAPER_ALEXNET['autolip']:g}, greedy SeqLip "
            f"{PAPER_ALEXNET['greedy']:g}"
        )
        rows.append(table_row("AlexNet 224x224", "random init", r, paper))
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
