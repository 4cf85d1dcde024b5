"""The work behind each row of :class:`lipreg.LipschitzCallback`'s method table.

:data:`METHOD_TABLE` lists the callback's computations (one :class:`Method` per logged
``lipschitz/<name>``, with its cadence, warm-start vectors, whether the cost budget may skip
it, and the cost assumed before its first run); :class:`MethodWork` is the part of the
callback that runs one of them (warm retry, timing for the budget) and the methods
themselves. A new computation is one row here plus one method of :class:`MethodWork` (or of
a subclass of the callback); the budget (:mod:`lipreg.callback_budget`) then measures it and
schedules it like the others.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lipreg.callback_budget import CostBudget
from lipreg.callback_inputs import describe
from lipreg.callback_options import PREFIX
from lipreg.callback_records import Computed, Method, layer_key, metric_values
from lipreg.callback_sharding import any_rank, attempt, every_rank, nonfinite_weights
from lipreg.functional.autolip import AutoLip, autolip
from lipreg.functional.incremental import (
    METHOD_PREFIX,
    IncrementalAnchor,
    incremental_autolip,
    make_anchor,
    slack,
)
from lipreg.functional.ladder import AS_TIGHT_AS_DENSE, LADDER, DenseWithinCost, quick_ladder
from lipreg.functional.lower_bound import lower_bound
from lipreg.functional.results import LipschitzResult
from lipreg.functional.seqlip import seqlip
from lipreg.functional.tight import tighten

__all__ = [
    "ANCHOR_RITZ",
    "ANCHOR_ROWS",
    "CERTIFIED_KEYS",
    "FIT_END",
    "METHOD_TABLE",
    "SCHEDULED",
    "MethodWork",
    "rows_of",
    "run_order",
]

#: The Ritz space of the anchors (``make_anchor(ritz=...)``): none. A 16-vector Ritz space
#: per dense weight makes a dense layer's incremental bound second order in the weight
#: change (bound (5) of :mod:`lipreg.functional.incremental_ritz`: MLP under SGD 0.001 %
#: slack after 10 steps instead of 0.07-7 %), but it costs an eigendecomposition per layer
#: at each anchor (3x the full certificate of the MNIST MLP) and doubles the increments'
#: cost, and over the hundreds of steps between two anchors the budget affords, the changes
#: outgrow its gap (training_overhead.md: 130 % slack after 2,000 SGD steps with it): the
#: budget buys more by re-anchoring more often.
ANCHOR_RITZ = 0
#: The rows that make an anchor (full certificates: by :data:`~lipreg.functional.ladder.LADDER`
#: and by the cheaper :func:`~lipreg.functional.ladder.quick_ladder`), in the order tried.
ANCHOR_ROWS = ("full_certificate", "quick_certificate")
#: Extra keys logged with every certified AutoLip value: its slack over the AutoLip estimate
#: of the same call (``value / estimate - 1``, an over-statement of the true slack) and the
#: number of full certificates (anchors) computed in this fit.
CERTIFIED_KEYS = ("lipschitz/certified_slack", "lipschitz/full_certificates")


class MethodWork:
    """Running the rows of :data:`METHOD_TABLE` (mixed into the callback, whose options and
    per-fit state the methods read)."""

    budget: CostBudget
    input_shape: tuple[int, ...] | None
    log_layers: bool
    certify_dense_limit: int
    seqlip_method: str
    seqlip_top_k: int | None
    seqlip_max_iter: int
    lower_bound_points: int
    seed: int
    _estimator: AutoLip | None
    _seqlip_state: dict[str, Tensor]
    _tight_state: dict[str, Tensor]
    _last_batch: Tensor | None
    _fresh_cert: LipschitzResult | None  # the certificate of the current step, if any
    recertify_slack: float
    max_overhead: float | None  # the cost budget (None: the step cadences alone)
    _anchor: IncrementalAnchor | None  # of the incremental certificates (not checkpointed)
    _anchor_slack: float | None  # the slack of the anchor's own certificate
    _anchor_is_quick: bool  # the anchor's certificate left some chain to a cheaper bound
    _last_slack: float | None  # the slack of the last certified value
    _full_certificates: int  # in this fit
    _step_now: int  # the optimizer step being computed
    _disabled: set[str]
    _sharded: bool  # the network is FSDP2-sharded (no anchor: full certificates only)
    _collective: bool  # the ranks agree on every decision that starts a gather
    tol: float
    max_iter: int
    methods: list[str] | None
    _report: Callable[[str, str], None]  # warn once per cause (the callback's)
    on_nonfinite: str  # "warn" or "raise"

    def _iterations(self) -> dict[str, Any]:
        """The iteration options every AutoLip call of the callback shares."""
        return {"tol": self.tol, "max_iter": self.max_iter, "seed": self.seed}

    def _certify_options(self) -> dict[str, Any]:
        """What the full and the incremental certificates share: warm-started from the
        estimate's vectors, on the estimator's cached analysis (one trace, one probe)."""
        assert self._estimator is not None
        return {
            "dense_limit": self.certify_dense_limit,
            "state": self._estimator.state,
            "analysis": self._estimator.analysis,
            **self._iterations(),
        }

    def _compute(self, network: nn.Module, step: int, due: set[str]) -> dict[str, float]:
        """Every due and runnable method of :data:`_METHOD_TABLE`, in its order; a failing
        method is switched off (warned once), non-finite values are logged as NaN."""
        tasks = self._tasks(due)
        if not tasks:
            return {}
        weights_bad = nonfinite_weights(network, self._collective)  # same on every rank
        if weights_bad:
            self._nonfinite(f"at step {step}: {weights_bad}")
            return {f"lipschitz/{m.name}": math.nan for m in tasks}

        metrics: dict[str, float] = {}
        nonfinite: list[str] = []
        self._fresh_cert = None  # lipschitz/certified refines this step's certificate only
        self._step_now = step
        for method in tasks:
            label = f"lipschitz/{method.name}"
            try:
                metrics.update(self._run(method, network))
            except Exception as exc:
                is_nonfinite = isinstance(exc, ValueError) and "non-finite" in str(exc)
                if any_rank(is_nonfinite, self._collective):
                    metrics[label] = math.nan
                    nonfinite.append(str(exc))
                    continue
                self._disabled.add(method.name)
                fix = (
                    f"To silence this, leave {method.name!r} out of methods=."
                    if method.name == method.requires
                    else f"(It comes with {method.requires!r}; it is back at the next fit.)"
                )
                self._report(
                    f"failed:{method.name}",
                    f"computing {label} failed at step {step}: {describe(exc)}\n{label} is "
                    "switched off for the rest of this fit; the other bounds and training "
                    f"continue. {fix}",
                )
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad or nonfinite:
            detail = "; ".join(nonfinite) if nonfinite else ""
            self._nonfinite(f"non-finite Lipschitz values at step {step}: {bad}. {detail}")
        return metrics

    def _nonfinite(self, message: str) -> None:
        if self.on_nonfinite == "raise":
            raise FloatingPointError(PREFIX + message)
        self._report(
            "nonfinite",
            f"{message.strip()} Logged as NaN; training goes on (this is reported once). "
            "Check the learning rate / loss scaling, or pass on_nonfinite='raise' to stop the "
            "run at the first non-finite value.",
        )

    def _run(self, method: Method, network: nn.Module) -> dict[str, float]:
        """Run one method, time it (for the budget) and name its metrics; if it fails while
        warm-started, retry it once from a cold start (warm vectors that no longer fit the
        network must not switch a method off)."""
        compute = getattr(self, method.compute)
        clock = self.budget.clock
        start = clock()
        # sharded: success, the retry and the failure are agreed (every rank, same path)
        result, failed = attempt(compute, network, self._collective)
        if failed is not None:
            retry = self._is_warm(method.warm) and "non-finite" not in str(failed)
            if not every_rank(retry, self._collective):
                raise failed
            rank_zero_info(
                f"{PREFIX}{method.name} failed with the warm-start vectors "
                f"({describe(failed, 300)}); they were dropped and it is retried from a cold "
                "start."
            )
            self._drop_warm(method.warm)
            start = clock()
            result, failed = attempt(compute, network, self._collective)
            if failed is not None:
                raise failed
        seconds = clock() - start
        if result is None:  # nothing to do at this step (no work to time either)
            return {}
        if not result.answered:  # (an answered row's cost is in the row that answered it)
            self.budget.record(method, seconds)
        return metric_values(method, result, seconds)

    def _is_warm(self, kind: str | None) -> bool:
        if kind == "seqlip":
            return bool(self._seqlip_state)
        return kind == "autolip" and self._estimator is not None and bool(self._estimator.state)

    def _drop_warm(self, kind: str | None) -> None:
        if kind == "seqlip":
            self._seqlip_state = {}
        elif kind == "autolip" and self._estimator is not None:
            self._estimator.state = {}

    def _tasks(self, due: set[str]) -> list[Method]:
        rows = [m for m in METHOD_TABLE.values() if m.name in due and self._runnable(m)]
        return run_order(rows, self.budget.unit is not None)

    def _active(self) -> list[str]:
        return [m for m in (self.methods or ()) if m not in self._disabled]

    def _runnable(self, method: Method) -> bool:
        """``method`` belongs to an active entry of ``methods`` and was not switched off."""
        return (
            method.requires in self._active()
            and method.name not in self._disabled
            and (method.requires != "autolip" or self._estimator is not None)
            and (method.ready is None or getattr(self, method.ready)())
        )

    # ------------------------------------------------------------------ the methods
    def _autolip_estimate(self, network: nn.Module) -> Computed:
        """``lipschitz/autolip``: answered by this step's certificate when one ran
        (:meth:`_estimate_of_certificate`), else computed by the warm estimator."""
        answered = self._estimate_of_certificate()
        return answered if answered is not None else self._run_estimator(network)

    def _run_estimator(self, network: nn.Module) -> Computed:
        """The warm AutoLip estimate (power iteration / Lanczos per chain)."""
        assert self._estimator is not None
        al = self._estimator()
        layers = {layer_key(lb.name): lb.value for lb in al.layers if lb.kind == "affine"}
        return Computed(al.value, al.n_iter, layers if self.log_layers else {})

    def _estimate_of_certificate(self) -> Computed | None:
        """The AutoLip estimate of this step's certificate (``None`` without one): a
        certificate runs every chain's warm Lanczos estimate with the estimator's options
        (``tol``, ``max_iter``, warm vectors) and reports it per layer (``LayerBound.
        estimate``) and in total (``LipschitzResult.estimate``), so the estimator would redo
        that work. Its vectors become the estimator's warm start. ``None`` too when some
        affine factor has no estimate of its own (then the estimator runs)."""
        cert = self._fresh_cert
        if cert is None or cert.estimate is None:
            return None
        affine = [lb for lb in cert.layers if lb.kind == "affine"]
        if any(lb.estimate is None for lb in affine):
            return None
        assert self._estimator is not None
        # the chains' vectors only (a certificate's other warm data, e.g. Gram vectors in
        # float64, is not part of the estimator's checkpointed state)
        self._estimator.state = {k: v for k, v in cert.state.items() if "#" not in k}
        layers = {layer_key(lb.name): float(lb.estimate) for lb in affine}  # type: ignore[arg-type]
        # iterations: the operator products of the certificate's call, which gave the estimate
        return Computed(cert.estimate, cert.n_iter, layers if self.log_layers else {}, True)

    def _full_certificate(self, network: nn.Module) -> Computed | None:
        """``lipschitz/autolip_certified`` by a full certificate (:data:`~lipreg.functional.
        ladder.LADDER`), which becomes the anchor of the incremental certificates (an upgrade
        of a quick anchor, or a re-anchoring once their slack grew)."""
        return self._anchor_certificate(network, quick=False)

    def _quick_certificate(self, network: nn.Module) -> Computed | None:
        """``lipschitz/autolip_certified`` by a full certificate whose dense certificates are
        limited by cost (:func:`~lipreg.functional.ladder.quick_ladder`: as certified, at most
        as tight): the first anchor, and re-anchoring when the budget cannot afford the full
        one. Nothing when a full certificate of this step already answered."""
        if self._fresh_cert is not None:
            return None
        return self._anchor_certificate(network, quick=True)

    def _anchor_certificate(self, network: nn.Module, quick: bool) -> Computed | None:
        """A full certificate (warm-started from the estimate's vectors, on the estimator's
        cached analysis) that becomes the anchor of the incremental certificates
        (:func:`lipreg.functional.incremental.make_anchor`); ``quick``: by
        :func:`~lipreg.functional.ladder.quick_ladder`, the anchor then being marked quick
        (to be upgraded) when a chain the quick ladder left to a cheaper certificate got a
        looser one than its dense certificate. A quick certificate that is not certified
        switches the quick row off: full certificates take its place."""
        assert self._estimator is not None and self.input_shape is not None
        options = self._certify_options()
        ladder = quick_ladder() if quick else LADDER
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cert = autolip(network, self.input_shape, certify=True, ladder=ladder, **options)
            # sharded: no anchor (it would keep every map's weights outside their gather)
            if cert.certified and not self._sharded:
                self._anchor = make_anchor(
                    network,
                    self.input_shape,
                    cert,
                    analysis=self._estimator.analysis,
                    step=self._step_now,
                    ritz=ANCHOR_RITZ,
                    previous=self._anchor,
                )
                skipped = {n for e in ladder if isinstance(e, DenseWithinCost) for n in e.skipped}
                self._anchor_is_quick = any(
                    lb.name in skipped and lb.method not in AS_TIGHT_AS_DENSE for lb in cert.layers
                )
        if not cert.certified and quick:  # the full ladder may certify what it did not
            self._disabled.add("quick_certificate")
            self._report(
                "quick_not_certified",
                f"the quick certificate could not certify AutoLip: {' '.join(cert.notes)} "
                "Full certificates take its place for this fit.",
            )
            return None
        if not cert.certified:  # say so rather than log an estimate under a "certified" key
            self._disabled.update((*ANCHOR_ROWS, "autolip_certified"))
            self._report(
                "not_certified",
                f"AutoLip could not be certified: {' '.join(cert.notes)} "
                "lipschitz/autolip_certified is off for this fit (raise certify_dense_limit, "
                "or register a rule with certify= for that layer); lipschitz/autolip goes on.",
            )
            return None
        self._full_certificates += 1
        self._anchor_slack = self._last_slack = _slack_or_none(cert)
        return self._certified(cert)

    def _incremental_certificate(self, network: nn.Module) -> Computed | None:
        """``lipschitz/autolip_certified`` from the anchor and the weight change
        (:func:`lipreg.functional.incremental.incremental_autolip`: ``σ_cert(A_s) +
        β(A_t − A_s)`` per anchored chain, the full ladder for the others): certified, at
        the cost of about one pass over the weights. Nothing when the full certificate of
        this step already answered."""
        if self._fresh_cert is not None or self._anchor is None:
            return None
        assert self._estimator is not None and self.input_shape is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cert = incremental_autolip(
                network, self.input_shape, self._anchor, **self._certify_options()
            )
        self._last_slack = _slack_or_none(cert)
        return self._certified(cert)

    def _certified(self, cert: LipschitzResult) -> Computed:
        """The logged values of a certified AutoLip result (kept as this step's certificate,
        which ``lipschitz/certified`` may tighten)."""
        self._fresh_cert = cert
        extra = {CERTIFIED_KEYS[1]: float(self._full_certificates)}
        if self._last_slack is not None:
            extra[CERTIFIED_KEYS[0]] = self._last_slack
        return Computed(cert.value, extra=extra)

    def _wants_anchor(self) -> bool:
        """A new anchor is worth its cost: there is none yet, or the incremental
        certificates' slack grew by more than ``recertify_slack`` since the anchor
        (``(1 + slack_now) / (1 + slack_at_anchor) − 1``: the anchor's own slack, e.g. of a
        Fourier bound on a large convolution, is not something a new anchor would remove)."""
        if self._anchor is None:
            return True
        now, base = self._last_slack, self._anchor_slack
        if now is None or base is None:
            return False  # no estimate to compare with: the anchor stays (still certified)
        return (1.0 + now) / (1.0 + base) - 1.0 > self.recertify_slack

    def _wants_quick_anchor(self) -> bool:
        """The quick certificate's turn: a new anchor is wanted (:meth:`_wants_anchor`: the
        first one, or re-anchoring; while a quick anchor's upgrade fits the planned budget,
        the budget makes it wait for the full one: ``Method.fallback_for``). Never on a
        sharded network (no anchors there)."""
        return not self._sharded and (self._wants_anchor() or self._quick_replaces_increment())

    def _quick_replaces_increment(self) -> bool:
        """Re-anchor instead of incrementing: both measured in this fit, the quick
        certificate costs no more than an increment. It then takes the increment's place in
        the monitoring (:meth:`_budget_rows`): a fresh certificate, so no increment's slack,
        at a lower cost. The case of train-mode batch-norm networks, whose increments also
        bound the folded scales' change (resnet18 32×32: an increment 1.1 s, 4.6 warm
        estimates, 84× its anchor after 100 steps; a quick certificate 0.66 s). Only under
        a cost budget: without one, no choice depends on measured times."""
        if self.max_overhead is None or self._sharded or self._anchor is None:
            return False
        if "quick_certificate" in self._disabled:
            return False
        quick = self.budget.measured("quick_certificate")
        increment = self.budget.measured("autolip_certified")
        return quick is not None and increment is not None and quick <= increment

    def _budget_rows(self) -> tuple[list[Method], list[Method], tuple[str, ...]]:
        """The roles of the rows in the cost budget (:meth:`CostBudget.choose`): the
        *promised* ones (the estimate and the incremental certificate, whose costs the fit
        end's reserve sets aside), the *monitoring* (the same, or the quick certificate in
        the increment's place: :meth:`_quick_replaces_increment`) and the *refresh* rows
        (re-anchoring from savings, once an anchor exists; not the quick certificate while
        it monitors)."""
        promised = [
            METHOD_TABLE[m]
            for m in ("autolip", "autolip_certified")
            if METHOD_TABLE[m].requires in self._active() and m not in self._disabled
        ]
        refresh = ANCHOR_ROWS if self._anchor is not None else ()
        if not self._quick_replaces_increment():
            return promised, promised, refresh
        quick = METHOD_TABLE["quick_certificate"]
        monitoring = [quick if m.name == "autolip_certified" else m for m in promised]
        return promised, monitoring, tuple(r for r in refresh if r != quick.name)

    def _wants_full_anchor(self) -> bool:
        """The full certificate's turn: the anchor is a quick one to upgrade (re-anchoring
        included), or there is no anchor and the quick certificate is off; on a sharded
        network at every certified step (no anchors). A tight anchor is re-anchored by the
        quick certificate, which then gives the same value at its lower cost."""
        if self._sharded:
            return True
        if self._anchor is None:
            return "quick_certificate" in self._disabled
        return self._anchor_is_quick

    def _promised_certificate(self) -> str:
        """The row of the fit end's certified value: incremental from the anchor if there is
        one (unless a quick certificate costs no more: :meth:`_quick_replaces_increment`),
        else a quick full certificate (sharded, or the quick one off: a full one)."""
        if self._anchor is not None and not self._quick_replaces_increment():
            return "autolip_certified"
        full = self._sharded or "quick_certificate" in self._disabled
        return "full_certificate" if full else "quick_certificate"

    def _has_anchor(self) -> bool:
        return self._anchor is not None

    def _tighten(self, network: nn.Module) -> Computed | None:
        """``lipschitz/certified``: the certificate of this step tightened by the dense
        LipSDP-Neuron blocks (up to 2048 neurons; the Fourier conv pairs, seconds to minutes
        each, are left to ``lipreg.certified_bound``). Nothing without a certificate at this
        step. Incremental like the certificate it refines: at a full certificate (an anchor)
        the multipliers are optimised, warm-started from the last call; at an incremental
        one the kept multipliers are only checked again on the new weights (``max_steps=0``:
        the float64 LMI test of the best start, a few times cheaper than re-optimising, and
        as certified)."""
        cert = self._fresh_cert
        if cert is None:
            return None
        assert self._estimator is not None and self.input_shape is not None
        incremental = any(lb.method.startswith(METHOD_PREFIX) for lb in cert.layers)
        tight = tighten(
            network,
            self.input_shape,
            cert,
            methods=("lipsdp",),
            state=self._tight_state,
            analysis=self._estimator.analysis,
            max_lmi_size=2048,
            max_steps=0 if incremental and self._tight_state else None,
        )
        self._tight_state = tight.state
        return Computed(tight.value)

    def _seqlip(self, network: nn.Module) -> Computed:
        assert self.input_shape is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sl = seqlip(
                network,
                self.input_shape,
                method=self.seqlip_method,  # type: ignore[arg-type]
                top_k=self.seqlip_top_k,
                state=self._seqlip_state,
                seed=self.seed,
                max_iter=self.seqlip_max_iter,
                analysis=None if self._estimator is None else self._estimator.analysis,
            )
        self._seqlip_state = sl.state
        return Computed(sl.value, sl.n_iter)

    def _lower_bound(self, network: nn.Module) -> Computed:
        assert self.input_shape is not None
        lb = lower_bound(
            network,
            self.input_shape,
            inputs=self._last_batch,
            n_random=self.lower_bound_points,
            n_anneal_steps=10,
            n_chains=4,
            seed=self.seed,
        )
        return Computed(lb.value)


#: The callback's computations, in the order they run at one step (:func:`run_order`: the
#: certificates first, from the estimator's warm vectors, since their per-layer Lanczos estimates
#: answer the AutoLip estimate (``covers``); the full certificate before the quick one and the
#: incremental one, which it makes unnecessary at the same step). Columns: name, the entry of
#: methods= it belongs to, its cadence attribute, its warm-start vectors, the work, whether the
#: budget may skip it, its assumed cost before the first run in multiples of the fit's first (cold)
#: AutoLip estimate (for the estimate itself: of one training step), what it needs, what it logs
#: under, when it is worth running and what it answers. Measured on the MNIST MLP / CNN-4 of
#: benchmarks/training_overhead.py (cold estimate 0.05-0.15 s): full certificate 1-13x (CNN-4's
#: dense convolutions the most), the quick one 0.4-3x (the first anchor; the full one upgrades a
#: quick anchor from savings, and the quick one waits for it while it fits the plan:
#: ``fallback_for``), incremental certificate (the estimate it answers included) 0.3-0.5x, greedy
#: SeqLip 150-400x, lower bound with 32 points 5-10x, the LipSDP tightening of the MLP's 1000-neuron
#: blocks hundreds; rounded up, since a guess too high only delays a first run. Everything is
#: budgeted: at the default cadence (every 50 steps) the incremental certificate (with the estimate)
#: costs a few percent of the training, at every step it is stretched. ``lipschitz/certified``
#: refines the certificate of the same step (``needs``), so it is budgeted apart: the fit end's
#: promise is the certified AutoLip value alone.
METHOD_TABLE: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "full_certificate",
            "autolip",
            "certify_every_n_train_steps",
            "autolip",
            "_full_certificate",
            budgeted=True,
            prior=20.0,
            logs="autolip_certified",
            ready="_wants_full_anchor",
            covers="autolip",
        ),
        Method(
            "quick_certificate",
            "autolip",
            "certify_every_n_train_steps",
            "autolip",
            "_quick_certificate",
            budgeted=True,
            prior=10.0,
            logs="autolip_certified",
            ready="_wants_quick_anchor",
            covers="autolip",
            fallback_for="full_certificate",
        ),
        Method(
            "autolip_certified",
            "autolip",
            "certify_every_n_train_steps",
            "autolip",
            "_incremental_certificate",
            budgeted=True,
            prior=1.0,
            ready="_has_anchor",
            covers="autolip",
        ),
        Method(
            "autolip",
            "autolip",
            "every_n_train_steps",
            "autolip",
            "_autolip_estimate",
            budgeted=True,
            prior=0.5,
        ),
        Method(
            "certified",
            "autolip",
            "certify_every_n_train_steps",
            None,
            "_tighten",
            budgeted=True,
            prior=1000.0,
            needs=(*ANCHOR_ROWS, "autolip_certified"),
        ),
        Method(
            "seqlip",
            "seqlip",
            "seqlip_every_n_train_steps",
            "seqlip",
            "_seqlip",
            budgeted=True,
            prior=1000.0,
        ),
        Method(
            "lower_bound",
            "lower_bound",
            "every_n_train_steps",
            None,
            "_lower_bound",
            budgeted=True,
            prior=50.0,
        ),
    )
}


def run_order(rows: list[Method], estimate_measured: bool) -> list[Method]:
    """``rows`` (in :data:`METHOD_TABLE`'s order) in the order they run: the table's, except
    before the fit's first estimate has been timed (``estimate_measured=False``): the rows
    that others cover (the estimate) then run first, cold, since the cost budget takes the
    fit's first estimate as the unit of its guesses."""
    if estimate_measured:
        return rows
    covered = {m.covers for m in rows if m.covers}
    return [m for m in rows if m.name in covered] + [m for m in rows if m.name not in covered]


#: What :meth:`LipschitzCallback.should_compute` schedules, one name per logged quantity
#: (the rows that log another row's value are scheduled with it: :func:`rows_of`).
SCHEDULED = tuple(m.name for m in METHOD_TABLE.values() if m.logs is None)


def rows_of(scheduled: set[str]) -> set[str]:
    """The rows of :data:`METHOD_TABLE` behind the scheduled names: each name's own row and
    the rows logging under it (``"autolip_certified"``: the incremental certificate, the
    full and the quick one; their ``ready`` predicates pick which can run)."""
    return {m.name for m in METHOD_TABLE.values() if (m.logs or m.name) in scheduled}


#: What ``compute_at_fit_end`` promises at the end of a fit: the estimate and a certified
#: value, incremental when an anchor exists (``autolip_certified``), else a (quick) full one.
FIT_END = ("autolip", "full_certificate", "quick_certificate", "autolip_certified")


def _slack_or_none(result: LipschitzResult) -> float | None:
    """:func:`lipreg.functional.incremental.slack`, or ``None`` when some affine factor has no
    estimate of its own (then the slack is unknown, and no re-anchoring is based on it)."""
    try:
        return slack(result)
    except ValueError:
        return None
