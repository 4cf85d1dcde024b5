"""Tracing a network into a graph of Lipschitz specs.

:func:`analyse` traces ``model`` with ``torch.fx`` and runs two probe passes, both with
*evaluation semantics*: every submodule's ``training`` flag is off while tracing and probing
(so ``if self.training:`` branches, dropout, BatchNorm statistics and parametrizations such as
``spectral_norm`` behave as in ``model.eval()``), no hook fires, the global RNG is untouched,
and every flag and buffer is restored exactly afterwards. It then assigns to every
input-dependent node the spec returned by its rule (:mod:`lipreg.functional.rules`).

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
import math
import operator
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from lipreg.functional.evaluation import call_target, evaluation_mode
from lipreg.functional.rules import (
    Affine,
    Combine,
    Elementwise,
    InputArg,
    NodeContext,
    Nonlinear,
    Spec,
    UnsupportedNodeError,
    has_module_rule,
    lookup_rule,
    overriding_methods,
    refusal_hint,
    splits_into_pieces,
)

__all__ = [
    "Analysis",
    "TraceError",
    "UnsupportedOperationError",
    "all_finite",
    "analyse",
    "check_finite_parameters",
    "check_input_shape",
    "eval_function",
    "evaluation_mode",
    "has_forward",
    "sub_networks",
    "trace",
    "unwrap_compiled",
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


_PROBE_BATCH = 2
# Ops that read only a tensor's metadata: their results do not depend on the input's values.
_SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "get_device"})
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The eager module behind ``torch.compile(module)`` (compiling does not change the
    function, and lipreg traces Python code, not compiled kernels)."""
    while type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod"):
        module = module._orig_mod
    return module


def has_forward(model: nn.Module) -> bool:
    """Whether some class of ``model`` below the framework base classes defines forward()."""
    for cls in type(model).__mro__:
        if "forward" in vars(cls):
            base = cls is nn.Module or cls.__module__.startswith(
                ("lightning.pytorch.core", "pytorch_lightning.core")
            )
            return not base
    return False


def sub_networks(model: nn.Module) -> list[str]:
    """Names of ``model``'s direct children that have parameters and a forward()."""
    return [
        name
        for name, child in model.named_children()
        if any(True for _ in child.parameters()) and has_forward(unwrap_compiled(child))
    ]


def check_has_forward(model: nn.Module) -> None:
    """Raise :class:`TraceError` with the sub-networks to choose from when ``model`` has no
    ``forward`` of its own (an autoencoder or a GAN written as a LightningModule)."""
    if has_forward(model):
        return
    subs = sub_networks(model)
    pick = subs[0] if subs else "net"
    raise TraceError(
        f"{type(model).__name__} has no forward(): there is no single function of the input "
        f"to bound. Its sub-networks are {subs}; bound one of them, e.g. "
        f"lipreg.autolip(model.{pick}, input_shape), or LipschitzCallback(model_attr={pick!r})."
    )


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


_FINITE_CHUNK = 2**22  # elements per isfinite() call: a 4 MiB mask, whatever the tensor


def all_finite(t: Tensor) -> Tensor:
    """``torch.isfinite(t).all()`` as a 0-dim bool tensor, checked chunk by chunk so that a
    large weight never needs a full-size mask (no host sync)."""
    with torch.no_grad():
        flat = t.detach().reshape(-1)
        if flat.numel() <= _FINITE_CHUNK:
            return torch.isfinite(flat).all()
        return torch.stack([torch.isfinite(c).all() for c in flat.split(_FINITE_CHUNK)]).all()


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
        finite = torch.stack([all_finite(t).to(named[0][1].device) for _, t in named])
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
    refusals: dict[fx.Node, str] = field(default_factory=dict)

    def _materialise(self, ctx: NodeContext) -> None:
        """Constant arguments as the rules see them: parameters read from the live model
        now, floating tensors cast to the compute dtype (detached unless differentiable)."""

        def load(a: Any) -> Any:
            if isinstance(a, _Attr):
                a = _resolve_attr(self.graph.owning_module, self.root, a.target)
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
        unsupported: list[_Refusal] = []
        with evaluation_mode(self.root, restore_buffers=False):
            for node, ctx in self.contexts.items():
                self._materialise(ctx)
                if node in self.refusals:
                    unsupported.append(_Refusal(node, ctx.target, self.refusals[node], False))
                    continue
                if node in self.pieces:
                    specs[node] = Nonlinear(1.0, "one piece of a split")
                    continue
                rule = lookup_rule(node, ctx.target)
                if rule is None:
                    unsupported.append(_describe_missing_rule(node, ctx.target))
                    continue
                try:
                    specs[node] = rule(ctx)
                except UnsupportedNodeError as exc:
                    unsupported.append(_Refusal(node, ctx.target, str(exc), False))
        if unsupported:
            raise UnsupportedOperationError(_unsupported_message(self.model_name, unsupported))
        self.specs = specs

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
        other.refresh_specs()
        return other

    def users(self, node: fx.Node) -> list[fx.Node]:
        """Input-dependent users of ``node`` (the output node excluded)."""
        return [u for u in node.users if u in self.specs]

    def is_output(self, node: fx.Node) -> bool:
        return node is self.output_node

    def label(self, node: fx.Node) -> str:
        """A unique readable name: the module path for ``call_module`` (with ``#k`` for the
        k-th call of a module called several times), else the node name."""
        return self.labels.get(node, node.name)


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


class _Tracer(fx.Tracer):
    """fx tracer that (i) keeps modules whose rule binds (:func:`rules.module_rule_class`) as
    leaves, so that ``register_rule(MyModule, ...)`` works for user modules, and traces
    through every other module, including a subclass of a ruled torch module that overrides
    a method (torch's own modules without a rule stay leaves and are refused by name);
    (ii) never runs forward hooks while tracing (they would receive fx proxies; lipreg bounds
    ``forward`` only); (iii) traces the eager module behind a ``torch.compile`` wrapper."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if unwrap_compiled(m) is not m:
            return False
        if has_module_rule(m):
            return True
        if overriding_methods(m):  # a subclass of a ruled class: a different function
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        inner = unwrap_compiled(m)
        if inner is not m:
            return self.call_module(inner, inner.forward, args, kwargs)
        return super().call_module(m, m.forward, args, kwargs)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` (falls back to a module chain for ``nn.Sequential``).

    A model that is itself a leaf with a rule (a bare ``nn.Conv2d``, say) is traced as a
    one-module graph so that its rule, and its certificate, apply.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    model = unwrap_compiled(model)
    _warn_about_hooks(model)
    check_has_forward(model)
    if has_module_rule(model):
        return _with_root(_sequential_graph(nn.Sequential(model)), nn.Sequential(model))
    before = set(vars(model))
    try:
        # The graph of the evaluation-mode function: `if self.training:` branches are
        # resolved as in model.eval(); flags are restored afterwards.
        with evaluation_mode(model):
            tracer = _Tracer()
            graph = tracer.trace(model)
            gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
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
    finally:
        # fx stores constants created inside forward() as `_tensor_constant<k>` attributes of
        # the model; the GraphModule holds its own references, and the model stays untouched.
        for name in set(vars(model)) - before:
            delattr(model, name)
    return _with_root(gm, model)


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


def _resolve_attr(gm: nn.Module | None, root: nn.Module, target: str) -> Any:
    """A ``get_attr`` target, read from the live model (parameters replaced since tracing
    are seen), or from the GraphModule for constants that fx created while tracing."""
    try:
        return _resolve(root, target)
    except AttributeError:
        if gm is None:
            raise
        return _resolve(gm, target)


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


def _call_node(node: fx.Node, root: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Evaluate one node (the caller holds :func:`evaluation_mode`); module hooks never
    fire: lipreg bounds each module's ``forward``."""
    target = root.get_submodule(node.target) if node.op == "call_module" else node.target
    return call_target(node.op, target, args, kwargs)


def _cuda_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _is_shape_query(node: fx.Node) -> bool:
    """Ops that read a tensor's metadata only (their result is a constant of the input)."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function" and node.target is getattr and len(node.args) >= 2:
        return node.args[1] in _SHAPE_ATTRIBUTES
    return False


def _storage(t: Tensor) -> int | None:
    if t.numel() == 0 or t.layout != torch.strided:
        return None
    return t.untyped_storage().data_ptr()


def _type_name(value: Any) -> str:
    if isinstance(value, tuple | list):
        inner = ", ".join(type(v).__name__ for v in value)
        return f"{type(value).__name__} ({inner})"
    return type(value).__name__


@dataclass
class _Probe:
    """What one evaluation of the graph on a probe batch shows."""

    values: dict[fx.Node, Any] = field(default_factory=dict)
    variable: set[fx.Node] = field(default_factory=set)
    shapes: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)
    samples: dict[fx.Node, Tensor] = field(default_factory=dict)
    refusals: dict[fx.Node, str] = field(default_factory=dict)
    nonfinite_constants: list[str] = field(default_factory=list)
    nonfinite_values: list[str] = field(default_factory=list)
    output: fx.Node | None = None


def _input_placeholder(gm: fx.GraphModule) -> fx.Node:
    """The one input; further parameters of forward() must have defaults."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [p.target for p in placeholders[1:] if not p.args]
    if not placeholders or required:
        names = [p.target for p in placeholders]
        raise TraceError(
            f"the model's forward takes {len(placeholders)} inputs {names}; lipreg bounds a "
            "function of ONE tensor input. Bound a one-input sub-network "
            "(LipschitzCallback(model_attr=...), or lipreg.autolip(model.encoder, ...)), or "
            "wrap the model so that the other inputs are fixed, e.g. "
            "class Wrapped(nn.Module): def forward(self, x): return model(x, y_fixed)."
        )
    return placeholders[0]


def _functionalise_inplace(
    node: fx.Node,
    value: Any,
    mutated: list[Tensor],
    probe: _Probe,
    holders_of: dict[int, list[fx.Node]],
    position: dict[fx.Node, int],
    model_state: set[int],
) -> str | None:
    """Rewire an in-place update at ``node`` into its out-of-place reading, or say why not.

    The graph says that every reader of a value sees it as it was computed. After
    ``y.mul_(4)`` the model's later readers of ``y`` see the updated tensor, so their
    argument is rewired from ``y``'s node to the update's node (which returns that very
    tensor): the graph then states what the model computes. This is refused when a *view*
    of the old tensor is read afterwards (it cannot be rewired to the update's result), when
    the op does not return the tensor it updated, or when input-dependent data is written into
    a tensor the analysis treats as constant (model parameters and buffers included).
    """
    writes_input = node in probe.variable
    for t in mutated:
        storage = _storage(t)
        if storage is None:
            continue
        if writes_input and storage in model_state:
            return (
                "writes an input-dependent value in place into the model's own parameters or "
                "buffers: the function would change from call to call."
            )
        holders = holders_of.get(storage, [])
        constant = [h.name for h in holders if h not in probe.variable]
        if writes_input and constant:
            return (
                f"writes an input-dependent value in place into {constant}, which the graph "
                "treats as constant. Build the tensor out of place (torch.cat, torch.where)."
            )
        for holder in holders:
            late = [u for u in holder.users if u is not node and position[u] > position[node]]
            if not late:
                continue
            if probe.values[holder] is not t or value is not t:
                return (
                    f"updates a tensor in place while {sorted(u.name for u in late)} still "
                    f"read it through a view ({holder.name!r}) that cannot be rewired to the "
                    "update's result. Use the out-of-place op (a = a + g(x))."
                )
            holder.replace_all_uses_with(
                node, delete_user_cb=lambda u, _n=node: u is not _n and position[u] > position[_n]
            )
    return None


def _run_probe(gm: fx.GraphModule, root: nn.Module, input_node: fx.Node, x: Tensor) -> _Probe:
    """Evaluate the graph node by node on the probe batch ``x`` (caller: eval mode, no_grad)."""
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    model_state = {_storage(t) for t in [*root.parameters(), *root.buffers()]} - {None}
    probe = _Probe()
    holders_of: dict[int, list[fx.Node]] = {}
    for node in nodes:
        mutated: list[Tensor] = []
        if node.op == "output":
            probe.output = _output_node(node, probe.values)
            continue
        if node.op == "placeholder":
            value = x if node is input_node else node.args[0]
        elif node.op == "get_attr":
            value = _resolve_attr(gm, root, node.target)
        else:
            args = fx.node.map_arg(node.args, lambda n: probe.values[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: probe.values[n])
            tensors = _tensors_in((args, kwargs))
            versions = [_version(t) for t in tensors]
            try:
                value = _call_node(node, root, args, kwargs)
            except Exception as exc:
                raise RuntimeError(
                    f"evaluating {node.format_node()} on an input of shape {tuple(x.shape)} "
                    f"failed: {type(exc).__name__}: {exc}. Is input_shape right (one sample, "
                    "no batch dimension)?"
                ) from exc
            mutated = [t for t, v in zip(tensors, versions, strict=True) if _version(t) != v]
        probe.values[node] = value
        _classify(node, value, input_node, probe)
        if mutated:
            problem = _functionalise_inplace(
                node, value, mutated, probe, holders_of, position, model_state
            )
            if problem:
                probe.refusals[node] = problem
        if _is_t(value) and (storage := _storage(value)) is not None:
            holders_of.setdefault(storage, []).append(node)
    return probe


def _tensors_in(values: Any) -> list[Tensor]:
    """The tensors inside nested tuples, lists and dicts of arguments."""
    found: list[Tensor] = []
    fx.node.map_aggregate(values, lambda a: found.append(a) if _is_t(a) else None)
    return found


def _version(t: Tensor) -> int | None:
    """A tensor's in-place update counter (inference tensors have none)."""
    return None if t.is_inference() else t._version


def _is_t(value: Any) -> bool:
    return isinstance(value, Tensor)


def _classify(node: fx.Node, value: Any, input_node: fx.Node, probe: _Probe) -> None:
    """Record whether ``node`` depends on the input, its per-sample shape, the first
    sample's value (for the batch-mixing check) and non-finite values."""
    depends = node is input_node or (
        any(n in probe.variable for n in node.all_input_nodes) and not _is_shape_query(node)
    )
    finite = not (_is_t(value) and value.is_floating_point()) or bool(all_finite(value))
    if not depends:
        if not finite:
            probe.nonfinite_constants.append(str(node.target if node.op == "get_attr" else node))
        return
    probe.variable.add(node)
    if not finite:
        probe.nonfinite_values.append(node.name)
    if type(value) is not Tensor:
        return
    if value.ndim == 0 or value.shape[0] != _PROBE_BATCH:
        probe.refusals[node] = (
            f"produces a tensor of shape {tuple(value.shape)} from a batch of {_PROBE_BATCH} "
            "inputs: it mixes the samples of the batch (e.g. x.view(-1), x.sum() over all "
            "dimensions). A Lipschitz constant is defined for a per-sample function: keep the "
            "batch dimension first and separate."
        )
        return
    probe.shapes[node] = tuple(value.shape[1:])
    probe.samples[node] = value.detach().clone()  # later in-place updates must not show


def _output_node(node: fx.Node, values: dict[fx.Node, Any]) -> fx.Node:
    out = node.args[0]
    if isinstance(out, fx.Node) and type(values.get(out)) is Tensor:
        return out
    kind = _type_name(values.get(out)) if isinstance(out, fx.Node) else _type_name(out)
    raise TypeError(
        f"the model's output is a {kind}, not a tensor: lipreg bounds maps from one tensor to "
        "one tensor. Wrap the model so that forward() returns the tensor to bound, e.g. "
        "class Logits(nn.Module): def forward(self, x): return model(x)[0]."
    )


def _first_mixing_node(order: list[fx.Node], a: _Probe, b: _Probe, kept: int) -> fx.Node | None:
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


def _consumer_refusal(node: fx.Node, probe: _Probe, target: Any) -> str | None:
    """Deny by default on value types: a node may consume only plain tensors from the input
    side, except a getitem taking one piece of a split/chunk/unbind."""
    if node.op == "call_method":
        self_value = probe.values.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if type(self_value) not in (Tensor, nn.Parameter):
            return (
                f"calls .{target}() on a {_type_name(self_value)}; lipreg's method rules are "
                "proven for plain torch.Tensor only."
            )
    for parent in node.all_input_nodes:
        if parent not in probe.variable or type(probe.values[parent]) is Tensor:
            continue
        if node.target is operator.getitem and splits_into_pieces(parent, parent.target):
            continue
        return (
            f"its input {parent.name!r} is a {_type_name(probe.values[parent])}, not a tensor: "
            "lipreg follows plain tensors (and the pieces of split/chunk/unbind) only, and "
            "cannot bound one element of another op's tuple output."
        )
    return None


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
    check_finite_parameters(model)
    first = next(iter(list(model.parameters()) + list(model.buffers())), None)
    device = first.device if first is not None else torch.device("cpu")
    probe_dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    gm = traced if traced is not None else trace(model)
    root: nn.Module = getattr(gm, "_lipreg_root", gm)
    input_node = _input_placeholder(gm)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(_PROBE_BATCH, *input_shape, generator=generator, device=device)
    # Two more batches, each sharing one sample with x: a per-sample function gives that
    # sample the same value at every node (a cumulative sum over the batch hides from one
    # of the two, a flip of the batch from neither).
    other = torch.randn(x.shape, generator=generator, device=device)
    x_new_second = torch.stack([x[0], other[1]])
    x_new_first = torch.stack([other[0], x[1]])
    # fork_rng: a safety net, so that no op of the model can consume the global RNG.
    with (
        torch.inference_mode(False),  # probe tensors must count their in-place updates
        torch.no_grad(),
        torch.random.fork_rng(devices=_cuda_devices(device)),
        evaluation_mode(root),
    ):
        probe = _run_probe(gm, root, input_node, x.to(probe_dtype))
        # Whether ops mix samples is a property of the graph, not of the weights: checked
        # once per graph and input shape (the callback's cached trace skips it afterwards).
        verified: set = gm.__dict__.setdefault("_lipreg_per_sample", set())
        others = []
        if input_shape not in verified:
            same_first = _run_probe(gm, root, input_node, x_new_second.to(probe_dtype))
            same_second = _run_probe(gm, root, input_node, x_new_first.to(probe_dtype))
            others = [(same_first, 0), (same_second, 1)]
    if probe.output is None:
        raise TypeError("the traced graph has no output node.")
    if probe.nonfinite_constants:
        raise ValueError(
            f"the model has non-finite (NaN/Inf) tensor attributes or constants "
            f"{probe.nonfinite_constants}: no Lipschitz bound exists for them. Check how they "
            "are computed, or reload a valid checkpoint."
        )
    if not probe.nonfinite_values:  # non-finite values are reported below
        _check_graph_reproduces_model(model, gm, probe.values[probe.output], x.to(probe_dtype))
    analysis = _build_analysis(
        model, gm, root, input_node, input_shape, probe, dtype, device, differentiable
    )
    analysis.refusals.update({n: r for n, r in probe.refusals.items() if n in analysis.contexts})
    for node, ctx in analysis.contexts.items():
        reason = _consumer_refusal(node, probe, ctx.target)
        if reason and node not in analysis.refusals:
            analysis.refusals[node] = reason
    _refuse_first_mixing_node(analysis, probe, others)
    if differentiable:
        _check_no_parameter_math(gm, probe)
    analysis.refresh_specs()
    verified.add(input_shape)  # reached only when nothing was refused
    if probe.nonfinite_values:
        raise ValueError(
            f"non-finite (NaN/Inf) intermediate values at nodes {probe.nonfinite_values} on a "
            "random probe input: the network does not compute a finite function there, so no "
            "Lipschitz bound is reported. Check the weights and constants used by forward()."
        )
    return analysis


@contextlib.contextmanager
def _hooks_disabled(model: nn.Module) -> Iterator[None]:
    """Run a block without the modules' forward hooks (lipreg bounds ``forward`` only)."""
    saved = [(m, m._forward_hooks, m._forward_pre_hooks) for m in model.modules()]
    try:
        for m, _, _ in saved:
            m._forward_hooks, m._forward_pre_hooks = (
                type(m._forward_hooks)(),
                type(m._forward_pre_hooks)(),
            )
        yield
    finally:
        for m, hooks, pre_hooks in saved:
            m._forward_hooks, m._forward_pre_hooks = hooks, pre_hooks


def _check_graph_reproduces_model(
    model: nn.Module, gm: fx.GraphModule, graph_output: Tensor, x: Tensor
) -> None:
    """Refuse a graph that does not compute what the model computes.

    torch.fx records ``a += b`` on a traced value as ``a = a + b``: when an alias of ``a`` is
    read afterwards (``keep = a; a += g(x); return a + keep``), the real model reads the
    updated tensor and the graph the old one. Python-side state and randomness diverge the
    same way. One forward of the model itself on the probe batch (evaluation mode, hooks
    off, compiled code run eagerly) catches all of them.
    """
    if not isinstance(getattr(gm, "_lipreg_root", None), type(model)):
        return  # a one-module graph around a ruled leaf: the graph is the module's call
    stance = getattr(torch.compiler, "set_stance", None)
    eager = stance("force_eager") if stance is not None else contextlib.nullcontext()
    with (
        torch.inference_mode(False),
        torch.no_grad(),
        torch.random.fork_rng(devices=_cuda_devices(x.device)),
        evaluation_mode(model),
        _hooks_disabled(model),
        eager,
    ):
        actual = model.forward(x)
    if type(actual) is not Tensor or actual.shape != graph_output.shape:
        found = tuple(actual.shape) if isinstance(actual, Tensor) else _type_name(actual)
        raise TraceError(
            f"the traced graph of {type(model).__name__} returns shape "
            f"{tuple(graph_output.shape)} but the model returns {found} on the same input: "
            "forward() does something torch.fx does not record (control flow on Python state, "
            "in-place updates of aliases). Rewrite it without them."
        )
    scale = float(actual.detach().abs().max()) if actual.numel() else 0.0
    if not torch.allclose(graph_output, actual, rtol=1e-4, atol=1e-5 * (1.0 + scale)):
        raise UnsupportedOperationError(
            f"the traced graph of {type(model).__name__} does not compute what the model "
            "computes on the same input (largest difference "
            f"{float((graph_output - actual).abs().max()):.3g}). torch.fx records `a += b` as "
            "`a = a + b`, so an in-place update read through an alias (`keep = a; "
            "a += g(x); return a + keep`) is mis-wired; randomness or Python-side state in "
            "forward() diverge the same way. Use out-of-place ops (a = a + g(x)) and a "
            "deterministic forward()."
        )


def _refuse_first_mixing_node(
    analysis: Analysis, probe: _Probe, others: list[tuple[_Probe, int]]
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


def _check_no_parameter_math(gm: fx.GraphModule, probe: _Probe) -> None:
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


def _build_analysis(
    model: nn.Module,
    gm: fx.GraphModule,
    root: nn.Module,
    input_node: fx.Node,
    input_shape: tuple[int, ...],
    probe: _Probe,
    dtype: torch.dtype,
    device: torch.device,
    differentiable: bool = False,
) -> Analysis:
    """Contexts (arguments with input markers) for every input-dependent node."""
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
        var_inputs: list[fx.Node] = []

        def mark(a: Any, _vi: list = var_inputs) -> Any:
            if isinstance(a, fx.Node):
                if a in probe.variable:
                    _vi.append(a)
                    return InputArg(len(_vi) - 1)
                if a.op == "get_attr":  # re-read at every refresh (see _with_root)
                    return _Attr(a.target)
                return probe.values[a]
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
            in_shapes=[probe.shapes.get(n, ()) for n in var_inputs],
            out_shape=probe.shapes.get(node),
            dtype=dtype,
            device=device,
            differentiable=differentiable,
        )
        contexts[node].meta["raw"] = (contexts[node].args, contexts[node].kwargs)
        # getitem on a split/chunk: a projection onto one piece.
        parent = var_inputs[0] if var_inputs else None
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
        labels=_unique_labels(order),
        pieces=pieces,
        model_name=type(model).__name__,
    )


def _unique_labels(nodes: list[fx.Node]) -> dict[fx.Node, str]:
    calls: dict[str, list[fx.Node]] = {}
    for n in nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    labels: dict[fx.Node, str] = {}
    for target, ns in calls.items():
        name = target.replace("._orig_mod", "").replace("_orig_mod.", "")  # torch.compile
        for k, n in enumerate(ns, start=1):
            labels[n] = name if len(ns) == 1 else f"{name}#{k}"
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
    """A callable computing ``model`` in evaluation mode without changing the model.

    The graph of :func:`trace` is evaluated node by node inside :func:`evaluation_mode`
    (BatchNorm running statistics, dropout off, training-only branches not taken, no hook
    fired, flags and buffers restored after every call). When fx cannot trace the model, the
    fallback calls ``model`` inside :func:`evaluation_mode` (forward hooks then do run); the
    returned string says which path was taken.
    """
    model = unwrap_compiled(model)
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
    check_has_forward(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the hook warning is for the upper bounds
            gm = trace(model)
    except TraceError as exc:
        return _eval_mode_call(model), f"eval-mode call (fx could not trace the model: {exc})"
    root: nn.Module = getattr(gm, "_lipreg_root", gm)
    nodes = list(gm.graph.nodes)
    input_node = _input_placeholder(gm)

    def run(x: Tensor) -> Any:
        env: dict[fx.Node, Any] = {}
        with evaluation_mode(root):
            for node in nodes:
                if node.op == "placeholder":
                    env[node] = x if node is input_node else node.args[0]
                elif node.op == "get_attr":
                    env[node] = _resolve_attr(gm, root, node.target)
                elif node.op == "output":
                    return fx.node.map_arg(node.args[0], lambda n: env[n])
                else:
                    args = fx.node.map_arg(node.args, lambda n: env[n])
                    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                    env[node] = _call_node(node, root, args, kwargs)
        raise RuntimeError("graph without output")

    return run, "fx"


def _eval_mode_call(model: nn.Module) -> Any:
    def run(x: Tensor) -> Any:
        with evaluation_mode(model):
            return model(x)

    return run
