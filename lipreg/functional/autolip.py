"""AutoLip (Scaman & Virmaux 2018, Algorithm 1) on any ``torch.fx``-traceable network.

For every node ``θ_k = g_k(θ_{i_1}, …)`` of the computation graph,

.. math::

    \\hat L_k = \\sum_{i} \\operatorname{Lip}_i(g_k)\\, \\hat L_i , \\qquad \\hat L_0 = 1,

with ``Lip_i(g_k)`` the Lipschitz constant of ``g_k`` in its ``i``-th input (constants have
``L = 0``). Residual blocks give ``1 + L(f)``, branches give sums over paths, concatenations
``sqrt(Σ L_i²)`` (the pieces are orthogonal), a module called twice is counted twice and an
unused module is not counted.

Consecutive affine nodes with nothing else between them (conv → BN, linear → linear,
conv → flatten → linear) are merged into one linear map whose norm is computed as a whole:
tighter than the product of their norms, and still sound (:mod:`lipreg.functional.chains`,
which also defines the chains' names). The walk itself is
:func:`lipreg.functional.compose.propagate`, shared with the differentiable penalty.

**Guarantee.** With ``certify=True`` (default) every merged map's norm is replaced by a
certified upper bound, from the first entry of the certificate ladder
(:mod:`lipreg.functional.ladder`: closed form, dense weight, materialised chain, product of
per-op certificates — closed form, dense, FFT for convolutions, Schur test for non-negative
maps) that applies, and the result's ``kind`` is ``"upper"``: a guaranteed upper bound on the
Lipschitz constant of the network in evaluation mode. The Lanczos/power-iteration values, which
approach each norm from below, are reported as ``result.estimate``. With ``certify=False`` only
those are computed and the result is an *estimate* (``certified`` is ``False``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, fx, nn

from lipreg.functional.analysis import Analysis, analyse
from lipreg.functional.analysis_cache import AnalysisCache, check_cache_matches
from lipreg.functional.certify import (
    DEFAULT_MEMORY_LIMIT_BYTES,
    default_memory_limit,
    memory_budget,
)
from lipreg.functional.chains import AffineChain, find_affine_chains
from lipreg.functional.compose import output_value, propagate
from lipreg.functional.ladder import ChainBounder, LadderEntry
from lipreg.functional.power_iteration import check_iteration_options
from lipreg.functional.results import LayerBound, LipschitzResult
from lipreg.functional.specs import Affine, Elementwise, Nonlinear
from lipreg.functional.trace import trace

__all__ = ["AutoLip", "autolip", "check_finite_result"]


def autolip(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    certify: bool = True,
    tol: float = 1e-4,
    max_iter: int = 500,
    method: Literal["lanczos", "power"] = "lanczos",
    dtype: torch.dtype = torch.float32,
    state: dict[str, Tensor] | None = None,
    seed: int = 0,
    dense_limit: int = 2048,
    traced: fx.GraphModule | None = None,
    memory_limit_bytes: float | None = None,
    ladder: Sequence[LadderEntry] | None = None,
    analysis: AnalysisCache | None = None,
    estimate: bool = True,
) -> LipschitzResult:
    """AutoLip upper bound of ``model`` (in evaluation mode) for the l2 norm.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace (or an ``nn.Sequential``).
        input_shape: shape of ONE input, without the batch dimension, e.g. ``(1, 28, 28)``.
        certify: use certified upper bounds for every affine map (default). ``False`` is
            faster and returns an estimate (power iteration approaches norms from below).
        tol: relative tolerance of the Lanczos/power iterations.
        max_iter: iteration cap per affine map.
        method: ``"lanczos"`` (default) or ``"power"`` (the paper's Algorithm 2).
        dtype: dtype of the iterations (``torch.float64`` on request); certificates are
            always computed in float64.
        state: warm-start vectors from a previous result's ``.state``.
        seed: seed of the private generator of the cold starts (the global RNG is untouched).
        dense_limit: maps whose smaller side is at most this are materialised and certified
            exactly.
        traced: a graph from :func:`lipreg.functional.trace.trace` to skip re-tracing (the
            :class:`AutoLip` estimator does this).
        memory_limit_bytes: extra memory each certificate may allocate (default
            ``min(1 GiB, max(256 MiB, 4 × the bytes of the model's parameters and
            buffers))``). Maps whose exact certificate needs more get a looser certified bound
            (row blocks, Frobenius/Schur, im2col for convolutions), said in ``notes``, in the
            layer's ``method`` and by a warning; the result stays certified.
        ladder: the chain certificates to try, in order (default
            :data:`lipreg.functional.ladder.LADDER`); e.g. ``[my_entry, *LADDER]`` puts a
            caller's entry first. Each entry is responsible for its own soundness: a
            ``certified`` answer must be a guaranteed upper bound. The last entry must always
            answer (:func:`lipreg.functional.ladder.estimate`).
        analysis: an :class:`~lipreg.functional.analysis_cache.AnalysisCache` of this
            ``model`` and ``input_shape`` (what :class:`AutoLip` holds): its trace and probe
            are reused while the model's structure is unchanged, and every spec re-reads the
            current weights, so the result equals the one without it.
        estimate: with ``certify=True``, ``False`` asks for the certified value only: the
            chains' Lanczos estimates are skipped wherever their certificate does not need one
            (a convolution whose exact Gram test is over its cost budget gets the torus bound
            either way; a product of per-op certificates), and ``result.estimate`` is
            ``None``. The certified value is the same as with ``True``; e.g. 2-3× cheaper on
            small CNNs at 32 × 32 (``benchmarks/results/scaling.md``).

    Raises:
        ValueError: a non-finite (NaN/Inf) value anywhere in the result (message mentions
            "non-finite"): never reported as a bound; ``estimate=False`` with
            ``certify=False`` (the estimate is then all there is).

    Returns:
        :class:`~lipreg.functional.results.LipschitzResult` with ``method="autolip"``.

    Example:
        >>> import torch, lipreg
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> r = lipreg.autolip(net, (4,))
        >>> r.certified
        True
    """
    start = time.perf_counter()
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}.")
    check_iteration_options(tol, max_iter, method)
    if not estimate and not certify:
        raise ValueError(
            "estimate=False asks for the certified value alone, but certify=False computes "
            "estimates only: pass certify=True, or leave estimate=True."
        )
    with memory_budget(_memory_limit(model, memory_limit_bytes)) as budget:
        current, analysis64 = _analyses(model, input_shape, dtype, certify, traced, analysis)
        bounder = ChainBounder(
            current,
            model,
            certify=certify,
            tol=tol,
            max_iter=max_iter,
            method=method,
            state=dict(state or {}),
            generator=torch.Generator(device=current.device).manual_seed(seed),
            dense_limit=dense_limit,
            ladder=ladder,
            given_analysis64=analysis64,
            estimates=estimate,
        )
        result = _autolip(current, bounder)
    if budget.events:
        msg = "memory budget: " + " | ".join(budget.events)
        warnings.warn(msg, stacklevel=2)
        result.notes.append(msg)
    check_finite_result(result)
    result.time_s = time.perf_counter() - start
    return result


def _analyses(
    model: nn.Module,
    input_shape: Sequence[int],
    dtype: torch.dtype,
    certify: bool,
    traced: fx.GraphModule | None,
    cache: AnalysisCache | None,
) -> tuple[Analysis, Analysis | None]:
    """The analysis at ``dtype`` and, for certificates, at float64 (both from ``cache`` when
    given, else one trace and one probe; ``None``: the bounder derives it on demand)."""
    if cache is None:
        if traced is None:  # trace once: the float64 analysis of the certificates reuses it
            traced = trace(model)
        return analyse(model, input_shape, dtype=dtype, traced=traced), None
    check_cache_matches(cache, model, input_shape, traced)
    current = cache.get(dtype, verify=certify)
    return current, cache.also_at(torch.float64) if certify else None


def check_finite_result(result: LipschitzResult) -> None:
    """Raise ``ValueError`` ("non-finite") if the value, the estimate or any layer's number
    is NaN or infinite: such a number is never reported as a bound."""
    bad = [
        f"{lb.name} ({field}={number})"
        for lb in result.layers
        for field, number in (("value", lb.value), ("estimate", lb.estimate), ("upper", lb.upper))
        if number is not None and not math.isfinite(number)
    ]
    for field, number in (("value", result.value), ("estimate", result.estimate)):
        if number is not None and not math.isfinite(number):
            bad.append(f"total {field}={number}")
    if bad:
        raise ValueError(
            f"{result.method} produced non-finite (NaN/Inf) values: {bad}. The network "
            "computes with a non-finite number (a weight, buffer, plain tensor attribute or a "
            "registered rule's constant) or "
            "overflows; no Lipschitz bound is reported."
        )


def _memory_limit(model: nn.Module, memory_limit_bytes: float | None) -> float:
    """The budget of every certificate: the caller's, else :func:`default_memory_limit`."""
    if memory_limit_bytes is not None:
        return memory_limit_bytes
    if isinstance(model, nn.Module):
        return default_memory_limit(model)
    return DEFAULT_MEMORY_LIMIT_BYTES  # analyse() raises the TypeError


def _autolip(analysis: Analysis, bounder: ChainBounder) -> LipschitzResult:
    """Every chain's factor through the certificate ladder, then the AutoLip walk twice:
    with the chains' values (the result) and with their iterative estimates."""
    certify = bounder.certify
    chains = find_affine_chains(analysis)
    layers, by_chain = _factors(analysis, chains, bounder)
    value = propagate(analysis, chains, lambda c: by_chain[c.name].value, 1.0)
    estimate = propagate(analysis, chains, lambda c: _estimate_of(by_chain[c.name]), 1.0)
    notes: list[str] = []
    total, total_est = output_value(analysis, value), output_value(analysis, estimate)
    if total is None or total_est is None:
        total, total_est = 0.0, 0.0
        notes.append("the output does not depend on the input: the function is constant.")
    kind = "upper" if certify and all(lb.certified for lb in layers) else "estimate"
    notes += _certification_notes(certify, layers)
    if not bounder.estimates:  # some chains have none: no total estimate to report
        total_est = None
        notes.append("estimate=False: the certified value only (no estimate).")
    return LipschitzResult(
        value=total,
        kind=kind,
        method="autolip",
        layers=layers,
        nodes={analysis.label(n): v for n, v in value.items()},
        estimate=total_est,
        state=bounder.new_state,
        n_iter=sum(lb.n_iter for lb in layers),
        notes=notes,
    )


def _estimate_of(lb: LayerBound) -> float:
    return lb.estimate if lb.estimate is not None else lb.value


def _factors(
    analysis: Analysis, chains: dict[fx.Node, AffineChain], bounder: ChainBounder
) -> tuple[list[LayerBound], dict[str, LayerBound]]:
    """Every factor in graph order (chains through the certificate ladder, activations and
    nonlinear nodes by their rule's constant), and the chains' factors by chain name."""
    layers: list[LayerBound] = []
    by_chain: dict[str, LayerBound] = {}
    for node in analysis.order[1:]:
        spec = analysis.specs[node]
        if isinstance(spec, Affine) and node in chains:
            lb = bounder.bound(chains[node])
            by_chain[chains[node].name] = lb
        elif isinstance(spec, Elementwise | Nonlinear):
            kind = "activation" if isinstance(spec, Elementwise) else "nonlinear"
            lb = LayerBound.from_rule(analysis.label(node), kind, spec.lipschitz)
        else:
            continue
        layers.append(lb)
    return layers, by_chain


def _certification_notes(certify: bool, layers: list[LayerBound]) -> list[str]:
    """What the caller must know about the guarantee (and the warning when a certified run
    had to fall back to estimates)."""
    notes: list[str] = []
    missing = [lb.name for lb in layers if not lb.certified]
    if certify and missing:
        msg = (
            f"AutoLip could not certify {missing}; the result mixes certified bounds with "
            "power-iteration estimates and is reported as an estimate (certified=False)."
        )
        warnings.warn(msg, stacklevel=3)  # at the autolip() call
        notes.append(msg)
    if not certify:
        notes.append(
            "certify=False: layer norms are Lanczos/power-iteration values, which approach "
            "each norm from below; the product is an estimate, not a guaranteed bound."
        )
    return notes


class AutoLip:
    """A reusable AutoLip estimator that warm-starts itself across calls.

    It traces and probes the model once (an
    :class:`~lipreg.functional.analysis_cache.AnalysisCache`, ``self.analysis``: re-analysed
    only when the model's structure changed, e.g. a module or a parameter replaced, a dtype
    change, a hook added) and keeps the power-iteration vectors between calls, so that
    re-estimating after a few optimizer steps costs a few iterations per layer. Every call
    reads the current weights: the result equals a fresh :func:`autolip` with the same
    ``state``. This is what :class:`lipreg.LipschitzCallback` uses.

    Example:
        >>> import torch, lipreg
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> estimator = lipreg.AutoLip(net, (4,), certify=False)
        >>> first, second = estimator(), estimator()
        >>> second.n_iter <= first.n_iter
        True
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], **options) -> None:
        self.model = model
        self.options = options
        self.state: dict[str, Tensor] = dict(options.pop("state", None) or {})
        # the trace, probe and node contexts, reused by every call while the model's
        # structure is unchanged (lipreg.functional.analysis_cache says what is checked)
        self.analysis = AnalysisCache(model, input_shape)
        self.input_shape = self.analysis.input_shape

    @property
    def traced(self) -> fx.GraphModule:
        """The current graph of the model (re-traced when its structure changed)."""
        return self.analysis.traced

    def __call__(self, **overrides) -> LipschitzResult:
        """Estimate with the current weights; ``overrides`` replace constructor options
        (``state={}`` forces a cold start)."""
        state = overrides.pop("state", self.state)
        options = {**self.options, **overrides}
        result = autolip(
            self.model, self.input_shape, state=state, analysis=self.analysis, **options
        )
        self.state = result.state
        return result
