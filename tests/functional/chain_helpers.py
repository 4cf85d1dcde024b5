"""Independent ground truths for the dense-chain certificates (tests only)."""

from __future__ import annotations

import itertools

import torch


def linear_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The ``out × in`` weights of a model's ``nn.Linear`` layers, in order."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def max_over_patterns(ws: list[torch.Tensor], slopes: list[tuple[float, float]]) -> float:
    """max over vertex patterns ``D_k ∈ {a_k, b_k}^{n_k}`` of ``‖W_L D ⋯ D W_1‖`` (brute force).

    The LMI certificates bound ``‖W_L D ⋯ D W_1‖`` for every diagonal ``D`` in the slope box, and
    the maximum of this convex function of each ``D_k`` is at a vertex: the returned value is
    therefore a lower bound on any sound certificate, and ≥ the Lipschitz constant of every
    network with these weights and slope-restricted activations.
    """
    best = 0.0
    choices = [itertools.product(ab, repeat=W.shape[0]) for W, ab in zip(ws, slopes, strict=False)]
    for pattern in itertools.product(*choices):
        J = ws[0].double()
        for W, d in zip(ws[1:], pattern, strict=True):
            J = W.double() @ (torch.tensor(d, dtype=torch.float64)[:, None] * J)
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    return best
