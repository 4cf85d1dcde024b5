"""Ops lipreg refuses on purpose, with the reason (:data:`NOT_LIPSCHITZ_HINTS`).

These have no global Lipschitz constant (normalisation by a data-dependent statistic,
attention, exp/log/sqrt …) or no certified rule (recurrent cells). The analysis shows the hint
instead of suggesting to register a rule: registering one would make the bound wrong.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["NOT_LIPSCHITZ_HINTS", "refusal_hint"]

_LOWER_BOUND_ADVICE = (
    " lipreg.lower_bound(model, input_shape) still gives a certified lower bound, and an "
    "upper bound exists for a sub-network without this op (model_attr=... in the callback)."
)
_NOT_GLOBALLY_LIPSCHITZ = (
    " It has no global Lipschitz constant, so no rule can exist (registering one would make "
    "the bound wrong)."
)

# Ops lipreg refuses on purpose, by class/function name, with the reason. Rules must NOT be
# suggested for them (see the refusal messages in analysis.py).
NOT_LIPSCHITZ_HINTS: dict[str, str] = {
    "LayerNorm": "LayerNorm divides by the input's own standard deviation, so its slope grows "
    "without bound as that deviation shrinks." + _NOT_GLOBALLY_LIPSCHITZ + _LOWER_BOUND_ADVICE,
    "RMSNorm": "RMSNorm divides by the input's own root mean square, so its slope grows "
    "without bound near 0." + _NOT_GLOBALLY_LIPSCHITZ + _LOWER_BOUND_ADVICE,
    "GroupNorm": "GroupNorm divides by a data-dependent standard deviation."
    + _NOT_GLOBALLY_LIPSCHITZ
    + _LOWER_BOUND_ADVICE,
    "InstanceNorm": "InstanceNorm divides by a data-dependent standard deviation."
    + _NOT_GLOBALLY_LIPSCHITZ
    + _LOWER_BOUND_ADVICE,
    "LocalResponseNorm": "LocalResponseNorm divides by a data-dependent power of the input."
    + _LOWER_BOUND_ADVICE,
    "MultiheadAttention": "dot-product attention multiplies input-dependent queries, keys and "
    "values; its Jacobian grows with the input's norm (Kim et al., 'The Lipschitz constant "
    "of self-attention', 2021)." + _NOT_GLOBALLY_LIPSCHITZ + _LOWER_BOUND_ADVICE,
    "scaled_dot_product_attention": "dot-product attention multiplies input-dependent "
    "queries, keys and values (Kim et al., 2021)." + _NOT_GLOBALLY_LIPSCHITZ + _LOWER_BOUND_ADVICE,
    "Transformer": "transformer layers contain dot-product attention and LayerNorm, neither "
    "globally Lipschitz." + _NOT_GLOBALLY_LIPSCHITZ + _LOWER_BOUND_ADVICE,
    "LSTM": "recurrent layers multiply input-dependent gates step after step; lipreg has no "
    "certified rule for recurrent cells." + _LOWER_BOUND_ADVICE,
    "GRU": "recurrent layers multiply input-dependent gates step after step; lipreg has no "
    "certified rule for recurrent cells." + _LOWER_BOUND_ADVICE,
    "RNN": "recurrent layers apply the same cell step after step and return a tuple (output, "
    "hidden); lipreg has no certified rule for recurrent cells." + _LOWER_BOUND_ADVICE,
    "exp": "exp is not globally Lipschitz (its slope grows without bound).",
    "pow": "powers other than 1 are not globally Lipschitz.",
    "sqrt": "sqrt is not Lipschitz at 0.",
    "rsqrt": "1/sqrt is not Lipschitz near 0.",
    "log": "log is not Lipschitz near 0.",
    "reciprocal": "1/x is not Lipschitz near 0.",
}


# Functional spellings of the same ops (torchvision's LayerNorm2d calls F.layer_norm, Swin its
# own window attention).
for _alias, _key in (
    ("layer_norm", "LayerNorm"),
    ("rms_norm", "RMSNorm"),
    ("group_norm", "GroupNorm"),
    ("instance_norm", "InstanceNorm"),
    ("local_response_norm", "LocalResponseNorm"),
    ("multi_head_attention_forward", "MultiheadAttention"),
    ("shifted_window_attention", "scaled_dot_product_attention"),
    ("lstm", "LSTM"),
    ("gru", "GRU"),
):
    NOT_LIPSCHITZ_HINTS[_alias] = NOT_LIPSCHITZ_HINTS[_key]


def refusal_hint(target: Any) -> str | None:
    """Why lipreg refuses ``target`` on purpose (a class, function or method name), if it
    does: matched on the class and its bases, or on the function/method name."""
    if isinstance(target, nn.Module):
        for cls in type(target).__mro__:
            for key, hint in NOT_LIPSCHITZ_HINTS.items():
                if cls.__name__.startswith(key):  # LSTMCell, InstanceNorm2d, TransformerEncoder…
                    return hint
        return None
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    name = name.rstrip("_")
    return NOT_LIPSCHITZ_HINTS.get(name)
