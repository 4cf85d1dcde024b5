"""Validation of :class:`lipreg.LipschitzCallback`'s options, at construction.

Every check raises with the option's name, the value found and what is accepted, and every
message starts with :data:`PREFIX` so that a user sees which component refused it. Types are
checked as strictly as values: ``True`` is not an int, ``2.0`` is not a step count, a string
is not a shape.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "METHODS",
    "PREFIX",
    "check_bool",
    "check_cadences",
    "check_choice",
    "check_input_shape",
    "check_int",
    "check_methods",
    "check_model_attr",
    "check_number",
    "is_int",
]

#: What ``methods=`` accepts (``"autolip"`` also brings its certificate, on its own cadence).
METHODS = ("autolip", "seqlip", "lower_bound")
#: The start of every message of the callback (errors, warnings and notes).
PREFIX = "LipschitzCallback: "
_ATTR_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def is_int(value: Any) -> bool:
    """An int that is not a bool (``True`` is not a step count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    """``value`` is an int ``>= minimum`` (or ``None`` when ``allow_none``)."""
    accepted = f"an int >= {minimum}" + (" or None" if allow_none else "")
    if value is None and allow_none:
        return
    if not is_int(value):
        raise TypeError(
            f"{PREFIX}{name} must be {accepted}, got {value!r} ({type(value).__name__})."
        )
    if value < minimum:
        raise ValueError(f"{PREFIX}{name} must be {accepted}, got {value!r}.")


def check_number(name: str, value: Any, allow_none: bool = False, example: float = 1e-4) -> None:
    """``value`` is a positive finite int or float (not a bool), or ``None`` when
    ``allow_none``; ``example`` is quoted in the message."""
    accepted = f"a positive finite number (e.g. {example:g})" + (" or None" if allow_none else "")
    if value is None and allow_none:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(
            f"{PREFIX}{name} must be {accepted}, got {value!r} ({type(value).__name__})."
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{PREFIX}{name} must be {accepted}, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """``value`` is ``True`` or ``False`` (not ``1``, not ``"yes"``)."""
    if not isinstance(value, bool):
        raise TypeError(
            f"{PREFIX}{name} must be True or False, got {value!r} ({type(value).__name__})."
        )


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """``value`` is one of the strings ``choices``."""
    if not isinstance(value, str):
        raise TypeError(
            f"{PREFIX}{name} must be one of {list(choices)}, got {value!r} "
            f"({type(value).__name__})."
        )
    if value not in choices:
        raise ValueError(f"{PREFIX}{name} must be one of {list(choices)}, got {value!r}.")


def check_methods(methods: Any) -> list[str] | None:
    """``None``, one name of :data:`METHODS` or a non-empty collection of them; returns the
    names in order without duplicates (``None`` stays ``None``: the default methods)."""
    accepted = f"None, one of {list(METHODS)} or a non-empty list of them"
    if methods is None:
        return None
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, Sequence) and not isinstance(methods, set | frozenset):
        raise TypeError(
            f"{PREFIX}methods must be {accepted}, got {methods!r} ({type(methods).__name__})."
        )
    methods = list(methods)
    if not all(isinstance(m, str) for m in methods):
        raise TypeError(f"{PREFIX}methods must be {accepted}, got {methods!r}.")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"{PREFIX}methods must be {accepted}, got {methods!r}.")
    return list(dict.fromkeys(methods))  # order kept, duplicates dropped


def check_input_shape(input_shape: Any) -> tuple[int, ...] | None:
    """``None`` or the shape of ONE input (positive ints, no batch dimension) as a tuple; an
    int ``n`` means ``(n,)``."""
    if input_shape is None:
        return None
    accepted = (
        "None (inferred from the batch) or a non-empty tuple of positive ints: the shape of "
        "ONE input without the batch dimension, e.g. (1, 28, 28)"
    )
    if is_int(input_shape):
        input_shape = (input_shape,)
    if isinstance(input_shape, str | bytes) or not isinstance(input_shape, Sequence):
        raise TypeError(
            f"{PREFIX}input_shape must be {accepted}; got {input_shape!r} "
            f"({type(input_shape).__name__})."
        )
    if not input_shape or not all(is_int(s) and s > 0 for s in input_shape):
        raise ValueError(f"{PREFIX}input_shape must be {accepted}; got {input_shape!r}.")
    return tuple(int(s) for s in input_shape)


def check_model_attr(model_attr: Any) -> None:
    """``None`` or a dotted attribute path (``"net"``, ``"model.encoder"``)."""
    accepted = "None or the name of an nn.Module attribute of the LightningModule ('net', 'a.b')"
    if model_attr is None:
        return
    if not isinstance(model_attr, str):
        raise TypeError(
            f"{PREFIX}model_attr must be {accepted}, got {model_attr!r} "
            f"({type(model_attr).__name__})."
        )
    if not _ATTR_PATH.match(model_attr):
        raise ValueError(f"{PREFIX}model_attr must be {accepted}, got {model_attr!r}.")


def check_cadences(
    every_n_train_steps: Any, every_n_epochs: Any, certify_every: Any, seqlip_every: Any
) -> tuple[int, int]:
    """Check the four cadences; return those of the certificate, whose default (``None``) is
    ``every_n_train_steps`` (a certified value at every monitoring step: incremental
    certificates cost a few estimates), and of SeqLip, whose default is 10 times
    ``every_n_train_steps`` (``0``, never by steps, without it)."""
    check_int("every_n_train_steps", every_n_train_steps, minimum=1, allow_none=True)
    check_int("every_n_epochs", every_n_epochs, minimum=1, allow_none=True)
    if every_n_train_steps is None and every_n_epochs is None:
        raise ValueError(
            f"{PREFIX}every_n_train_steps and every_n_epochs are both None: the callback "
            "would never compute. Set every_n_train_steps (e.g. 50) and/or every_n_epochs."
        )
    check_int("certify_every_n_train_steps", certify_every, 0, True)
    check_int("seqlip_every_n_train_steps", seqlip_every, 0, True)
    every = every_n_train_steps or 0
    return (
        every if certify_every is None else certify_every,
        10 * every if seqlip_every is None else seqlip_every,
    )
