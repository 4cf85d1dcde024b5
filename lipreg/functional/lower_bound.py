"""Lower bounds on the Lipschitz constant from local Jacobians.

By Rademacher's theorem ``L(f) = sup_x ‖J_f(x)‖_2`` over points of differentiability, so for
any such ``x`` and unit ``v``

.. math::

    \\lVert J_f(x)\\, v \\rVert_2 \\le \\lVert J_f(x) \\rVert_2 \\le L(f).

:func:`lower_bound` maximises ``‖J_f(x)‖_2`` over candidate points: real inputs (if given),
random points, and simulated annealing started from the best of them. The Jacobian norm at
each point is computed exactly through autograd (batched ``jvp``/``vjp`` power iteration,
one independent iteration per sample, never a finite difference). For ReLU networks the
gradient of ``x ↦ ‖J_f(x)‖`` is zero almost everywhere, which is why the search is
derivative-free (random + annealing) rather than gradient ascent.

**Guarantee.** ``value`` is a certified *lower* bound (``kind="lower"``): each candidate's
value is ``‖J v‖`` for an explicit unit ``v``, attained at a point where the network is
differentiable with probability one (random or perturbed points).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lipreg.functional.graph import check_finite_parameters, check_input_shape, eval_function
from lipreg.functional.results import LayerBound, LipschitzResult

__all__ = ["jacobian_norms", "lower_bound"]


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
    samples independently). Returns ``(sigma, v)`` with ``sigma[i] = ‖J_i v_i‖ ≤ ‖J_i‖_2``.
    """
    x = x.detach()
    batch = x.shape[0]
    if generator is None:  # never touch the global RNG
        generator = torch.Generator(device=x.device).manual_seed(0)
    if v0 is None:
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    else:
        v = v0.detach().clone()
    dims = tuple(range(1, x.ndim))

    def normalise(t: Tensor) -> Tensor:
        n = t.reshape(batch, -1).norm(dim=1).clamp_min(1e-300)
        return t / n.reshape(batch, *([1] * (t.ndim - 1)))

    v = normalise(v)
    with torch.enable_grad():
        _, vjp_fn = torch.func.vjp(fn, x)
    prev = torch.zeros(batch, dtype=x.dtype, device=x.device)
    sigma = prev
    for _ in range(n_iter):
        with warnings.catch_warnings():
            # torch's forward-mode AD emits its own "torch.jit.script is deprecated" notice
            # when it loads its decompositions on first use; it is not ours to act on.
            warnings.filterwarnings("ignore", ".*torch.jit.script.*", FutureWarning)
            _, jv = torch.func.jvp(fn, (x,), (v,))
        sigma = jv.reshape(batch, -1).norm(dim=1)
        (jtjv,) = vjp_fn(jv)
        if bool(((sigma - prev).abs() <= tol * sigma.clamp_min(1e-30)).all()):
            break
        prev = sigma
        zero = jtjv.reshape(batch, -1).norm(dim=1) == 0
        v = torch.where(zero.reshape(batch, *([1] * len(dims))), v, normalise(jtjv))
    return sigma.detach(), v.detach()


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
) -> LipschitzResult:
    """A certified lower bound: the largest local Jacobian norm found by search.

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

    Returns:
        :class:`~lipreg.functional.results.LipschitzResult` with ``kind="lower"``; its
        ``state`` holds ``"argmax"`` (the best point) and ``"direction"`` (the input
        direction of largest amplification there).
    """
    start = time.perf_counter()
    input_shape = check_input_shape(input_shape)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    check_finite_parameters(model)
    first = next(iter(list(model.parameters()) + list(model.buffers())), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    fn, how = eval_function(model)

    def fn_tensor(x: Tensor) -> Tensor:
        out = fn(x)
        if not isinstance(out, Tensor):
            raise TypeError(f"the model's output is a {type(out).__name__}, not a tensor.")
        return out

    gen = torch.Generator(device=device).manual_seed(seed)
    best_value, best_x, best_v, best_source = -1.0, None, None, ""
    sources: dict[str, float] = {}

    def evaluate(x: Tensor, source: str) -> tuple[Tensor, Tensor]:
        nonlocal best_value, best_x, best_v, best_source
        sig_all, v_all = [], []
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size].to(device=device, dtype=dtype)
            sig, v = jacobian_norms(fn_tensor, xb, n_iter=n_iter, generator=gen)
            sig_all.append(sig)
            v_all.append(v)
        sig, v = torch.cat(sig_all), torch.cat(v_all)
        i = int(torch.argmax(sig))
        sources[source] = max(sources.get(source, 0.0), float(sig[i]))
        if float(sig[i]) > best_value:
            best_value, best_x, best_v, best_source = float(sig[i]), x[i].clone(), v[i], source
        return sig, v

    pool_x, pool_s = [], []
    mean, std = 0.0, 1.0
    if inputs is not None:
        data = []
        for b, xb in enumerate(_as_batches(inputs, input_shape)):
            if b >= max_batches:
                break
            data.append(xb.detach().to(device=device, dtype=dtype))
        if not data:
            raise ValueError("inputs is empty: no point to search from.")
        data_x = torch.cat(data)
        mean, std = float(data_x.mean()), float(data_x.std()) if data_x.numel() > 1 else 1.0
        if not std > 0:  # constant inputs: random points would all collapse onto them
            std = 1.0
        sig, _ = evaluate(data_x, "data")
        pool_x.append(data_x)
        pool_s.append(sig)
    if scale is not None:
        std = float(scale)
    if n_random > 0:
        rnd = mean + std * torch.randn(
            n_random, *input_shape, generator=gen, dtype=dtype, device=device
        )
        sig, _ = evaluate(rnd, "random")
        pool_x.append(rnd)
        pool_s.append(sig)
    if not pool_x:
        raise ValueError("nothing to search: give inputs or n_random > 0.")
    all_x, all_s = torch.cat(pool_x), torch.cat(pool_s)
    if n_anneal_steps > 0 and n_chains > 0:
        _anneal(evaluate, all_x, all_s, std, n_anneal_steps, n_chains, gen, progress=progress)
    if dtype != torch.float64:
        # Re-evaluate the best point on a float64 copy, so that float32 rounding of the
        # Jacobian cannot push the reported value above the exact ‖J(x) v‖.
        best_value = _float64_value(model, best_x, best_v, gen)
    notes = [
        "certified lower bound: the largest ‖J(x) v‖ found, at a point where the network is "
        "differentiable (with probability one); the true constant can be larger.",
    ]
    if how != "fx":
        notes.append(f"evaluation path: {how}")
    layers = [
        LayerBound(
            name=f"best from {src}",
            kind="lower",
            value=val,
            certified=False,
            estimate=val,
            method="jacobian",
        )
        for src, val in sources.items()
    ]
    return LipschitzResult(
        value=best_value,
        kind="lower",
        method="lower_bound",
        layers=layers,
        state={"argmax": best_x, "direction": best_v},
        time_s=time.perf_counter() - start,
        notes=[*notes, f"best found by: {best_source}"],
    )


def _float64_value(model: nn.Module, x: Tensor, v: Tensor, gen: torch.Generator) -> float:
    model64 = copy.deepcopy(model).double()
    fn64, _ = eval_function(model64)
    sig, _ = jacobian_norms(
        fn64, x[None].double(), v0=v[None].double(), n_iter=20, tol=1e-12, generator=gen
    )
    return float(sig[0])


def _anneal(
    evaluate: Any,
    all_x: Tensor,
    all_s: Tensor,
    std: float,
    n_steps: int,
    n_chains: int,
    gen: torch.Generator,
    *,
    progress: bool,
) -> None:
    """Simulated annealing on ``x ↦ ‖J(x)‖`` from the ``n_chains`` best points (in place)."""
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
        s_prop, _ = evaluate(prop, "annealing")
        u = torch.rand(k, generator=gen, dtype=x.dtype, device=x.device)
        accept = (s_prop >= s) | (u < torch.exp((s_prop - s) / temp))
        x = torch.where(accept.reshape(shape), prop, x)
        s = torch.where(accept, s_prop, s)
        # Shrink the step where proposals keep failing, grow it where they succeed.
        step = torch.where(accept, step * 1.1, step * 0.9)
