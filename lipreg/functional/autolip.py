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
tighter than the product of their norms, and still sound.

**Guarantee.** With ``certify=True`` (default) every merged map's norm is replaced by a
certified upper bound (closed form, dense float64 eigen-decomposition, FFT bound for
convolutions, Schur test for non-negative maps, or a product of those), and the result's
``kind`` is ``"upper"``: a guaranteed upper bound on the Lipschitz constant of the network in
evaluation mode. The Lanczos/power-iteration values, which approach each norm from below, are
reported as ``result.estimate``. With ``certify=False`` only those are computed and the result
is an *estimate* (``certified`` is ``False``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, fx, nn

from lipreg.functional.certify import (
    DEFAULT_MEMORY_LIMIT_BYTES,
    current_budget,
    default_memory_limit,
    dense_bytes,
    dense_norm_bound,
    matrix_norm_bound,
    matrix_norm_certificate,
    memory_budget,
    schur_bound,
)
from lipreg.functional.graph import Analysis, analyse, combine, node_lipschitz, trace
from lipreg.functional.linear_map import LinearMap, compose
from lipreg.functional.power_iteration import check_iteration_options, operator_norm
from lipreg.functional.results import LayerBound, LipschitzResult
from lipreg.functional.rules import Affine, Combine, Elementwise, Nonlinear

__all__ = [
    "AffineChain",
    "AutoLip",
    "ChainBounder",
    "autolip",
    "chain_linear_map",
    "check_finite_result",
    "find_affine_chains",
]


@dataclass
class AffineChain:
    """Consecutive affine nodes ``nodes`` applied to the output of ``source``."""

    nodes: list[fx.Node]
    source: fx.Node
    name: str


def find_affine_chains(analysis: Analysis) -> dict[fx.Node, AffineChain]:
    """Maximal chains of affine nodes, keyed by their last node.

    A node extends its input's chain when that input is affine and has no other user (and is
    not the network's output): its intermediate value is then never needed on its own.
    """
    chain_of: dict[fx.Node, AffineChain] = {}
    ends: dict[fx.Node, AffineChain] = {}
    for node in analysis.order[1:]:
        if not isinstance(analysis.specs[node], Affine):
            continue
        (parent,) = analysis.inputs[node]
        extend = (
            isinstance(analysis.specs.get(parent), Affine)
            and analysis.users(parent) == [node]
            and not analysis.is_output(parent)
        )
        if extend:
            chain = chain_of[parent]
            ends.pop(parent, None)
            chain.nodes.append(node)
        else:
            chain = AffineChain(nodes=[node], source=parent, name="")
        chain_of[node] = chain
        ends[node] = chain
    for chain in ends.values():
        chain.name = " -> ".join(analysis.label(n) for n in chain.nodes)
    return ends


def _node_map(analysis: Analysis, node: fx.Node) -> LinearMap:
    spec = analysis.specs[node]
    assert isinstance(spec, Affine)
    (parent,) = analysis.inputs[node]
    return LinearMap(
        apply=spec.linear,
        in_shape=analysis.shapes[parent],
        out_shape=analysis.shapes[node],
        dtype=analysis.dtype,
        device=analysis.device,
        name=analysis.label(node),
    )


def chain_linear_map(analysis: Analysis, chain: AffineChain) -> LinearMap:
    """The bias-free linear part of a chain as one :class:`LinearMap`."""
    return compose([_node_map(analysis, n) for n in chain.nodes], name=chain.name)


class ChainBounder:
    """Computes the norm of each affine chain: estimate, certified bound, or both."""

    def __init__(
        self,
        analysis: Analysis,
        model: nn.Module,
        *,
        certify: bool,
        tol: float,
        max_iter: int,
        method: str,
        state: dict[str, Tensor],
        generator: torch.Generator,
        dense_limit: int,
    ) -> None:
        self.analysis = analysis
        self.model = model
        self.certify = certify
        self.tol = tol
        self.max_iter = max_iter
        self.method = method
        self.state = state
        self.generator = generator
        self.dense_limit = dense_limit
        self._analysis64: Analysis | None = None  # float64 specs, computed on first use
        self.new_state: dict[str, Tensor] = {}

    @property
    def analysis64(self) -> Analysis:
        """The same analysis (same nodes) with float64 specs, for the certificates."""
        if self._analysis64 is None:
            self._analysis64 = self.analysis.at_dtype(torch.float64)
        return self._analysis64

    def _weight_is_exact(self) -> bool:
        """Weights of ``self.analysis`` equal the model's (no float64 tensor was rounded)."""
        if self.analysis.dtype == torch.float64:
            return True
        return not any(
            t.dtype == torch.float64 for t in (*self.model.parameters(), *self.model.buffers())
        )

    def bound(self, chain: AffineChain) -> LayerBound:
        specs = [self.analysis.specs[n] for n in chain.nodes]
        if (
            self.certify
            and len(specs) == 1
            and specs[0].weight is not None
            and not specs[0].isometry
            and self._weight_is_exact()
        ):
            # One dense layer: its weight converts exactly to float64 chunk by chunk, so no
            # float64 copy of the whole network (analysis64) is needed.
            return self._weight_bound(chain, specs[0].weight, 1.0)
        if self.certify:  # closed forms and weights at the model's own precision (float64)
            specs = [self.analysis64.specs[n] for n in chain.nodes]
        scale = math.prod(s.norm for s in specs if s.isometry)  # type: ignore[misc]
        core = [(n, s) for n, s in zip(chain.nodes, specs, strict=True) if not s.isometry]
        # Closed forms evaluated in float64 are exact up to a few ulps: pad by 4 ulps.
        pad = 1 + 4 * torch.finfo(torch.float64).eps if self.certify else 1.0
        if not core:
            value = scale * pad
            return LayerBound(chain.name, "affine", value, True, scale, value, "closed-form")
        if len(core) == 1 and core[0][1].norm is not None:
            value = scale * core[0][1].norm * pad
            return LayerBound(chain.name, "affine", value, True, value, value, "closed-form")
        if len(core) == 1 and core[0][1].weight is not None and self.certify:
            return self._weight_bound(chain, core[0][1].weight, scale)

        op = chain_linear_map(self.analysis, chain)
        upper, how, v_exact = None, "", None
        if self.certify and self._dense_ok(op):
            op64 = chain_linear_map(self.analysis64, chain)
            upper, v_exact = dense_norm_bound(op64, batch_size=self._dense_batch(op64))
            how = "dense"
        if upper is not None:
            self.new_state[chain.name] = v_exact.to(self.analysis.dtype)
            return LayerBound(chain.name, "affine", upper, True, upper, upper, how)

        gap0 = self.state.get(f"{chain.name}#gap")
        res = operator_norm(
            op,
            v0=self.state.get(chain.name),
            gap0=float(gap0) if gap0 is not None else None,
            tol=self.tol,
            max_iter=self.max_iter,
            method=self.method,  # type: ignore[arg-type]
            generator=self.generator,
        )
        self.new_state[chain.name] = res.v
        if math.isfinite(res.gap):
            self.new_state[f"{chain.name}#gap"] = torch.tensor(res.gap, dtype=torch.float64)
        extra = {"converged": res.converged, "residual": res.residual}
        upper, how = self._product_bound(core, scale) if self.certify else (None, "")
        if upper is None:  # an estimate: the iterative value, labelled as such
            method = f"{self.method} ({how})" if self.certify else self.method
            return LayerBound(
                chain.name, "affine", res.sigma, False, res.sigma, None, method, res.n_iter, extra
            )
        return LayerBound(
            chain.name, "affine", upper, True, res.sigma, upper, how, res.n_iter, extra
        )

    def _weight_bound(self, chain: AffineChain, weight: Tensor, scale: float) -> LayerBound:
        cert = matrix_norm_certificate(weight, name=chain.name)
        value = scale * cert.bound
        self.new_state[chain.name] = cert.v.to(self.analysis.dtype)
        method = cert.method if cert.method == "dense" else f"{cert.method} (memory budget)"
        extra = {"blocks": cert.blocks} if cert.method == "row-blocks" else {}
        return LayerBound(
            chain.name, "affine", value, True, scale * cert.estimate, value, method, 0, extra
        )

    def _dense_ok(self, op: LinearMap) -> bool:
        """The map may be materialised: small enough a side, and the dense matrix (twice,
        while it is assembled), its Gram certificate and the basis batches fit the budget."""
        small = min(op.in_features, op.out_features)
        if small > self.dense_limit:
            return False
        return self._dense_bytes(op) <= current_budget().limit_bytes

    def _dense_batch(self, op: LinearMap) -> int:
        """Basis vectors per pass of ``to_dense``: autograd keeps about three activations of
        the map's size per vector; a quarter of the budget goes to them."""
        per_vector = 8 * 3 * (op.in_features + op.out_features)
        return int(min(256, max(1, current_budget().limit_bytes // 4 // per_vector)))

    def _dense_bytes(self, op: LinearMap) -> int:
        n, m = op.in_features, op.out_features
        activations = self._dense_batch(op) * 8 * 3 * (n + m)
        return 16 * n * m + dense_bytes(min(n, m)) + activations

    def _product_bound(
        self, core: list[tuple[fx.Node, Affine]], scale: float
    ) -> tuple[float | None, str]:
        """Certified bound of a chain as the product of its ops' certified bounds."""
        total, methods = scale, []
        for node, spec in core:
            if spec.norm is not None:
                total *= spec.norm
                methods.append("closed-form")
            elif spec.weight is not None:
                total *= matrix_norm_bound(spec.weight)[0]
                methods.append("dense")
            elif spec.certify is not None:
                total *= spec.certify()
                methods.append("fft")
            else:
                op64 = _node_map(self.analysis64, node)
                if spec.nonnegative:
                    total *= schur_bound(op64)
                    methods.append("schur")
                elif self._dense_ok(op64):
                    total *= dense_norm_bound(op64, batch_size=self._dense_batch(op64))[0]
                    methods.append("dense")
                else:
                    return None, (
                        f"no certificate for {self.analysis.label(node)}: too large to "
                        f"materialise ({op64.in_features}x{op64.out_features}) and no "
                        "structured bound; raise dense_limit or register a rule with certify="
                    )
        return total, " x ".join(methods) if len(methods) > 1 else methods[0]


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
        traced: a graph from :func:`lipreg.functional.graph.trace` to skip re-tracing (the
            :class:`AutoLip` estimator does this).
        memory_limit_bytes: extra memory each certificate may allocate (default
            ``min(1 GiB, max(256 MiB, 4 × the bytes of the model's parameters and
            buffers))``). Maps whose exact certificate needs more get a looser certified bound
            (row blocks, Frobenius/Schur, im2col for convolutions), said in ``notes``, in the
            layer's ``method`` and by a warning; the result stays certified.

    Raises:
        ValueError: a non-finite (NaN/Inf) value anywhere in the result (message mentions
            "non-finite"): never reported as a bound.

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
    if memory_limit_bytes is not None:
        limit = memory_limit_bytes
    elif isinstance(model, nn.Module):
        limit = default_memory_limit(model)
    else:  # analyse() raises the TypeError
        limit = DEFAULT_MEMORY_LIMIT_BYTES
    with memory_budget(limit) as budget:
        result = _autolip(
            model,
            input_shape,
            certify=certify,
            tol=tol,
            max_iter=max_iter,
            method=method,
            dtype=dtype,
            state=state,
            seed=seed,
            dense_limit=dense_limit,
            traced=traced,
        )
    if budget.events:
        msg = "memory budget: " + " | ".join(budget.events)
        warnings.warn(msg, stacklevel=2)
        result.notes.append(msg)
    check_finite_result(result)
    result.time_s = time.perf_counter() - start
    return result


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


def _autolip(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    certify: bool,
    tol: float,
    max_iter: int,
    method: Literal["lanczos", "power"],
    dtype: torch.dtype,
    state: dict[str, Tensor] | None,
    seed: int,
    dense_limit: int,
    traced: fx.GraphModule | None,
) -> LipschitzResult:
    start = time.perf_counter()
    if traced is None:  # trace once: the float64 analysis of the certificates reuses it
        traced = trace(model)
    analysis = analyse(model, input_shape, dtype=dtype, traced=traced)
    generator = torch.Generator(device=analysis.device).manual_seed(seed)
    bounder = ChainBounder(
        analysis,
        model,
        certify=certify,
        tol=tol,
        max_iter=max_iter,
        method=method,
        state=dict(state or {}),
        generator=generator,
        dense_limit=dense_limit,
    )
    chains = find_affine_chains(analysis)
    value: dict[fx.Node, float] = {analysis.input_node: 1.0}
    estimate: dict[fx.Node, float] = {analysis.input_node: 1.0}
    layers: list[LayerBound] = []
    all_certified = True
    for node in analysis.order[1:]:
        spec = analysis.specs[node]
        parents = analysis.inputs[node]
        if isinstance(spec, Affine):
            chain = chains.get(node)
            if chain is None:  # interior of a chain: folded into its end
                continue
            lb = bounder.bound(chain)
            layers.append(lb)
            all_certified &= lb.certified
            est = lb.estimate if lb.estimate is not None else lb.value
            value[node] = lb.value * value[chain.source]
            estimate[node] = est * estimate[chain.source]
        elif isinstance(spec, Elementwise | Nonlinear):
            lip = node_lipschitz(spec)
            kind = "activation" if isinstance(spec, Elementwise) else "nonlinear"
            layers.append(LayerBound(analysis.label(node), kind, lip, True, lip, lip, "rule"))
            value[node] = lip * value[parents[0]]
            estimate[node] = lip * estimate[parents[0]]
        elif isinstance(spec, Combine):
            value[node] = combine(spec, [value[p] for p in parents])
            estimate[node] = combine(spec, [estimate[p] for p in parents])
    out = analysis.output_node
    notes: list[str] = []
    if out in value:
        total, total_est = value[out], estimate[out]
    else:
        total, total_est = 0.0, 0.0
        notes.append("the output does not depend on the input: the function is constant.")
    if certify and not all_certified:
        missing = [lb.name for lb in layers if not lb.certified]
        msg = (
            f"AutoLip could not certify {missing}; the result mixes certified bounds with "
            "power-iteration estimates and is reported as an estimate (certified=False)."
        )
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
    kind = "upper" if certify and all_certified else "estimate"
    if not certify:
        notes.append(
            "certify=False: layer norms are Lanczos/power-iteration values, which approach "
            "each norm from below; the product is an estimate, not a guaranteed bound."
        )
    return LipschitzResult(
        value=total,
        kind=kind,
        method="autolip",
        layers=layers,
        nodes={analysis.label(n): v for n, v in value.items()},
        estimate=total_est,
        state=bounder.new_state,
        n_iter=sum(lb.n_iter for lb in layers),
        time_s=time.perf_counter() - start,
        notes=notes,
    )


class AutoLip:
    """A reusable AutoLip estimator that warm-starts itself across calls.

    It traces the model once and keeps the power-iteration vectors between calls, so that
    re-estimating after a few optimizer steps costs a few iterations per layer. Every call
    still reads the current weights. This is what :class:`lipreg.LipschitzCallback` uses.

    Example:
        >>> import torch, lipreg
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> estimator = lipreg.AutoLip(net, (4,), certify=False)
        >>> first, second = estimator(), estimator()
        >>> second.n_iter <= first.n_iter
        True
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], **options) -> None:
        from lipreg.functional.graph import check_input_shape, trace

        self.model = model
        self.input_shape = check_input_shape(input_shape)
        self.options = options
        self.state: dict[str, Tensor] = dict(options.pop("state", None) or {})
        self.traced = trace(model)  # the graph, reused by every call

    def __call__(self, **overrides) -> LipschitzResult:
        """Estimate with the current weights; ``overrides`` replace constructor options
        (``state={}`` forces a cold start)."""
        state = overrides.pop("state", self.state)
        options = {**self.options, **overrides}
        result = autolip(self.model, self.input_shape, state=state, traced=self.traced, **options)
        self.state = result.state
        return result
