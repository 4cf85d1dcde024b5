"""``certified_bound``: the tightest certified upper bound lipreg can produce within a budget.

Every candidate below is a certified upper bound on the Lipschitz constant of the whole
network (l2 → l2, evaluation mode), so their minimum is one too:

* **AutoLip** (:func:`lipreg.autolip`, ``certify=True``): any graph; each affine chain's
  norm certified by the certificate ladder (:mod:`lipreg.functional.ladder`).
* **Sequential blocks** (networks whose graph is one path; :func:`segment_chains` splits it
  into runs of affine chains separated by element-wise activations with slopes in
  ``[a_i, b_i]``, and breaker factors such as max-pooling). For a run
  ``W_m φ_{m−1} ⋯ φ_1 W_1`` any split into consecutive blocks gives

  .. math:: L \\le \\prod_{\\text{blocks } B} L(B) \\prod_{\\text{cuts}} \\max(|a_i|, |b_i|),

  where a block is certified by

  - ``"lipsdp"`` — the dense LipSDP-Neuron-type certificate of a run of materialisable chains
    (:func:`lipreg.functional.lipsdp.lipsdp_neuron`, never looser than ECLipsE-Fast);
  - ``"conv-pair"`` — two zero-padded convolutions around one activation, by Fourier blocks
    (:func:`lipreg.functional.conv_pairs.chain_pair_certificate`);
  - a single chain by its AutoLip factor.

  The best split is found by dynamic programming over the run (exact for the candidate
  blocks computed). Breaker factors multiply in with their rule's constant.

Each certificate is a float64 check with an explicit rounding margin (whatever optimiser
found its multipliers), so the result is ``certified=True``. The result is labelled with the
certificate that won (``method``), and the runners-up are listed in ``notes`` (shown by
``summary()``). Multipliers are returned in ``state`` for warm starts (pass ``state=`` back).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from lipreg.functional.analysis import Analysis, analyse
from lipreg.functional.analysis_cache import AnalysisCache, check_cache_matches
from lipreg.functional.autolip import autolip
from lipreg.functional.certify import current_budget, default_memory_limit, memory_budget
from lipreg.functional.chains import (
    AffineChain,
    NotSequentialError,
    SeqChain,
    chain_linear_map,
    segment_chains,
)
from lipreg.functional.ladder import TIGHTEST_LADDER
from lipreg.functional.results import LayerBound, LipschitzResult
from lipreg.functional.rounding import materialisation_error, perturbed_bound
from lipreg.functional.trace import trace

__all__ = ["BLOCK_CERTIFICATES", "best_split", "certified_bound", "tighten"]


@dataclass
class _Run:
    """What the block certificates see: the float64 analysis, the budget and the state."""

    analysis64: Analysis
    max_lmi_size: int
    max_steps: int | None
    state: dict[str, Tensor]
    new_state: dict[str, Tensor] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)  # certified chain norms (AutoLip)
    dense_cache: dict[str, tuple[Tensor, float] | None] = field(default_factory=dict)

    def fits(self, chain: AffineChain) -> bool:
        """The chain's float64 matrix fits the memory budget (twice, while assembled)."""
        op = chain_linear_map(self.analysis64, chain)
        return 16 * op.in_features * op.out_features <= current_budget().limit_bytes

    def dense(self, chain: AffineChain) -> tuple[Tensor, float] | None:
        """The chain's float64 matrix (``out × in``) and a bound on its rounding error
        (:func:`~lipreg.functional.rounding.materialisation_error`; 0 for a lone weight, which
        is the model's own), or ``None`` if it does not fit or its rounding is not bounded."""
        if chain.name not in self.dense_cache:
            spec = self.analysis64.specs[chain.nodes[0]]
            answer: tuple[Tensor, float] | None = None
            if len(chain.nodes) == 1 and getattr(spec, "weight", None) is not None:
                answer = spec.weight.detach().to(torch.float64), 0.0
            elif self.fits(chain):
                error = materialisation_error(self.analysis64, chain)
                if error is not None:
                    answer = chain_linear_map(self.analysis64, chain).to_dense(), error
            self.dense_cache[chain.name] = answer
        return self.dense_cache[chain.name]

    def warm(self, key: str, count: int) -> list[Tensor] | None:
        parts = [self.state.get(f"{key}#{k}") for k in range(count)]
        return None if any(p is None for p in parts) else parts  # type: ignore[return-value]

    def keep(self, key: str, multipliers: Sequence[Tensor]) -> None:
        for k, t in enumerate(multipliers):
            self.new_state[f"{key}#{k}"] = t.detach()


BlockCertificate = Callable[[_Run, SeqChain, int, int], LayerBound | None]


def lipsdp_block(run: _Run, seg: SeqChain, start: int, stop: int) -> LayerBound | None:
    """Chains ``start..stop`` (≥ 2) materialised in float64 with at most ``max_lmi_size``
    neurons in total: the certified LipSDP-Neuron bound. ``None`` when they do not fit."""
    from lipreg.functional.lipsdp import lipsdp_neuron

    chains = seg.maps[start : stop + 1]
    dense = [run.dense(c) for c in chains]
    if any(d is None for d in dense):
        return None
    weights = [d[0] for d in dense]  # type: ignore[index]
    errors = [d[1] for d in dense]  # type: ignore[index]
    if sum(w.shape[1] for w in weights) + weights[-1].shape[0] > run.max_lmi_size:
        return None
    slopes = [(a, b) for a, b, _ in seg.boxes[start:stop]]
    name = " -> ".join(c.name for c in chains)
    key = f"lipsdp:{name}"
    options = {} if run.max_steps is None else {"max_steps": run.max_steps}
    cert = lipsdp_neuron(weights, slopes, warm=run.warm(key, len(slopes)), **options)
    run.keep(key, cert.multipliers)
    # widen to the exact matrices: ‖Â_j‖ ≤ ‖A_j‖ + e_j with ‖A_j‖ AutoLip's certified norm
    norms = [run.norms[c.name] + e for c, e in zip(chains, errors, strict=True)]
    lips = math.prod(max(abs(a), abs(b)) for a, b in slopes)
    value = perturbed_bound(cert.value, norms, errors, lips)
    return _block(name, "lipsdp-block", value, cert.estimate, cert.method, cert.seconds)


def conv_pair_block(run: _Run, seg: SeqChain, start: int, stop: int) -> LayerBound | None:
    """Two convolution chains around one activation: the Fourier-block pair certificate."""
    if stop != start + 1:
        return None
    from lipreg.functional.conv_pairs import chain_pair_certificate

    first, second = seg.maps[start], seg.maps[stop]
    a, b, _ = seg.boxes[start]
    name = f"{first.name} -> {second.name}"
    key = f"conv-pair:{name}"
    warm = run.warm(key, 1)
    options = {} if run.max_steps is None else {"max_steps": run.max_steps}
    cert = chain_pair_certificate(
        run.analysis64, first, (a, b), second, warm=warm[0] if warm else None, **options
    )
    if cert is None:
        return None
    run.keep(key, [cert.multipliers])
    return _block(name, "conv-pair", cert.value, cert.estimate, cert.method, cert.seconds)


def _block(
    name: str, kind: str, value: float, estimate: float, method: str, seconds: float
) -> LayerBound:
    return LayerBound(
        name=name,
        kind=kind,
        value=value,
        certified=True,
        estimate=estimate,
        upper=value,
        method=method,
        extra={"seconds": seconds},
    )


BLOCK_CERTIFICATES: dict[str, BlockCertificate] = {
    "lipsdp": lipsdp_block,
    "conv-pair": conv_pair_block,
}
"""Certificates of a block of consecutive chains, by name (the ``methods=`` option)."""


def best_split(
    singles: Sequence[LayerBound],
    cuts: Sequence[LayerBound],
    blocks: dict[tuple[int, int], LayerBound],
) -> tuple[float, list[LayerBound]]:
    """The smallest ``Π L(block) · Π L(cut)`` over splits of chains ``0..m−1`` into
    consecutive blocks (dynamic programming). ``singles[i]`` is chain ``i`` alone,
    ``cuts[i]`` the activation between chains ``i`` and ``i+1``, ``blocks[(i, j)]`` a
    certificate of chains ``i..j`` (activations inside included). Returns the value and the
    factors of the best split, in order."""
    m = len(singles)
    best: list[tuple[float, list[LayerBound]]] = [(1.0, [])]
    for stop in range(m):
        options = []
        for start in range(stop + 1):
            block = singles[stop] if start == stop else blocks.get((start, stop))
            if block is None:
                continue
            value, factors = best[start]
            pieces = [*factors, block]
            if start > 0:
                value *= cuts[start - 1].value
                pieces = [*factors, cuts[start - 1], block]
            options.append((value * block.value, pieces))
        best.append(min(options, key=lambda o: o[0]))
    return best[m]


def certified_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    methods: Sequence[str] = ("autolip", *BLOCK_CERTIFICATES),
    dense_limit: int = 2048,
    max_lmi_size: int = 4096,
    max_steps: int | None = None,
    memory_limit_bytes: float | None = None,
    state: dict[str, Tensor] | None = None,
    seed: int = 0,
) -> LipschitzResult:
    """The tightest certified upper bound on the l2 Lipschitz constant of ``model`` (in
    evaluation mode) that lipreg can produce within the budget. Its AutoLip candidate uses
    :data:`~lipreg.functional.ladder.TIGHTEST_LADDER` (the block-banded Gram test of every
    convolution, whatever it costs; :func:`lipreg.autolip`'s default skips the costly ones).

    Args:
        model: any traceable ``nn.Module``; the block certificates apply to sequential
            networks (one path from input to output), AutoLip to any graph.
        input_shape: shape of ONE input sample, e.g. ``(1, 28, 28)``.
        methods: which certificates to try: ``"autolip"`` and the names of
            :data:`BLOCK_CERTIFICATES` (``"lipsdp"``, ``"conv-pair"``).
        dense_limit: AutoLip's dense-certificate limit (smaller side of a materialised map).
        max_lmi_size: the largest total neuron count of one dense LipSDP block.
        max_steps: optimiser steps per LMI (``None``: each certificate's default).
        memory_limit_bytes: extra memory per certificate (as :func:`lipreg.autolip`).
        state: warm-start state from a previous result's ``.state``.
        seed: seed of the iterative estimates' cold starts.

    Returns:
        A :class:`LipschitzResult` with ``kind="upper"`` (``certified=True``),
        ``method="certified_bound (<winning certificate>)"``, the winner's factors in
        ``layers``, the runners-up in ``notes`` and the multipliers in ``state``.

    Raises:
        ValueError: unknown method names, or no certified candidate (AutoLip could not
            certify some map and no block certificate covered the network).

    Example:
        >>> import torch, lipreg
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> r = lipreg.certified_bound(net, (4,))
        >>> r.certified and r.value <= lipreg.autolip(net, (4,)).value
        True
    """
    start_time = time.perf_counter()
    _check_methods(methods)
    limit = memory_limit_bytes or default_memory_limit(model)
    # one trace and one probe for both: AutoLip's float64 analysis is the blocks'
    cache = AnalysisCache(model, input_shape)
    base = autolip(
        model,
        input_shape,
        certify=True,
        state=state,
        seed=seed,
        dense_limit=dense_limit,
        memory_limit_bytes=limit,
        analysis=cache,
        ladder=TIGHTEST_LADDER,  # the Gram test whatever it costs: the tightest AutoLip
    )
    blocks = [m for m in methods if m in BLOCK_CERTIFICATES]
    result = tighten(
        model,
        input_shape,
        base,
        methods=blocks,
        use_autolip="autolip" in methods,
        max_lmi_size=max_lmi_size,
        max_steps=max_steps,
        memory_limit_bytes=limit,
        state=state,
        analysis=cache,
    )
    result.time_s = time.perf_counter() - start_time
    return result


def _check_methods(methods: Sequence[str]) -> None:
    known = ["autolip", *BLOCK_CERTIFICATES]
    unknown = sorted(set(methods) - set(known))
    if unknown or not methods:
        raise ValueError(
            f"certified_bound: unknown methods {unknown} (expected a non-empty subset of {known})."
        )


def tighten(
    model: nn.Module,
    input_shape: Sequence[int],
    base: LipschitzResult,
    *,
    methods: Sequence[str] = tuple(BLOCK_CERTIFICATES),
    use_autolip: bool = True,
    max_lmi_size: int = 4096,
    max_steps: int | None = None,
    memory_limit_bytes: float | None = None,
    state: dict[str, Tensor] | None = None,
    traced: fx.GraphModule | None = None,
    analysis: AnalysisCache | None = None,
) -> LipschitzResult:
    """The best of a certified AutoLip result ``base`` (of the same model and input shape)
    and the block certificates ``methods`` (see :func:`certified_bound`, which calls this;
    the callback calls it after its own certified AutoLip). Returns ``base``'s value when
    nothing is tighter; the multipliers found are in ``state`` (``base.state`` included).

    ``analysis``: the :class:`~lipreg.functional.analysis_cache.AnalysisCache` that made
    ``base`` (e.g. ``AutoLip.analysis``, or the one passed to ``autolip(analysis=...)``):
    its float64 analysis is reused (specs re-read from the current weights, no new trace or
    probe). Otherwise the model is analysed again at float64 (on ``traced`` if given)."""
    start_time = time.perf_counter()
    candidates: list[tuple[float, str, list[LayerBound]]] = []
    if use_autolip and base.certified:
        candidates.append((base.value, "autolip", base.layers))
    notes: list[str] = []
    new_state = dict(base.state)
    if methods and base.certified:
        limit = memory_limit_bytes or default_memory_limit(model)
        with memory_budget(limit):
            run = _Run(
                _analysis64(model, input_shape, traced, analysis),
                max_lmi_size,
                max_steps,
                dict(state or {}),
            )
            seq = _sequential_candidate(run, base, list(methods), notes)
        new_state.update(run.new_state)
        if seq is not None:
            candidates.append(seq)
    if not candidates:
        raise ValueError(
            "certified_bound: no certified candidate: AutoLip could not certify "
            f"{[lb.name for lb in base.layers if not lb.certified]} and the block "
            "certificates need every single chain certified. " + " ".join(base.notes)
        )
    candidates.sort(key=lambda c: c[0])
    value, winner, layers = candidates[0]
    notes += [f"runner-up: {name} {v:.6g}" for v, name, _ in candidates[1:]]
    return LipschitzResult(
        value=value,
        kind="upper",
        method=f"certified_bound ({winner})",
        layers=layers,
        estimate=base.estimate,
        state=new_state,
        n_iter=base.n_iter,
        time_s=time.perf_counter() - start_time,
        notes=notes + base.notes,
    )


def _analysis64(
    model: nn.Module,
    input_shape: Sequence[int],
    traced: fx.GraphModule | None,
    cache: AnalysisCache | None,
) -> Analysis:
    """The float64 analysis of the blocks: from ``cache`` (checked to be this model's),
    else a new one."""
    if cache is None:
        return analyse(model, input_shape, dtype=torch.float64, traced=traced or trace(model))
    check_cache_matches(cache, model, input_shape, traced)
    return cache.get(torch.float64)


def _sequential_candidate(
    run: _Run, base: LipschitzResult, blocks: list[str], notes: list[str]
) -> tuple[float, str, list[LayerBound]] | None:
    """The best split of every run of a sequential network into certified blocks, times
    its breaker factors; ``None`` (with a note) for graphs that are not one path."""
    try:
        items, _ = segment_chains(run.analysis64)
    except NotSequentialError:
        notes.append("block certificates skipped: the graph is not one path (AutoLip only).")
        return None
    by_name = {lb.name: lb for lb in base.layers}
    run.norms = {name: lb.value for name, lb in by_name.items() if lb.kind == "affine"}
    total, layers, used = 1.0, [], set()
    for item in items:
        if isinstance(item, LayerBound):
            total *= item.value
            layers.append(item)
            continue
        singles = [by_name[c.name] for c in item.maps]
        cuts = [
            LayerBound.from_rule(n, "activation", max(abs(a), abs(b))) for a, b, n in item.boxes
        ]
        value, factors = best_split(singles, cuts, _blocks(run, item, blocks))
        used.update(f.kind for f in factors if f.kind in ("lipsdp-block", "conv-pair"))
        total *= value
        layers += factors
    if not math.isfinite(total):
        return None
    return total, "+".join(sorted(used)) or "autolip", layers


def _blocks(run: _Run, seg: SeqChain, names: list[str]) -> dict[tuple[int, int], LayerBound]:
    """Candidate blocks of one run: every adjacent pair, and every maximal stretch of
    materialisable chains (one dense block), by each certificate in ``names``; the smallest
    per span is kept."""
    m = len(seg.maps)
    spans = [(i, i + 1) for i in range(m - 1)]
    fits = [run.fits(c) for c in seg.maps]
    i = 0
    while i < m:
        j = i
        while j + 1 < m and fits[i] and fits[j + 1]:
            j += 1
        if j - i >= 2:
            spans.append((i, j))
        i = j + 1
    found: dict[tuple[int, int], LayerBound] = {}
    for span in spans:
        for name in names:
            try:
                block = BLOCK_CERTIFICATES[name](run, seg, *span)
            except (ValueError, RuntimeError) as exc:  # reported, never silently dropped
                warnings.warn(f"certified_bound: {name} on {span}: {exc}", stacklevel=4)
                block = None
            if block is not None and (span not in found or block.value < found[span].value):
                found[span] = block
    return found
