"""Every final bound of a trained (or untrained) network, computed in one place.

Training runs (``bounds.md``), the paper's studies, ``experiments/estimate.py`` and
``benchmarks/bounds_table.py`` all call :func:`final_bounds`, so that the same options give
the same numbers everywhere:

* ``autolip``: the certified AutoLip upper bound (product of certified layer norms along the
  graph) and its per-layer factors;
* ``seqlip``: exact SeqLip (certified) when every activation is narrow enough to enumerate,
  else greedy SeqLip, which is an **estimate** (it may fall below the true constant);
* ``lower_bound``: a certified lower bound (a float64 difference quotient actually evaluated).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

import lipreg

METHODS = ("autolip", "seqlip", "lower_bound")
SEQLIP_MAX_ITER = 30  # greedy SeqLip: local-search rounds per pair (the studies' setting)
LOWER_BOUND_RANDOM = 128  # random starting points of the lower-bound search
LOWER_BOUND_ANNEAL = 30  # annealing steps of the lower-bound search


def final_bounds(
    net: torch.nn.Module,
    input_shape: Sequence[int],
    methods: Sequence[str] = METHODS,
    inputs: torch.Tensor | None = None,
    *,
    seqlip_top_k: int | None = None,
) -> dict[str, Any]:
    """Certified AutoLip, SeqLip (exact if widths allow, else greedy) and a lower bound.

    Returns a dict keyed by method; each entry has ``value`` (or ``skipped`` with the reason
    when a method does not apply, e.g. SeqLip on a branching graph) and says whether it is
    certified. ``inputs`` seed the lower-bound search with real data.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown final-bound methods {unknown}; choose from {list(METHODS)}.")
    shape = tuple(input_shape)
    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "autolip" in methods:
            r = lipreg.autolip(net, shape)
            out["autolip"] = {
                "value": r.value,
                "certified": r.certified,
                "estimate": r.estimate,
                "layers": {lb.name: lb.value for lb in r.layers},
            }
        if "seqlip" in methods:
            out["seqlip"] = _seqlip_entry(net, shape, seqlip_top_k)
        if "lower_bound" in methods:
            r = lipreg.lower_bound(
                net,
                shape,
                inputs=inputs,
                n_random=LOWER_BOUND_RANDOM,
                n_anneal_steps=LOWER_BOUND_ANNEAL,
            )
            out["lower_bound"] = {"value": r.value, "kind": r.kind}
    return out


def _seqlip_entry(net: torch.nn.Module, shape: tuple[int, ...], top_k: int | None) -> dict:
    try:
        try:
            r = lipreg.seqlip(net, shape, method="exact")
        except ValueError:  # widths beyond the enumeration limit: the greedy estimate
            r = lipreg.seqlip(net, shape, method="greedy", top_k=top_k, max_iter=SEQLIP_MAX_ITER)
    except lipreg.NotSequentialError as exc:
        return {"skipped": str(exc)}
    return {"value": r.value, "certified": r.certified, "method": r.method}
