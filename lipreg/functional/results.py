"""Result objects shared by all estimators."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

__all__ = ["LayerBound", "LipschitzResult"]

Kind = Literal["upper", "estimate", "lower"]


@dataclass(kw_only=True)
class LayerBound:
    """One factor of a bound: a merged affine chain, an activation, a pooling, a SeqLip pair.

    Keyword-only: ``LayerBound(name=..., kind=..., value=..., certified=..., ...)``.

    Attributes:
        name: the nodes it covers, e.g. ``"features.0"`` or ``"layer1.0[conv1+bn1]"`` (an
            affine chain's name, see :mod:`lipreg.functional.chains`).
        kind: ``"affine"``, ``"activation"``, ``"nonlinear"``, ``"seqlip-pair"``,
            ``"lipsdp-block"``, ``"conv-pair"``, ``"rounding"`` (a widening for the float64
            rounding of materialised maps), ...
        value: the factor used in the network's number.
        certified: ``value`` is a guaranteed upper bound on this factor.
        estimate: the iterative (power/Lanczos, greedy) value, a lower estimate of the exact
            factor; ``None`` when not computed.
        upper: a certified upper bound on the factor, ``None`` when none was computed.
        method: how ``value`` was obtained (``"lanczos"``, ``"dense"``, ``"fft"``,
            ``"schur"``, ``"closed-form"``, ``"conv-gram"``, ``"conv-pointwise"``,
            ``"fft-merged"``, ``"lipsdp-neuron"``, ``"fourier-lmi"``, ``"exact"``,
            ``"greedy"`` ...).
        n_iter: Gram-operator products (forward+backward passes) spent on it.
        extra: method-specific details (``converged``, ``residual``, ``blocks`` ...).
    """

    name: str
    kind: str
    value: float
    certified: bool
    estimate: float | None = None
    upper: float | None = None
    method: str = ""
    n_iter: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_rule(cls, name: str, kind: str, lipschitz: float) -> LayerBound:
        """A factor given by a rule's proven constant (an activation's ``max |slope|``, a
        pooling's constant): certified, and its own estimate and upper bound."""
        return cls(
            name=name,
            kind=kind,
            value=lipschitz,
            certified=True,
            estimate=lipschitz,
            upper=lipschitz,
            method="rule",
        )


@dataclass(kw_only=True)
class LipschitzResult:
    """The outcome of an estimator; ``float(result)`` is ``result.value``. Keyword-only.

    Attributes:
        value: the number (see ``kind``).
        kind: ``"upper"`` — a certified upper bound on the Lipschitz constant;
            ``"estimate"`` — no guarantee either way (power iteration stopped at a tolerance,
            greedy or truncated SeqLip); ``"lower"`` — a certified lower bound.
        certified: ``True`` only when ``value`` is a guaranteed upper bound.
        method: ``"autolip"``, ``"seqlip-exact"``, ``"seqlip-greedy"``, ``"seqlip-certified"``
            (``certify=True``), ``"certified_bound (<winner>)"``, ``"lower_bound"``.
        layers: per-factor breakdown (:class:`LayerBound`).
        nodes: per-node bound carried through the graph (AutoLip), by node name.
        estimate: the same estimator evaluated with iterative layer norms instead of certified
            ones (a tighter number without a guarantee), when both were computed.
        state: warm-start vectors, keyed by layer name; pass back as ``state=`` to warm-start.
        n_iter: total Gram-operator products.
        time_s: wall time in seconds.
        notes: anything the caller should know (why a number is not certified ...).
    """

    value: float
    kind: Kind
    method: str
    layers: list[LayerBound] = field(default_factory=list)
    nodes: dict[str, float] = field(default_factory=dict)
    estimate: float | None = None
    state: dict[str, Tensor] = field(default_factory=dict)
    n_iter: int = 0
    time_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def certified(self) -> bool:
        return self.kind == "upper"

    def __float__(self) -> float:
        return float(self.value)

    def summary(self) -> str:
        """A plain-text table of the breakdown."""
        head = (
            f"{self.method}: {self.value:.6g} ({self._kind_text()})"
            + (f", estimate {self.estimate:.6g}" if self.estimate is not None else "")
            + f", {self.n_iter} iterations, {self.time_s:.3f} s"
        )
        rows = [head, f"{'layer':<40} {'kind':<12} {'value':>12} {'certified':>9} method"]
        for lb in self.layers:
            rows.append(
                f"{lb.name[:40]:<40} {lb.kind:<12} {lb.value:>12.6g} {lb.certified!s:>9} "
                f"{lb.method}"
            )
        rows.extend(f"note: {n}" for n in self.notes)
        return "\n".join(rows)

    def _kind_text(self) -> str:
        return {
            "upper": "certified upper bound",
            "estimate": "estimate, not certified",
            "lower": "certified lower bound",
        }[self.kind]

    def __repr__(self) -> str:
        return (
            f"LipschitzResult(value={self.value:.6g}, kind={self.kind!r}, method={self.method!r}, "
            f"layers={len(self.layers)}, n_iter={self.n_iter}, time_s={self.time_s:.3f})"
        )
