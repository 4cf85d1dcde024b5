"""Estimate the Lipschitz constant of one of the paper's networks and print the breakdown.

    python experiments/estimate.py                       # the paper's 4-layer MNIST CNN
    python experiments/estimate.py --model alexnet       # torchvision AlexNet, 3x224x224
    python experiments/estimate.py --model mlp --seqlip exact

Weights are random (seeded): the point is to show what lipreg reports. Certified numbers are
labelled as such; estimates are labelled as estimates.
"""

from __future__ import annotations

import argparse
import warnings

import torch

import lipreg
from lipreg.models import PAPER_INPUT_SHAPES, PAPER_MODELS


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
    al = lipreg.autolip(model, shape)
    print(al.summary(), "\n")
    if args.seqlip != "none":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sl = lipreg.seqlip(model, shape, method=args.seqlip, top_k=args.top_k, max_iter=30)
        print(sl.summary(), "\n")
    lb = lipreg.lower_bound(model, shape, n_random=64, n_anneal_steps=20)
    print(lb.summary(), "\n")
    print(f"=> {lb.value:.4g} <= L(f) <= {al.value:.4g} (certified)")


if __name__ == "__main__":
    main()
