"""Every bound of one network, with timings: the one place the studies (and
``benchmarks/bounds_table.py``) call the estimators.

:func:`experiments.bounds.final_bounds` gives the final bounds of a training run (exact OR
greedy SeqLip, one lower-bound search). The studies need more, in the same spirit: AutoLip,
exact AND greedy SeqLip side by side, several labelled lower-bound searches and the time of
each. :func:`network_bounds` computes them with the shared settings of
:mod:`experiments.bounds` (``SEQLIP_MAX_ITER``), so no call site hard-codes its own.

Guarantees: ``autolip.value`` is a certified upper bound when ``autolip.certified``; exact
SeqLip (when computed) is a certified upper bound; greedy SeqLip is an ESTIMATE (it may fall
below the true constant); every lower-bound search returns a certified lower bound (a float64
Jacobian norm actually evaluated), so their maximum :attr:`NetworkBounds.best_lower` is one too.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import lipreg
from experiments.bounds import SEQLIP_MAX_ITER
from experiments.reporting import ratio

__all__ = [
    "QUICK_IMAGE_SEARCH",
    "ImageLowerSearch",
    "NetworkBounds",
    "bound_columns",
    "certified_value",
    "final_values",
    "frobenius_product",
    "linear_layers",
    "network_bounds",
    "timed",
]


@dataclass
class NetworkBounds:
    """The bounds of one network (see the module docstring for what each guarantees)."""

    autolip: lipreg.LipschitzResult
    exact: lipreg.LipschitzResult | None
    greedy: lipreg.LipschitzResult | None
    lower: dict[str, lipreg.LipschitzResult] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)

    @property
    def seqlip(self) -> float | None:
        """Exact SeqLip when computed (certified), else greedy SeqLip (an estimate)."""
        best = self.exact if self.exact is not None else self.greedy
        return best.value if best is not None else None

    @property
    def best_lower(self) -> float | None:
        """The largest certified lower bound found (a max of lower bounds is one)."""
        return max((r.value for r in self.lower.values()), default=None)


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` with its warnings silenced (the tables say what each value is),
    and its wall time in seconds."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


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


def exact_seqlip(net: nn.Module, shape: tuple[int, ...]) -> lipreg.LipschitzResult | None:
    """Exact SeqLip when every activation width allows enumeration and the graph is a chain,
    else ``None`` (the table then says '–'); an uncertified result is dropped too."""
    try:
        result, _ = timed(lipreg.seqlip, net, shape, method="exact")
    except (ValueError, lipreg.NotSequentialError):
        return None
    return result if result.certified else None


def network_bounds(
    net: nn.Module,
    shape: tuple[int, ...],
    *,
    exact: bool = True,
    greedy: bool = True,
    top_k: int | None = None,
    seqlip_max_iter: int | None = SEQLIP_MAX_ITER,
    lower: Mapping[str, Mapping[str, Any]] | None = None,
) -> NetworkBounds:
    """AutoLip, exact SeqLip (if ``exact`` and feasible), greedy SeqLip (if ``greedy``) and
    one :func:`lipreg.lower_bound` search per entry of ``lower`` (name -> its keyword
    arguments, e.g. ``{"data": {"inputs": x, "n_random": 0, "n_anneal_steps": 0}}``).

    ``seqlip_max_iter=None`` keeps :func:`lipreg.seqlip`'s own default (what the MLP studies
    have always used); otherwise the shared ``SEQLIP_MAX_ITER``.
    """
    start = time.perf_counter()
    times: dict[str, float] = {}
    autolip, times["autolip"] = timed(lipreg.autolip, net, shape)
    sl = None
    if exact:
        t0 = time.perf_counter()
        sl = exact_seqlip(net, shape)
        times["exact"] = time.perf_counter() - t0
    gsl = None
    if greedy:
        options: dict[str, Any] = {"method": "greedy", "top_k": top_k}
        if seqlip_max_iter is not None:
            options["max_iter"] = seqlip_max_iter
        gsl, times["greedy"] = timed(lipreg.seqlip, net, shape, **options)
    found: dict[str, lipreg.LipschitzResult] = {}
    for name, kwargs in (lower or {}).items():
        found[name], times[f"lower_{name}"] = timed(lipreg.lower_bound, net, shape, **kwargs)
    times["total"] = time.perf_counter() - start
    return NetworkBounds(autolip=autolip, exact=sl, greedy=gsl, lower=found, times=times)


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
