"""An independent, certified lower bound on the Lipschitz constant of a network.

Nothing here imports lipreg. For ``f`` the network in evaluation mode (a float64 deep copy),

* ``‖J_f(x)‖₂`` is computed from the dense Jacobian (autograd, float64) at random points of
  several scales, then pushed up by a few steps of gradient ascent on the top singular value
  ``σ(x) = uᵀ J_f(x) v`` (hill climbing where that gradient vanishes, as for ReLU networks);
* the best point is *certified* by a difference quotient along the top right singular vector
  ``v``:

  .. math::

      L(f) \\ge \\frac{\\lVert f(x + h v) - f(x) \\rVert_2}{\\lVert (x + h v) - x \\rVert_2},

  which holds by the definition of ``L(f)`` for any ``h`` (kinks included). The quotient is
  evaluated in float64 and a rounding margin is subtracted from the numerator.

The returned :attr:`OracleResult.lower` is the best certified quotient: a true lower bound, so
a certified upper bound below it is a soundness bug.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "OracleResult",
    "certified_quotient",
    "eval_mode",
    "fingerprint_diff",
    "float64_copy",
    "model_fingerprint",
    "oracle_lower_bound",
]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``model`` in evaluation mode for the block; each module's own
    ``training`` flag is restored exactly afterwards (mixed modes included)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _convert_plain_tensors(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating tensors stored as plain attributes (neither parameter nor buffer)."""
    for m in model.modules():
        for name, value in list(vars(m).items()):
            if isinstance(value, Tensor) and value.is_floating_point():
                object.__setattr__(m, name, value.detach().to(dtype))


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 deep copy of ``model`` (parameters, buffers and plain tensor attributes)."""
    with torch.no_grad():
        clone = copy.deepcopy(model)
        clone.to(torch.float64)
        _convert_plain_tensors(clone, torch.float64)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def model_fingerprint(model: nn.Module) -> dict[str, object]:
    """Everything bounding must leave bit-identical: parameters, buffers (with their names),
    plain tensor attributes, ``.grad`` and every module's ``training`` flag."""
    out: dict[str, object] = {}
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            out[f"param:{name}"] = p.detach().clone()
            out[f"grad:{name}"] = None if p.grad is None else p.grad.detach().clone()
            out[f"requires_grad:{name}"] = p.requires_grad
        for name, b in model.named_buffers(remove_duplicate=False):
            out[f"buffer:{name}"] = None if b is None else b.detach().clone()
        for mname, m in model.named_modules(remove_duplicate=False):
            out[f"training:{mname}"] = m.training
            for aname, value in vars(m).items():
                if isinstance(value, Tensor):
                    out[f"attr:{mname}.{aname}"] = value.detach().clone()
    return out


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def fingerprint_diff(before: dict[str, object], after: dict[str, object]) -> list[str]:
    """Keys whose values differ bitwise (NaN-aware) between two :func:`model_fingerprint`."""
    bad = list(before.keys() ^ after.keys())
    for key in before.keys() & after.keys():
        a, b = before[key], after[key]
        tensors = isinstance(a, Tensor) and isinstance(b, Tensor)
        if not (_same_tensor(a, b) if tensors else a == b):
            bad.append(key)
    return sorted(bad)


@dataclass
class OracleResult:
    """``lower``: certified difference quotient (a true lower bound on ``L(f)``);
    ``jacobian_norm``: the largest ``‖J(x)‖₂`` seen (exact up to float64 rounding);
    ``point``/``direction``: where and along what ``lower`` was certified."""

    lower: float
    jacobian_norm: float
    point: Tensor
    direction: Tensor
    n_points: int
    dtype: torch.dtype


class _Function:
    """``x ↦ model(x.reshape(1, *shape)).reshape(-1)`` on flat float inputs."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype):
        self.model = model
        self.shape = tuple(input_shape)
        self.dtype = dtype
        self.mode = "autograd-vectorized"
        self.batch_ok = True
        self.power_iterations = 0  # > 0: power iteration instead of dense Jacobians

    def __call__(self, x: Tensor) -> Tensor:
        y = self.model(x.reshape(1, *self.shape))
        if not isinstance(y, Tensor):
            raise TypeError(f"the oracle needs a tensor output, got {type(y).__name__}")
        return y.reshape(-1)

    def value(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self(x)

    def jacobian(self, x: Tensor) -> Tensor:
        """Dense Jacobian by autograd; by central differences for models autograd cannot
        differentiate (an in-place update of a tensor saved for backward). Either way only
        the search uses it: the final value is certified by a difference quotient."""
        if self.mode == "autograd-vectorized":
            try:
                with torch.enable_grad():
                    return torch.autograd.functional.jacobian(self, x, vectorize=True)
            except Exception:  # vmap over the backward is not supported by every op
                self.mode = "autograd"
        if self.mode == "autograd":
            try:
                with torch.enable_grad():
                    return torch.autograd.functional.jacobian(self, x)
            except RuntimeError:
                self.mode = "finite-differences"
        return self._fd_jacobian(x)

    def _fd_jacobian(self, x: Tensor) -> Tensor:
        n = x.numel()
        h = 1e-6 * max(1.0, float(x.abs().max()))
        eye = torch.eye(n, dtype=x.dtype)
        points = torch.cat([x + h * eye, x - h * eye])
        with torch.no_grad():
            out = self.batched(points)
        if out is None:  # the model couples the samples of a batch: one point at a time
            with torch.no_grad():
                out = torch.stack([self(p) for p in points])
        return ((out[:n] - out[n:]) / (2 * h)).T

    def batched(self, points: Tensor) -> Tensor | None:
        """``f`` on each row of ``points`` in one batched call, or None if the batched result
        differs from the per-sample one (checked on the first and last rows)."""
        if not self.batch_ok:
            return None
        out = self.model(points.reshape(-1, *self.shape)).reshape(points.shape[0], -1)
        for i in (0, -1):
            ref = self(points[i])
            if not torch.allclose(out[i], ref, rtol=1e-9, atol=1e-12):
                self.batch_ok = False
                return None
        return out

    def top_triplet(self, x: Tensor) -> tuple[float, Tensor, Tensor]:
        if self.power_iterations:
            return self.power_triplet(x, self.power_iterations)
        jac = self.jacobian(x).detach()
        if not bool(torch.isfinite(jac).all()):
            return math.nan, torch.zeros(jac.shape[0], dtype=jac.dtype), x * 0
        u, s, vh = torch.linalg.svd(jac, full_matrices=False)
        return float(s[0]), u[:, 0], vh[0]

    def power_triplet(self, x: Tensor, iterations: int) -> tuple[float, Tensor, Tensor]:
        """Power iteration on ``JᵀJ`` (Jacobian-vector and vector-Jacobian products) for
        networks too large for a dense Jacobian: ``‖J v‖`` for the final unit ``v``."""
        gen = torch.Generator().manual_seed(1)
        v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        v = v / v.norm()
        with torch.enable_grad():
            y, vjp = torch.func.vjp(self, x)
            jv = y
            for _ in range(iterations):
                _, jv = torch.func.jvp(self, (x,), (v,))
                (w,) = vjp(jv)
                if not bool(torch.isfinite(w).all()) or float(w.norm()) == 0.0:
                    break
                v = w / w.norm()
            _, jv = torch.func.jvp(self, (x,), (v,))
        sigma = float(jv.norm())
        return sigma, (jv / max(sigma, 1e-300)).detach(), v.detach()

    def sigma_gradient(self, x: Tensor, u: Tensor, v: Tensor) -> Tensor | None:
        """Gradient of ``x ↦ uᵀ J(x) v`` (= ∇σ_max where the top singular value is simple)."""
        if self.mode == "finite-differences":
            return None
        try:
            with torch.enable_grad():
                xr = x.detach().clone().requires_grad_(True)
                y = self(xr)
                (g,) = torch.autograd.grad(y, xr, u, create_graph=True)
                s = g @ v
                if not s.requires_grad:
                    return None
                (gr,) = torch.autograd.grad(s, xr, allow_unused=True)
        except RuntimeError:  # no double backward for some ops
            return None
        if gr is None or not bool(torch.isfinite(gr).all()) or float(gr.norm()) == 0.0:
            return None
        return gr.detach()


def certified_quotient(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    v: Tensor,
    *,
    steps: Sequence[float],
    rel_err: float,
    sigma: float,
) -> float:
    """Best ``(‖f(x ± h v) − f(x)‖ − margin) / ‖(x ± h v) − x‖`` over ``h`` in ``steps``.

    The step actually taken is the float difference ``(x + h v) − x`` (exact inputs); the
    margin ``2 · rel_err · (1 + ‖f‖ + σ‖x‖)`` covers the rounding error of the two evaluations.
    """
    with torch.no_grad():
        fx = fn(x)
        xnorm = float(x.norm())
        best = 0.0
        for h in steps:
            for sign in (1.0, -1.0):
                xp = x + sign * h * v
                dn = float((xp - x).norm())
                if dn == 0.0:
                    continue
                fxp = fn(xp)
                if not (bool(torch.isfinite(fxp).all()) and bool(torch.isfinite(fx).all())):
                    continue
                num = float((fxp - fx).norm())
                scale = 1.0 + max(float(fx.norm()), float(fxp.norm())) + sigma * xnorm
                q = (num - 2.0 * rel_err * scale) / dn * (1.0 - 1e-12)
                best = max(best, q)
    return best


def oracle_lower_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    n_random: int = 8,
    scales: Sequence[float] = (0.3, 1.0, 3.0),
    n_starts: int = 2,
    n_ascent: int = 6,
    seed: int = 0,
    inputs: Tensor | None = None,
    power_iterations: int = 0,
) -> OracleResult:
    """A certified lower bound on ``L(model)`` (evaluation mode), independent of lipreg.

    ``n_random`` Gaussian points per scale in ``scales`` (plus ``inputs``), then ``n_ascent``
    ascent steps from the ``n_starts`` best points; the best point is certified by a float64
    difference quotient. ``model`` is not modified (a float64 deep copy is evaluated).
    ``power_iterations > 0``: ``‖J(x)‖`` by that many power-iteration steps (JVP/VJP) instead
    of the dense Jacobian, for large networks with many outputs.
    """
    shape = tuple(int(s) for s in input_shape)
    n = math.prod(shape)
    try:
        clone = float64_copy(model)
        dtype, rel_err = torch.float64, 1e-10
    except Exception:  # a model that cannot be deep-copied: evaluate it in its own dtype
        clone = model
        p = next(iter(model.parameters()), None)
        dtype = p.dtype if p is not None else torch.float32
        rel_err = 1e-10 if dtype == torch.float64 else 1e-4
    gen = torch.Generator().manual_seed(seed)
    with eval_mode(clone):
        fn = _Function(clone, shape, dtype)
        fn.power_iterations = power_iterations
        candidates: list[Tensor] = []
        if inputs is not None:
            candidates += [t.reshape(-1).to(dtype) for t in inputs]
        for s in scales:
            candidates += [
                s * torch.randn(n, generator=gen, dtype=dtype) for _ in range(max(n_random, 0))
            ]
        if not candidates:
            candidates = [torch.randn(n, generator=gen, dtype=dtype)]
        scored: list[tuple[float, Tensor, Tensor, Tensor]] = []
        for x in candidates:
            sigma, u, v = fn.top_triplet(x)
            if math.isfinite(sigma):
                scored.append((sigma, x, u, v))
        if not scored:
            x = candidates[0]
            return OracleResult(0.0, math.nan, x, torch.zeros_like(x), len(candidates), dtype)
        scored.sort(key=lambda t: -t[0])
        n_points = len(candidates)
        best = scored[0]
        for sigma, x, u, v in scored[: max(n_starts, 0)]:
            step = 0.1 * max(float(x.norm()), 1.0)
            cur = (sigma, x, u, v)
            for _ in range(n_ascent):
                grad = fn.sigma_gradient(cur[1], cur[2], cur[3])
                if grad is None:  # piecewise linear here: a random probe instead
                    grad = torch.randn(n, generator=gen, dtype=dtype)
                x_new = cur[1] + step * grad / grad.norm()
                s_new, u_new, v_new = fn.top_triplet(x_new)
                n_points += 1
                if math.isfinite(s_new) and s_new > cur[0]:
                    cur = (s_new, x_new, u_new, v_new)
                    step *= 1.5
                else:
                    step *= 0.5
            if cur[0] > best[0]:
                best = cur
        sigma, x, _, v = best
        hs = [c * max(1.0, float(x.abs().max())) for c in (1e-2, 1e-3, 1e-4, 1e-5)]
        if dtype != torch.float64:
            hs = [c * max(1.0, float(x.abs().max())) for c in (1e-1, 3e-2, 1e-2)]
        lower = certified_quotient(fn.value, x, v, steps=hs, rel_err=rel_err, sigma=sigma)
    return OracleResult(
        lower=lower, jacobian_norm=sigma, point=x, direction=v, n_points=n_points, dtype=dtype
    )
