"""Optional dependencies of :mod:`lipreg.models`, imported on first use with a clear error."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["import_optional"]


def import_optional(module: str, needed_for: str, install: str) -> ModuleType:
    """Import ``module``, or raise ``ImportError`` saying what needs it and how to install it.

    Args:
        module: dotted module name (``"scipy.io"``, ``"torchvision"``).
        needed_for: what needs it, for the message (``"lipreg.models.alexnet"``).
        install: the install command to suggest (``"`pip install torchvision`"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise ImportError(
            f"{needed_for} needs {package}, an optional dependency of lipreg. Install it with "
            f"{install}."
        ) from exc
