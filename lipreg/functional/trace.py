"""Tracing a network with ``torch.fx``, and running the traced graph node by node.

:func:`trace` records the graph of the *evaluation-mode* function of a model (every
``training`` flag off while tracing, so ``if self.training:`` branches resolve as in
``model.eval()``); no forward hook runs, and the model is left untouched.

:class:`GraphInterpreter` is the one way lipreg evaluates such a graph: a
:class:`torch.fx.Interpreter` that dispatches every node through
:func:`lipreg.functional.evaluation.call_target` (a module's ``forward`` is called directly, so
module hooks never fire) and reads parameters and buffers from the live model (so a parameter
replaced after tracing, e.g. by ``load_state_dict(assign=True)``, is seen). The probes of the
analysis (:class:`lipreg.functional.probe.ProbeInterpreter`) and the lower bound's
:func:`eval_function` both run on it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from lipreg.functional.evaluation import call_target, evaluation_mode
from lipreg.functional.rules import has_module_rule, overriding_methods
from lipreg.functional.sharding import (
    agree_ok,
    check_shardable,
    is_dtensor,
    is_fsdp_hook,
    local_tensor,
)

__all__ = [
    "GraphInterpreter",
    "TraceError",
    "UnsupportedOperationError",
    "all_finite",
    "check_finite_parameters",
    "check_has_forward",
    "check_input_shape",
    "check_no_sharded_attrs",
    "eval_function",
    "graph_root",
    "has_forward",
    "input_placeholder",
    "nonfinite_names",
    "resolve_attr",
    "sub_networks",
    "trace",
    "type_name",
    "unwrap_compiled",
]


class UnsupportedOperationError(TypeError):
    """The network contains operations lipreg has no Lipschitz rule for."""


class TraceError(TypeError):
    """``torch.fx`` could not trace the network."""


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


def nonfinite_names(named: Sequence[tuple[str, Tensor]]) -> list[str]:
    """The names of the tensors of ``named`` that hold a NaN or an Inf.

    One host sync when all are finite: the per-tensor sums ``s_i = Σ t_i`` are computed on
    the device and tested together. NaN and ±Inf propagate through a sum (``Inf − Inf`` is
    NaN), so a finite ``s_i`` proves every element of ``t_i`` finite. A non-finite ``s_i``
    may also be an overflow of finite elements (or a half-precision sum): only those tensors
    then get the exact element-wise test (:func:`all_finite`), which names the culprits.
    Half-precision tensors are summed in float32 (their range overflows quickly)."""
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return []
    device = named[0][1].device
    with torch.no_grad():
        sums = torch.stack([_finite_probe_sum(t).to(device) for _, t in named])
        ok = torch.isfinite(sums)
        if bool(ok.all()):  # the one sync of the common case
            return []
        suspects = [named[i] for i in (~ok).nonzero().flatten().tolist()]
        return [name for name, t in suspects if not bool(all_finite(t))]


def _finite_probe_sum(t: Tensor) -> Tensor:
    t = t.detach()
    return t.sum(dtype=torch.float32) if t.element_size() < 4 else t.sum()


def check_finite_parameters(model: nn.Module) -> None:
    """Raise if any floating parameter or buffer holds NaN or Inf (naming them); one host
    sync when all are finite (:func:`nonfinite_names`), as this runs at every estimate.

    An FSDP2 shard (``DTensor``) is checked on this rank's part only (no hidden collective),
    then the ranks agree (:func:`lipreg.functional.sharding.agree_ok`), so that every rank
    raises when one holds a non-finite value."""
    named, shards = [], False
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is not None:
            shards = shards or is_dtensor(t)
            named.append((name, local_tensor(t)))
    bad = nonfinite_names(named)
    if shards and not agree_ok(not bad) and not bad:
        bad = ["a parameter shard held by another rank"]
    if bad:
        raise ValueError(
            f"the model has non-finite (NaN/Inf) values in {bad}: no Lipschitz bound exists "
            "for such weights. Check the training run that produced them (learning rate, "
            "loss scaling) or reload a valid checkpoint."
        )


def type_name(value: Any) -> str:
    """The type of ``value`` as a message shows it (with element types for tuples/lists)."""
    if isinstance(value, tuple | list):
        inner = ", ".join(type(v).__name__ for v in value)
        return f"{type(value).__name__} ({inner})"
    return type(value).__name__


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
    check_shardable(model)  # FSDP1 wrappers: refused with what to do (fx cannot trace them)
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


def graph_root(gm: fx.GraphModule) -> nn.Module:
    """The live model behind a graph from :func:`trace` (``gm`` itself for other graphs):
    the module whose parameters and submodules every evaluation reads."""
    return getattr(gm, "_lipreg_root", gm)


def _resolve(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def resolve_attr(gm: nn.Module | None, root: nn.Module, target: str) -> Any:
    """A ``get_attr`` target, read from the live model (parameters replaced since tracing
    are seen), or from the GraphModule for constants that fx created while tracing."""
    try:
        return _resolve(root, target)
    except AttributeError:
        if gm is None:
            raise
        return _resolve(gm, target)


def check_no_sharded_attrs(gm: fx.GraphModule) -> None:
    """Refuse a sharded parameter read by ``forward`` outside a module call (``x @ self.w``):
    the probe would compute with a shard. Modules' own parameters are gathered per call."""
    root = graph_root(gm)
    found = [
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "get_attr" and is_dtensor(resolve_attr(gm, root, str(n.target)))
    ]
    if found:
        raise NotImplementedError(
            f"forward() reads the FSDP-sharded parameters {found} directly (outside a module "
            "call); lipreg gathers sharded parameters per module call only. Hold them in a "
            "module with a rule (nn.Linear, nn.Conv2d, ...) or in a module that is not sharded."
        )


def _user_hooks(hooks: dict) -> list:
    """The hooks that are not FSDP2's own all-gather hooks (those lipreg replaces by its own
    gathers: :mod:`lipreg.functional.sharding`)."""
    return [h for h in hooks.values() if not is_fsdp_hook(h)]


def _warn_about_hooks(model: nn.Module) -> None:
    hooked = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if _user_hooks(m._forward_hooks) or _user_hooks(m._forward_pre_hooks)
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


def input_placeholder(gm: fx.GraphModule) -> fx.Node:
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


class GraphInterpreter(fx.Interpreter):
    """Evaluates a graph from :func:`trace` node by node, as lipreg defines the network.

    ``run(x)`` feeds ``x`` to the input placeholder (further placeholders take their default
    values) and returns what the output node returns. Every ``call_*`` node goes through
    :func:`~lipreg.functional.evaluation.call_target` on the live model's submodule (its
    ``forward``, so no module hook fires), and a ``get_attr`` reads the live model first (see
    :func:`resolve_attr`). The caller chooses the mode: this class changes no flag and no
    buffer; :func:`eval_function` wraps every run in
    :func:`~lipreg.functional.evaluation.evaluation_mode`.

    Exceptions raised by an op propagate unchanged (``extra_traceback`` is off, so fx does
    not rewrite their messages). With ``keep_values=False`` intermediate values are freed after
    their last use (fx's ``garbage_collect_values``); subclasses that inspect ``self.env``
    afterwards (the probe) keep them.
    """

    def __init__(self, gm: fx.GraphModule, *, keep_values: bool = False) -> None:
        self.gm = gm
        self.root = graph_root(gm)
        super().__init__(self.root, garbage_collect_values=not keep_values, graph=gm.graph)
        self.extra_traceback = False  # op errors keep their own message

    def run_node(self, n: fx.Node) -> Any:
        # fx's run_node adds a per-node debug log and node-meta context (for graph
        # transformations, unused here) that cost ~40% of a call on small networks, where
        # the lower bound runs the graph thousands of times; the evaluation itself is fx's.
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        return getattr(self, n.op)(n.target, args, kwargs)

    def fetch_attr(self, target: str) -> Any:
        return resolve_attr(self.gm, self.root, target)

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return call_target("call_module", self.root.get_submodule(target), args, kwargs)

    def call_method(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return call_target("call_method", target, args, kwargs)

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return call_target("call_function", target, args, kwargs)


def eval_function(model: nn.Module) -> tuple[Callable[[Tensor], Any], str]:
    """A callable computing ``model`` in evaluation mode without changing the model.

    The graph of :func:`trace` is evaluated node by node by a :class:`GraphInterpreter`
    inside :func:`evaluation_mode` (BatchNorm running statistics, dropout off, training-only
    branches not taken, no hook fired, flags and buffers restored after every call). When fx
    cannot trace the model, the fallback calls ``model`` inside :func:`evaluation_mode`
    (forward hooks then do run); the returned string says which path was taken.
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
    input_placeholder(gm)  # one tensor input (other parameters need defaults)
    interpreter = GraphInterpreter(gm)

    def run(x: Tensor) -> Any:
        with evaluation_mode(interpreter.root):
            return interpreter.run(x)

    return run, "fx"


def _eval_mode_call(model: nn.Module) -> Callable[[Tensor], Any]:
    def run(x: Tensor) -> Any:
        with evaluation_mode(model):
            return model(x)

    return run
