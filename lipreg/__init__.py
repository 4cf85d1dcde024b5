"""lipreg: sound Lipschitz-constant estimation and control for PyTorch networks.

The estimators (:func:`autolip`, :func:`seqlip`, :func:`lower_bound`) live in
:mod:`lipreg.functional` and import neither Lightning nor Hydra.
"""

from lipreg.functional import *  # noqa: F403
from lipreg.functional import __all__ as _functional_all
from lipreg.penalty import LipschitzPenalty

__version__ = "0.1.0"
__all__ = [*_functional_all, "LipschitzPenalty", "__version__"]
