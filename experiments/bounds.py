"""Every bound of a network, computed in one place.

:func:`network_bounds` is the one routine that calls the estimators: AutoLip, exact and/or
greedy SeqLip and any number of named lower-bound searches, each timed. The paper's studies,
``experiments/estimate.py`` and ``benchmarks/bounds_table.py`` call it directly;
:func:`final_bounds` is the view a training run writes to ``bounds.json``/``bounds.md`` and
logs (exact SeqLip when feasible, else greedy; one lower-bound search seeded with data).

Guarantees:

* ``autolip``: a certified upper bound when ``result.certified`` (product of certified layer
  norms along the graph), with its per-layer factors;
* exact SeqLip: a certified upper bound (activation patterns enumerated, full SVDs);
* greedy SeqLip: an **estimate** (a local search; it may fall below the true constant);
* every lower-bound search: a certified lower bound (a float64 difference quotient actually
  evaluated), so the largest of them is one too.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

import lipreg

__all__ = [
    "LOWER_BOUND_ANNEAL",
    "LOWER_BOUND_RANDOM",
    "METHODS",
    "SEQLIP_MAX_ITER",
    "NetworkBounds",
    "exact_seqlip",
    "final_bounds",
    "network_bounds",
    "timed",
]

METHODS = ("autolip", "seqlip", "lower_bound")
SEQLIP_MAX_ITER = 30  # greedy SeqLip: local-search rounds per pair (the studies' setting)
LOWER_BOUND_RANDOM = 128  # random starting points of a training run's lower-bound search
LOWER_BOUND_ANNEAL = 30  # annealing steps of a training run's lower-bound search


@dataclass
class NetworkBounds:
    """The bounds of one network (see the module docstring for what each guarantees).

    ``skipped`` maps a method that does not apply to the reason (e.g. SeqLip on a branching
    graph); ``times`` holds the wall time of each computation in seconds."""

    autolip: lipreg.LipschitzResult | None
    exact: lipreg.LipschitzResult | None = None
    greedy: lipreg.LipschitzResult | None = None
    lower: dict[str, lipreg.LipschitzResult] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def seqlip_result(self) -> lipreg.LipschitzResult | None:
        """Exact SeqLip when computed (certified), else greedy SeqLip (an estimate)."""
        return self.exact if self.exact is not None else self.greedy

    @property
    def seqlip(self) -> float | None:
        best = self.seqlip_result
        return best.value if best is not None else None

    @property
    def best_lower(self) -> float | None:
        """The largest certified lower bound found (a max of lower bounds is one)."""
        return max((r.value for r in self.lower.values()), default=None)


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` with its warnings silenced (the reports say what each value
    is), and its wall time in seconds."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def exact_seqlip(net: nn.Module, shape: tuple[int, ...]) -> lipreg.LipschitzResult | None:
    """Exact SeqLip when every activation width allows enumeration and the graph is a chain,
    else ``None`` (a table then says '–'); an uncertified result is dropped too."""
    try:
        result, _ = timed(lipreg.seqlip, net, shape, method="exact")
    except (ValueError, lipreg.NotSequentialError):
        return None
    return result if result.certified else None


def network_bounds(
    net: nn.Module,
    shape: Sequence[int],
    *,
    autolip: bool = True,
    exact: bool = True,
    greedy: bool | Literal["fallback"] = True,
    top_k: int | None = None,
    seqlip_max_iter: int | None = SEQLIP_MAX_ITER,
    lower: Mapping[str, Mapping[str, Any]] | None = None,
) -> NetworkBounds:
    """AutoLip (if ``autolip``), exact SeqLip (if ``exact`` and feasible), greedy SeqLip (if
    ``greedy``; ``"fallback"``: only when exact SeqLip was not obtained) and one
    :func:`lipreg.lower_bound` search per entry of ``lower`` (name -> its keyword arguments,
    e.g. ``{"data": {"inputs": x, "n_random": 0, "n_anneal_steps": 0}}``).

    ``seqlip_max_iter=None`` keeps :func:`lipreg.seqlip`'s own default (what the MLP studies
    have always used); otherwise the shared :data:`SEQLIP_MAX_ITER`. A network SeqLip does not
    apply to (not a chain) gets ``skipped["seqlip"]`` with the reason instead of greedy SeqLip.
    """
    start = time.perf_counter()
    shape = tuple(shape)
    b = NetworkBounds(autolip=None)
    if autolip:
        b.autolip, b.times["autolip"] = timed(lipreg.autolip, net, shape)
    if exact:
        b.exact, b.times["exact"] = timed(exact_seqlip, net, shape)
    if greedy is True or (greedy == "fallback" and b.exact is None):
        options: dict[str, Any] = {"method": "greedy", "top_k": top_k}
        if seqlip_max_iter is not None:
            options["max_iter"] = seqlip_max_iter
        try:
            b.greedy, b.times["greedy"] = timed(lipreg.seqlip, net, shape, **options)
        except lipreg.NotSequentialError as exc:
            b.skipped["seqlip"] = str(exc)
    for name, kwargs in (lower or {}).items():
        b.lower[name], b.times[f"lower_{name}"] = timed(lipreg.lower_bound, net, shape, **kwargs)
    b.times["total"] = time.perf_counter() - start
    return b


def final_bounds(
    net: torch.nn.Module,
    input_shape: Sequence[int],
    methods: Sequence[str] = METHODS,
    inputs: torch.Tensor | None = None,
    *,
    seqlip_top_k: int | None = None,
) -> dict[str, Any]:
    """A training run's final bounds: certified AutoLip, SeqLip (exact if widths allow, else
    greedy) and a lower bound seeded with ``inputs``, as a dict keyed by method.

    Each entry has ``value`` (or ``skipped`` with the reason when a method does not apply)
    and says whether it is certified.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown final-bound methods {unknown}; choose from {list(METHODS)}.")
    search = {
        "inputs": inputs,
        "n_random": LOWER_BOUND_RANDOM,
        "n_anneal_steps": LOWER_BOUND_ANNEAL,
    }
    b = network_bounds(
        net,
        input_shape,
        autolip="autolip" in methods,
        exact="seqlip" in methods,
        greedy="fallback" if "seqlip" in methods else False,
        top_k=seqlip_top_k,
        lower={"search": search} if "lower_bound" in methods else None,
    )
    out: dict[str, Any] = {}
    if b.autolip is not None:
        out["autolip"] = {
            "value": b.autolip.value,
            "certified": b.autolip.certified,
            "estimate": b.autolip.estimate,
            "layers": {lb.name: lb.value for lb in b.autolip.layers},
        }
    if "seqlip" in methods:
        sl = b.seqlip_result
        out["seqlip"] = (
            {"value": sl.value, "certified": sl.certified, "method": sl.method}
            if sl is not None
            else {"skipped": b.skipped.get("seqlip", "no SeqLip result")}
        )
    if "search" in b.lower:
        out["lower_bound"] = {"value": b.lower["search"].value, "kind": b.lower["search"].kind}
    return out
