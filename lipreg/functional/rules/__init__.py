"""Per-node Lipschitz rules and the public rule registry.

A rule receives a :class:`~lipreg.functional.specs.NodeContext` and returns a spec
(``Affine``, ``Elementwise``, ``Nonlinear``, ``Combine``, defined with what each promises in
:mod:`lipreg.functional.specs`, the one place to import them from), or raises
``UnsupportedNodeError`` with the reason. :func:`register_rule` adds or overrides the rule
of a module class, a function, or a tensor method name; a node without a rule is refused.

One module per op family, each registering its rules when imported:

=================  ==========================================================================
``registry``       the three registries, :func:`register_rule`, lookup and subclass binding
``activations``    ONE table of element-wise activations (:data:`ACTIVATIONS`), softmax
``linear``         linear, convolution, transposed convolution, batch norm, ``x @ C``
``pooling``        max-pooling (``sqrt`` of the window coverage), average pooling, padding
``shape``          identity, reshape, permutation, indexing, upsampling, dropout, split
``arithmetic``     ``+ − × ÷`` with constants or between branches, negation, concatenation
``hints``          ops refused on purpose, with the reason (:data:`NOT_LIPSCHITZ_HINTS`)
=================  ==========================================================================

Adding an element-wise activation is one entry of the table in ``activations.py``: its module
classes, functions and method names all get the rule, from the one slope range. For
``erf`` (``erf' = 2/sqrt(π) e^{-x²} ∈ (0, 2/sqrt(π)]``)::

    Activation(
        "erf",
        (0.0, 2 / math.sqrt(math.pi) + 1e-12),  # a proven interval for σ', padded outwards
        modules=(MyErf,),  # nn.Module classes computing σ
        functions=(torch.erf, torch.special.erf),
        methods=("erf",),  # x.erf() (and x.erf_())
    )

A slope range that depends on an argument reads it through :class:`Param`: LeakyReLU's entry
has ``slopes=lambda negative_slope: ...`` and ``params=(Param("negative_slope", 1, 0.01),)``,
read from the module's attribute or from ``F.leaky_relu(x, negative_slope)``. Outside the
package (a user's own activation), ``register_activations([Activation(...)])`` does the same.
"""

from __future__ import annotations

from lipreg.functional.rules import arithmetic, linear, pooling  # noqa: F401  (registrations)
from lipreg.functional.rules.activations import (
    ACTIVATIONS,
    Activation,
    Param,
    SlopeRange,
    extreme_slope,
    register_activations,
)
from lipreg.functional.rules.hints import NOT_LIPSCHITZ_HINTS, refusal_hint
from lipreg.functional.rules.pooling import maxpool_lipschitz
from lipreg.functional.rules.registry import (
    has_module_rule,
    lookup_rule,
    module_rule_class,
    overriding_methods,
    register_rule,
    registered_targets,
    restored_registries,
)
from lipreg.functional.rules.shape import splits_into_pieces

__all__ = [
    "ACTIVATIONS",
    "NOT_LIPSCHITZ_HINTS",
    "Activation",
    "Param",
    "SlopeRange",
    "extreme_slope",
    "has_module_rule",
    "lookup_rule",
    "maxpool_lipschitz",
    "module_rule_class",
    "overriding_methods",
    "refusal_hint",
    "register_activations",
    "register_rule",
    "registered_targets",
    "restored_registries",
    "splits_into_pieces",
]
