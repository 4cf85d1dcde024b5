"""Certified lower bounds on the Lipschitz constant: difference quotients found by search.

For any two points ``x ≠ z`` the definition of the Lipschitz constant gives

.. math::

    q(x, z) = \\frac{\\lVert f(z) - f(x) \\rVert_2}{\\lVert z - x \\rVert_2} \\le L(f),

with no assumption on differentiability: it holds at kinks, on flat pieces, everywhere.
:func:`lower_bound` reports such a quotient, *evaluated*, never a derivative. The local
Jacobian only guides the search: by Rademacher's theorem ``L(f) = sup_x ‖J_f(x)‖_2``, so the
search maximises ``‖J_f(x) v‖`` (batched ``jvp``/``vjp`` power iteration, :func:`jacobian_norms`)
over real inputs (if given), random points, and simulated annealing started from the best of
them; on request (``n_ascent_steps``, ``n_walk_steps``) also by smoothed gradient ascent and a
walk over reachable ReLU activation patterns (:mod:`lipreg.functional.lower_bound_search`),
which find the rare regions of large ``‖J‖`` that random search misses (e.g. 0.73–0.76 → 0.96–0.98
of the best known value on the GLipSDP CNN-2, ``benchmarks/results/lower_bounds.md``). The
best ``n_certify`` points ``x`` and their directions ``v`` are then certified: for the
steps ``h = ±t · max(‖x‖, 1) · v`` with ``t`` in ``steps`` (1e-1 … 1e-7) the quotient
``q(x, x + h)`` is evaluated on a float64 copy of the network, and the best certified one is
the result. At a kink, where autograd's "derivative" need not be a derivative of the function
(``relu(x) − relu(−x) − x ≡ 0`` has autograd Jacobian ``−1`` at ``0``), the quotient is what the
function really does.

**Rounding model.** Let ``ŷ(z)`` be the float64 evaluation of the network and ``f(z)`` the
exact-arithmetic network with the same (float64-representable) weights. The certificate uses

.. math::

    \\lVert ŷ(z) - f(z) \\rVert \\le E = \\rho \\max_j \\lVert ŷ(z_j) \\rVert
        + \\kappa\\, 2^{-29} \\max_j \\lVert ŷ_{32}(z_j) - ŷ(z_j) \\rVert + m\\,2^{-1022}

over the points ``z_j`` of one candidate (``x`` and its ``2·len(steps)`` neighbours), with
``ρ = 1e-10`` (a relative forward error 10⁶ times float64's unit roundoff), ``ŷ₃₂`` the same
network evaluated in float32 (its error, scaled by the ratio ``2⁻²⁹`` of the unit roundoffs
and a safety factor ``κ = 1e4``, measures the rounding the computation really suffers, which
catches cancellations where the output is far smaller than the intermediate values), and
``m`` the output size. The numerator is then ``‖ŷ(z) − ŷ(x)‖ (1 − (m + 8) ε) − 2E`` (clamped
at 0; ``ε = 2⁻⁵²`` covers the subtraction and the norm), the denominator is the norm of the
*realised* step ``(x + h) − x`` computed in float64, times ``1 + (n + 8) ε``, and the quotient
is multiplied by ``1 − 8 ε``. Norms are computed scaled by the largest entry (no underflow or
overflow).

**Guarantee.** ``value`` is a certified *lower* bound (``kind="lower"``) on the l2 Lipschitz
constant of the network in evaluation mode, under the rounding model above; the argument
pair is returned (``state["argmax"]``, ``state["witness"]``) so that anyone can re-check it.
Any non-finite output raises a ``ValueError`` mentioning "non-finite"; a model whose output for
a sample depends on the rest of the batch is refused.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lipreg.functional.jacobian import jacobian_norms
from lipreg.functional.lower_bound_search import ascend_from_best, walk_from_best
from lipreg.functional.results import LayerBound, LipschitzResult
from lipreg.functional.trace import check_finite_parameters, check_input_shape, eval_function

__all__ = [
    "DEFAULT_STEPS",
    "DifferenceQuotients",
    "QuotientCertificate",
    "jacobian_norms",
    "lower_bound",
]

DEFAULT_STEPS: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
"""Relative step sizes ``t`` of the certified difference quotients (``h = ±t·max(‖x‖,1)·v``)."""
RELATIVE_OUTPUT_MARGIN = 1e-10  # ρ of the rounding model
FLOAT32_ERROR_SAFETY = 1e4  # κ of the rounding model
_EPS = 2.0**-52
_F32_TO_F64 = 2.0**-29  # ratio of the unit roundoffs of float64 and float32
_TINY = 2.0**-1022


def _scaled_norms(rows: Tensor) -> Tensor:
    """Row norms computed as ``a ‖row / a‖`` with ``a`` the largest magnitude (no overflow or
    underflow of the squares); rows with a non-finite entry get ``inf``."""
    rows = rows.reshape(rows.shape[0], -1)
    finite = torch.isfinite(rows).all(dim=1)
    rows = torch.where(finite[:, None], rows, torch.zeros_like(rows))
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=rows.dtype, device=rows.device)
    a = rows.abs().amax(dim=1)
    safe = torch.where(a > 0, a, torch.ones_like(a))
    norms = a * (rows / safe[:, None]).norm(dim=1)
    return torch.where(finite, norms, torch.full_like(norms, math.inf))


def _model_function(model: nn.Module, dtype: torch.dtype) -> tuple[Any, str]:
    """``eval_function`` of ``model`` with every floating parameter and buffer in ``dtype``:
    the model itself when it already is, else a deep copy (the model is never touched)."""
    floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if all(t.dtype == dtype for t in floats):
        return eval_function(model)
    # Why a deep copy: the certificate needs the network evaluated with float64 weights, so a
    # float64 copy of every parameter and buffer is needed whatever we do; deepcopy adds only
    # the module skeleton (0.7 ms for mnist_cnn4, against ~20 s for its lower_bound search,
    # measured 2026-12). The cheaper-looking alternative, torch.func.functional_call with
    # float64 tensors, swaps them into the user's own module for the duration of each call: a
    # training thread, hook or callback running meanwhile would see (and could update) float64
    # weights. The copy is the one way that never touches the model.
    try:
        converted = copy.deepcopy(model).to(dtype)
    except Exception as exc:
        raise RuntimeError(
            f"the lower bound is certified by evaluating the network in float64 (and a float32 "
            f"copy measures its rounding), which needs copy.deepcopy(model).to({dtype}); that "
            f"failed: {type(exc).__name__}: {exc}. Pass a model that can be deep-copied (for a "
            "torch.compile'd model, its original module), or whose parameters and buffers are "
            f"already {dtype}."
        ) from exc
    return eval_function(converted)


@dataclass
class QuotientCertificate:
    """Certified difference quotients of :class:`DifferenceQuotients` for ``K`` candidates.

    Attributes:
        values: ``(K,)`` float64, the best certified quotient ``≤ L(f)`` of each candidate
            (0 where no step gave a positive certified value).
        points: ``(K, *input_shape)`` float64, the point ``z = x + h`` of each best pair.
        steps: ``(K,)`` the signed relative step ``±t`` of each best pair.
        float32_overflow: the float32 evaluation overflowed at some point (those candidates'
            quotients are certified as 0).
    """

    values: Tensor
    points: Tensor
    steps: Tensor
    float32_overflow: bool = False


class DifferenceQuotients:
    """Certified ``‖f(x+h) − f(x)‖ / ‖h‖`` of a network, evaluated in float64.

    Builds (once) a float64 and a float32 evaluation of ``model`` in evaluation mode
    (:func:`lipreg.functional.trace.eval_function` on deep copies when the model's dtype
    differs; the model itself is never modified). Calling it with candidate points ``x`` and
    directions ``v`` returns, per candidate, the largest certified quotient over the steps
    ``h = ±t·max(‖x‖, 1)·v/‖v‖``, ``t ∈ steps``, with the rounding model of this module's
    docstring.

    **Guarantee.** Every returned value is ``≤ L(f)`` (a certified lower bound), whatever the
    network's differentiability at ``x``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        steps: Sequence[float] = DEFAULT_STEPS,
        batch_size: int = 64,
    ) -> None:
        steps = tuple(float(t) for t in steps)
        if not steps or not all(math.isfinite(t) and t > 0 for t in steps):
            raise ValueError(f"steps must be positive finite numbers, got {steps!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        self.steps = steps
        self.batch_size = batch_size
        self.fn64, self.how = _model_function(model, torch.float64)
        self.fn32, _ = _model_function(model, torch.float32)

    def _outputs(self, fn: Any, z: Tensor, dtype: torch.dtype) -> Tensor:
        outs = []
        for s in range(0, z.shape[0], self.batch_size):
            out = fn(z[s : s + self.batch_size])
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"the model's output is a {type(out).__name__}, not a tensor: wrap the model "
                    "so that forward() returns the tensor whose Lipschitz constant you want."
                )
            if out.dtype != dtype:
                raise TypeError(
                    f"the model evaluated on {dtype} inputs with {dtype} weights returned "
                    f"{out.dtype}: it casts internally, so its rounding cannot be bounded by the "
                    "difference-quotient certificate. Remove the internal cast."
                )
            outs.append(out.detach().reshape(out.shape[0], -1).to(torch.float64))
        return torch.cat(outs)

    def __call__(self, x: Tensor, v: Tensor) -> QuotientCertificate:
        """Certify the candidates ``x`` (``(K, *input_shape)``) along ``v`` (same shape)."""
        with torch.no_grad():
            return self._certify(x, v)

    def _certify(self, x: Tensor, v: Tensor) -> QuotientCertificate:
        shape = tuple(x.shape[1:])
        k_count = x.shape[0]
        x64 = x.detach().to(torch.float64).reshape(k_count, -1)
        v64 = v.detach().to(torch.float64).reshape(k_count, -1)
        n = x64.shape[1]
        t = torch.tensor(self.steps, dtype=torch.float64, device=x64.device)
        signed = torch.cat([t, -t])
        values = torch.zeros(k_count, dtype=torch.float64)
        points = x64.clone()
        best_steps = torch.zeros(k_count, dtype=torch.float64)
        overflow, checked = False, False
        for k in range(k_count):
            xk, vk = x64[k], v64[k]
            vnorm = float(_scaled_norms(vk[None])[0])
            if not (math.isfinite(vnorm) and vnorm > 0):
                continue
            vk = vk / vnorm
            scale = max(float(_scaled_norms(xk[None])[0]), 1.0)
            z = xk[None] + (signed[:, None] * scale) * vk[None]  # (2T, n): x + h, rounded
            pts = torch.cat([xk[None], z])
            y64 = self._outputs(self.fn64, pts.reshape(-1, *shape), torch.float64)
            if not bool(torch.isfinite(y64).all()):
                raise ValueError(
                    "the network's output is non-finite (NaN/Inf) at a searched point: no "
                    "certified lower bound exists. Check the weights and any tensor attributes "
                    "used by forward()."
                )
            y32 = self._outputs(self.fn32, pts.to(torch.float32).reshape(-1, *shape), torch.float32)
            err32 = _scaled_norms(y32 - y64)
            m = y64.shape[1]
            if not bool(torch.isfinite(err32).all()):
                overflow = True
                continue
            margin = (
                RELATIVE_OUTPUT_MARGIN * float(_scaled_norms(y64).max())
                + FLOAT32_ERROR_SAFETY * _F32_TO_F64 * float(err32.max())
                + m * _TINY
            )
            if not checked:
                self._check_per_sample(xk.reshape(1, *shape), y64[0], margin)
                checked = True
            num = _scaled_norms(y64[1:] - y64[:1]) * (1 - (m + 8) * _EPS) - 2 * margin
            den = _scaled_norms(z - xk[None]) * (1 + (n + 8) * _EPS)
            q = torch.where(den > 0, num.clamp_min(0) / den.clamp_min(_TINY), 0.0)
            q = q * (1 - 8 * _EPS)
            j = int(torch.argmax(q))
            if float(q[j]) > float(values[k]):
                values[k], points[k], best_steps[k] = q[j], z[j], signed[j]
        if not bool(torch.isfinite(values).all()):  # unreachable: finite outputs, den > 0
            raise ValueError("a certified difference quotient is non-finite.")
        return QuotientCertificate(values, points.reshape(k_count, *shape), best_steps, overflow)

    def _check_per_sample(self, x: Tensor, batched: Tensor, margin: float) -> None:
        """Raise if ``x`` evaluated alone, among its neighbours (``batched``) and next to the
        distant point ``1 − 2x`` gives outputs further apart than the rounding model allows
        (``2E``, plus 1e-8 relative): then the model mixes the samples of a batch."""
        alone = self._outputs(self.fn64, x, torch.float64)[0]
        paired = self._outputs(self.fn64, torch.cat([x, 1 - 2 * x]), torch.float64)[0]
        size = float(_scaled_norms(alone[None])[0])
        diff = float(_scaled_norms(torch.stack([batched - alone, paired - alone])).max())
        if diff > 2 * margin + 1e-8 * size:
            raise ValueError(
                "the network's output for a sample changes with the other samples of the batch "
                f"(difference {diff:.3g} for an output of norm {size:.3g} between a sample "
                "evaluated alone and in a batch): it is not a per-sample function, so it has "
                "no per-sample Lipschitz constant. Remove the batch coupling (batch statistics, "
                "reductions over dim 0) or wrap the model so that samples are independent."
            )


def _as_batches(inputs: Any, input_shape: tuple[int, ...]) -> Iterable[Tensor]:
    if isinstance(inputs, Tensor):
        inputs = [inputs]
    for item in inputs:
        x = item[0] if isinstance(item, tuple | list) else item
        if not isinstance(x, Tensor):
            raise TypeError(
                f"inputs must be a tensor or an iterable of tensors / (x, y) batches; got an "
                f"item of type {type(x).__name__}."
            )
        if tuple(x.shape[1:]) != input_shape:
            if tuple(x.shape) == input_shape:
                x = x[None]
            else:
                raise ValueError(
                    f"inputs have shape {tuple(x.shape)}, expected (batch, *{input_shape})."
                )
        yield x


class _Pool:
    """The ``size`` best ``(‖J v‖, x, v, source)`` seen so far."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sig: Tensor | None = None
        self.x: Tensor | None = None
        self.v: Tensor | None = None
        self.src: list[str] = []

    def add(self, sig: Tensor, x: Tensor, v: Tensor, source: str) -> None:
        srcs = self.src + [source] * sig.shape[0]
        if self.sig is not None:
            assert self.x is not None and self.v is not None
            sig, x, v = torch.cat([self.sig, sig]), torch.cat([self.x, x]), torch.cat([self.v, v])
        top = torch.argsort(sig, descending=True, stable=True)[: self.size]
        self.sig, self.x, self.v = sig[top], x[top].clone(), v[top].clone()
        self.src = [srcs[int(i)] for i in top]


def lower_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    inputs: Tensor | Iterable[Any] | None = None,
    n_random: int = 256,
    scale: float | None = None,
    n_anneal_steps: int = 50,
    n_chains: int = 16,
    batch_size: int = 64,
    max_batches: int = 100,
    n_iter: int = 50,
    seed: int = 0,
    progress: bool = False,
    n_certify: int = 8,
    steps: Sequence[float] = DEFAULT_STEPS,
    n_ascent_steps: int = 0,
    n_walk_steps: int = 0,
) -> LipschitzResult:
    """A certified lower bound: the best float64 difference quotient near the points of
    largest local Jacobian norm found by search.

    ``value = ‖f(z) − f(x)‖ / ‖z − x‖`` minus an explicit rounding margin (see the module
    docstring), for a pair ``(x, z)`` actually evaluated, so ``value ≤ L(f)`` by definition,
    at kinks too. The Jacobian search only chooses ``x`` and the direction of ``z − x``.

    Args:
        model: any network (fx-traceable models run without any change of mode; others are
            switched to eval mode for the call and restored).
        input_shape: shape of ONE input, without the batch dimension.
        inputs: real inputs to search from: a tensor ``(N, *input_shape)`` or an iterable of
            tensors or ``(x, y)`` batches (e.g. a DataLoader; at most ``max_batches`` read).
        n_random: random points ``N(μ, scale²)`` (``μ``, ``scale``: mean and std of
            ``inputs`` if given, else 0 and 1).
        scale: override of the random points' standard deviation.
        n_anneal_steps: simulated-annealing steps from the ``n_chains`` best points.
        n_chains: number of annealing chains.
        batch_size: points per batched Jacobian evaluation.
        max_batches: cap on batches read from ``inputs``.
        n_iter: power iterations per Jacobian norm.
        seed: seed of the private generator.
        progress: show a tqdm progress bar (if tqdm is installed).
        n_certify: number of best search points whose difference quotients are certified.
        steps: relative step sizes ``t`` of the quotients (``h = ±t·max(‖x‖, 1)·v``).
        n_ascent_steps: steps of smoothed gradient ascent
            (:func:`~lipreg.functional.lower_bound_search.smoothed_ascent`) from the
            ``n_chains`` best points and ``n_chains`` random restarts, after the annealing.
            0 (default) skips it; ~100 is a good budget for ReLU networks.
        n_walk_steps: steps of the walk over reachable activation patterns
            (:func:`~lipreg.functional.lower_bound_search.pattern_walk`) from the
            ``n_chains`` best distinct points found so far, last. 0 (default) skips it; ~30 is a
            good budget. Needs ``nn.ReLU`` modules (a note says when there is none).

    Returns:
        :class:`~lipreg.functional.results.LipschitzResult` with ``kind="lower"``;
        ``estimate`` is the largest autograd ``‖J(x) v‖`` found (not certified). Its ``state``
        holds ``"argmax"`` (the point ``x``), ``"witness"`` (the float64 point ``z``, so that
        ``value ≤ ‖f(z) − f(x)‖/‖z − x‖``), ``"step"`` (the signed relative step) and
        ``"direction"`` (the search direction ``v`` at ``x``).

    Raises:
        ValueError: non-finite weights, Jacobians or outputs (message mentions
            "non-finite"), or a batch-coupled model.
    """
    start = time.perf_counter()
    input_shape = check_input_shape(input_shape)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(n_certify, int) or n_certify < 1:
        raise ValueError(f"n_certify must be a positive int, got {n_certify!r}.")
    check_finite_parameters(model)
    first = next(iter(list(model.parameters()) + list(model.buffers())), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    fn, how = eval_function(model)
    certifier = DifferenceQuotients(model, steps=steps, batch_size=batch_size)
    for name, n in (("n_ascent_steps", n_ascent_steps), ("n_walk_steps", n_walk_steps)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}.")
    # The walk starts from the best pooled points, so the pool then keeps n_chains of them;
    # only the n_certify best are certified either way.
    pool_size = max(n_certify, n_chains) if n_walk_steps > 0 else n_certify
    search = _Search(
        fn=fn,
        gen=torch.Generator(device=device).manual_seed(seed),
        pool=_Pool(pool_size),
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        n_iter=n_iter,
    )
    all_x, all_s, std = _starting_points(
        search, inputs, input_shape, n_random=n_random, scale=scale, max_batches=max_batches
    )
    if n_anneal_steps > 0 and n_chains > 0:
        _anneal(search, all_x, all_s, std, n_anneal_steps, n_chains, progress=progress)
    extra = None
    if n_ascent_steps > 0:
        extra = ascend_from_best(
            model,
            all_x,
            all_s,
            search.evaluate,
            n_steps=n_ascent_steps,
            n_chains=n_chains,
            std=std,
            generator=search.gen,
            progress=progress,
        )
    if n_walk_steps > 0:
        _run_walk(search, model, n_walk_steps, n_chains, extra, progress)
    pool = search.pool
    assert pool.x is not None and pool.v is not None and pool.sig is not None
    k = min(n_certify, pool.x.shape[0])
    cert = certifier(pool.x[:k], pool.v[:k])
    return _lower_bound_result(search, cert, how, start)


def _run_walk(
    search: _Search,
    model: nn.Module,
    n_steps: int,
    n_chains: int,
    extra: tuple[Tensor, Tensor, Tensor] | None,
    progress: bool,
) -> None:
    """The pattern walk from the pool and the ascent chains' bests (``extra``); a note when
    the model has no ``nn.ReLU``."""
    pool = search.pool
    assert pool.x is not None and pool.sig is not None and pool.v is not None
    candidates = (pool.x, pool.sig, pool.v)
    if extra is not None:
        x, sig, v = (torch.cat([a, b.to(a.dtype)]) for a, b in zip(candidates, extra, strict=True))
        candidates = (x, sig, v)
    ran = walk_from_best(
        model, candidates, search.evaluate, n_steps=n_steps, n_chains=n_chains, progress=progress
    )
    if not ran:
        search.notes.append(
            "pattern walk skipped: the model has no nn.ReLU module (the walk flips ReLU units "
            "found by type); the other strategies ran."
        )


@dataclass
class _Search:
    """The state of the Jacobian-norm search: the model's function, the private generator, the
    pool of the best candidates and the largest ``‖J v‖`` found per source."""

    fn: Callable[[Tensor], Any]
    gen: torch.Generator
    pool: _Pool
    device: torch.device
    dtype: torch.dtype
    batch_size: int
    n_iter: int
    sources: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def fn_tensor(self, x: Tensor) -> Tensor:
        out = self.fn(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"the model's output is a {type(out).__name__}, not a tensor.")
        return out

    def evaluate(self, x: Tensor, source: str) -> tuple[Tensor, Tensor]:
        """``(‖J(x_i) v_i‖, v_i)`` for every point (batched power iteration); adds them to the
        pool. Raises if a Jacobian is non-finite."""
        sig_all, v_all = [], []
        for s in range(0, x.shape[0], self.batch_size):
            xb = x[s : s + self.batch_size].to(device=self.device, dtype=self.dtype)
            sig, v = jacobian_norms(self.fn_tensor, xb, n_iter=self.n_iter, generator=self.gen)
            sig_all.append(sig)
            v_all.append(v)
        sig, v = torch.cat(sig_all), torch.cat(v_all)
        if not bool(torch.isfinite(sig).all()):
            raise ValueError(
                f"the network's Jacobian is non-finite (NaN/Inf) at some {source} points: no "
                "certified lower bound exists. Check the weights and any tensor attributes used "
                "by forward()."
            )
        self.sources[source] = max(self.sources.get(source, 0.0), float(sig.max()))
        self.pool.add(sig, x.to(device=self.device, dtype=self.dtype), v, source)
        return sig, v


def _read_inputs(
    search: _Search, inputs: Tensor | Iterable[Any], input_shape: tuple[int, ...], max_batches: int
) -> Tensor:
    """The first ``max_batches`` batches of ``inputs``, concatenated, in the model's dtype."""
    data = []
    for b, xb in enumerate(_as_batches(inputs, input_shape)):
        if b >= max_batches:
            break
        data.append(xb.detach().to(device=search.device, dtype=search.dtype))
    if not data:
        raise ValueError("inputs is empty: no point to search from.")
    data_x = torch.cat(data)
    if not bool(torch.isfinite(data_x).all()):
        raise ValueError("inputs contain non-finite (NaN/Inf) values.")
    return data_x


def _starting_points(
    search: _Search,
    inputs: Tensor | Iterable[Any] | None,
    input_shape: tuple[int, ...],
    *,
    n_random: int,
    scale: float | None,
    max_batches: int,
) -> tuple[Tensor, Tensor, float]:
    """Evaluate the data points, then ``n_random`` points ``N(μ, std²)`` (``μ``, ``std``: the
    data's mean and std, else 0 and 1; ``scale`` overrides ``std``). Returns all the points,
    their ``‖J v‖`` and ``std`` (the annealing's step scale)."""
    pool_x, pool_s = [], []
    mean, std = 0.0, 1.0
    if inputs is not None:
        data_x = _read_inputs(search, inputs, input_shape, max_batches)
        mean, std = float(data_x.mean()), float(data_x.std()) if data_x.numel() > 1 else 1.0
        if not std > 0:  # constant inputs: random points would all collapse onto them
            std = 1.0
        sig, _ = search.evaluate(data_x, "data")
        pool_x.append(data_x)
        pool_s.append(sig)
    if scale is not None:
        std = float(scale)
    if n_random > 0:
        rnd = mean + std * torch.randn(
            n_random, *input_shape, generator=search.gen, dtype=search.dtype, device=search.device
        )
        sig, _ = search.evaluate(rnd, "random")
        pool_x.append(rnd)
        pool_s.append(sig)
    if not pool_x:
        raise ValueError("nothing to search: give inputs or n_random > 0.")
    return torch.cat(pool_x), torch.cat(pool_s), std


def _lower_bound_result(
    search: _Search, cert: QuotientCertificate, how: str, start: float
) -> LipschitzResult:
    """The best certified quotient, with the search's breakdown and the witness pair."""
    pool = search.pool
    assert pool.sig is not None and pool.x is not None and pool.v is not None
    i = int(torch.argmax(cert.values))
    value = float(cert.values[i])
    best_jacobian = float(pool.sig[0])
    layers = [
        LayerBound(
            name=f"search: best ‖J v‖ from {src}",
            kind="search",
            value=val,
            certified=False,
            estimate=val,
            method="jacobian (autograd; guides the search, not certified)",
        )
        for src, val in search.sources.items()
    ]
    layers.append(
        LayerBound(
            name="difference quotient",
            kind="lower",
            value=value,
            certified=False,  # LayerBound.certified means "an upper bound"
            estimate=best_jacobian,
            method="difference quotient (float64, rounding margin)",
        )
    )
    return LipschitzResult(
        value=value,
        kind="lower",
        method="lower_bound",
        layers=layers,
        estimate=best_jacobian,
        state={
            "argmax": pool.x[i].clone(),
            "witness": cert.points[i].clone(),
            "step": cert.steps[i].clone(),
            "direction": pool.v[i].clone(),
        },
        time_s=time.perf_counter() - start,
        notes=_result_notes(pool.src[i], cert, i, best_jacobian, how) + search.notes,
    )


def _result_notes(
    source: str, cert: QuotientCertificate, i: int, best_jacobian: float, how: str
) -> list[str]:
    """What the reader of the result should know: what the value is, where it was found, and
    when autograd's norm disagrees with the certified quotient (a kink)."""
    value = float(cert.values[i])
    notes = [
        "certified lower bound: a difference quotient ‖f(z) − f(x)‖/‖z − x‖ evaluated in "
        "float64 with an explicit rounding margin (≤ L by definition, kinks included); the "
        "true constant can be larger.",
        f"best found by: {source}; step t = {float(cert.steps[i]):+.0e} relative to max(‖x‖, 1)",
    ]
    if best_jacobian > value * (1 + 1e-2) + 1e-12:
        notes.append(
            f"the largest autograd ‖J(x) v‖ found ({best_jacobian:.6g}) exceeds every certified "
            f"difference quotient ({value:.6g}): at a kink (ReLU, max, abs) autograd's "
            "derivative need not be a derivative of the function; the quotient is reported."
        )
    if cert.float32_overflow:
        notes.append(
            "the float32 evaluation that measures rounding overflowed at some candidates; "
            "their quotients were not certified (counted as 0)."
        )
    if how != "fx":
        notes.append(f"evaluation path: {how}")
    return notes


def _anneal(
    search: _Search,
    all_x: Tensor,
    all_s: Tensor,
    std: float,
    n_steps: int,
    n_chains: int,
    *,
    progress: bool,
) -> None:
    """Simulated annealing on ``x ↦ ‖J(x)‖`` from the ``n_chains`` best points; every proposal
    is evaluated by ``search`` (so it enters the pool of candidates)."""
    gen = search.gen
    k = min(n_chains, all_x.shape[0])
    top = torch.argsort(all_s, descending=True)[:k]
    x, s = all_x[top].clone(), all_s[top].clone()
    step = torch.full((k,), 0.5 * std, dtype=x.dtype, device=x.device)
    temp0 = float(s.mean()) * 0.05 + 1e-12
    steps = range(n_steps)
    if progress:
        try:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="lower bound (annealing)")
        except ImportError:
            pass
    shape = (k,) + (1,) * (x.ndim - 1)
    for t in steps:
        temp = temp0 / math.log(2.0 + t)
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        prop = x + step.reshape(shape) * noise
        s_prop, _ = search.evaluate(prop, "annealing")
        u = torch.rand(k, generator=gen, dtype=x.dtype, device=x.device)
        accept = (s_prop >= s) | (u < torch.exp((s_prop - s) / temp))
        x = torch.where(accept.reshape(shape), prop, x)
        s = torch.where(accept, s_prop, s)
        # Shrink the step where proposals keep failing, grow it where they succeed.
        step = torch.where(accept, step * 1.1, step * 0.9)
