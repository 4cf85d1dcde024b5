"""The three rule registries (module classes, functions, tensor-method names) and their lookup.

Deny by default: a node whose target has no registered rule is unsupported, and a rule binds
to a module subclass only when the subclass cannot compute anything else (see
:func:`module_rule_class`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from torch import fx, nn

from lipreg.functional.specs import RuleFn, Spec

__all__ = [
    "has_module_rule",
    "lookup_rule",
    "module_rule_class",
    "overriding_methods",
    "register_rule",
    "registered_targets",
    "restored_registries",
]

_MODULE_RULES: dict[type, RuleFn] = {}
_FUNCTION_RULES: dict[Any, RuleFn] = {}
_METHOD_RULES: dict[str, RuleFn] = {}


def register_rule(target: type | Callable | str, rule: RuleFn | Spec) -> None:
    """Register how lipreg bounds a module class, a function or a tensor method.

    Args:
        target: an ``nn.Module`` subclass (matched along the MRO), a function such as
            ``torch.special.expit`` (matched by identity), or a method name such as
            ``"my_method"`` (for ``x.my_method(...)``).
        rule: a spec (for constant rules, e.g. ``Elementwise(0.0, 1.0)``) or a callable
            ``rule(ctx: NodeContext) -> Affine | Elementwise | Nonlinear | Combine``.

    Example:
        >>> import lipreg, torch
        >>> class Swish2(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * torch.sigmoid(x)
        >>> lipreg.register_rule(Swish2, lipreg.Elementwise(-0.0999, 1.0999))
    """
    fn: RuleFn = rule if callable(rule) else (lambda ctx, _s=rule: _s)  # type: ignore[misc]
    if isinstance(target, str):
        _METHOD_RULES[target] = fn
    elif isinstance(target, type) and issubclass(target, nn.Module):
        _MODULE_RULES[target] = fn
    elif callable(target):
        _FUNCTION_RULES[target] = fn
    else:
        raise TypeError(
            "register_rule target must be an nn.Module subclass, a function or a method "
            f"name (str), got {target!r}."
        )


def registered_targets() -> dict[str, list[str]]:
    """Names of everything that has a rule (for docs and error messages)."""
    return {
        "modules": sorted(t.__name__ for t in _MODULE_RULES),
        "functions": sorted(getattr(f, "__name__", repr(f)) for f in _FUNCTION_RULES),
        "methods": sorted(_METHOD_RULES),
    }


@contextlib.contextmanager
def restored_registries() -> Iterator[None]:
    """Undo, on exit, every :func:`register_rule` made inside the block (tests, experiments).

    The registries are restored in place, so references to them stay valid.
    """
    saved = [(reg, dict(reg)) for reg in (_MODULE_RULES, _FUNCTION_RULES, _METHOD_RULES)]
    try:
        yield
    finally:
        for reg, copy in saved:
            reg.clear()
            reg.update(copy)


# Class attributes a subclass may redefine without changing what forward() computes:
# construction, printing, pickling and checkpoint plumbing (parametrized modules define
# __getstate__/__deepcopy__ and a ``weight`` property, which the rules read like any weight).
_HARMLESS_OVERRIDES = frozenset(
    {
        "__init__",
        "__repr__",
        "__getstate__",
        "__setstate__",
        "__deepcopy__",
        "__reduce__",
        "__reduce_ex__",
        "extra_repr",
        "reset_parameters",
        "_load_from_state_dict",
        "_save_to_state_dict",
        "_get_name",
    }
)


@functools.cache
def _harmless_mixins() -> tuple[type, ...]:
    """Mixin classes whose methods cannot change what ``forward`` computes.

    FSDP2's ``FSDPModule``: ``fully_shard`` swaps a module's class for a dynamic
    ``FSDP<Name>(FSDPModule, <Name>)`` that defines only ``__deepcopy__``. ``FSDPModule``
    defines no ``forward`` and nothing the original ``forward`` calls (``unshard``/``reshard``,
    ``set_*`` options, ``_apply``, ``__new__``): FSDP acts through forward hooks (all-gathers),
    which lipreg replaces by its own gathers (:mod:`lipreg.functional.sharding`), so the module
    computes its original class's function and binds to that class's rule. A class between
    the dynamic one and the original (a user subclass) is still examined."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return ()
    return (FSDPModule,)


def _overridden_methods(cls: type, base: type) -> list[str]:
    """Functions that the classes between ``cls`` and ``base`` (excluded) define and that
    could change what ``base``'s ``forward`` computes (the :func:`_harmless_mixins` are
    skipped)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is base:
            break
        if klass in _harmless_mixins():
            continue
        for name, value in vars(klass).items():
            if name in _HARMLESS_OVERRIDES:
                continue
            if callable(value) or isinstance(value, staticmethod | classmethod):
                names.append(f"{klass.__name__}.{name}")
    return names


def module_rule_class(module: nn.Module) -> type | None:
    """The registered class whose rule binds to ``module``, or ``None``.

    A rule is proven for the code of the class it was registered for. It binds to a subclass
    only when the subclass redefines no method (a LoRA-style ``nn.Linear`` whose ``forward``
    adds ``A @ B``, a weight-standardised conv overriding ``_conv_forward``, a layer scaling
    ``super().forward(x)``): such a subclass is a different function and is traced through.
    """
    for cls in type(module).__mro__:
        if cls in _MODULE_RULES:
            return None if _overridden_methods(type(module), cls) else cls
    return None


def overriding_methods(module: nn.Module) -> list[str]:
    """Methods by which ``module``'s class departs from the nearest class with a rule."""
    for cls in type(module).__mro__:
        if cls in _MODULE_RULES:
            return _overridden_methods(type(module), cls)
    return []


def has_module_rule(module: nn.Module) -> bool:
    """Whether a registered rule binds to ``module`` (see :func:`module_rule_class`)."""
    return module_rule_class(module) is not None


def lookup_rule(node: fx.Node, target: Any) -> RuleFn | None:
    """The rule of a node, or ``None`` (deny by default).

    Module rules bind by :func:`module_rule_class`; function rules by identity; method rules
    by name (the analysis checks that ``self`` is a plain tensor). An in-place method
    ``x.op_()`` takes the rule of ``x.op()``: the analysis refuses in-place updates whose
    old value is still read afterwards, so the two compute the same function.
    """
    if node.op == "call_module":
        cls = module_rule_class(target)
        return _MODULE_RULES[cls] if cls is not None else None
    if node.op == "call_method":
        rule = _METHOD_RULES.get(target)
        if rule is None and target.endswith("_") and not target.startswith("_"):
            rule = _METHOD_RULES.get(target[:-1])
        return rule
    try:
        return _FUNCTION_RULES.get(target)
    except TypeError:  # unhashable target
        return None
