"""One trace and one probe per model, reused across calls while nothing structural changed.

:func:`lipreg.functional.analysis.analyse` traces and probes a network and then applies the
rules. Only the last step reads the weights' *values*; tracing, probing (which nodes depend
on the input, their shapes, refusals, in-place rewiring, batch mixing) and the node order
depend on the model's *structure*. :class:`AnalysisCache` keeps the structure and, at every
:meth:`AnalysisCache.get`, re-reads the current weights.

**What is cached**: the traced graph, the probe's structural results (input-dependent nodes,
their per-sample shapes, the output node, refusals, labels, node order), each node's
context (its module object, its constant arguments as *references* to parameters, buffers
and tensor attributes), and one :class:`~lipreg.functional.analysis.Analysis` per dtype.

**What is re-read at every call**: every spec, by re-applying every node's rule
(:meth:`Analysis.refresh_specs`, which looks the rule up again in the registry and reads the
module's current weights, BatchNorm statistics and attributes, and every ``get_attr``
tensor, from the live model); and the finiteness of every parameter, buffer and ``get_attr``
tensor (one host sync, :func:`~lipreg.functional.trace.nonfinite_names`; on a NaN/Inf the
full analysis runs and raises its usual message).

**What invalidates** (deny by default; the next call re-traces and re-probes, and the reason
is logged at INFO level on ``lipreg.functional.analysis_cache`` and kept in
:attr:`AnalysisCache.last_reason`), compared with ``==`` on a :func:`model_fingerprint`:

- the input shape;
- the set of submodules: path, identity, class, ``training`` flag, whether a registered
  rule binds to it (so :func:`lipreg.register_rule` after the first call re-traces), and a
  snapshot of every plain attribute (numbers, strings, tuples, lists, dicts and sets by
  value; functions, classes and hooks by identity; tensors by identity, shape, dtype,
  device, storage and in-place version counter; other objects by identity, type and a
  one-level snapshot of their attributes). Forward and backward hooks, state-dict hooks and
  the ``_non_persistent_buffers_set`` are such attributes;
- every parameter and buffer (shared ones under every name): name, identity, class, shape,
  dtype, device, layout, storage pointer and ``requires_grad``;
- every tensor a ``get_attr`` node reads (fx constants and plain tensor attributes):
  identity, shape, dtype, device.

**Never cached**: an analysis whose graph computes constants from the model's state inside
``forward()`` (``self.w * 2``, ``torch.randn(3)``, ``self.w.sum().item()``: see
:func:`~lipreg.functional.analysis.state_derived_nodes`); the probe froze their values, so
such a model is re-analysed at every call (said once in :attr:`AnalysisCache.notes`).

**Not in the fingerprint**: Python state outside the modules that ``forward()`` reads
(module-level globals, closures, objects nested two levels below a module attribute). For
*certified* bounds (``get(verify=True)``, what :func:`~lipreg.functional.autolip.autolip`
asks with ``certify=True``) a reused structure is re-checked by one probe batch through the
graph and the model (:func:`~lipreg.functional.analysis.check_graph_still_matches`), so a
certificate never bounds a graph the model no longer computes; estimates skip that forward
(call :meth:`AnalysisCache.invalidate` after changing such state). Estimates also skip the
probe's check of non-finite *intermediate* values (an overflow inside ``forward()`` with
finite weights); any non-finite norm still makes
:func:`~lipreg.functional.autolip.check_finite_result` refuse the result.
"""

from __future__ import annotations

import enum
import logging
import types
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from lipreg.functional.analysis import Analysis, analyse, check_graph_still_matches
from lipreg.functional.rules import has_module_rule, overriding_methods
from lipreg.functional.sharding import local_tensor
from lipreg.functional.trace import (
    check_input_shape,
    nonfinite_names,
    resolve_attr,
    trace,
    unwrap_compiled,
)

__all__ = ["AnalysisCache", "check_cache_matches", "model_fingerprint"]

log = logging.getLogger(__name__)

# Attributes of nn.Module described by other parts of the fingerprint.
_COVERED = frozenset({"_parameters", "_buffers", "_modules"})
_ATOMS = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
    enum.Enum,
)
_ATOM_TYPES = frozenset(t for t in _ATOMS if t is not enum.Enum)
_CONTAINERS = frozenset({dict, OrderedDict, list, tuple, set, frozenset})
_MAX_NESTING = 20
_BY_IDENTITY = (
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
)


def _freeze(value: Any, depth: int = 0, nesting: int = 0) -> Any:
    """A comparable snapshot of a plain attribute (see the module docstring); the type is
    kept so that ``1``, ``1.0`` and ``True`` differ."""
    kind = type(value)
    if kind in _ATOM_TYPES or isinstance(value, _ATOMS):
        return (kind, value)
    if kind in _CONTAINERS and not value:  # most hook dictionaries: the common case
        return (kind,)
    if nesting > _MAX_NESTING:  # a self-containing container: compared by identity
        return ("identity", id(value))
    if isinstance(value, tuple | list):
        return (kind, tuple(_freeze(v, depth, nesting + 1) for v in value))
    if isinstance(value, dict):
        items = value.items()
        return (kind, tuple((_freeze(k, depth), _freeze(v, depth, nesting + 1)) for k, v in items))
    if isinstance(value, set | frozenset):
        return (kind, tuple(sorted(repr(_freeze(v, depth, nesting + 1)) for v in value)))
    if isinstance(value, Tensor):
        return ("tensor", *_tensor_key(value), value._version)
    if isinstance(value, _BY_IDENTITY) or (callable(value) and not hasattr(value, "__dict__")):
        return ("identity", id(value))
    # any other object: identity, type, and its own attributes one level down
    inner = vars(value) if hasattr(value, "__dict__") and depth == 0 else {}
    return ("object", id(value), kind, _freeze(dict(inner), depth + 1) if inner else ())


def _attributes(m: nn.Module) -> tuple:
    """The snapshot of a module's plain attributes (:func:`_freeze`, with the two common
    cases inline: this runs at every call)."""
    snapshot = []
    for k, v in vars(m).items():
        kind = type(v)
        if kind in _ATOM_TYPES:
            snapshot.append((k, kind, v))
        elif kind in _CONTAINERS and not v:
            snapshot.append((k, kind))
        elif k not in _COVERED:
            snapshot.append((k, _freeze(v)))
    return tuple(snapshot)


def _tensor_key(t: Tensor) -> tuple:
    local = local_tensor(t)  # an FSDP2 shard: its own storage (a DTensor has no data_ptr)
    ptr = local.data_ptr() if local.layout == torch.strided and not local.is_meta else 0
    return (id(t), type(t), tuple(t.shape), t.dtype, t.device, t.layout, ptr, t.requires_grad)


def model_fingerprint(
    model: nn.Module, input_shape: Sequence[int], gm: fx.GraphModule | None = None
) -> dict[str, tuple]:
    """Everything the cached structure depends on, by section (the module docstring lists
    them); two fingerprints are equal iff every section is."""
    modules, tensors = [], []
    for prefix, m in model.named_modules(remove_duplicate=False):
        attributes = _attributes(m)
        rule = (has_module_rule(m), bool(overriding_methods(m)))
        modules.append((prefix, id(m), type(m), m.training, rule, attributes))
        dot = f"{prefix}." if prefix else ""
        # every parameter and buffer under every name (as named_parameters(remove_duplicate=
        # False)), None entries included: a registered-but-None buffer is structure too
        for section in (m._parameters, m._buffers):
            for k, t in section.items():
                tensors.append((dot + k, None if t is None else _tensor_key(t)))
    return {
        "input shape": tuple(input_shape),
        "submodules, their flags, attributes and hooks": tuple(modules),
        "parameters and buffers": tuple(tensors),
        "tensor attributes read by the graph": _attr_keys(model, gm),
    }


def _attr_tensors(model: nn.Module, gm: fx.GraphModule | None) -> list[tuple[str, Tensor]]:
    """The tensors the graph's ``get_attr`` nodes read, from the live model."""
    if gm is None:
        return []
    targets = gm.__dict__.get("_lipreg_get_attr_targets")
    if targets is None:  # the probe may rewire uses, never add get_attr nodes: list once
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"]
        gm.__dict__["_lipreg_get_attr_targets"] = targets
    found = []
    for target in targets:
        value = resolve_attr(gm, model, target)
        if isinstance(value, Tensor):
            found.append((target, value))
    return found


def _attr_keys(model: nn.Module, gm: fx.GraphModule | None) -> tuple:
    return tuple((name, *_tensor_key(t)) for name, t in _attr_tensors(model, gm))


class AnalysisCache:
    """The analysis of ``model`` at ``input_shape``, traced and probed once and refreshed
    with the current weights at every :meth:`get` (what is cached, re-read and invalidated:
    module docstring). :class:`lipreg.AutoLip` holds one; pass it to
    :func:`lipreg.autolip` / :func:`lipreg.functional.tight.tighten` as ``analysis=`` to
    share one trace and one probe between calls.

    Attributes:
        traced: the current graph (re-traced when the fingerprint changed).
        last_reason: why the last :meth:`get` re-analysed (``None`` when it reused).
        notes: what the caller should know (e.g. why this model is never cached).
        reasons: why each (re)build happened, oldest first (``builds`` is its length).
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        *,
        traced: fx.GraphModule | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.input_shape = check_input_shape(input_shape)
        self.traced = traced if traced is not None else trace(model)
        # the fingerprint of the model when `traced` was made (None: unknown, re-trace)
        self._traced_for: dict[str, tuple] | None = model_fingerprint(
            unwrap_compiled(model), self.input_shape, self.traced
        )
        self._reusable = False  # the analyses below may be refreshed instead of rebuilt
        self._by_dtype: dict[torch.dtype, Analysis] = {}
        self._pending: str | None = "first call"
        self.last_reason: str | None = None
        self.notes: list[str] = []
        self.reasons: list[str] = []
        self._last: Analysis | None = None

    @property
    def builds(self) -> int:
        """How many times the structure was (re)built (traced or not, probed)."""
        return len(self.reasons)

    def invalidate(self, reason: str = "invalidate() was called") -> None:
        """Forget the structure: the next :meth:`get` re-traces and re-probes."""
        self._traced_for, self._reusable, self._by_dtype = None, False, {}
        self._pending = reason

    def get(self, dtype: torch.dtype = torch.float32, *, verify: bool = False) -> Analysis:
        """The analysis with every spec computed from the current weights at ``dtype``:
        equal to ``analyse(model, input_shape, dtype=dtype)`` (same specs, same errors).
        ``verify=True`` (certified bounds) also re-checks, when the structure is reused, that
        the graph still computes what the model computes
        (:func:`~lipreg.functional.analysis.check_graph_still_matches`: one probe batch, no
        batch-mixing check)."""
        live = unwrap_compiled(self.model)
        fingerprint = model_fingerprint(live, self.input_shape, self.traced)
        reason = self._stale(fingerprint)
        if reason is None:
            named = [*live.named_parameters(), *live.named_buffers()]
            named += _attr_tensors(live, self.traced)
            if nonfinite_names(named):  # the full analysis raises with its own message
                reason = "a parameter, buffer or tensor attribute is not finite"
        if reason is not None:
            self._last = self._build(live, fingerprint, dtype, reason)
            return self._last
        self.last_reason = None
        if verify:
            check_graph_still_matches(live, self.traced, self.input_shape)
        self._last = self._refreshed(next(iter(self._by_dtype.values())), dtype, None)
        return self._last

    def also_at(self, dtype: torch.dtype) -> Analysis:
        """The analysis that the last :meth:`get` returned, at another ``dtype``, with
        specs read now (the same nodes; no new check, trace or probe): call it right after
        :meth:`get`, as :func:`~lipreg.functional.autolip.autolip` does for the float64
        specs of its certificates."""
        if self._last is None:
            raise RuntimeError("AnalysisCache.also_at() needs a get() first.")
        if not self._reusable:
            return self._last.at_dtype(dtype)
        return self._refreshed(self._last, dtype, self._last)

    def _refreshed(self, base: Analysis, dtype: torch.dtype, fresh: Analysis | None) -> Analysis:
        """The kept analysis at ``dtype`` with specs read now (made from ``base``, same nodes,
        if this dtype was never asked for; ``fresh`` was refreshed a moment ago)."""
        analysis = self._by_dtype.get(dtype)
        if analysis is None:
            analysis = base.at_dtype(dtype)  # computes its specs
            self._by_dtype[dtype] = analysis
        elif analysis is not fresh:
            analysis.refresh_specs()
        return analysis

    def _stale(self, fingerprint: dict[str, tuple]) -> str | None:
        """Why the cached structure cannot be used, or ``None``."""
        if self._pending is not None:
            return self._pending
        if self._traced_for is None:
            return "no fingerprint"
        changed = [k for k, v in fingerprint.items() if self._traced_for.get(k) != v]
        if changed:
            return f"changed since the last analysis: {', '.join(changed)}"
        if not self._reusable:
            return "the model computes constants from its state in forward()"
        return None

    def _build(
        self, live: nn.Module, fingerprint: dict[str, tuple], dtype: torch.dtype, reason: str
    ) -> Analysis:
        """Re-trace if the fingerprint changed since the graph was made, then probe and apply
        the rules as a fresh :func:`analyse` does; keep the structure when it may be."""
        if self._traced_for != fingerprint:
            self._traced_for = None  # a failed trace leaves the cache invalid
            self.traced = trace(self.model)
            fingerprint = model_fingerprint(live, self.input_shape, self.traced)
        self._reusable, self._by_dtype = False, {}
        self._pending = f"the last analysis raised ({reason})"  # until it succeeds
        self.last_reason = reason
        self.reasons.append(reason)
        log.info("lipreg: analysing %s (%s)", type(live).__name__, reason)
        analysis = analyse(self.model, self.input_shape, dtype=dtype, traced=self.traced)
        self._traced_for, self._pending = fingerprint, None
        if analysis.derived_constants:
            note = (
                f"the analysis of {type(live).__name__} is rebuilt at every call: forward() "
                f"computes {analysis.derived_constants} from the model's state, whose values "
                "the probe froze."
            )
            if note not in self.notes:
                self.notes.append(note)
            return analysis
        self._reusable = True
        self._by_dtype[dtype] = analysis
        return analysis


def check_cache_matches(
    cache: AnalysisCache,
    model: nn.Module,
    input_shape: Sequence[int],
    traced: fx.GraphModule | None = None,
) -> None:
    """Raise ``ValueError`` unless ``cache`` is the analysis of this very ``model`` (same
    object) at this ``input_shape``, and ``traced`` (if given) is its graph: an analysis of
    another network would bound the wrong function."""
    shape = check_input_shape(input_shape)
    if cache.model is not model or cache.input_shape != shape:
        raise ValueError(
            f"analysis= is the AnalysisCache of a {type(cache.model).__name__} at input shape "
            f"{cache.input_shape}, but the call is for a {type(model).__name__} at {shape} "
            "(a different object or shape): pass the cache built for this model and shape."
        )
    if traced is not None and traced is not cache.traced:
        raise ValueError(
            "both traced= and analysis= were given, and traced is not analysis.traced: pass "
            "analysis= alone (it holds the graph)."
        )
