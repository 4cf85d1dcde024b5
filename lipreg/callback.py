"""Lightning callback that monitors the Lipschitz constant while a network trains.

Add ``LipschitzCallback()`` to a ``Trainer`` and every ``every_n_train_steps`` optimizer steps
(expensive bounds less often, within a cost budget: ``max_overhead``), and once more at the
end of the fit, it logs through every logger of the Trainer (W&B, TensorBoard, CSV) and into
``trainer.callback_metrics`` (so that ``ModelCheckpoint`` / ``EarlyStopping`` can monitor
them):

=================================== ==========================================================
key                                 meaning
=================================== ==========================================================
``lipschitz/autolip``               AutoLip with Lanczos layer norms (warm-started; relative
                                    tolerance ``tol`` per layer). An **estimate**: the norms
                                    approach from below.
``lipschitz/autolip_certified``     AutoLip with certified layer norms: a **guaranteed upper
                                    bound**; every ``certify_every_n_train_steps`` steps
                                    (default: every monitoring step) and at the end of every
                                    fit. A full certificate (first a quick one) anchors it,
                                    later values are incremental (below).
``lipschitz/certified_slack``       with it: its slack over the estimate of the same call,
                                    ``value / estimate - 1`` (over-states the true slack).
``lipschitz/full_certificates``     with it: full certificates (anchors) so far in this fit.
``lipschitz/certified``             with it, the tightest certified bound (the smaller of the
                                    above and the LMI block certificates of
                                    :func:`lipreg.functional.tight.tighten`: optimised at
                                    an anchor, re-checked at an increment),
                                    when the cost budget affords it too (not promised at
                                    the fit end: it can cost minutes on wide layers).
``lipschitz/seqlip``                greedy SeqLip (an estimate) or exact SeqLip (certified),
                                    sequential networks only.
``lipschitz/seqlip_over_autolip``   ratio of the two.
``lipschitz/lower_bound``           certified lower bound (largest Jacobian norm found on the
                                    current batch and around it).
``lipschitz/layer/<name>``          per-layer norm estimates (``log_layers=True``); ``<name>``
                                    is the chain's ``LayerBound.name`` unchanged (its module
                                    path, e.g. ``features.0`` or ``layer2.0.downsample[0+1]``),
                                    the same string as in tables built from ``LayerBound``.
``lipschitz/<method>_iterations``,  cost of each estimate (the time, on the callback's
``lipschitz/<method>_time_s``       clock, is what the cost budget predicts from;
                                    ``full_certificate_time_s`` and
                                    ``quick_certificate_time_s`` for the anchors).
=================================== ==========================================================

**Steps.** The values of optimizer step ``k`` are logged under Lightning's own step index
for that step (``k - 1`` with one optimizer; :func:`lightning_step`), so ``train/loss`` and
the Lipschitz values of one step share their x; in ``metrics.csv`` they are two rows with the
same ``step``. :attr:`LipschitzCallback.last_step` is the global step of the last computation.

**It never breaks a fit.** Every option is validated (types included) when the callback is
constructed. Everything that can go wrong later — finding the network or its input, tracing,
one of the bounds — is reported once per cause with ``rank_zero_warn`` (what was expected,
what was found, what to do); the part that failed is switched off and training goes on. The
one documented way to make the callback raise is ``on_nonfinite="raise"`` (NaN/Inf weights or
bounds).

The estimates never perturb training: the estimators use a private ``torch.Generator``, leave
parameters, gradients, buffers and train/eval modes untouched, and run in float32 (float64 for
certificates) outside autocast. Warm-start vectors are kept between calls and saved in
checkpoints, so a resumed run continues warm (vectors that no longer fit, e.g. after a change
of input size, are dropped with a note). Under DDP every rank computes the same values (same
weights, same seeded start vectors) and rank 0's are broadcast, so all ranks see identical
``callback_metrics``; loggers write once (rank 0). On an FSDP2-sharded model only the estimate
and full certificates run, with every gather agreed across ranks (:mod:`lipreg.callback_sharding`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lipreg.callback_budget import CostBudget, planned_steps
from lipreg.callback_inputs import (
    SwitchOff,
    at_path,
    batch_tensors,
    check_given_input,
    describe,
    describe_candidates,
    device_type,
    find_network,
    infer_input,
)
from lipreg.callback_methods import (
    FIT_END,
    METHOD_TABLE,
    SCHEDULED,
    MethodWork,
    rows_of,
)
from lipreg.callback_options import (
    PREFIX,
    check_bool,
    check_cadences,
    check_choice,
    check_input_shape,
    check_int,
    check_methods,
    check_model_attr,
    check_number,
)
from lipreg.callback_records import layer_key, lightning_step, publish
from lipreg.callback_sharding import ShardedGuards
from lipreg.callback_state import WarmState, read_state
from lipreg.functional.autolip import AutoLip
from lipreg.functional.chains import NotSequentialError
from lipreg.functional.sharding import is_sharded

__all__ = ["FIT_END", "SCHEDULED", "LipschitzCallback", "layer_key", "lightning_step"]


class LipschitzCallback(MethodWork, ShardedGuards, Callback):
    """Monitor AutoLip / SeqLip / a lower bound of the model during training.

    **Which network.** ``model_attr=None`` bounds the LightningModule's own ``forward``;
    ``model_attr="net"`` (or a dotted path, ``"model.encoder"``) bounds that sub-network.
    ``torch.compile``d modules — the attribute itself or submodules inside it — are bounded
    through their original modules (``_orig_mod``), never through the compiled wrapper, and
    the wrappers the training uses are left untouched. A LightningModule without ``forward``
    (an autoencoder with ``encoder``/``decoder``, a GAN with ``generator``/``discriminator``)
    has no single function to bound: one warning lists its sub-networks and the
    ``model_attr=...`` to pick, and the callback switches itself off for that fit (no lower
    bound either: without a forward there is no function to bound). A ``forward`` that needs
    two inputs gets the same treatment (set ``model_attr`` to a one-input sub-network or wrap
    the network in a one-input module).

    **Which input.** Unless ``input_shape`` is given, it is inferred at the first training
    batch of every fit (:func:`lipreg.callback_inputs.infer_input`): the first floating-point
    tensor of the batch (dicts in any key order, tuples, lists, dataclasses, nested) with a
    per-sample shape on one sample of which the network's forward returns a tensor. Labels
    (integer tensors, ``(B,)`` vectors, targets of the wrong width) are thereby rejected. The
    lower bound searches from the same tensor of every batch.

    **Which methods.** ``methods=None``: AutoLip, plus SeqLip when the network is sequential.
    When AutoLip refuses the network (a LayerNorm, attention, an LSTM, ``x * x``...: the core
    raises ``UnsupportedOperationError``/``TraceError`` naming the reason), one warning gives
    that reason and the callback falls back to ``lipschitz/lower_bound``, computable for any
    differentiable network. With explicit ``methods`` the refused ones are switched off (one
    warning) and the others run. ``methods=["lower_bound"]`` never traces the network.

    **Incremental certificates.** The first certified value of a fit is a *quick* full
    certificate (warm-started from the estimate; :func:`lipreg.functional.ladder.quick_ladder`:
    maps whose dense certificate costs too much get a cheaper one, as certified, possibly
    looser: CNN-4 +2.6 % at a tenth of the cost); it becomes the *anchor* ``s``
    (:func:`lipreg.functional.incremental.make_anchor`; ``ANCHOR_RITZ`` in
    :mod:`lipreg.callback_methods` says why without a Ritz space). Later values are certified
    from it and the weight change: ``σ(A_t) <= σ_cert(A_s) + β(A_t − A_s)`` per anchored
    chain (:func:`lipreg.functional.incremental.incremental_autolip`), at the cost of a few
    estimates; a certificate also gives ``lipschitz/autolip`` of its step (it runs every
    chain's warm Lanczos estimate anyway; the estimator itself then does not run). They stay
    certified whatever the change; only their slack grows. A quick anchor that left a map to
    a looser certificate is replaced by a full one (:data:`~lipreg.functional.ladder.LADDER`)
    once the budget's savings afford it; once the slack grew by more than ``recertify_slack``
    since the anchor, the next certified value is a new anchor (the full certificate while a
    quick anchor's upgrade fits the planned budget, else the quick one). Where an increment
    costs more than a quick certificate (both measured: train-mode batch-norm networks such
    as resnet18, whose increments also bound the folded scales' change), every certified
    value is a quick certificate, a new anchor: cheaper and without an increment's slack.
    The anchor belongs to the fit (not checkpointed: a resumed fit anchors anew).

    **Cost budget.** The callback times everything it does (one clock, ``budget.clock``) and
    the training between its hooks, and keeps its own time under ``(1 - UNTIMED_SHARE) *
    max_overhead`` of the training time (3 % at the default 0.05; the rest is left to what no
    hook can time: the fit's steps run a little slower after its work). A computation
    (``Method.budgeted``: every row of :data:`lipreg.callback_methods.METHOD_TABLE`) runs at
    a step its cadence selects only if its predicted cost (median of its last runs; a
    generous guess before the first) fits the budget of the planned fit
    (``trainer.estimated_stepping_batches``; a long fit gets its anchor early) with the
    fit-end certificate and the upkeep of the steps left set aside; runs of a method are
    spaced by about ``cost / (own share * step time)`` steps. The monitoring (estimate,
    incremental certificate) runs even while a borrowed anchor is repaid; the rest waits
    until the callback is out of debt; re-anchoring is paid from savings, leaving room for
    the monitoring's remaining runs (and half the budget, when the monitoring cannot afford
    its cadence anyway). The first stretch of each method is said once
    (``rank_zero_info``: cost, step time, effective cadence, how to change it). Rule:
    :class:`lipreg.callback_budget.CostBudget`; under DDP rank 0 decides.

    **Resuming.** ``input_shape`` (when not passed) and the default methods are re-derived at
    every fit, so a run resumed on data of another size bounds the new size; warm-start
    vectors of another input shape are dropped with a note (cold start).

    Args:
        methods: any of ``"autolip"``, ``"seqlip"``, ``"lower_bound"`` (a string or a list).
            Default: AutoLip, plus SeqLip when the network is sequential.
        every_n_train_steps: compute after every ``n``-th optimizer step (``None``: never).
        every_n_epochs: also compute at the end of every ``n``-th training epoch.
        input_shape: shape of ONE input without the batch dimension; inferred from the first
            training batch of each fit when omitted (see above).
        model_attr: attribute (dotted path allowed) of the LightningModule holding the
            network to bound; ``None`` bounds the LightningModule's own ``forward``.
        tol, max_iter: Lanczos tolerance (``> 0``; 1e-3: a warm estimate is then 40 % cheaper
            than at ``autolip``'s 1e-4 and moved by about 1e-5) and iteration cap per layer.
        certify_every_n_train_steps: cadence of ``lipschitz/autolip_certified`` (default
            ``every_n_train_steps``; ``0`` disables it; epoch ends selected by
            ``every_n_epochs`` certify too, and the fit end always does). An upper limit,
            stretched by ``max_overhead``.
        seqlip_every_n_train_steps: cadence of SeqLip (default 10 times
            ``every_n_train_steps``): a greedy search over activation patterns costs far more
            than a warm AutoLip estimate. An upper limit, stretched by ``max_overhead``.
        seqlip_method: ``"greedy"`` (estimate) or ``"exact"`` (certified, small widths).
        seqlip_top_k: top-``k`` truncation for SeqLip on large layers (``None``: automatic).
        seqlip_max_iter: local-search rounds per pair of greedy SeqLip (default 30).
        lower_bound_points: random points of the lower-bound search (besides the batch).
        certify_dense_limit: maps whose smaller side is at most this are certified exactly by
            materialising them (tighter than the FFT/product certificates on small feature
            maps, costlier on large ones); ``0`` uses only structured certificates.
        log_layers: log per-layer norms (keys :func:`layer_key`).
        compute_at_fit_end: at the end of every fit, compute the AutoLip estimate and a
            certified value (:data:`FIT_END`: incremental when an anchor exists, else a quick
            full certificate) unless done at the final step (default ``True``): every fit ends
            with a certified bound. SeqLip (minutes on a large network) and the lower bound
            keep their cadences. Independent of :meth:`should_compute`; never skipped by the
            budget (its cost is counted, and an incremental one set aside in advance).
        max_overhead: the fraction of the training time the callback may cost the fit: its
            own time and, 40 % of it, its untimed effects on the training steps (default
            ``0.05``; ``None``: no budget, the step cadences alone). See **Cost budget**
            above.
        recertify_slack: re-anchor (a new full certificate) once the incremental certificates'
            slack grew by more than this fraction since the anchor (default ``0.01``; the
            slack is measured against the estimate of the same call).
        on_nonfinite: ``"warn"`` (log NaN, warn once, keep training) or ``"raise"``
            (``FloatingPointError``) when the weights or a bound are not finite.
        seed: seed (an int ``>= 0``) of the private generators.

    Raises:
        TypeError, ValueError: at construction, for an option of the wrong type or value
            (the message names the option, the value and what is accepted).
    """

    def __init__(
        self,
        methods: Sequence[str] | str | None = None,
        every_n_train_steps: int | None = 50,
        every_n_epochs: int | None = None,
        input_shape: Sequence[int] | None = None,
        *,
        model_attr: str | None = None,
        tol: float = 1e-3,
        max_iter: int = 500,
        certify_every_n_train_steps: int | None = None,
        seqlip_every_n_train_steps: int | None = None,
        seqlip_method: str = "greedy",
        seqlip_top_k: int | None = None,
        seqlip_max_iter: int = 30,
        lower_bound_points: int = 32,
        certify_dense_limit: int = 2048,
        log_layers: bool = True,
        compute_at_fit_end: bool = True,
        max_overhead: float | None = 0.05,
        recertify_slack: float = 0.01,
        on_nonfinite: str = "warn",
        seed: int = 0,
    ) -> None:
        super().__init__()
        methods = check_methods(methods)
        certify_every_n_train_steps, seqlip_every_n_train_steps = check_cadences(
            every_n_train_steps,
            every_n_epochs,
            certify_every_n_train_steps,
            seqlip_every_n_train_steps,
        )
        shape = check_input_shape(input_shape)
        check_model_attr(model_attr)
        check_number("tol", tol)
        check_int("max_iter", max_iter, minimum=1)
        check_choice("seqlip_method", seqlip_method, ("greedy", "exact"))
        check_int("seqlip_top_k", seqlip_top_k, minimum=1, allow_none=True)
        check_int("seqlip_max_iter", seqlip_max_iter, minimum=1)
        check_int("lower_bound_points", lower_bound_points, minimum=0)
        check_int("certify_dense_limit", certify_dense_limit, minimum=0)
        check_bool("log_layers", log_layers)
        check_bool("compute_at_fit_end", compute_at_fit_end)
        check_number("max_overhead", max_overhead, allow_none=True, example=0.05)
        check_number("recertify_slack", recertify_slack, example=0.01)
        check_choice("on_nonfinite", on_nonfinite, ("warn", "raise"))
        check_int("seed", seed, minimum=0)

        self._methods_requested: list[str] | None = methods
        self._input_shape_requested: tuple[int, ...] | None = shape
        self.methods: list[str] | None = list(methods) if methods is not None else None
        self.input_shape: tuple[int, ...] | None = shape
        self.every_n_train_steps = every_n_train_steps
        self.every_n_epochs = every_n_epochs
        self.model_attr = model_attr
        self.tol, self.max_iter = float(tol), max_iter
        self.certify_every_n_train_steps = certify_every_n_train_steps
        self.seqlip_every_n_train_steps = seqlip_every_n_train_steps
        self._methods_arg = tuple(methods) if methods is not None else ("auto",)
        self.seqlip_method, self.seqlip_top_k = seqlip_method, seqlip_top_k
        self.seqlip_max_iter = seqlip_max_iter
        self.lower_bound_points = lower_bound_points
        self.certify_dense_limit = certify_dense_limit
        self.log_layers = log_layers
        self.compute_at_fit_end = compute_at_fit_end
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        #: Measured costs and training time; ``budget.clock`` is the clock of every timing.
        self.budget = CostBudget(self.max_overhead)
        self.recertify_slack = float(recertify_slack)
        self.on_nonfinite = on_nonfinite
        self.seed = seed
        # warm-start vectors, and the input shape they belong to
        self._autolip_state: dict[str, Tensor] = {}
        self._seqlip_state: dict[str, Tensor] = {}
        self._tight_state: dict[str, Tensor] = {}  # LMI multipliers (not checkpointed)
        self._warm_shape: tuple[int, ...] | None = None
        self._last_step = -1
        self._done_at_last_step: set[str] = set()  # methods computed at self._last_step
        self.last_metrics: dict[str, float] = {}
        self._last_metrics_step = -1
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        """Per-fit state: everything derived from the model and the data of one fit."""
        self.input_shape = self._input_shape_requested
        self.methods = list(self._methods_requested) if self._methods_requested else None
        self._estimator: AutoLip | None = None
        self._network_cache: nn.Module | None = None
        self._prepared = False
        self._off = False  # the whole callback is switched off for this fit
        self._disabled: set[str] = set()  # parts switched off after a failure
        self._reported: set[str] = set()  # causes already warned about
        self._input_path: tuple[Any, ...] | None = None
        self._last_batch: Tensor | None = None
        self._fresh_cert = None
        # FSDP2: the network is sharded / lipreg's work must be agreed across ranks
        self._sharded = self._collective = False
        # incremental certificates: anchored per fit (a new fit may train another network)
        self._anchor = None
        self._anchor_slack = self._last_slack = None
        self._anchor_is_quick = False
        self._full_certificates = 0
        self._step_now = 0
        self.budget.start_fit()

    @property
    def last_step(self) -> int:
        """Global step (optimizer steps done) of the last computation; ``-1`` before any."""
        return self._last_step

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            methods=self._methods_arg,  # constructor arguments: stable across preparation
            every_n_train_steps=self.every_n_train_steps,
            every_n_epochs=self.every_n_epochs,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers only (checkpoints load with ``weights_only=True``)."""
        if self._estimator is not None:
            self._autolip_state = self._estimator.state
            self._warm_shape = self.input_shape
        shape = self._warm_shape if self._warm_shape is not None else self.input_shape
        warm = WarmState(self._autolip_state, self._seqlip_state, shape, self._last_step)
        return warm.as_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the warm-start vectors (versions 1 and 2); the input shape and the
        default methods are re-derived by the resumed fit. A state this version cannot read
        (newer, or damaged) is ignored with a warning: the resumed fit starts cold."""
        self._estimator = None
        try:
            warm = read_state(state_dict)
        except ValueError as exc:
            rank_zero_warn(
                f"{PREFIX}the checkpoint's LipschitzCallback state {exc}. Its warm-start "
                "vectors are ignored (the estimates start cold); training resumes normally. "
                "Upgrade lipreg to use them if the checkpoint comes from a newer version."
            )
            return
        self._warm_shape = warm.input_shape
        self._autolip_state, self._seqlip_state = warm.autolip, warm.seqlip
        self._last_step = warm.last_step

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Checkpoint state (if any) is already loaded; everything else is derived anew.
        if self._estimator is not None:  # a second fit() with the same callback
            self._autolip_state = self._estimator.state
            self._warm_shape = self.input_shape
        self._reset_fit_state()

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.budget.start is None:
            self.budget.begin_training(trainer.global_step, planned_steps(trainer))
        if not self._prepared:
            with self.budget.counting():
                self._prepare_safely(pl_module, batch)
        if self._off or "lower_bound" not in self._active():
            return
        x = at_path(batch, self._input_path) if self._input_path is not None else None
        ok = isinstance(x, Tensor) and tuple(x.shape[1:]) == self.input_shape
        self._last_batch = x.detach() if ok else None  # type: ignore[union-attr]

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        due = {m for m in SCHEDULED if self.should_compute(m, step, trainer.current_epoch)}
        due = rows_of(due)
        if due:
            with self.budget.counting(step=True):
                due = self._affordable(trainer, due, step)
                self._compute_and_log(trainer, step, due, in_batch=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = self.every_n_epochs
        step = trainer.global_step
        if n and (trainer.current_epoch + 1) % n == 0 and step != self._last_step:
            with self.budget.counting():
                due = self._affordable(trainer, set(METHOD_TABLE), step)
                self._compute_and_log(trainer, step, due, in_batch=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``compute_at_fit_end``: the :data:`FIT_END` methods not yet computed at the final
        step, so that every fit ends with a certified bound whatever its length and
        cadences."""
        if not self.compute_at_fit_end:
            return
        step = trainer.global_step
        done = self._done_at_last_step if step == self._last_step else set()
        certificate = self._promised_certificate()
        promised = {"autolip"} | (set() if done & set(FIT_END[1:]) else {certificate})
        due = promised - done
        if due:
            with self.budget.counting():
                # a re-anchoring and the tightened certificate too, if the budget affords them
                extra = {"certified", "full_certificate"}
                due = self._affordable(trainer, due | extra, step, forced=tuple(due))
                self._compute_and_log(trainer, step, due, in_batch=False)

    def should_compute(self, method: str, step: int, epoch: int) -> bool:
        """Whether ``method`` runs after optimizer step ``step`` of epoch ``epoch``.

        The one gate of the step schedule: ``method`` is one of :data:`SCHEDULED`
        (``"autolip"``, ``"autolip_certified"``, ``"certified"`` — which refines the
        certificate of the same step only —, ``"seqlip"``, ``"lower_bound"``). The
        default follows the step cadences of the constructor; override it for any other
        schedule (after optimizer steps the callback computes what it returns ``True`` for,
        less what the cost budget cannot afford; exactly that with ``max_overhead=None``).
        Two documented additions run besides it: epoch ends selected by ``every_n_epochs``
        compute every method (the budget permitting), and ``compute_at_fit_end`` computes, at
        the end of the fit, the :data:`FIT_END` methods not yet computed at the final step.
        """
        cadence = getattr(self, METHOD_TABLE[method].cadence)
        return step > 0 and bool(cadence) and step % cadence == 0

    def _affordable(
        self, trainer: Trainer, due: set[str], step: int, forced: Sequence[str] = ()
    ) -> set[str]:
        """What of ``due`` the cost budget affords at ``step`` (:class:`CostBudget`; the
        ``forced`` ones always, and no reserve for the fit end then); under DDP, rank 0's
        choice (every rank reaches this line at the same steps)."""
        if self.max_overhead is None:
            return due
        tasks = self._tasks(due)
        # the fit end's reserve: the estimate and an increment (without an anchor by then,
        # the promised quick certificate runs over budget, counted). Re-anchoring refreshes
        # what these two keep logging: after them (from savings, room for their runs left);
        # a quick certificate no dearer than an increment monitors in its place.
        promised, monitored, refresh = self._budget_rows()
        reserve = promised if self.compute_at_fit_end and not forced else []
        # every scheduled row's cadence: the smallest is how often the callback is called
        scheduled = self._tasks(set(SCHEDULED)) + tasks
        cadences = {m.name: getattr(self, m.cadence) or 0 for m in scheduled}
        monitoring = [(m, getattr(self, m.cadence) or 0) for m in monitored]
        chosen = self.budget.choose(tasks, step, reserve, cadences, forced, monitoring, refresh)
        if trainer.world_size > 1:
            chosen = trainer.strategy.broadcast(chosen, src=0)
        return set(chosen)

    # ------------------------------------------------------------------ reporting
    def _report(self, cause: str, message: str) -> None:
        """Warn once per cause (rank zero)."""
        if cause in self._reported:
            return
        self._reported.add(cause)
        rank_zero_warn(PREFIX + message)

    def _switch_off(self, message: str) -> None:
        self._off = True
        self._report("off", f"{message} The callback is off for this fit; training continues.")

    # ------------------------------------------------------------------ preparation
    def _prepare_safely(self, pl_module: LightningModule, batch: Any) -> None:
        """Find the network, its input and the methods; never raises."""
        self._prepared = True
        # structural, hence the same on every rank whatever preparation does on each
        self._collective = is_sharded(pl_module)
        try:
            with torch.autocast(device_type=device_type(pl_module), enabled=False):
                self._prepare(pl_module, batch)
        except SwitchOff as exc:
            self._switch_off(str(exc))
        except Exception as exc:
            self._switch_off(
                f"preparing the bounds failed unexpectedly: {describe(exc)}. Please report "
                "this to lipreg with the model; meanwhile pass input_shape=/model_attr= "
                "explicitly or remove the callback."
            )

    def _prepare(self, pl_module: LightningModule, batch: Any) -> None:
        network = find_network(pl_module, self.model_attr)
        self._network_cache = network
        requested = self._methods_requested
        self._sharded = is_sharded(network)
        if self._sharded:  # FSDP2: the AutoLip estimate and full certificates only
            requested = self._prepare_sharded(network, requested)
        candidates = list(batch_tensors(batch))
        if self._input_shape_requested is None:
            self._input_path, self.input_shape = infer_input(network, candidates)
        else:
            check_given_input(network, self._input_shape_requested, candidates)
            self._input_path = next(
                (p for p, t in candidates if tuple(t.shape[1:]) == self.input_shape), None
            )
        self._drop_stale_warm_vectors()
        if requested is None or {"autolip", "seqlip"} & set(requested):
            self._prepare_autolip(network, requested)
        if "lower_bound" in self._active() and self._input_path is None:
            self._report(
                "lower_bound_inputs",
                f"no tensor of the training batch has per-sample shape {self.input_shape} "
                f"(found {describe_candidates(candidates)}); lipschitz/lower_bound searches "
                "from random points only. Pass the input_shape of the network's real input to "
                "search from the data too.",
            )
        if not self._active():
            raise SwitchOff("no method is left to compute (see the warning above).")

    def _drop_stale_warm_vectors(self) -> None:
        warm = self._autolip_state or self._seqlip_state
        if warm and self._warm_shape is not None and self._warm_shape != self.input_shape:
            rank_zero_info(
                f"{PREFIX}the saved warm-start vectors are for input shape {self._warm_shape}, "
                f"this fit's input shape is {self.input_shape}: dropped (cold start)."
            )
            self._autolip_state, self._seqlip_state, self._tight_state = {}, {}, {}
        self._warm_shape = self.input_shape

    def _prepare_autolip(self, network: nn.Module, requested: list[str] | None) -> None:
        """Trace once for AutoLip (and test SeqLip); on refusal fall back (see class doc)."""
        from lipreg.functional.chains import segment_chains

        assert self.input_shape is not None
        name = type(network).__name__
        try:
            self._estimator = AutoLip(
                network,
                self.input_shape,
                certify=False,
                state=self._autolip_state,
                **self._iterations(),
            )
            # raises for unsupported ops; the estimator's cached analysis (one trace, one
            # probe for the whole fit: every later call re-reads its weights)
            analysis = self._estimator.analysis.get(torch.float32)
        except Exception as exc:
            self._estimator = None
            reason = describe(exc)
            if requested is None:
                self.methods = ["lower_bound"]
                self._report(
                    "autolip_refused",
                    f"AutoLip cannot bound {name} at input shape {self.input_shape}: {reason}\n"
                    "Falling back to lipschitz/lower_bound (a certified lower bound, "
                    "computable for any differentiable network); no upper bound is logged. "
                    "To bound a supported part, set model_attr= to it.",
                )
            else:
                dropped = [m for m in requested if m in ("autolip", "seqlip")]
                self._disabled.update(dropped)
                rest = [m for m in requested if m not in dropped]
                message = (
                    f"AutoLip cannot bound {name} at input shape {self.input_shape}: {reason}\n"
                    "methods=['lower_bound'] works for any differentiable network."
                )
                if not rest:  # one warning: the cause, and that the callback is off
                    raise SwitchOff(message) from exc
                self._report(
                    "autolip_refused",
                    f"{message} Switched off {dropped} for this fit; {rest} still run.",
                )
            return
        if requested is None or "seqlip" in requested:
            try:
                segment_chains(analysis)
                sequential = True
            except NotSequentialError as exc:
                sequential = False
                if requested is not None:
                    self._disabled.add("seqlip")
                    self._report(
                        "seqlip_refused",
                        f"methods={requested} asks for SeqLip, but {exc} SeqLip is off for "
                        "this fit; AutoLip bounds any graph.",
                    )
                else:
                    rank_zero_info(f"{PREFIX}{name} is not sequential; SeqLip off.")
            if requested is None:
                self.methods = ["autolip", "seqlip"] if sequential else ["autolip"]

    # ------------------------------------------------------------------ the work
    def _compute_and_log(self, trainer: Trainer, step: int, due: set[str], in_batch: bool) -> None:
        metrics: dict[str, float] = {}
        if self._collective:  # sharded: every rank must enter the same gathers
            self._check_ranks_agree(due, step)
        elif not due:  # the budget chose nothing (the same on every rank: rank 0's choice)
            self._mark_done(step, due)
            return
        if self._prepared and not self._off and self._network_cache is not None:
            network = self._network_cache
            with torch.autocast(device_type=device_type(network), enabled=False):
                metrics = self._compute(network, step, due)
        # Same numbers on every rank (collective: every rank reaches this line at this step,
        # even with the callback off, so that a rank-dependent failure cannot hang DDP).
        metrics = trainer.strategy.broadcast(metrics, src=0)
        self._mark_done(step, due)
        if not metrics:
            return
        # last_metrics: everything computed at the last step (the fit end may add to it)
        earlier = self.last_metrics if self._last_metrics_step == step else {}
        merged = {**earlier, **metrics}
        if "lipschitz/seqlip" in metrics and merged.get("lipschitz/autolip", 0.0) > 0:
            ratio = merged["lipschitz/seqlip"] / merged["lipschitz/autolip"]
            metrics["lipschitz/seqlip_over_autolip"] = merged["lipschitz/seqlip_over_autolip"] = (
                ratio
            )
        self.last_metrics, self._last_metrics_step = merged, step
        if not publish(trainer, metrics, in_batch=in_batch):
            self._report(
                "lightning_step",
                "this Lightning has no fit_loop.epoch_loop._batches_that_stepped (the step "
                "index of its own self.log values): Lipschitz values are logged at "
                "trainer.global_step, one step after Lightning's values of the same step.",
            )

    def _mark_done(self, step: int, due: set[str]) -> None:
        """``due`` was computed after ``step`` (what the fit end need not compute again)."""
        if step != self._last_step:
            self._done_at_last_step = set()
        self._last_step = step
        self._done_at_last_step |= due
