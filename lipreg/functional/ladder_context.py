"""What an entry of the certificate ladder (:mod:`lipreg.functional.ladder`) sees about one
affine chain, and the helpers that build its answer.

:class:`ChainContext` computes the chain's derived quantities once (specs at the analysis
precision and in float64, the product of the isometries' scales, the non-isometric core, the
chain's linear map, the merged convolution of ``[batch norm]* conv [batch norm]*``) and runs the
iterative (Lanczos/power) estimate at most once. :func:`affine_bound` and
:func:`with_iterative` build the :class:`~lipreg.functional.results.LayerBound` an entry
returns; :func:`warm_vector` reads the chain's warm start.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import Tensor, fx

from lipreg.functional.chains import AffineChain, chain_linear_map
from lipreg.functional.conv_chain import merged_conv
from lipreg.functional.linear_map import LinearMap
from lipreg.functional.power_iteration import OperatorNormResult, operator_norm
from lipreg.functional.results import LayerBound
from lipreg.functional.rounding import folded_kernel_error
from lipreg.functional.specs import Affine, ConvData

if TYPE_CHECKING:
    from lipreg.functional.ladder import ChainBounder

__all__ = ["CLOSED_FORM_PAD", "ChainContext", "affine_bound", "warm_vector", "with_iterative"]

# Closed forms evaluated in float64 are exact up to a few ulps: they are padded by 4 ulps.
CLOSED_FORM_PAD = 1 + 4 * torch.finfo(torch.float64).eps


class ChainContext:
    """What a ladder entry sees about one chain; the derived quantities are computed once."""

    def __init__(self, bounder: ChainBounder, chain: AffineChain) -> None:
        self.bounder = bounder
        self.chain = chain
        self.refusal = ""  # why the product certificate failed (for the estimate's label)
        self._iterative: OperatorNormResult | None = None

    @cached_property
    def specs(self) -> list[Affine]:
        """The chain's specs at the analysis precision."""
        return [self.bounder.analysis.specs[n] for n in self.chain.nodes]  # type: ignore[misc]

    @cached_property
    def bound_specs(self) -> list[Affine]:
        """The specs the factor is computed from: float64 (the model's own weights, closed
        forms in float64) when certifying, else those of the analysis."""
        if not self.bounder.certify:
            return self.specs
        return [self.bounder.analysis64.specs[n] for n in self.chain.nodes]  # type: ignore[misc]

    @cached_property
    def scale(self) -> float:
        """Product of the norms of the isometries (scalar multiples of isometries)."""
        return math.prod(s.norm for s in self.bound_specs if s.isometry)  # type: ignore[misc]

    @cached_property
    def core(self) -> list[tuple[fx.Node, Affine]]:
        """The ops that are not isometries, with their nodes."""
        pairs = zip(self.chain.nodes, self.bound_specs, strict=True)
        return [(n, s) for n, s in pairs if not s.isometry]

    @cached_property
    def op(self) -> LinearMap:
        """The chain's linear map at the analysis precision (iterations, size checks)."""
        return chain_linear_map(self.bounder.analysis, self.chain)

    @cached_property
    def merged(self) -> tuple[ConvData, float, bool] | None:
        """The chain ``[isometry]* [scale]* conv [scale]* [isometry]*`` as ``(merged float64
        convolution, its kernel_error, no leading isometry)``
        (:func:`~lipreg.functional.conv_chain.merged_conv`,
        :func:`~lipreg.functional.rounding.folded_kernel_error`), else ``None``."""
        specs = self.bound_specs
        inner = [i for i, spec in enumerate(specs) if not spec.isometry]
        if not inner:
            return None
        conv = merged_conv(specs[inner[0] : inner[-1] + 1])
        if conv is None:
            return None
        return conv, folded_kernel_error(inner[-1] - inner[0]), inner[0] == 0

    def iterative(self) -> OperatorNormResult:
        """Lanczos/power iteration on the chain (warm-started from ``state``), run once; its
        vector (and spectral gap) go to ``new_state``."""
        if self._iterative is None:
            b, name = self.bounder, self.chain.name
            gap0 = b.state.get(f"{name}#gap")
            res = operator_norm(
                self.op,
                v0=b.state.get(name),
                gap0=float(gap0) if gap0 is not None else None,
                tol=b.tol,
                max_iter=b.max_iter,
                method=b.method,  # type: ignore[arg-type]
                generator=b.cold_start_generator(name),
            )
            b.new_state[name] = res.v
            if math.isfinite(res.gap):
                b.new_state[f"{name}#gap"] = torch.tensor(res.gap, dtype=torch.float64)
            self._iterative = res
        return self._iterative


def affine_bound(ctx: ChainContext, value: float, **fields) -> LayerBound:
    """The chain's factor ``value`` as an affine :class:`LayerBound` (``fields``: its other
    attributes)."""
    return LayerBound(name=ctx.chain.name, kind="affine", value=value, **fields)


def warm_vector(ctx: ChainContext, n_in: int) -> Tensor | None:
    """The chain's warm-start vector from ``state`` (the last estimate's or certificate's),
    flattened, when it has ``n_in`` entries: the dense certificate's ``v0``, which only
    speeds its search (the bound is proved by its Cholesky test whatever ``v0`` is)."""
    v = ctx.bounder.state.get(ctx.chain.name)
    return v.reshape(-1) if v is not None and v.numel() == n_in else None


def with_iterative(
    ctx: ChainContext, res: OperatorNormResult, value: float, upper: float | None, method: str
) -> LayerBound:
    """A factor whose ``estimate`` is the iterative value ``res.sigma``; certified iff an
    ``upper`` bound is given."""
    extra = {"converged": res.converged, "residual": res.residual}
    return affine_bound(
        ctx,
        value,
        certified=upper is not None,
        estimate=res.sigma,
        upper=upper,
        method=method,
        n_iter=res.n_iter,
        extra=extra,
    )
