"""Models: the networks of Scaman & Virmaux (2018) and loaders of public benchmark networks.

The public names are those of :mod:`lipreg.models.paper` (the paper's architectures) and
:mod:`lipreg.models.benchmark_nets` (LipSDP / GLipSDP loaders and published values); each
submodule's ``__all__`` is the one list of its names.
"""

from lipreg.models import benchmark_nets, paper
from lipreg.models.benchmark_nets import *  # noqa: F403  (names: benchmark_nets.__all__)
from lipreg.models.paper import *  # noqa: F403  (names: paper.__all__)

__all__ = benchmark_nets.__all__ + paper.__all__
