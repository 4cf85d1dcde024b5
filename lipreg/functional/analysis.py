"""Analysing a traced network into a graph of Lipschitz specs.

:func:`analyse` traces ``model`` with ``torch.fx`` (:func:`lipreg.functional.trace.trace`) and
probes it (:class:`lipreg.functional.probe.ProbeInterpreter`), both with *evaluation
semantics*: every submodule's ``training`` flag is off while tracing and probing (so
``if self.training:`` branches, dropout, BatchNorm statistics and parametrizations such as
``spectral_norm`` behave as in ``model.eval()``), no hook fires, the global RNG is untouched,
and every flag and buffer is restored exactly afterwards. It then assigns to every
input-dependent node the spec returned by its rule (:mod:`lipreg.functional.rules`). The
structure is established once per call; :meth:`Analysis.at_dtype` gives the specs at another
dtype on the same nodes, without a new trace or probe.

**Deny by default.** A node depends on the input when any of its arguments does, whatever
its value type (a tuple holding ``None``, a nested tuple, a dict): only shape queries
(``x.shape``, ``x.size()``, ``x.dim()``) read nothing but metadata. Everything the analysis
cannot account for is refused with the node named, all at once, in one
:class:`UnsupportedOperationError`: an op without a rule (or with a rule proven for a parent
class whose methods the module overrides), a value that is not a plain tensor, an in-place
update whose old value is read afterwards, an op that mixes the samples of a batch (found by
changing one sample of the probe batch and watching the other).
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from lipreg.functional.evaluation import evaluation_mode
from lipreg.functional.probe import (
    Probe,
    ProbeInterpreter,
    ProbeRun,
    check_graph_reproduces_model,
    cuda_devices,
    is_shape_query,
    tensors_in,
)
from lipreg.functional.rules import (
    lookup_rule,
    overriding_methods,
    refusal_hint,
    splits_into_pieces,
)
from lipreg.functional.sharding import check_shardable, gathered_agreed, is_sharded, sealed
from lipreg.functional.specs import (
    Affine,
    InputArg,
    NodeContext,
    Nonlinear,
    Spec,
    UnsupportedNodeError,
)
from lipreg.functional.trace import (
    UnsupportedOperationError,
    check_finite_parameters,
    check_input_shape,
    check_no_sharded_attrs,
    graph_root,
    input_placeholder,
    resolve_attr,
    trace,
    type_name,
    unwrap_compiled,
)

__all__ = ["Analysis", "analyse"]


class _Attr:
    """A parameter or buffer read by a ``get_attr`` node, resolved at every refresh."""

    __slots__ = ("target",)

    def __init__(self, target: str) -> None:
        self.target = target


@dataclass
class Analysis:
    """A traced network with a spec for every input-dependent node.

    Attributes:
        graph: the traced ``torch.fx`` graph (of a wrapper that shares the model's modules).
        input_node: the placeholder.
        output_node: the node whose value the model returns.
        specs: spec of every input-dependent node (``Affine``/``Elementwise``/...).
        contexts: the :class:`NodeContext` of each such node.
        shapes: per-sample output shape of each input-dependent tensor node.
        order: input-dependent nodes in topological order (placeholder first).
        inputs: for each node, its input-dependent argument nodes (with repetitions).
        input_shape: shape of one input.
        dtype, device: compute dtype and device.
        labels: the readable name of each node (see :meth:`label`).
    """

    graph: fx.Graph
    root: nn.Module
    input_node: fx.Node
    output_node: fx.Node | None
    specs: dict[fx.Node, Spec]
    contexts: dict[fx.Node, NodeContext]
    shapes: dict[fx.Node, tuple[int, ...]]
    order: list[fx.Node]
    inputs: dict[fx.Node, list[fx.Node]]
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    labels: dict[fx.Node, str] = field(default_factory=dict)
    pieces: set[fx.Node] = field(default_factory=set)
    model_name: str = "model"
    refusals: dict[fx.Node, str] = field(default_factory=dict)
    # constants that forward() computes from the model's state (probe values, frozen here)
    derived_constants: list[str] = field(default_factory=list)
    # the model holds FSDP2 shards: specs are computed inside lipreg.functional.sharding.
    # gathered() and their tensors are valid only there (see refresh_specs)
    sharded: bool = False

    def _materialise(self, ctx: NodeContext) -> None:
        """Constant arguments as the rules see them: parameters read from the live model
        now, floating tensors cast to the compute dtype (detached unless differentiable)."""

        def load(a: Any) -> Any:
            if isinstance(a, _Attr):
                a = resolve_attr(self.graph.owning_module, self.root, a.target)
            if isinstance(a, Tensor) and a.is_floating_point():
                a = a.to(dtype=ctx.dtype, device=ctx.device)
                return a if ctx.differentiable else a.detach()
            return a

        raw_args, raw_kwargs = ctx.meta["raw"]
        ctx.args = tuple(fx.node.map_aggregate(raw_args, load))
        ctx.kwargs = dict(fx.node.map_aggregate(raw_kwargs, load))

    def refresh_specs(self, nodes: Sequence[fx.Node] | None = None) -> None:
        """(Re)apply the rules of ``nodes`` (default: every node), reading the current
        parameters; the other nodes keep their specs.

        Cheap (no forward pass except for generic affine offsets): the penalty calls it at
        every step so that its closures see the current weights, with autograd.

        Sharded: a full refresh gathers each node's FSDP unit for its rule and keeps affine
        specs sealed (:func:`~lipreg.functional.sharding.sealed`; known ones are skipped):
        their chain re-reads them inside its own gather (``ChainBounder.bound``)."""
        specs: dict[fx.Node, Spec] = {} if nodes is None else dict(self.specs)
        unsupported: list[_Refusal] = []
        todo = self.contexts if nodes is None else {n: self.contexts[n] for n in nodes}
        with evaluation_mode(self.root, restore_buffers=False):
            for node, ctx in todo.items():
                if self.sharded and nodes is None and isinstance(self.specs.get(node), Affine):
                    specs[node] = self.specs[node]  # sealed already: no gather needed
                    continue
                scope = (  # the unsharded path: no gather, no collective
                    gathered_agreed(self.root, self.modules_of([node]), f"ruling {node.name}")
                    if self.sharded and nodes is None
                    else contextlib.nullcontext()
                )
                with scope:
                    refusal = self._apply_rule(node, ctx, specs)
                if self.sharded and nodes is None and node in specs:
                    specs[node] = sealed(specs[node])
                if refusal is not None:
                    unsupported.append(refusal)
        if unsupported:
            raise UnsupportedOperationError(_unsupported_message(self.model_name, unsupported))
        self.specs = specs

    def _apply_rule(
        self, node: fx.Node, ctx: NodeContext, specs: dict[fx.Node, Spec]
    ) -> _Refusal | None:
        """Set ``specs[node]`` from the node's rule, or return why the node is refused."""
        self._materialise(ctx)
        if node in self.refusals:
            return _Refusal(node, ctx.target, self.refusals[node], False)
        if node in self.pieces:
            specs[node] = Nonlinear(1.0, "one piece of a split")
            return None
        rule = lookup_rule(node, ctx.target)
        if rule is None:
            return _describe_missing_rule(node, ctx.target)
        try:
            specs[node] = rule(ctx)
        except UnsupportedNodeError as exc:
            return _Refusal(node, ctx.target, str(exc), False)
        return None

    def modules_of(self, nodes: Sequence[fx.Node]) -> list[nn.Module]:
        """The modules whose parameters the rules of ``nodes`` read (a module call's module,
        each ``get_attr`` argument's owner): what a sharded gather must gather for them."""
        found: list[nn.Module] = []
        for node in nodes:
            ctx = self.contexts.get(node)
            if ctx is None:
                continue
            if isinstance(ctx.target, nn.Module):
                found.append(ctx.target)
            for attr in _attrs_in(ctx.meta["raw"]):
                owner, _, _ = attr.target.rpartition(".")
                found.append(self.root.get_submodule(owner))
        return found

    def at_dtype(self, dtype: torch.dtype) -> Analysis:
        """The same analysis with every spec computed at ``dtype``: same graph, same nodes
        (so chains found on one apply to the other), no new trace and no new probe.

        The certificates use this for their float64 specs: the structure (refusals, batch
        mixing, in-place checks) is a property of the graph and is established once."""
        if dtype == self.dtype:
            return self
        contexts = {
            node: dataclasses.replace(ctx, dtype=dtype, meta=dict(ctx.meta))
            for node, ctx in self.contexts.items()
        }
        other = dataclasses.replace(self, contexts=contexts, specs={}, dtype=dtype)
        if self.sharded:  # the kinds only: a chain's specs are refreshed inside its gather
            other.specs = dict(self.specs)
        else:
            other.refresh_specs()
        return other

    def users(self, node: fx.Node) -> list[fx.Node]:
        """Input-dependent users of ``node`` (the output node excluded)."""
        return [u for u in node.users if u in self.specs]

    def is_output(self, node: fx.Node) -> bool:
        return node is self.output_node

    def label(self, node: fx.Node) -> str:
        """A unique readable name of ``node``, as results and logs show it.

        - a module call: its module path (``layer1.0.conv1``), with ``#k`` for the k-th call
          of a module called several times (``layer1.0.relu#2``);
        - a function or method call: the path of the module whose ``forward`` makes it and
          the op (``layer1.0 (add)``), with ``#k`` inside the parentheses for the k-th such
          op of that module (``layer1.0 (add#2)``); an op of the top-level ``forward`` is the
          op's name alone (``flatten``);
        - the input: its parameter name (``x``).

        Paths are those of the traced model's ``named_modules()`` (so
        ``model.get_submodule(path)`` finds the module), without ``torch.compile``'s
        ``_orig_mod``. A LightningModule traced as a whole (``forward`` calling
        ``self.model(x)``) keeps the attribute (``model.layer1.0.conv1``); pass
        ``model_attr="model"`` to the callback for paths relative to the network.
        """
        return self.labels.get(node, node.name)


def _attrs_in(raw: Any) -> list[_Attr]:
    """The parameter references among a node's raw arguments."""
    found: list[_Attr] = []
    fx.node.map_aggregate(raw, lambda a: found.append(a) if isinstance(a, _Attr) else None)
    return found


def _rule_refusal(node: fx.Node, ctx: NodeContext) -> str | None:
    """The node's own rule's reason to refuse it, if any (more specific than the analysis')."""
    rule = lookup_rule(node, ctx.target)
    if rule is None:
        return None
    try:
        rule(ctx)
    except UnsupportedNodeError as exc:
        return str(exc)
    return None


def _probe_setting(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device of the model's first parameter or buffer, and the dtype the probes run in
    (the model's own floating dtype, float32 for a model without floating state)."""
    first = next(iter(list(model.parameters()) + list(model.buffers())), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    return device, dtype


def _probe(
    gm: fx.GraphModule, input_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> ProbeRun:
    """Probe the graph in evaluation mode, without autograd, on a forked RNG (a safety net,
    so that no op of the model can consume the global RNG)."""
    # Whether ops mix samples is a property of the graph, not of the weights: checked once
    # per graph and input shape (the callback's cached trace skips it afterwards).
    verified: set = gm.__dict__.setdefault("_lipreg_per_sample", set())
    with (
        torch.inference_mode(False),  # probe tensors must count their in-place updates
        torch.no_grad(),
        torch.random.fork_rng(devices=cuda_devices(device)),
        evaluation_mode(graph_root(gm)),
    ):
        return ProbeInterpreter(gm).probe(
            input_shape, device=device, dtype=dtype, check_mixing=input_shape not in verified
        )


def _check_probe(model: nn.Module, gm: fx.GraphModule, run: ProbeRun) -> None:
    """Refuse what the probe shows before any rule runs: no output, non-finite constants,
    a graph that does not compute what the model computes."""
    probe = run.main
    if probe.output is None:
        raise TypeError("the traced graph has no output node.")
    if probe.nonfinite_constants:
        raise ValueError(
            f"the model has non-finite (NaN/Inf) tensor attributes or constants "
            f"{probe.nonfinite_constants}: no Lipschitz bound exists for them. Check how they "
            "are computed, or reload a valid checkpoint."
        )
    if not probe.nonfinite_values:  # non-finite values are reported after the rules
        check_graph_reproduces_model(model, gm, probe.values[probe.output], run.x)


def check_graph_still_matches(
    model: nn.Module, gm: fx.GraphModule, input_shape: tuple[int, ...]
) -> None:
    """Re-run the probe's refusals of a kept graph with the current weights: one probe batch
    through the graph and through the model itself (:func:`check_graph_reproduces_model`),
    non-finite constants. A cached analysis (:mod:`lipreg.functional.analysis_cache`) calls
    it before a *certified* bound, because Python state that ``forward()`` reads outside the
    modules (globals, closures) is not in the cache's fingerprint: a certificate must never
    bound a graph the model no longer computes."""
    device, probe_dtype = _probe_setting(model)
    _check_probe(model, gm, _probe(gm, input_shape, device, probe_dtype))


def analyse(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    traced: fx.GraphModule | None = None,
    differentiable: bool = False,
) -> Analysis:
    """Trace ``model`` and attach a Lipschitz spec to every input-dependent node.

    ``traced`` reuses a graph from :func:`trace` (the probes and the rules still run, so
    that every spec reads the current weights). ``differentiable=True`` keeps parameters
    attached to autograd in every spec (for :class:`lipreg.LipschitzPenalty`).

    Raises:
        UnsupportedOperationError: listing every node that is refused, with the reason.
        TraceError: the model cannot be traced, has no forward, or takes several inputs.
        ValueError: non-finite parameters, buffers, tensor attributes or probe values (the
            message contains "non-finite").
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    input_shape = check_input_shape(input_shape)
    model = unwrap_compiled(model)
    if isinstance(model, nn.Sequential) and len(model) == 0:
        raise ValueError("the model is an empty nn.Sequential: there is nothing to bound.")
    sharded = is_sharded(model)
    check_shardable(model)
    check_finite_parameters(model)
    device, probe_dtype = _probe_setting(model)
    gm = traced if traced is not None else trace(model)
    input_node = input_placeholder(gm)
    if sharded:
        check_no_sharded_attrs(gm)
    run = _probe(gm, input_shape, device, probe_dtype)
    _check_probe(model, gm, run)
    probe = run.main
    analysis = _build_analysis(
        model, gm, input_node, input_shape, probe, dtype, device, differentiable
    )
    analysis.sharded = sharded
    _collect_refusals(analysis, run)
    analysis.derived_constants = state_derived_nodes(gm, probe)
    if differentiable:
        _check_no_parameter_math(gm, probe)
    analysis.refresh_specs()
    # Reached only when nothing was refused: this graph and shape are per-sample.
    gm.__dict__["_lipreg_per_sample"].add(input_shape)
    if probe.nonfinite_values:
        raise ValueError(
            f"non-finite (NaN/Inf) intermediate values at nodes {probe.nonfinite_values} on a "
            "random probe input: the network does not compute a finite function there, so no "
            "Lipschitz bound is reported. Check the weights and constants used by forward()."
        )
    return analysis


def _collect_refusals(analysis: Analysis, run: ProbeRun) -> None:
    """Every reason the probes give to refuse a node: the probe's own (shapes, in-place
    updates), value types consumed, and the first node that mixes samples."""
    probe = run.main
    analysis.refusals.update({n: r for n, r in probe.refusals.items() if n in analysis.contexts})
    for node, ctx in analysis.contexts.items():
        reason = _consumer_refusal(node, probe, ctx.target)
        if reason and node not in analysis.refusals:
            analysis.refusals[node] = reason
    _refuse_first_mixing_node(analysis, probe, run.others)


def _refuse_first_mixing_node(
    analysis: Analysis, probe: Probe, others: list[tuple[Probe, int]]
) -> None:
    """Refuse the first node whose value for a sample moved when only another sample of the
    batch moved, unless it is already refused or its own rule gives a more specific reason
    (BatchNorm without running statistics)."""
    found = [_first_mixing_node(analysis.order, probe, other, kept) for other, kept in others]
    found = [n for n in found if n is not None]
    node = min(found, key=analysis.order.index) if found else None
    if node is None or node not in analysis.contexts or node in analysis.refusals:
        return
    ctx = analysis.contexts[node]
    analysis._materialise(ctx)
    with evaluation_mode(analysis.root, restore_buffers=False):
        if _rule_refusal(node, ctx):
            return
    analysis.refusals[node] = (
        "mixes the samples of a batch (its value for one sample changed when only another "
        "sample of the batch changed), or is random in evaluation mode: e.g. softmax or a "
        "mean over dim 0, batch statistics, noise. A Lipschitz constant is defined for a "
        "deterministic per-sample function."
    )


def _first_mixing_node(order: list[fx.Node], a: Probe, b: Probe, kept: int) -> fx.Node | None:
    """The first node whose value for sample ``kept`` differs between two probe batches that
    share only that sample: it mixes samples (softmax or a mean over dim 0, a cumulative sum,
    a flip of the batch, batch statistics) or is random."""
    for node in order:
        u, v = a.samples.get(node), b.samples.get(node)
        if u is None or v is None or not (u.is_floating_point() and v.is_floating_point()):
            continue
        u, v = u[kept], v[kept]
        if u.shape != v.shape:
            return node
        scale = float(u.abs().max()) if u.numel() else 0.0
        if not torch.allclose(u, v, rtol=1e-4, atol=1e-6 * (1.0 + scale), equal_nan=True):
            return node
    return None


def state_derived_nodes(gm: fx.GraphModule, probe: Probe) -> list[str]:
    """Names of the nodes whose probe value the analysis keeps although it may change with
    the model's state: input-independent calls that return a tensor (``self.w * 2``,
    ``torch.randn(3)``) or whose arguments come from a parameter, buffer or tensor attribute
    (``self.w.sum().item()``) or from such a node. Shape queries (``x.size(0)``,
    ``self.w.shape``) read metadata only and are not derived. An analysis with such nodes
    must be rebuilt (new probe) whenever the weights may have changed."""
    derived: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node in probe.variable or node.op not in ("call_module", "call_method", "call_function"):
            continue
        if is_shape_query(node):
            continue
        from_state = any(a.op == "get_attr" or a in derived for a in node.all_input_nodes)
        holds_tensor = bool(tensors_in(probe.values.get(node)))
        if from_state or holds_tensor or node.op == "call_module":
            derived.add(node)
    return [n.name for n in gm.graph.nodes if n in derived]


def _check_no_parameter_math(gm: fx.GraphModule, probe: Probe) -> None:
    derived = [
        n.name
        for n in gm.graph.nodes
        if n.op.startswith("call")
        and n not in probe.variable
        and isinstance(probe.values.get(n), Tensor)
    ]
    if derived:
        raise ValueError(
            f"nodes {derived} compute tensors from parameters inside forward() (e.g. a "
            "weight normalisation); a differentiable penalty would see them frozen at "
            "their first value. Compute them in a module (parametrizations are fine) or "
            "use the estimators, which re-read them at every call."
        )


def _consumer_refusal(node: fx.Node, probe: Probe, target: Any) -> str | None:
    """Deny by default on value types: a node may consume only plain tensors from the input
    side, except a getitem taking one piece of a split/chunk/unbind."""
    if node.op == "call_method":
        self_value = probe.values.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if type(self_value) not in (Tensor, nn.Parameter):
            return (
                f"calls .{target}() on a {type_name(self_value)}; lipreg's method rules are "
                "proven for plain torch.Tensor only."
            )
    for parent in node.all_input_nodes:
        if parent not in probe.variable or type(probe.values[parent]) is Tensor:
            continue
        if node.target is operator.getitem and splits_into_pieces(parent, parent.target):
            continue
        return (
            f"its input {parent.name!r} is a {type_name(probe.values[parent])}, not a tensor: "
            "lipreg follows plain tensors (and the pieces of split/chunk/unbind) only, and "
            "cannot bound one element of another op's tuple output."
        )
    return None


def _node_context(
    node: fx.Node,
    root: nn.Module,
    probe: Probe,
    dtype: torch.dtype,
    device: torch.device,
    differentiable: bool,
) -> tuple[NodeContext, list[fx.Node]]:
    """The context of an input-dependent node (input-dependent arguments replaced by
    :class:`InputArg` markers, parameters by references read at every refresh, other
    constants by their probe values) and its input-dependent argument nodes."""
    var_inputs: list[fx.Node] = []

    def mark(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a in probe.variable:
                var_inputs.append(a)
                return InputArg(len(var_inputs) - 1)
            if a.op == "get_attr":  # re-read at every refresh (see trace._with_root)
                return _Attr(a.target)
            return probe.values[a]
        return a

    args = fx.node.map_aggregate(node.args, mark)
    kwargs = fx.node.map_aggregate(node.kwargs, mark)
    target = root.get_submodule(node.target) if node.op == "call_module" else node.target
    ctx = NodeContext(
        node=node,
        target=target,
        args=tuple(args),
        kwargs=dict(kwargs),
        n_inputs=len(var_inputs),
        in_shapes=[probe.shapes.get(n, ()) for n in var_inputs],
        out_shape=probe.shapes.get(node),
        dtype=dtype,
        device=device,
        differentiable=differentiable,
    )
    ctx.meta["raw"] = (ctx.args, ctx.kwargs)
    return ctx, var_inputs


def _build_analysis(
    model: nn.Module,
    gm: fx.GraphModule,
    input_node: fx.Node,
    input_shape: tuple[int, ...],
    probe: Probe,
    dtype: torch.dtype,
    device: torch.device,
    differentiable: bool = False,
) -> Analysis:
    """Contexts (arguments with input markers) for every input-dependent node."""
    root = graph_root(gm)
    contexts: dict[fx.Node, NodeContext] = {}
    inputs: dict[fx.Node, list[fx.Node]] = {}
    order: list[fx.Node] = []
    pieces: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node not in probe.variable:
            continue
        order.append(node)
        if node is input_node:
            continue
        contexts[node], inputs[node] = _node_context(
            node, root, probe, dtype, device, differentiable
        )
        # getitem on a split/chunk: a projection onto one piece.
        parent = inputs[node][0] if inputs[node] else None
        if (
            node.target is operator.getitem
            and parent is not None
            and splits_into_pieces(parent, parent.target)
        ):
            pieces.add(node)
    return Analysis(
        graph=gm.graph,
        root=root,
        input_node=input_node,
        output_node=probe.output,
        specs={},
        contexts=contexts,
        shapes=probe.shapes,
        order=order,
        inputs=inputs,
        input_shape=input_shape,
        dtype=dtype,
        device=device,
        labels=readable_labels(order),
        pieces=pieces,
        model_name=type(model).__name__,
    )


def _clean_path(path: str) -> str:
    return path.replace("._orig_mod", "").replace("_orig_mod.", "")  # torch.compile


def _enclosing_module(node: fx.Node) -> str:
    """Path of the module whose ``forward`` made the call (fx's ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack") or {}
    return _clean_path(next(reversed(stack.values()))[0]) if stack else ""


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def readable_labels(nodes: list[fx.Node]) -> dict[fx.Node, str]:
    """Unique readable labels of ``nodes`` (the format is described in :meth:`Analysis.label`)."""
    calls = [n for n in nodes if n.op in ("call_module", "call_function", "call_method")]
    modules = {n for n in calls if n.op == "call_module"}
    paths = {n: _clean_path(str(n.target)) if n in modules else _enclosing_module(n) for n in calls}
    groups: dict[tuple[str, str | None], list[fx.Node]] = {}
    for n in calls:
        groups.setdefault((paths[n], None if n in modules else _op_name(n)), []).append(n)
    labels: dict[fx.Node, str] = {}
    for (path, op), members in groups.items():
        for k, n in enumerate(members, start=1):
            count = f"#{k}" if len(members) > 1 else ""
            if op is None:
                labels[n] = f"{path}{count}"
            else:
                labels[n] = f"{path} ({op}{count})" if path else f"{op}{count}"
    # A top-level op may share its name with a module or the input: keep labels unique.
    taken = {n.name for n in nodes if n not in labels}
    for n in calls:
        if labels[n] in taken:
            labels[n] = f"{labels[n]} [{n.name}]"
        taken.add(labels[n])
    return labels


def _what(node: fx.Node, target: Any) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(target).__name__})"
    if node.op == "call_method":
        return f"method .{target}()"
    return f"function {getattr(target, '__name__', repr(target))}"


@dataclass(frozen=True)
class _Refusal:
    """One refused node: what it is, why, and whether a user rule could make sense."""

    node: fx.Node
    target: Any
    reason: str
    ruleable: bool

    @property
    def kind(self) -> tuple[str, str]:
        """Nodes of the same op refused for the same reason are reported together."""
        name = type(self.target).__name__ if self.node.op == "call_module" else str(self.target)
        return (f"{self.node.op}:{name}", self.reason)


def _describe_missing_rule(node: fx.Node, target: Any) -> _Refusal:
    """Why a node has no rule, and whether registering one could make sense."""
    hint = refusal_hint(target)
    if hint is not None:
        return _Refusal(node, target, hint, False)
    if node.op == "call_module" and (overrides := overriding_methods(target)):
        return _Refusal(
            node,
            target,
            f"it overrides {overrides} of a class lipreg has a rule for, so that rule does "
            "not apply, and torch.fx could not trace into it. Make it traceable or register "
            "a rule for this class.",
            True,
        )
    return _Refusal(node, target, "no rule registered", True)


def _unsupported_message(model_name: str, unsupported: list[_Refusal]) -> str:
    groups: dict[tuple[str, str], list[_Refusal]] = {}
    for refusal in unsupported:
        groups.setdefault(refusal.kind, []).append(refusal)
    lines = []
    for (_, reason), members in groups.items():
        first = members[0]
        where = f"{_what(first.node, first.target)} at node {first.node.name!r}"
        if len(members) > 1:
            others = [m.node.name for m in members[1:]]
            shown = ", ".join(repr(n) for n in others[:5]) + (", ..." if len(others) > 5 else "")
            where += f" (and {len(others)} more of the same kind: {shown})"
        lines.append(f"  - {where}: {reason}")
    message = f"lipreg cannot bound {len(unsupported)} node(s) of {model_name}:\n" + "\n".join(
        lines
    )
    if any(r.ruleable for r in unsupported):
        message += (
            "\nFor an op that IS globally Lipschitz, add a rule with "
            "lipreg.register_rule(target, rule), e.g. "
            "lipreg.register_rule(MyActivation, lipreg.Elementwise(0.0, 1.0)) for an "
            "activation with slopes in [0, 1], or a function returning lipreg.Affine(...) / "
            "lipreg.Nonlinear(constant) (see lipreg.functional.rules)."
        )
    return message
