"""Tracing a network into a graph of Lipschitz specs.

:func:`analyse` traces ``model`` with ``torch.fx``, runs one probe pass (batch of 2 zeros, with
*evaluation* semantics: BatchNorm uses running statistics, dropout is the identity) without
touching the model — no mode switch, no hooks fired, no buffer update, no global RNG — and
assigns to every input-dependent node the spec returned by its rule
(:mod:`lipreg.functional.rules`). Every node without a rule is collected, and one
:class:`UnsupportedOperationError` lists them all.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from lipreg.functional.rules import (
    NOT_LIPSCHITZ_HINTS,
    Affine,
    Combine,
    Elementwise,
    NodeContext,
    Nonlinear,
    Spec,
    UnsupportedNodeError,
    _Var,
    has_module_rule,
    lookup_rule,
)

__all__ = [
    "Analysis",
    "TraceError",
    "UnsupportedOperationError",
    "analyse",
    "check_finite_parameters",
    "check_input_shape",
    "eval_function",
    "trace",
]


class _Attr:
    """A parameter or buffer read by a ``get_attr`` node, resolved at every refresh."""

    __slots__ = ("target",)

    def __init__(self, target: str) -> None:
        self.target = target


class UnsupportedOperationError(TypeError):
    """The network contains operations lipreg has no Lipschitz rule for."""


class TraceError(TypeError):
    """``torch.fx`` could not trace the network."""


_DROPOUT_FUNCTIONS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
}
_DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_PROBE_BATCH = 2


def check_input_shape(input_shape: Any) -> tuple[int, ...]:
    """Validate ``input_shape``: the shape of ONE input, without the batch dimension."""
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    if (
        not isinstance(input_shape, Sequence)
        or len(input_shape) == 0
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_shape)
    ):
        raise ValueError(
            "input_shape must be a non-empty tuple of positive ints giving the shape of ONE "
            f"input without the batch dimension, e.g. (1, 28, 28); got {input_shape!r}."
        )
    return tuple(int(s) for s in input_shape)


def check_finite_parameters(model: nn.Module) -> None:
    """Raise if any floating parameter or buffer holds NaN or Inf."""
    named = [
        (name, t)
        for name, t in list(model.named_parameters()) + list(model.named_buffers())
        if t is not None and t.is_floating_point() and t.numel()
    ]
    if not named:
        return
    with torch.no_grad():  # one device sync for all tensors (this runs at every estimate)
        finite = torch.stack([torch.isfinite(t).all().to(named[0][1].device) for _, t in named])
    if bool(finite.all()):
        return
    bad = [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]
    if bad:
        raise ValueError(
            f"the model has non-finite (NaN/Inf) values in {bad}: no Lipschitz bound exists "
            "for such weights. Check the training run that produced them (learning rate, "
            "loss scaling) or reload a valid checkpoint."
        )


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

    def _materialise(self, ctx: NodeContext) -> None:
        """Constant arguments as the rules see them: parameters read from the live model
        now, floating tensors cast to the compute dtype (detached unless differentiable)."""

        def load(a: Any) -> Any:
            if isinstance(a, _Attr):
                a = _resolve(self.root, a.target)
            if isinstance(a, Tensor) and a.is_floating_point():
                a = a.to(dtype=ctx.dtype, device=ctx.device)
                return a if ctx.differentiable else a.detach()
            return a

        raw_args, raw_kwargs = ctx.meta["raw"]
        ctx.args = tuple(fx.node.map_aggregate(raw_args, load))
        ctx.kwargs = dict(fx.node.map_aggregate(raw_kwargs, load))

    def refresh_specs(self) -> None:
        """(Re)apply every node's rule, reading the current parameters.

        Cheap (no forward pass except for generic affine offsets): the penalty calls it at
        every step so that its closures see the current weights, with autograd.
        """
        specs: dict[fx.Node, Spec] = {}
        unsupported: list[str] = []
        for node, ctx in self.contexts.items():
            self._materialise(ctx)
            if node in self.pieces:
                specs[node] = Nonlinear(1.0, "one piece of a split")
                continue
            rule = lookup_rule(node, ctx.target)
            if rule is None:
                unsupported.append(_describe_unsupported(node, ctx.target, None))
                continue
            try:
                specs[node] = rule(ctx)
            except UnsupportedNodeError as exc:
                unsupported.append(_describe_unsupported(node, ctx.target, str(exc)))
        if unsupported:
            lines = "\n".join(f"  - {u}" for u in unsupported)
            raise UnsupportedOperationError(
                f"lipreg has no Lipschitz rule for {len(unsupported)} node(s) of "
                f"{self.model_name}:\n{lines}\n"
                "Add one with lipreg.register_rule(target, rule), e.g. "
                "lipreg.register_rule(MyActivation, lipreg.Elementwise(0.0, 1.0)) for an "
                "activation with slopes in [0, 1], or a function returning lipreg.Affine(...) "
                "/ lipreg.Nonlinear(constant) (see lipreg.functional.rules)."
            )
        self.specs = specs

    def users(self, node: fx.Node) -> list[fx.Node]:
        """Input-dependent users of ``node`` (the output node excluded)."""
        return [u for u in node.users if u in self.specs]

    def is_output(self, node: fx.Node) -> bool:
        return node is self.output_node

    def label(self, node: fx.Node) -> str:
        """A unique readable name: the module path for ``call_module`` (with ``#k`` for the
        k-th call of a module called several times), else the node name."""
        return self.labels.get(node, node.name)


class _Tracer(fx.Tracer):
    """fx tracer that (i) keeps modules with a registered lipreg rule as leaves, so that
    ``register_rule(MyModule, ...)`` works for user modules, and (ii) never runs forward hooks
    while tracing (they would receive fx proxies; lipreg bounds ``forward`` only)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return has_module_rule(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        return super().call_module(m, m.forward, args, kwargs)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` (falls back to a module chain for ``nn.Sequential``).

    A model that is itself a leaf with a rule (a bare ``nn.Conv2d``, say) is traced as a
    one-module graph so that its rule, and its certificate, apply.
    """
    _warn_about_hooks(model)
    if has_module_rule(model):
        return _with_root(_sequential_graph(nn.Sequential(model)), nn.Sequential(model))
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return _with_root(fx.GraphModule(tracer.root, graph, type(model).__name__), model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        if isinstance(model, nn.Sequential):
            return _with_root(_sequential_graph(model), model)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "lipreg needs a static graph of tensor operations. Common causes: control flow "
            "that depends on tensor values (if/for on x), calls into non-torch libraries, or "
            "modules that are not registered as submodules. Rewrite forward() accordingly, or "
            "express the network as an nn.Sequential of modules, which lipreg walks without fx."
        ) from exc


def _with_root(gm: fx.GraphModule, root: nn.Module) -> fx.GraphModule:
    # GraphModule copies attribute references at construction; parameters replaced later
    # (load_state_dict(assign=True), torch.func.functional_call) must be read from the live
    # model, so remember it (unregistered: not a submodule).
    object.__setattr__(gm, "_lipreg_root", root)
    return gm


def _resolve(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def _warn_about_hooks(model: nn.Module) -> None:
    hooked = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    ]
    if hooked:
        warnings.warn(
            f"modules {hooked} have forward hooks; lipreg neither runs nor models hooks (it "
            "bounds each module's forward()). If a hook changes outputs, the bound does not "
            "account for it.",
            stacklevel=3,
        )


def _sequential_graph(model: nn.Sequential) -> fx.GraphModule:
    """Fallback for an untraceable nn.Sequential: a chain of call_module nodes."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    for name, _ in model.named_children():
        x = graph.call_module(name, (x,))
    graph.output(x)
    return fx.GraphModule(model, graph)


def _eval_call_module(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Evaluate a leaf module with eval semantics and without firing its hooks."""
    if isinstance(module, _DROPOUT_MODULES):
        return args[0]
    if isinstance(module, nn.RReLU):  # random slopes in training mode
        return F.rrelu(args[0], module.lower, module.upper, training=False)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        use_batch = module.running_mean is None  # rejected by the BatchNorm rule
        return F.batch_norm(
            args[0],
            module.running_mean,
            module.running_var,
            module.weight,
            module.bias,
            use_batch,
            0.0,
            module.eps,
        )
    return module.forward(*args, **kwargs)


def _eval_call_function(target: Any, args: tuple, kwargs: dict) -> Any:
    if target in _DROPOUT_FUNCTIONS:
        return args[0] if args else kwargs["input"]
    if target is F.rrelu:
        kwargs = {**kwargs, "training": False}
    if target is F.batch_norm:
        kwargs = dict(kwargs)
        if len(args) > 5:
            args = (*args[:5], False, *args[6:])
        else:
            kwargs["training"] = False
    return target(*args, **kwargs)


def _cuda_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _per_sample_shape(value: Any, node: fx.Node) -> tuple[int, ...] | None:
    if isinstance(value, Tensor):
        if value.ndim == 0 or value.shape[0] != _PROBE_BATCH:
            raise ValueError(
                f"node {node.format_node()} produces a tensor of shape {tuple(value.shape)} from "
                f"a batch of {_PROBE_BATCH} inputs: it mixes samples of the batch (for example "
                "x.view(-1) or x.sum() over all dimensions). A Lipschitz constant is defined "
                "for a per-sample function: keep the batch dimension first and separate."
            )
        return tuple(value.shape[1:])
    return None


def _is_tensor_like(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    return (
        isinstance(value, tuple | list)
        and len(value) > 0
        and all(isinstance(v, Tensor) for v in value)
    )


def analyse(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    traced: fx.GraphModule | None = None,
    differentiable: bool = False,
) -> Analysis:
    """Trace ``model`` and attach a Lipschitz spec to every input-dependent node.

    ``traced`` reuses a graph from :func:`trace` (the probe pass and the rules still run, so
    that every spec reads the current weights). ``differentiable=True`` keeps parameters
    attached to autograd in every spec (for :class:`lipreg.LipschitzPenalty`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    input_shape = check_input_shape(input_shape)
    if isinstance(model, nn.Sequential) and len(model) == 0:
        raise ValueError("the model is an empty nn.Sequential: there is nothing to bound.")
    check_finite_parameters(model)
    first = next(iter(list(model.parameters()) + list(model.buffers())), None)
    device = first.device if first is not None else torch.device("cpu")
    probe_dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    gm = traced if traced is not None else trace(model)
    root: nn.Module = getattr(gm, "_lipreg_root", gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise TypeError(
            f"the model's forward takes {len(placeholders)} inputs "
            f"({[p.name for p in placeholders]}); lipreg bounds functions of ONE tensor input."
        )
    values: dict[fx.Node, Any] = {}
    variable: set[fx.Node] = set()
    shapes: dict[fx.Node, tuple[int, ...]] = {}
    output_node: fx.Node | None = None
    x0 = torch.zeros(_PROBE_BATCH, *input_shape, dtype=probe_dtype, device=device)

    def load(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: values[n])

    # fork_rng: a safety net, so that no op of the model can consume the global RNG.
    with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices(device)):
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                values[node] = x0
                variable.add(node)
                shapes[node] = input_shape
                continue
            if node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node) or not isinstance(values.get(out), Tensor):
                    kind = (
                        type(values.get(out, out)).__name__
                        if isinstance(out, fx.Node)
                        else (type(out).__name__)
                    )
                    raise TypeError(
                        f"the model's output is a {kind}, not a tensor: lipreg bounds maps "
                        "from one tensor to one tensor. Wrap the model so that forward() "
                        "returns the tensor to bound (e.g. lambda: model(x)[0] in a module)."
                    )
                output_node = out
                continue
            args, kwargs = load(node.args), load(node.kwargs)
            try:
                if node.op == "get_attr":
                    values[node] = _resolve(root, node.target)
                    continue
                if node.op == "call_module":
                    values[node] = _eval_call_module(root.get_submodule(node.target), args, kwargs)
                elif node.op == "call_method":
                    self_obj, *rest = args
                    values[node] = getattr(self_obj, node.target)(*rest, **kwargs)
                else:
                    values[node] = _eval_call_function(node.target, args, kwargs)
            except Exception as exc:
                raise RuntimeError(
                    f"evaluating {node.format_node()} on an input of shape "
                    f"{(_PROBE_BATCH, *input_shape)} failed: {type(exc).__name__}: {exc}. "
                    "Is input_shape right (one sample, no batch dimension)?"
                ) from exc
            depends = any(n in variable for n in node.all_input_nodes)
            if depends and _is_tensor_like(values[node]):
                variable.add(node)
                shape = _per_sample_shape(values[node], node)
                if shape is not None:
                    shapes[node] = shape
    if output_node is None:
        raise TypeError("the traced graph has no output node.")

    contexts: dict[fx.Node, NodeContext] = {}
    inputs: dict[fx.Node, list[fx.Node]] = {}
    order: list[fx.Node] = []
    pieces: set[fx.Node] = set()
    input_node = placeholders[0]
    if differentiable:
        derived = [
            n.name
            for n in gm.graph.nodes
            if n.op.startswith("call") and n not in variable and isinstance(values.get(n), Tensor)
        ]
        if derived:
            raise ValueError(
                f"nodes {derived} compute tensors from parameters inside forward() (e.g. a "
                "weight normalisation); a differentiable penalty would see them frozen at "
                "their first value. Compute them in a module (parametrizations are fine) or "
                "use the estimators, which re-read them at every call."
            )

    for node in gm.graph.nodes:
        if node not in variable:
            continue
        order.append(node)
        if node.op == "placeholder":
            continue
        var_inputs: list[fx.Node] = []

        def mark(a: Any, _vi: list = var_inputs) -> Any:
            if isinstance(a, fx.Node):
                if a in variable:
                    _vi.append(a)
                    return _Var(len(_vi) - 1)
                if a.op == "get_attr":  # re-read at every refresh (see _with_root)
                    return _Attr(a.target)
                return values[a]
            return a

        args = fx.node.map_aggregate(node.args, mark)
        kwargs = fx.node.map_aggregate(node.kwargs, mark)
        inputs[node] = var_inputs
        target = root.get_submodule(node.target) if node.op == "call_module" else node.target
        contexts[node] = NodeContext(
            node=node,
            target=target,
            args=tuple(args),
            kwargs=dict(kwargs),
            n_inputs=len(var_inputs),
            in_shapes=[shapes.get(n, ()) for n in var_inputs],
            out_shape=shapes.get(node),
            dtype=dtype,
            device=device,
            differentiable=differentiable,
        )
        # getitem on a tuple-valued node (split/chunk): a projection of one piece.
        if (
            node.op == "call_function"
            and node.target is operator.getitem
            and isinstance(values[var_inputs[0]], tuple | list)
        ):
            pieces.add(node)
    for ctx in contexts.values():
        ctx.meta["raw"] = (ctx.args, ctx.kwargs)
    analysis = Analysis(
        graph=gm.graph,
        root=root,
        input_node=input_node,
        output_node=output_node,
        specs={},
        contexts=contexts,
        shapes=shapes,
        order=order,
        inputs=inputs,
        input_shape=input_shape,
        dtype=dtype,
        device=device,
        labels=_unique_labels(order),
        pieces=pieces,
        model_name=type(model).__name__,
    )
    analysis.refresh_specs()
    return analysis


def _unique_labels(nodes: list[fx.Node]) -> dict[fx.Node, str]:
    calls: dict[str, list[fx.Node]] = {}
    for n in nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    labels: dict[fx.Node, str] = {}
    for target, ns in calls.items():
        for k, n in enumerate(ns, start=1):
            labels[n] = target if len(ns) == 1 else f"{target}#{k}"
    return labels


def _describe_unsupported(node: fx.Node, target: Any, reason: str | None) -> str:
    if node.op == "call_module":
        what = f"module {node.target!r} ({type(target).__name__})"
        key = type(target).__name__
    elif node.op == "call_method":
        what = f"method .{target}()"
        key = str(target)
    else:
        name = getattr(target, "__name__", repr(target))
        what = f"function {name}"
        key = name
    if reason is None:
        reason = NOT_LIPSCHITZ_HINTS.get(
            key.replace("1d", "").replace("2d", "").replace("3d", ""), "no rule registered"
        )
    return f"{what} at node {node.name!r} [{node.format_node()}]: {reason}"


def node_lipschitz(spec: Spec) -> float:
    """Lipschitz constant of a single-input non-affine spec."""
    if isinstance(spec, Elementwise):
        return spec.lipschitz
    if isinstance(spec, Nonlinear):
        return spec.lipschitz
    raise TypeError(f"no scalar constant for {spec!r}")


def combine(spec: Combine, parent_values: list[float]) -> float:
    if spec.mode == "sum":
        weights = spec.weights or (1.0,) * len(parent_values)
        return sum(abs(w) * v for w, v in zip(weights, parent_values, strict=True))
    if spec.mode == "l2":
        return math.sqrt(sum(v * v for v in parent_values))
    raise ValueError(f"unknown Combine mode {spec.mode!r}")


__all__ += ["Affine", "combine", "node_lipschitz"]


def eval_function(model: nn.Module) -> tuple[Any, str]:
    """A callable computing ``model`` in evaluation mode without touching the model.

    Traced with ``torch.fx`` and evaluated node by node with evaluation semantics (BatchNorm
    running statistics, dropout off, no hooks fired). When fx cannot trace the model, the
    fallback calls ``model`` inside a context that switches it to eval mode and restores
    every submodule's mode afterwards (forward hooks then do run); the returned string says
    which path was taken.
    """
    coupled = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
    ]
    if coupled:
        raise ValueError(
            f"BatchNorm modules {coupled} have track_running_stats=False: they normalise with "
            "batch statistics even in eval mode, so the network is not a per-sample function "
            "and has no per-sample Jacobian. Use track_running_stats=True."
        )
    try:
        tracer = _Tracer()
        gm = fx.GraphModule(model, tracer.trace(model))
    except Exception:
        return _eval_mode_call(model), "eval-mode call (fx could not trace the model)"
    nodes = list(gm.graph.nodes)
    submodules = {n.target: gm.get_submodule(n.target) for n in nodes if n.op == "call_module"}
    attrs: dict[str, Any] = {}
    for n in nodes:
        if n.op == "get_attr":
            obj: Any = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            attrs[n.target] = obj

    def run(x: Tensor) -> Any:
        env: dict[fx.Node, Any] = {}
        for node in nodes:
            if node.op == "placeholder":
                env[node] = x
            elif node.op == "get_attr":
                env[node] = attrs[node.target]
            elif node.op == "output":
                return fx.node.map_arg(node.args[0], lambda n: env[n])
            else:
                args = fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                if node.op == "call_module":
                    env[node] = _eval_call_module(submodules[node.target], args, kwargs)
                elif node.op == "call_method":
                    self_obj, *rest = args
                    env[node] = getattr(self_obj, node.target)(*rest, **kwargs)
                else:
                    env[node] = _eval_call_function(node.target, args, kwargs)
        raise RuntimeError("graph without output")

    return run, "fx"


def _eval_mode_call(model: nn.Module) -> Any:
    def run(x: Tensor) -> Any:
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            return model(x)
        finally:
            for m, mode in modes:
                m.training = mode

    return run
