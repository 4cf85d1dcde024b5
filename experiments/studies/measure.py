"""What the studies derive from :func:`experiments.bounds.network_bounds` (the one routine
that computes bounds): table columns labelled with their guarantee, final values for the
loggers, the image studies' lower-bound searches, and closed-form MLP bounds.

Guarantees: ``AutoLip (certified upper)`` is shown only when certified; exact SeqLip is a
certified upper bound; greedy SeqLip is an ESTIMATE (it may fall below the true constant); every
``LB`` column is a certified lower bound, and so is their maximum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import lipreg
from experiments.bounds import NetworkBounds
from experiments.reporting import ratio

__all__ = [
    "QUICK_IMAGE_SEARCH",
    "ImageLowerSearch",
    "bound_columns",
    "certified_value",
    "final_values",
    "frobenius_product",
    "linear_layers",
]


def certified_value(result: lipreg.LipschitzResult) -> float | None:
    """The value when certified, else ``None`` (a table then says '–', never an estimate)."""
    return float(result.value) if result.certified else None


def linear_layers(net: nn.Module) -> list[nn.Linear]:
    return [m for m in net.modules() if isinstance(m, nn.Linear)]


def frobenius_product(net: nn.Module) -> float:
    """``Π_k ‖W_k‖_F`` over the Linear layers (float64): a certified upper bound of an MLP
    with 1-Lipschitz activations, since ``‖W‖₂ ≤ ‖W‖_F``."""
    return math.prod(
        float(torch.linalg.matrix_norm(m.weight.detach().double(), "fro"))
        for m in linear_layers(net)
    )


@dataclass(frozen=True)
class ImageLowerSearch:
    """The two lower-bound searches of the image studies, from the first ``points`` test
    inputs: ``data`` (the Jacobian norms at those inputs, no search) and ``annealing`` (the
    same inputs plus ``random`` random points, then ``anneal_steps`` annealing steps)."""

    points: int
    random: int
    anneal_steps: int

    @classmethod
    def of(cls, quick: bool, points: int, random: int, anneal_steps: int) -> ImageLowerSearch:
        """The study's settings, or the tiny :data:`QUICK_IMAGE_SEARCH` in quick mode."""
        return QUICK_IMAGE_SEARCH if quick else cls(points, random, anneal_steps)

    def searches(self, inputs: torch.Tensor) -> dict[str, dict[str, Any]]:
        """The ``lower`` argument of :func:`network_bounds`."""
        return {
            "data": {"inputs": inputs, "n_random": 0, "n_anneal_steps": 0},
            "annealing": {
                "inputs": inputs,
                "n_random": self.random,
                "n_anneal_steps": self.anneal_steps,
            },
        }

    def notes(self, what: str) -> str:
        return (
            f"LB data: the first {self.points} test {what} (at most), no search. LB annealing: "
            f"the same + {self.random} random points, then {self.anneal_steps} annealing steps."
        )


QUICK_IMAGE_SEARCH = ImageLowerSearch(points=32, random=8, anneal_steps=2)


def bound_columns(
    b: NetworkBounds, extra_lower: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """The table columns of ``b``, labelled with their guarantee: AutoLip (certified and
    estimate), exact and greedy SeqLip, each lower bound (``LB <name>``, with
    ``extra_lower`` computed elsewhere), the best lower bound and the ratios (SeqLip = exact
    when computed, else greedy)."""
    lower = {name: r.value for name, r in b.lower.items()} | dict(extra_lower or {})
    best = max(lower.values(), default=None)
    return {
        "AutoLip (certified upper)": certified_value(b.autolip),
        "AutoLip estimate": b.autolip.estimate,
        "SeqLip exact (certified upper)": b.exact.value if b.exact is not None else None,
        "greedy SeqLip (estimate)": b.greedy.value if b.greedy is not None else None,
        **{f"LB {name} (certified lower)": value for name, value in lower.items()},
        "best LB (certified lower)": best,
        "AutoLip/SeqLip": ratio(b.autolip.value, b.seqlip),
        "SeqLip/best LB": ratio(b.seqlip, best),
    }


def final_values(
    b: NetworkBounds, extra_lower: Mapping[str, float] | None = None
) -> dict[str, float | None]:
    """The final values of a run for its loggers (``final/<key>``) and the study summary."""
    lower = {name: r.value for name, r in b.lower.items()} | dict(extra_lower or {})
    return {
        "autolip_certified": certified_value(b.autolip),
        "autolip_estimate": b.autolip.estimate,
        "seqlip_exact": b.exact.value if b.exact is not None else None,
        "seqlip_greedy": b.greedy.value if b.greedy is not None else None,
        **{f"lb_{name}": value for name, value in lower.items()},
    }
