"""How :class:`lipreg.LipschitzCallback`'s computations are described, named and placed.

:class:`Method` is one row of the callback's table of computations; :class:`Computed` what one
run of it found; :func:`metric_values` names it (``lipschitz/<name>``, ``_iterations``,
``_time_s``, per-layer keys from :func:`layer_key`); :func:`lightning_step` is the step index
at which Lightning logs its own values of the same optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lipreg.callback_options import is_int

__all__ = ["Computed", "Method", "layer_key", "lightning_step", "metric_values", "publish"]


@dataclass(frozen=True)
class Computed:
    """What one method found: its value, iterations (``None``: not an iterative estimate)
    and extra metrics (per-layer norms, already keyed). ``answered``: taken from another
    row's result of the same step (``Method.covers``), not computed: the cost budget does not
    time it."""

    value: float
    iterations: int | None = None
    extra: dict[str, float] = field(default_factory=dict)
    answered: bool = False


@dataclass(frozen=True)
class Method:
    """One computation of the callback, logged as ``lipschitz/<name>``.

    ``requires``: the entry of ``methods=`` it belongs to; ``cadence``: the callback
    attribute holding its step cadence (``should_compute``'s default); ``warm``: the
    warm-start vectors it uses (``"autolip"``, ``"seqlip"`` or ``None``; dropped and retried
    cold once if it fails with them); ``compute``: the name of the callback's method doing
    the work (looked up on the instance, so that a subclass may override it), which takes the
    network and returns a :class:`Computed`, or ``None`` when it has nothing honest to log.
    ``budgeted``: whether the cost budget (``max_overhead``) may skip it at a step its cadence
    selects (``False``: it always runs, and its cost is counted); ``prior``: the cost assumed
    before its first run, in multiples of the warm AutoLip estimate's measured cost
    (:class:`lipreg.callback_budget.CostBudget`); ``needs``: a method it refines, without
    which it does not run at a step (its ``compute`` returns ``None`` then); ``logs``: the
    name its value is logged under when it is not ``name`` (two rows may log one quantity
    computed two ways, timed and budgeted apart: the full and the incremental certificate);
    ``ready``: the name of the callback's predicate that must hold for it to be worth running
    at all (e.g. an incremental certificate needs an anchor), checked before the budget.
    ``covers``: a row whose value this one's result also gives (a certificate's per-layer
    Lanczos estimates are the AutoLip estimate): when both run at a step, this one runs
    first and the covered row is answered from it at no cost. ``fallback_for``: a tighter,
    costlier row logging the same quantity that this one stands in for: when that row is
    due and fits the planned budget (only waiting for savings), this one waits too; it runs
    instead of it only when that one is not due or does not fit the plan at all.
    """

    name: str
    requires: str
    cadence: str
    warm: str | None
    compute: str
    budgeted: bool = False
    prior: float = 0.0
    needs: tuple[str, ...] = ()
    logs: str | None = None
    ready: str | None = None
    covers: str | None = None
    fallback_for: str | None = None


def metric_values(method: Method, computed: Computed, seconds: float) -> dict[str, float]:
    """``lipschitz/<logs or name>``, ``lipschitz/<name>_iterations`` (iterative estimates
    only), ``lipschitz/<name>_time_s`` and the extra (per-layer) values."""
    key = f"lipschitz/{method.name}"
    metrics = {f"lipschitz/{method.logs or method.name}": computed.value}
    if computed.iterations is not None:
        metrics[f"{key}_iterations"] = float(computed.iterations)
    metrics[f"{key}_time_s"] = seconds
    return metrics | computed.extra


def layer_key(name: str) -> str:
    """The metric key of a chain's norm: ``lipschitz/layer/`` + ``LayerBound.name``, unchanged.

    One spelling everywhere: scalars, ``callback_metrics`` and any table keyed by
    ``LayerBound.name`` (W&B and CSV keep the string; TensorBoard's own writer replaces
    characters outside ``[-/\\w.]``, such as the ``[0+1]`` of a merged chain, by ``_``).
    """
    return f"lipschitz/layer/{name}"


def lightning_step(trainer: Any, *, in_batch: bool) -> int | None:
    """The step index under which Lightning logs its ``self.log`` values of the optimizer
    step just taken (``None`` if this Lightning does not expose it).

    Lightning logs training-step values under the number of batches that stepped *before*
    the current one (``fit_loop.epoch_loop._batches_that_stepped``, incremented after the
    batch's logging), and epoch-end values under that counter minus one. So in
    ``on_train_batch_end`` (``in_batch=True``) the index is the counter; in the epoch-end and
    fit-end hooks, the counter minus one. No public API gives this index; the callback's tests
    check it against a real Trainer's ``metrics.csv``.

    The CSVLogger writes one row per ``log_metrics`` call, so ``metrics.csv`` holds Lightning's
    row and the callback's row with the same ``step`` (merge them by ``step``). Logging through
    Lightning's ``self.log`` would share the row but is wrong here: a value logged with it once
    is written again, stale, at every later logging step of the epoch.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    counter = getattr(loop, "_batches_that_stepped", None)
    if not is_int(counter):
        return None
    return counter if in_batch else max(counter - 1, 0)


def publish(trainer: Any, metrics: dict[str, float], *, in_batch: bool) -> bool:
    """Log ``metrics`` to every logger of ``trainer`` at Lightning's step index of the
    optimizer step just taken (:func:`lightning_step`), and put them into
    ``trainer.callback_metrics`` (float64 tensors). Returns ``False`` when this Lightning
    does not expose that index (then ``trainer.global_step`` is used)."""
    index = lightning_step(trainer, in_batch=in_batch)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step if index is None else index)
    for key, value in metrics.items():
        trainer.callback_metrics[key] = torch.tensor(value, dtype=torch.float64)
    return index is not None
