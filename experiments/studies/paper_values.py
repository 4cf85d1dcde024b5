"""The numbers of Scaman & Virmaux (NeurIPS 2018), in ONE place (poster tables, paper.md §3.1-3.4).

Every study table and ``benchmarks/bounds_table.py`` read them from here. They are the
paper's values for the paper's own (trained or pretrained) networks: a comparison, never a
ground truth for lipreg.
"""

from __future__ import annotations

__all__ = ["PAPER_ALEXNET", "PAPER_CNN", "PAPER_MLP", "PAPER_RANDOM", "paper_cnn_best_lower"]

# §3.2, "AutoLip and SeqLip for MLPs of various size"; key: number of linear layers
PAPER_MLP: dict[int, dict[str, float]] = {
    4: {
        "frob": 648.2,
        "autolip": 33.04,
        "seqlip": 21.47,
        "greedy": 21.47,
        "lb_data": 4.36,
        "lb_annealing": 4.55,
        "lb_grid": 6.56,
    },
    5: {
        "frob": 4283.1,
        "autolip": 134.4,
        "seqlip": 72.87,
        "greedy": 72.87,
        "lb_data": 6.77,
        "lb_annealing": 5.8,
        "lb_grid": 7.1,
    },
    7: {
        "frob": 22341.0,
        "autolip": 294.6,
        "seqlip": 130.2,
        "greedy": 130.2,
        "lb_data": 5.4,
        "lb_annealing": 5.27,
        "lb_grid": 6.51,
    },
    10: {
        "frob": 7343800.0,
        "autolip": 19248.2,
        "seqlip": 2463.44,
        "greedy": 2463.36,
        "lb_data": 10.04,
        "lb_annealing": 5.77,
        "lb_grid": 17.1,
    },
}

# §3.3, "AutoLip and SeqLip for MNIST-CNNs of various size"; key: number of conv layers
PAPER_CNN: dict[int, dict[str, float]] = {
    4: {"autolip": 174.0, "greedy": 86.0, "ratio": 2.0, "lb_data": 12.64, "lb_annealing": 25.5},
    5: {"autolip": 790.1, "greedy": 335.0, "ratio": 2.4, "lb_data": 16.79, "lb_annealing": 22.2},
    7: {"autolip": 12141.0, "greedy": 3629.0, "ratio": 3.3, "lb_data": 31.22, "lb_annealing": 43.6},
    10: {"autolip": 4.5e6, "greedy": 8.2e5, "ratio": 5.4, "lb_data": 38.26, "lb_annealing": 107.8},
}

# §3.4, ImageNet-pretrained AlexNet (the "AutoLip" is the product of the 8 layer norms)
PAPER_ALEXNET: dict[str, float] = {"autolip": 3.62e7, "greedy": 5.45e6}

# §3.1: SeqLip/AutoLip read off the poster's plot (about ±15%), for 1..10 linear layers
PAPER_RANDOM: dict[float, list[float]] = {
    0.5: [1.0, 0.71, 0.51, 0.38, 0.30, 0.21, 0.15, 0.12, 0.087, 0.058],
    0.1: [1.0, 0.40, 0.21, 0.083, 0.038, 0.015, 0.0075, 0.0038, 0.0019, 8.5e-4],
    0.01: [1.0, 0.36, 0.16, 0.068, 0.030, 0.0062, 0.0027, 6.8e-4, 5.5e-4, 8.7e-5],
}


def paper_cnn_best_lower(n_layers: int) -> float:
    """The paper's best lower bound (data or annealing) for its ``n_layers``-layer CNN."""
    values = PAPER_CNN[n_layers]
    return max(values["lb_data"], values["lb_annealing"])
