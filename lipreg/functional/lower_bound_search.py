"""Search strategies of :func:`lipreg.functional.lower_bound.lower_bound` for ReLU networks.

The lower bound is a difference quotient ``q(x, z) = ‖f(z) − f(x)‖/‖z − x‖ ≤ L(f)`` evaluated
in float64 (:class:`~lipreg.functional.lower_bound.DifferenceQuotients`); the search only
chooses ``x``. Both strategies here hand every point they reach to an ``evaluate(x, source)``
callback (the batched power iteration on the real model's Jacobian, which puts the point into
the pool of candidates that are certified); nothing they compute is itself a bound.

On a ReLU network ``‖J(x)‖ = ‖W_L D_{L-1}(x) … D_1(x) W_1‖`` is piecewise constant in ``x``:
its gradient is zero almost everywhere, so plain gradient ascent on it never moves and random
perturbations (the annealing) rarely reach the rare patterns of large norm. Two remedies:

1. :func:`smoothed_ascent`: gradient ascent on ``‖J_β(x)ᵀ u‖²`` where ``J_β`` is the Jacobian
   of the network with every ``nn.ReLU`` replaced by ``softplus_β`` (derivative
   ``sigmoid(β z)``, a smoothed gate), ``u`` refreshed by one power step per iteration, and
   ``β`` raised geometrically (relative to each layer's pre-activation scale) so that ``J_β``
   tends to the real Jacobian.
2. :func:`pattern_walk`: a hill climb over *reachable* activation patterns. At ``x`` with top
   singular pair ``(u, v)`` of ``J(x)``, ``uᵀ J v`` is linear in each layer's gates ``d_i``, with
   ``∂(uᵀ J v)/∂d_i = a_i b_i`` (``a``: the cotangent of ``u`` at the unit's output, ``b``: the
   tangent of ``v`` at its input). Units with ``(1 − 2 d_i) a_i b_i > 0`` are the flips that
   raise ``‖J‖`` to first order; the walk steps just across the hyperplane of one of them (or
   of several at once, by a least-norm step on the linearised pre-activations), evaluates the
   real network there (so the new pattern is reachable by construction) and moves when the
   real ``‖J v‖`` increased.

Both work on a private deep copy of the model in evaluation mode (the model is never touched)
and need the ReLUs to be ``nn.ReLU`` modules (they are found by type); on a model without any,
the ascent runs on the unsmoothed copy (fine for smooth activations) and the walk is skipped
(:class:`ReluProbe` reports it).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "Evaluate",
    "ReluProbe",
    "ascend_from_best",
    "pattern_walk",
    "smoothed_ascent",
    "walk_from_best",
]

Evaluate = Callable[[Tensor, str], tuple[Tensor, Tensor]]
"""``evaluate(x, source) -> (‖J(x_i) v_i‖, v_i)``: the real model's power iteration; it also
adds the points to the pool of candidates certified by difference quotients."""


class ReluProbe:
    """A deep copy of ``model`` in evaluation mode with a forward hook on every ``nn.ReLU``.

    ``mode = "record"`` stores each ReLU's input (pre-activation) and output of the last call
    in ``pre`` / ``post``; ``mode = "smooth"`` replaces each ReLU's output by
    ``softplus(β_l z)/β_l`` with ``β_l = beta / scale_l`` (``scale_l`` from :meth:`calibrate`);
    ``mode = "off"`` leaves the network as it is.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        # Outside inference mode: the copy's weights must be usable by autograd (the caller
        # may run under torch.inference_mode()).
        try:
            with torch.inference_mode(False):
                self.net = copy.deepcopy(model).to(dtype).eval()
        except Exception as exc:
            raise RuntimeError(
                "the lower bound's ascent and pattern walk run on a private copy of the model "
                f"(copy.deepcopy(model).to({dtype}), hooks added to its nn.ReLU modules); that "
                f"failed: {type(exc).__name__}: {exc}. Pass a model that can be deep-copied, or "
                "leave n_ascent_steps and n_walk_steps at 0."
            ) from exc
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.relus = [m for m in self.net.modules() if isinstance(m, nn.ReLU)]
        for m in self.relus:
            m.inplace = False  # an in-place ReLU would overwrite the recorded pre-activation
            m.register_forward_hook(self._hook)
        self.mode = "off"
        self.beta = 1.0
        self.scales: dict[int, float] = {}
        self.pre: list[Tensor] = []
        self.post: list[Tensor] = []

    def _hook(self, module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
        z = args[0]
        if self.mode == "record":
            self.pre.append(z)
            self.post.append(out)
        elif self.mode == "smooth":
            beta = self.beta / self.scales.get(id(module), 1.0)
            return F.softplus(z, beta=beta)
        return None

    def __call__(self, x: Tensor, mode: str = "off") -> Tensor:
        self.mode, self.pre, self.post = mode, [], []
        try:
            out = self.net(x)
        finally:
            self.mode = "off"
        if not isinstance(out, Tensor):
            raise TypeError(f"the model's output is a {type(out).__name__}, not a tensor.")
        return out

    def calibrate(self, x: Tensor) -> None:
        """``scale_l``: the mean ``|z|`` of each ReLU's pre-activations at the points ``x``, so
        that ``beta`` is relative to the layer's own scale (the search is scale invariant)."""
        with torch.no_grad():
            self(x, "record")
        self.scales = {}
        for m, z in zip(self.relus, self.pre, strict=True):
            s = float(z.abs().mean())
            self.scales[id(m)] = s if s > 0 and math.isfinite(s) else 1.0
        self.pre, self.post = [], []


def _rows_normalised(t: Tensor) -> Tensor:
    n = t.reshape(t.shape[0], -1).norm(dim=1).clamp_min(1e-300)
    return t / n.reshape(-1, *([1] * (t.ndim - 1)))


def _steps(n: int, desc: str, progress: bool) -> Iterable[int]:
    if progress:
        try:
            from tqdm.auto import tqdm

            return tqdm(range(n), desc=desc)
        except ImportError:
            pass
    return range(n)


def smoothed_ascent(
    model: nn.Module,
    x0: Tensor,
    evaluate: Evaluate,
    *,
    n_steps: int,
    lr: float,
    generator: torch.Generator,
    beta_range: tuple[float, float] = (2.0, 300.0),
    eval_every: int = 10,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Adam ascent of ``‖J_β(x)ᵀ u‖²`` from the points ``x0`` (one independent chain each).

    ``J_β`` is the Jacobian of the softplus-smoothed network (:class:`ReluProbe`), ``β``
    (relative to each layer's pre-activation scale) grows geometrically over ``beta_range``;
    ``u`` (output space) is refreshed every step by ``u ← J_β J_βᵀ u / ‖·‖`` (power iteration
    interleaved with the ascent). Every ``eval_every`` steps and at the end the points go to
    ``evaluate`` (the real network), source ``"smoothed ascent"``. Returns, per chain, the
    evaluated point of largest real ``‖J v‖`` with that value and ``v`` (starts for
    :func:`pattern_walk`). Guarantee: none by itself; the value comes from the certified
    quotients of the pool.
    """
    probe = ReluProbe(model, x0.dtype)
    probe.calibrate(x0)
    with torch.inference_mode(False), torch.enable_grad():
        x = x0.detach().clone().requires_grad_(True)
        out_shape = probe(x.detach()).shape
        u = _rows_normalised(
            torch.randn(out_shape, generator=generator, dtype=x.dtype, device=x.device)
        )
        opt = torch.optim.Adam([x], lr=lr)
        best: list[Tensor] = []
        b0, b1 = beta_range
        for t in _steps(n_steps, "lower bound (smoothed ascent)", progress):
            probe.beta = b0 * (b1 / b0) ** (t / max(n_steps - 1, 1))
            w = torch.zeros(out_shape, dtype=x.dtype, device=x.device, requires_grad=True)
            y = probe(x, "smooth")
            g = torch.autograd.grad((y * (u + w)).sum(), x, create_graph=True)[0]
            obj = g.reshape(g.shape[0], -1).pow(2).sum(dim=1)
            # J_β (J_βᵀ u) = ∂/∂w <J_βᵀ (u + w), J_βᵀ u> at w = 0: the power step for u.
            ju = torch.autograd.grad((g * g.detach()).sum(), w, retain_graph=True)[0]
            # None: the Jacobian does not depend on x (a linear network), nothing to climb.
            grad_x = torch.autograd.grad(obj.sum(), x, allow_unused=True)[0]
            grad_x = torch.zeros_like(x) if grad_x is None else grad_x
            if bool(torch.isfinite(ju).all()) and bool((ju != 0).any()):
                u = _rows_normalised(ju.detach())
            opt.zero_grad()
            x.grad = -grad_x  # ascent
            opt.step()
            if (t + 1) % eval_every == 0 or t == n_steps - 1:
                point = x.detach().clone()
                sig, v = evaluate(point, "smoothed ascent")
                better = sig > best[1] if best else torch.ones_like(sig, dtype=torch.bool)
                best = [
                    _where_rows(better, new, old)
                    for new, old in zip((point, sig, v), best or (point, sig, v), strict=True)
                ]
    return best[0], best[1], best[2]


def _where_rows(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(mask.reshape(-1, *([1] * (new.ndim - 1))), new, old)


def _forward_tangents(
    probe: ReluProbe, x: Tensor, d: Tensor
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor | None]]:
    """At the points ``x`` with tangents ``d``: ``(y, J d, pre, post, tangents)`` with
    ``tangents[l] = J_{pre_l}(x) d`` (the directional derivative of layer ``l``'s
    pre-activations). One vjp with zero cotangents ``(w, w_l)``, then the vjp of that linear
    map with ``d`` (the double-vjp trick: exact, reverse mode only). The graph of ``y`` is kept,
    so call it under grad mode."""
    xg = x.detach().clone().requires_grad_(True)
    y = probe(xg, "record")
    pre, post = probe.pre, probe.post
    w = torch.zeros_like(y, requires_grad=True)
    wz = [torch.zeros_like(z, requires_grad=True) for z in pre]
    s = (y * w).sum() + sum(((z * c).sum() for z, c in zip(pre, wz, strict=True)), y.sum() * 0)
    g = torch.autograd.grad(s, xg, create_graph=True)[0]
    tangents = torch.autograd.grad((g * d.detach().clone()).sum(), [w, *wz], allow_unused=True)
    jd = tangents[0] if tangents[0] is not None else torch.zeros_like(y)
    return y, jd.detach(), pre, post, list(tangents[1:])


def _flat(ts: list[Tensor], like: list[Tensor]) -> Tensor:
    """Concatenate per-layer tensors (``None`` read as zeros) into ``(P, U)``."""
    rows = like[0].shape[0]
    parts = [z if t is None else t for t, z in zip(ts, like, strict=True)]
    zero = [t is None for t in ts]
    flat = [
        (0 * p if none else p).detach().reshape(rows, -1)
        for p, none in zip(parts, zero, strict=True)
    ]
    return torch.cat(flat, dim=1)


def _gate_gains(probe: ReluProbe, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(gains, pre)``, both ``(P, U)`` over all ``U`` ReLU units: ``pre`` the pre-activations
    at ``x`` and ``gains = (1 − 2 d) a b``, the first-order change of ``uᵀ J(x) v`` when unit
    ``i`` flips (``d = [pre > 0]``, ``u = J v/‖J v‖``, ``a`` = ``Jᵀ``-cotangent of ``u`` at the
    unit's output, ``b`` = tangent of ``v`` at its input)."""
    with torch.inference_mode(False), torch.enable_grad():
        y, jv, pre, post, tangents = _forward_tangents(probe, x, v)
        u = _rows_normalised(jv)
        cot = torch.autograd.grad((y * u).sum(), post, allow_unused=True)
    z, b, a = _flat(pre, pre), _flat(tangents, pre), _flat(list(cot), pre)
    return (1 - 2 * (z > 0).to(z.dtype)) * a * b, z


def _unit_gradients(probe: ReluProbe, x: Tensor, units: Tensor) -> Tensor:
    """``∇_x pre_j(x_r)`` for rows ``x_r`` and unit indices ``units[r]`` (flattened over all
    ReLU layers): one backward pass for the whole batch."""
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        probe(xg, "record")
        pre = torch.cat([z.reshape(z.shape[0], -1) for z in probe.pre], dim=1)
        picked = pre.gather(1, units[:, None]).sum()
        return torch.autograd.grad(picked, xg)[0].detach().reshape(x.shape[0], -1)


def _into_next_region(probe: ReluProbe, x: Tensor, step: Tensor, overshoot: float) -> Tensor:
    """Points ``x + s·step`` in the middle of the region entered at ``s = 1`` (the step was
    sized to just reach the targeted hyperplanes): ``s = (1 + s₂)/2`` with ``s₂ > 1`` the next
    crossing of any unit along the line (linearised: ``s_i = −pre_i/tangent_i``), or
    ``1 + overshoot`` if none. A step of fixed relative overshoot would jump over a thin
    region, the very kind that can hold a large Jacobian."""
    with torch.inference_mode(False), torch.enable_grad():
        _, _, pre, _, tangents = _forward_tangents(probe, x, step.reshape(x.shape))
    z, t = _flat(pre, pre), _flat(tangents, pre)
    cross = torch.where(t != 0, -z / torch.where(t != 0, t, torch.ones_like(t)), math.inf)
    ahead = torch.where(cross > 1 + 1e-9, cross, math.inf).amin(dim=1)
    s = torch.where(torch.isfinite(ahead), 0.5 * (1 + ahead), 1 + overshoot)
    shape = (-1, *([1] * (x.ndim - 1)))
    return x + s.reshape(shape) * step.reshape(x.shape)


def _flip_proposals(
    probe: ReluProbe, x: Tensor, v: Tensor, n_flips: int, n_group: int, overshoot: float
) -> tuple[Tensor, Tensor]:
    """Points across the hyperplanes of the ``n_flips`` most beneficial flips of each chain
    (one at a time), and across those of the best 2, 4, …, ``n_group`` and of all beneficial
    ones (up to ``n_group``; for the last ReLU layer that is the best response ``d_i = [a_i b_i
    > 0]``) at once (least-norm step on the linearised pre-activations, ``G_S δ = −z_S``), each
    moved to the middle of the region it
    enters (:func:`_into_next_region`). Returns the points ``(M, *shape)`` and the index of the
    chain each belongs to."""
    p = x.shape[0]
    gains, pre = _gate_gains(probe, x, v)
    k = min(max(n_flips, n_group), gains.shape[1])
    top_gain, units = torch.topk(gains, k, dim=1)
    rows = torch.arange(p, device=x.device).repeat_interleave(k)
    grads = _unit_gradients(probe, x[rows], units.reshape(-1)).reshape(p, k, -1)
    z = pre.gather(1, units)  # (p, k)
    flat = x.reshape(p, -1)
    steps, owner = [], []
    for c in range(p):
        useful = int((top_gain[c] > 0).sum())
        sizes = {2**i for i in range(1, 20) if 2**i < useful} | {useful}
        for j in range(min(useful, n_flips)):  # one flip at a time
            nrm2 = float(grads[c, j].pow(2).sum())
            if nrm2 > 0:
                steps.append(-z[c, j] / nrm2 * grads[c, j])
                owner.append(c)
        for size in sorted(sizes):  # the best `size` flips together
            if 1 < size <= useful:
                step = torch.linalg.pinv(grads[c, :size]) @ (-z[c, :size])
                if bool(torch.isfinite(step).all()):
                    steps.append(step)
                    owner.append(c)
    if not steps:
        return x[:0], torch.zeros(0, dtype=torch.long, device=x.device)
    idx = torch.tensor(owner, device=x.device)
    start = flat[idx].reshape(-1, *x.shape[1:])
    return _into_next_region(probe, start, torch.stack(steps), overshoot), idx


def pattern_walk(
    model: nn.Module,
    x0: Tensor,
    evaluate: Evaluate,
    *,
    start: tuple[Tensor, Tensor] | None = None,
    n_steps: int,
    n_flips: int = 8,
    n_group: int = 32,
    overshoot: float = 0.05,
    progress: bool = False,
) -> bool:
    """Hill climb over reachable activation patterns from the points ``x0`` (one chain each).

    Each step proposes, per chain, the points across the hyperplanes of its ``n_flips`` most
    beneficial ReLU flips (gains ``(1 − 2d) a b`` of ``uᵀ J v``, see the module docstring), one
    at a time and several at once, evaluates the *real* network there (``evaluate``, source
    ``"pattern walk"``: the pattern actually reached is whatever the network computes) and
    moves the chain to its best proposal if that raised ``‖J v‖``; a chain with no improving
    proposal stops. ``start = (sig, v)`` gives the known ``‖J v‖`` and ``v`` of ``x0``.
    Returns ``False`` (and does nothing) when the model has no ``nn.ReLU``.
    Guarantee: none by itself; the value comes from the certified quotients of the pool.
    """
    probe = ReluProbe(model, x0.dtype)
    if not probe.relus:
        return False
    # Outside inference mode (the caller's may be on): the walk differentiates the probe at
    # its points, so every tensor it keeps must be a normal one.
    with torch.inference_mode(False):
        x = x0.detach().clone()
        # ``start``: the ``(‖J v‖, v)`` of ``x0`` when already known (no second evaluation).
        if start is None:
            sig, v = evaluate(x, "pattern walk")
        sig, v = (sig, v) if start is None else start
        budget = (n_steps, n_flips, n_group, overshoot)
        _climb(probe, x, sig.clone(), v.clone(), evaluate, budget, progress)
    return True


def _climb(
    probe: ReluProbe,
    x: Tensor,
    sig: Tensor,
    v: Tensor,
    evaluate: Evaluate,
    budget: tuple[int, int, int, float],
    progress: bool,
) -> None:
    """The loop of :func:`pattern_walk` (updates ``x``, ``sig``, ``v`` in place); ``budget``
    is ``(n_steps, n_flips, n_group, overshoot)``."""
    n_steps, n_flips, n_group, overshoot = budget
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in _steps(n_steps, "lower bound (pattern walk)", progress):
        idx = torch.nonzero(active).reshape(-1)
        if idx.numel() == 0:
            break
        props, owner = _flip_proposals(probe, x[idx], v[idx], n_flips, n_group, overshoot)
        moved = torch.zeros_like(active)
        if props.shape[0]:
            s_new, v_new = evaluate(props, "pattern walk")
            for c_local, c in enumerate(idx.tolist()):
                mine = torch.nonzero(owner == c_local).reshape(-1)
                if mine.numel() == 0:
                    continue
                best = int(mine[torch.argmax(s_new[mine])])
                if float(s_new[best]) > float(sig[c]) * (1 + 1e-9):
                    x[c], sig[c], v[c] = props[best], s_new[best], v_new[best]
                    moved[c] = True
        active &= moved


def ascend_from_best(
    model: nn.Module,
    points: Tensor,
    norms: Tensor,
    evaluate: Evaluate,
    *,
    n_steps: int,
    n_chains: int,
    std: float,
    generator: torch.Generator,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`smoothed_ascent` from the ``n_chains`` points of largest ``norms`` and as many
    random restarts ``N(mean(points), std²)`` (fresh regions: the best points may all sit on
    one plateau), with learning rate ``0.2·std``. Returns each chain's best ``(x, ‖J v‖, v)``."""
    k = max(1, min(n_chains, points.shape[0]))
    top = torch.argsort(norms, descending=True, stable=True)[:k]
    rnd = float(points.mean()) + std * torch.randn(
        (k, *points.shape[1:]), generator=generator, dtype=points.dtype, device=points.device
    )
    return smoothed_ascent(
        model,
        torch.cat([points[top], rnd]),
        evaluate,
        n_steps=n_steps,
        lr=0.2 * std,
        generator=generator,
        progress=progress,
    )


def walk_from_best(
    model: nn.Module,
    candidates: tuple[Tensor, Tensor, Tensor],
    evaluate: Evaluate,
    *,
    n_steps: int,
    n_chains: int,
    progress: bool = False,
) -> bool:
    """:func:`pattern_walk` from the ``n_chains`` distinct points of largest ``‖J v‖`` among
    ``candidates = (x, ‖J v‖, v)`` (already evaluated: no second evaluation). Returns
    :func:`pattern_walk`'s answer (``False``: no ``nn.ReLU``)."""
    x, sig, v = candidates
    keep: list[int] = []
    for i in torch.argsort(sig, descending=True, stable=True).tolist():
        if len(keep) < max(n_chains, 1) and not any(torch.equal(x[i], x[j]) for j in keep):
            keep.append(i)
    return pattern_walk(
        model,
        x[keep].clone(),
        evaluate,
        start=(sig[keep].clone(), v[keep].clone()),
        n_steps=n_steps,
        progress=progress,
    )
