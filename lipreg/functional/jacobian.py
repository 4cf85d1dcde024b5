"""Spectral norms of per-sample Jacobians by batched power iteration: the search guide of
:func:`lipreg.functional.lower_bound.lower_bound` and :class:`lipreg.metrics.LipschitzLowerBound`.

``sigma_i = ‖J_i v_i‖`` with ``v_i`` a unit vector, so ``sigma_i ≤ ‖J_f(x_i)‖_2`` exactly as
computed by autograd at ``x_i``; it is NOT a certified bound on the Lipschitz constant (at a
kink autograd's derivative need not be a derivative of the function): the lower bound only
uses it to choose where to evaluate certified difference quotients.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["jacobian_norms"]


class _Jvp:
    """``v ↦ J_f(x) v`` at a fixed ``x``: forward mode, or reverse-over-reverse without it.

    Forward-mode AD is missing for some kernels (``nn.LSTM`` on CPU, the fused
    ``nn.MultiheadAttention`` path). Then ``J v`` is the vjp of the linear map
    ``u ↦ Jᵀ u`` with cotangent ``v`` (the "double-vjp trick"), exact as well; its graph is
    recorded with the composite scaled-dot-product attention, since the fused kernels have no
    double backward.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> None:
        self.fn, self.x = fn, x
        self.mode: str | None = None  # "forward" or "reverse" once one has worked
        self._reverse_fn: Any = None

    def __call__(self, v: Tensor) -> Tensor:
        if self.mode == "reverse":
            return self._reverse(v)
        try:
            with warnings.catch_warnings():
                # torch's forward-mode AD emits its own "torch.jit.script is deprecated"
                # notice when it loads its decompositions on first use; not ours to act on.
                warnings.filterwarnings("ignore", ".*torch.jit.script.*", FutureWarning)
                _, jv = torch.func.jvp(self.fn, (self.x,), (v,))
        except (NotImplementedError, RuntimeError) as forward_error:
            if self.mode == "forward":
                raise
            try:
                jv = self._reverse(v)
            except Exception as reverse_error:
                raise RuntimeError(
                    f"computing J·v failed in forward mode ({forward_error}) and in the "
                    f"reverse-mode fallback (vjp of the vjp: {reverse_error})."
                ) from reverse_error
            self.mode = "reverse"
            return jv
        self.mode = "forward"
        return jv

    def _reverse(self, v: Tensor) -> Tensor:
        # Fused attention kernels have no double backward: record the graph of this
        # fallback with the composite ("math") attention, which is differentiable twice.
        with _math_attention(), torch.enable_grad():
            if self._reverse_fn is None:
                out, vjp_fn = torch.func.vjp(self.fn, self.x)
                _, self._reverse_fn = torch.func.vjp(vjp_fn, torch.zeros_like(out))
            (jv,) = self._reverse_fn((v,))
        return jv.detach()


def _math_attention() -> Any:
    """A context selecting the composite scaled-dot-product attention (twice differentiable)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to select
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def jacobian_norms(
    fn: Any,
    x: Tensor,
    *,
    v0: Tensor | None = None,
    n_iter: int = 50,
    tol: float = 1e-6,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Spectral norms of the per-sample Jacobians of ``fn`` at the points ``x`` (batched).

    Runs power iteration on ``J_iᵀ J_i`` for every sample ``i`` at once (``fn`` must treat
    samples independently), with ``J v`` by forward-mode AD, or by the double-vjp trick where
    forward mode is not implemented (``nn.LSTM``, fused attention); a model whose in-place ops
    break reverse mode is re-run functionalized. Returns ``(sigma, v)``
    with ``sigma[i] = ‖J_i v_i‖ ≤ ‖J_i‖_2`` (exact autograd values at ``x``: a guide for
    :func:`lower_bound`'s search, not a certified bound at non-differentiable points).
    """
    x = x.detach()
    batch = x.shape[0]
    if generator is None:  # never touch the global RNG
        generator = torch.Generator(device=x.device).manual_seed(0)
    if v0 is None:
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    else:
        v = v0.detach().clone()

    def normalise(t: Tensor) -> Tensor:
        n = t.reshape(batch, -1).norm(dim=1).clamp_min(1e-300)
        return t / n.reshape(batch, *([1] * (t.ndim - 1)))

    v = normalise(v)
    try:
        return _power_iteration(fn, x, v, n_iter, tol, normalise)
    except RuntimeError as exc:
        if "inplace operation" not in str(exc):
            raise
    # In-place ops (``relu_(y)`` on a tensor autograd saved) break reverse mode: functionalize
    # replaces every mutation by its out-of-place equivalent, with the same values.
    return _power_iteration(torch.func.functionalize(fn), x, v, n_iter, tol, normalise)


def _power_iteration(
    fn: Any, x: Tensor, v: Tensor, n_iter: int, tol: float, normalise: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    batch = x.shape[0]
    dims = tuple(range(1, x.ndim))
    with torch.enable_grad():
        _, vjp_fn = torch.func.vjp(fn, x)
    jvp = _Jvp(fn, x)
    prev = torch.zeros(batch, dtype=x.dtype, device=x.device)
    sigma = prev
    for _ in range(n_iter):
        jv = jvp(v)
        sigma = jv.reshape(batch, -1).norm(dim=1)
        (jtjv,) = vjp_fn(jv)
        if bool(((sigma - prev).abs() <= tol * sigma.clamp_min(1e-30)).all()):
            break
        prev = sigma
        zero = jtjv.reshape(batch, -1).norm(dim=1) == 0
        v = torch.where(zero.reshape(batch, *([1] * len(dims))), v, normalise(jtjv))
    return sigma.detach(), v.detach()
