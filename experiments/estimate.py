"""Estimate the Lipschitz constant of one of the paper's networks and print the breakdown.

    python experiments/estimate.py                       # the paper's 4-layer MNIST CNN
    python experiments/estimate.py --model alexnet       # torchvision AlexNet, 3x224x224
    python experiments/estimate.py --model mlp --seqlip exact

Weights are random (seeded): the point is to show what lipreg reports. Certified numbers are
labelled as such; estimates are labelled as estimates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python experiments/estimate.py` from anywhere
    sys.path.insert(0, str(ROOT))

from experiments.bounds import network_bounds  # noqa: E402
from lipreg.models import PAPER_INPUT_SHAPES, PAPER_MODELS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist_cnn4", choices=sorted(PAPER_MODELS))
    parser.add_argument("--seqlip", default="greedy", choices=["greedy", "exact", "none"])
    parser.add_argument("--top-k", type=int, default=None, help="SeqLip top-k (default: auto)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = PAPER_MODELS[args.model]()
    shape = PAPER_INPUT_SHAPES[args.model]
    print(
        f"{args.model}: input shape {shape}, {sum(p.numel() for p in model.parameters())} "
        "parameters (random init)\n"
    )
    # the shared bounds code of the studies (greedy SeqLip with the shared iteration budget)
    b = network_bounds(
        model,
        shape,
        exact=args.seqlip == "exact",
        greedy=args.seqlip == "greedy",
        top_k=args.top_k,
        lower={"search": {"n_random": 64, "n_anneal_steps": 20}},
    )
    print(b.autolip.summary(), "\n")
    if args.seqlip == "exact" and b.exact is None:
        print(
            "exact SeqLip: not computed (an activation is wider than the enumeration limit or "
            "the graph is not a chain); use --seqlip greedy for an estimate.\n"
        )
    sl = b.exact if args.seqlip == "exact" else b.greedy
    if sl is not None:
        print(sl.summary(), "\n")
    lb = b.lower["search"]
    print(lb.summary(), "\n")
    print(f"=> {lb.value:.4g} <= L(f) <= {b.autolip.value:.4g} (certified)")


if __name__ == "__main__":
    main()
