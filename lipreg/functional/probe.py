"""Probing a traced graph on random batches: what depends on the input, with which shapes.

:class:`ProbeInterpreter` is :class:`lipreg.functional.trace.GraphInterpreter` with
bookkeeping: it keeps every value, records which nodes depend on the input (deny by default:
a node depends on the input when any argument does, whatever the value type; only shape
queries read nothing but metadata), their per-sample shapes, non-finite values, and in-place
updates (rewired into the graph when that states what the model computes, refused otherwise).
:meth:`ProbeInterpreter.probe` is the one entry point: a seeded random batch of
:data:`PROBE_BATCH` inputs, plus, when asked, two batches that each share one sample with it
(the batch-mixing check). The caller holds evaluation mode and ``no_grad``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from lipreg.functional.evaluation import evaluation_mode
from lipreg.functional.sharding import (
    all_ranks_succeed,
    gathered,
    gathered_on_call,
    is_dtensor,
    local_tensor,
)
from lipreg.functional.trace import (
    GraphInterpreter,
    TraceError,
    UnsupportedOperationError,
    all_finite,
    type_name,
)

__all__ = [
    "PROBE_BATCH",
    "Probe",
    "ProbeInterpreter",
    "ProbeRun",
    "check_graph_reproduces_model",
    "cuda_devices",
    "is_shape_query",
    "tensors_in",
]

#: Samples in a probe batch (two, so that an op mixing samples shows).
PROBE_BATCH = 2
# Ops that read only a tensor's metadata: their results do not depend on the input's values.
_SHAPE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "get_device"})
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})
_CALLS = frozenset({"call_module", "call_method", "call_function"})


@dataclass
class Probe:
    """What one evaluation of the graph on a probe batch shows."""

    values: dict[fx.Node, Any] = field(default_factory=dict)
    variable: set[fx.Node] = field(default_factory=set)
    shapes: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)
    samples: dict[fx.Node, Tensor] = field(default_factory=dict)
    refusals: dict[fx.Node, str] = field(default_factory=dict)
    nonfinite_constants: list[str] = field(default_factory=list)
    nonfinite_values: list[str] = field(default_factory=list)
    output: fx.Node | None = None


@dataclass
class ProbeRun:
    """The probes of one analysis: ``main`` on the batch ``x``, and ``others`` as pairs
    (probe of a batch sharing only sample ``kept`` with ``x``, ``kept``), empty when the
    batch-mixing check was not asked for."""

    main: Probe
    x: Tensor
    others: list[tuple[Probe, int]]


def cuda_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG ``torch.random.fork_rng`` must save for ``device``."""
    return [device.index or 0] if device.type == "cuda" else []


def is_shape_query(node: fx.Node) -> bool:
    """Ops that read a tensor's metadata only (their result is a constant of the input)."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function" and node.target is getattr and len(node.args) >= 2:
        return node.args[1] in _SHAPE_ATTRIBUTES
    return False


def _storage(t: Tensor) -> int | None:
    t = local_tensor(t)  # a DTensor has no storage of its own: its shard's is this rank's
    if t.numel() == 0 or t.layout != torch.strided:
        return None
    return t.untyped_storage().data_ptr()


def tensors_in(values: Any) -> list[Tensor]:
    """The tensors inside nested tuples, lists and dicts of arguments."""
    found: list[Tensor] = []
    fx.node.map_aggregate(values, lambda a: found.append(a) if isinstance(a, Tensor) else None)
    return found


def _version(t: Tensor) -> int | None:
    """A tensor's in-place update counter (inference tensors have none)."""
    return None if t.is_inference() else t._version


class ProbeInterpreter(GraphInterpreter):
    """:class:`GraphInterpreter` that records, for one batch at a time, a :class:`Probe`.

    Per node: its value (all kept), whether it depends on the input, its per-sample shape and
    first-sample value (for the batch-mixing check), non-finite values, and in-place updates
    (a node whose argument's version counter moved), which are rewired in the graph when the
    out-of-place reading states what the model computes (see :meth:`_functionalise_inplace`).
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, keep_values=True)
        # FSDP2 shards: every module call gathers its unit (one unit at a time, all ranks)
        self.sharded = any(is_dtensor(p) for p in self.root.parameters())
        self.position = {n: i for i, n in enumerate(self.graph.nodes)}
        self.model_state = {
            _storage(t) for t in [*self.root.parameters(), *self.root.buffers()]
        } - {None}
        self.record = Probe()
        self.holders_of: dict[int, list[fx.Node]] = {}
        self.input_node = next(n for n in self.graph.nodes if n.op == "placeholder")
        self.x_shape: tuple[int, ...] = ()  # of the batch being run, for error messages

    def probe(
        self,
        input_shape: tuple[int, ...],
        *,
        device: torch.device,
        dtype: torch.dtype,
        check_mixing: bool,
    ) -> ProbeRun:
        """Run the graph on a seeded random batch ``x`` of :data:`PROBE_BATCH` inputs of
        ``input_shape`` (float32 draws, cast to ``dtype``); with ``check_mixing``, also on two
        batches that each share one sample with ``x``: a per-sample function gives that
        sample the same value at every node (a cumulative sum over the batch hides from one
        of the two, a flip of the batch from neither)."""
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(PROBE_BATCH, *input_shape, generator=generator, device=device)
        other = torch.randn(x.shape, generator=generator, device=device)
        # Built before any run: a model that writes into its input must not change them.
        shared = [(torch.stack([x[0], other[1]]), 0), (torch.stack([other[0], x[1]]), 1)]
        main = self.run_batch(x.to(dtype))
        others = [(self.run_batch(b.to(dtype)), kept) for b, kept in shared] if check_mixing else []
        return ProbeRun(main=main, x=x.to(dtype), others=others)

    def run_batch(self, x: Tensor) -> Probe:
        """Evaluate the graph on the batch ``x`` and return what it shows."""
        self.record, self.holders_of = Probe(), {}
        self.x_shape = tuple(x.shape)
        self.run(x)
        self.record.values = {n: v for n, v in self.env.items() if n.op != "output"}
        self.env = {}
        return self.record

    def run_node(self, node: fx.Node) -> Any:
        mutated: list[Tensor] = []
        if node.op == "output":
            self.record.output = _output_node(node, self.env)
            return super().run_node(node)
        if node.op not in _CALLS:
            value = super().run_node(node)
        else:
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            tensors = tensors_in((args, kwargs))
            versions = [_version(t) for t in tensors]
            with self._gathered(node):  # a refused gather raises its own error
                try:
                    value = getattr(self, node.op)(node.target, args, kwargs)
                except Exception as exc:
                    raise RuntimeError(
                        f"evaluating {node.format_node()} on an input of shape {self.x_shape} "
                        f"failed: {type(exc).__name__}: {exc}. Is input_shape right (one "
                        "sample, no batch dimension)?"
                    ) from exc
            mutated = [t for t, v in zip(tensors, versions, strict=True) if _version(t) != v]
        self.env[node] = value  # the in-place check reads it
        self._classify(node, value)
        if mutated and (problem := self._functionalise_inplace(node, value, mutated)):
            self.record.refusals[node] = problem
        if isinstance(value, Tensor) and (storage := _storage(value)) is not None:
            self.holders_of.setdefault(storage, []).append(node)
        return value

    def _gathered(self, node: fx.Node) -> contextlib.AbstractContextManager:
        """For a sharded model, the gather of a module call's FSDP unit around the call (and
        the ranks' agreement that it succeeded); nothing otherwise."""
        if not self.sharded or node.op != "call_module":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(gathered(self.root, [self.root.get_submodule(node.target)]))
        stack.enter_context(all_ranks_succeed(f"probing node {node.name!r}"))
        return stack

    def _classify(self, node: fx.Node, value: Any) -> None:
        """Record whether ``node`` depends on the input, its per-sample shape, the first
        sample's value (for the batch-mixing check) and non-finite values."""
        probe = self.record
        depends = node is self.input_node or (
            any(n in probe.variable for n in node.all_input_nodes) and not is_shape_query(node)
        )
        finite = not (isinstance(value, Tensor) and value.is_floating_point()) or bool(
            all_finite(value)
        )
        if not depends:
            if not finite:
                where = node.target if node.op == "get_attr" else node
                probe.nonfinite_constants.append(str(where))
            return
        probe.variable.add(node)
        if not finite:
            probe.nonfinite_values.append(node.name)
        if type(value) is not Tensor:
            return
        if value.ndim == 0 or value.shape[0] != PROBE_BATCH:
            probe.refusals[node] = (
                f"produces a tensor of shape {tuple(value.shape)} from a batch of {PROBE_BATCH} "
                "inputs: it mixes the samples of the batch (e.g. x.view(-1), x.sum() over all "
                "dimensions). A Lipschitz constant is defined for a per-sample function: keep "
                "the batch dimension first and separate."
            )
            return
        probe.shapes[node] = tuple(value.shape[1:])
        probe.samples[node] = value.detach().clone()  # later in-place updates must not show

    def _functionalise_inplace(
        self, node: fx.Node, value: Any, mutated: list[Tensor]
    ) -> str | None:
        """Rewire an in-place update at ``node`` into its out-of-place reading, or say why not.

        The graph says that every reader of a value sees it as it was computed. After
        ``y.mul_(4)`` the model's later readers of ``y`` see the updated tensor, so their
        argument is rewired from ``y``'s node to the update's node (which returns that very
        tensor): the graph then states what the model computes. This is refused when a *view*
        of the old tensor is read afterwards (it cannot be rewired to the update's result),
        when the op does not return the tensor it updated, or when input-dependent data is
        written into a tensor the analysis treats as constant (model parameters and buffers
        included). The interpreter reads arguments when a node runs, so a rewiring applies to
        the rest of this run.
        """
        probe, position = self.record, self.position
        writes_input = node in probe.variable
        for t in mutated:
            storage = _storage(t)
            if storage is None:
                continue
            if writes_input and storage in self.model_state:
                return (
                    "writes an input-dependent value in place into the model's own parameters "
                    "or buffers: the function would change from call to call."
                )
            holders = self.holders_of.get(storage, [])
            constant = [h.name for h in holders if h not in probe.variable]
            if writes_input and constant:
                return (
                    f"writes an input-dependent value in place into {constant}, which the "
                    "graph treats as constant. Build the tensor out of place (torch.cat, "
                    "torch.where)."
                )
            for holder in holders:
                late = [u for u in holder.users if u is not node and position[u] > position[node]]
                if not late:
                    continue
                if self.env[holder] is not t or value is not t:
                    return (
                        f"updates a tensor in place while {sorted(u.name for u in late)} still "
                        f"read it through a view ({holder.name!r}) that cannot be rewired to "
                        "the update's result. Use the out-of-place op (a = a + g(x))."
                    )
                holder.replace_all_uses_with(
                    node,
                    delete_user_cb=lambda u, _n=node: u is not _n and position[u] > position[_n],
                )
        return None


def _output_node(node: fx.Node, values: dict[fx.Node, Any]) -> fx.Node:
    out = node.args[0]
    if isinstance(out, fx.Node) and type(values.get(out)) is Tensor:
        return out
    kind = type_name(values.get(out)) if isinstance(out, fx.Node) else type_name(out)
    raise TypeError(
        f"the model's output is a {kind}, not a tensor: lipreg bounds maps from one tensor to "
        "one tensor. Wrap the model so that forward() returns the tensor to bound, e.g. "
        "class Logits(nn.Module): def forward(self, x): return model(x)[0]."
    )


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


def check_graph_reproduces_model(
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
        torch.random.fork_rng(devices=cuda_devices(x.device)),
        evaluation_mode(model),
        _hooks_disabled(model),
        gathered_on_call(model),  # FSDP2 shards: one unit at a time (nothing otherwise)
        eager,
    ):
        actual = model.forward(x)
    if type(actual) is not Tensor or actual.shape != graph_output.shape:
        found = tuple(actual.shape) if isinstance(actual, Tensor) else type_name(actual)
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
