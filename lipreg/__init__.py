"""lipreg: sound Lipschitz-constant estimation and control for PyTorch networks.

The estimators (:func:`autolip`, :func:`seqlip`, :func:`lower_bound`) live in
:mod:`lipreg.functional` and import neither Lightning nor Hydra. The training integration
(:class:`LipschitzCallback`, needing Lightning; :class:`LipschitzLowerBound`, needing
torchmetrics) is imported on first use.
"""

from typing import TYPE_CHECKING, Any

from lipreg.functional import *  # noqa: F403
from lipreg.functional import __all__ as _functional_all
from lipreg.penalty import LipschitzPenalty

if TYPE_CHECKING:
    from lipreg.callback import LipschitzCallback
    from lipreg.metrics import LipschitzLowerBound

__version__ = "0.1.0"
__all__ = [
    *_functional_all,
    "LipschitzCallback",
    "LipschitzLowerBound",
    "LipschitzPenalty",
    "__version__",
]

_LAZY = {
    "LipschitzCallback": ("lipreg.callback", "lightning"),
    "LipschitzLowerBound": ("lipreg.metrics", "torchmetrics"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, requirement = _LAZY[name]
        import importlib

        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ImportError(
                f"lipreg.{name} needs {requirement}: pip install 'lipreg[train]' "
                f"(or pip install {requirement})."
            ) from exc
        return getattr(module, name)
    raise AttributeError(f"module 'lipreg' has no attribute {name!r}")
