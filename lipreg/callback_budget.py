"""The cost budget of :class:`lipreg.LipschitzCallback`: what it measures and what it may run.

The callback's own time (preparation, every method, broadcasting and logging) is kept under
``max_overhead`` times the training time of the fit. :class:`CostBudget` measures both with one
clock and decides, at every step where the step cadences select some methods, which of the
*budgeted* ones (``Method.budgeted``: every row of the callback's table, the estimate
included) are affordable; unbudgeted ones would always run and be counted. The policy is
stated in full in :class:`CostBudget`'s docstring; the callback's class docstring summarises
it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from lipreg.callback_options import PREFIX
from lipreg.callback_records import Method

__all__ = ["COST_WINDOW", "UNTIMED_SHARE", "UPKEEP_WINDOW", "CostBudget", "planned_steps"]

#: A method's predicted cost is the median of its last ``COST_WINDOW`` measured runs (the
#: median: a run slowed down by a busy machine or a cold start does not set the cadence).
COST_WINDOW = 5

#: The upkeep of a step (the callback's time at a step besides its methods' runs: deciding,
#: checking the weights, logging) is predicted by the median of its last ``UPKEEP_WINDOW``
#: steps (the median: a first log call that sets Lightning up does not stop the monitoring).
UPKEEP_WINDOW = 25

#: The share of ``max_overhead`` left to what the callback's clock cannot see: after its
#: work the fit's own steps run a little slower. Fits taking turns batch by batch
#: (benchmarks/results/lockstep_overhead.md) measured it at 0-0.5 % of the MLP fits and
#: 0.8-2 % of the CNN-4 fits whose callback took 3.4-3.7 % of their time, growing with that
#: time (1.1-1.8 % at 7.4 %), the measurement resolving ±0.7 %; not the garbage collector,
#: page faults or hooks left behind (measured: docs/design/issue10/incremental.md, section
#: 12). No hook can time it, so the callback's own time is kept under ``(1 - UNTIMED_SHARE)
#: * max_overhead``: 3 % at the default 0.05, 2 % left to the rest.
UNTIMED_SHARE = 0.4


class CostBudget:
    """Measured costs and the budget of one fit.

    Notation at optimizer step ``s`` of a fit that started at step ``s0`` (``k = s - s0``
    steps done in this fit), with ``e = (1 - untimed_share) * max_overhead`` (the
    callback's own share of the training time; :data:`UNTIMED_SHARE`):

    * ``T``: training seconds of the fit, the wall time since its first batch started minus
      the callback's own time ``S`` (everything between its hooks: data loading, forward,
      backward, optimizer, validation, checkpoints), and ``t = T / k`` per step;
    * ``c(m)``: predicted cost of method ``m``, the median of its last :data:`COST_WINDOW`
      runs in this fit; before its first run, ``Method.prior`` times the cost of the fit's
      first AutoLip estimate (a cold one: the unit scales with the network like the cold
      computations the priors describe; times ``t`` before any estimate was measured).
      Priors are generous on purpose: one that is too high only delays a first run, one too
      low overruns once;
    * ``E = e * T``: the budget earned so far; ``P = e * t * N``: the budget of the planned
      fit of ``N`` steps (``trainer.estimated_stepping_batches - s0``; ``P = E`` when the
      length is unknown or infinite);
    * ``R``: the reserve, the predicted cost of what the callback promises at the end of the
      fit (``compute_at_fit_end``: the estimate and an incremental certificate); it is set
      aside from ``P`` once the estimate has been measured (the guesses are in its units);
      with it, the upkeep of the calls left in the planned fit, this one included (its
      logging comes after the decision): ``u * (⌊(N − k) / n⌋ + 1)``, ``u`` the median
      upkeep of a step at which the callback was called (:data:`UPKEEP_WINDOW`), ``n`` the
      smallest step cadence (at ``every_n_train_steps=1`` on a small network, deciding at
      every step costs about 1 % of the fit: unplanned, it overran the budget).

    At a step where the cadences select some methods, the unbudgeted ones count first
    (``S`` grows by their predicted cost), then each budgeted one, in the order of the
    callback's method table, runs if and only if

    1. ``S <= E``: the callback is not in debt now;
    2. ``S + c(m) + R <= max(P, E)``: the run and the reserve fit the planned budget;
    3. ``k - k_m >= c(m) / (e t)`` steps passed since its last run at ``k_m`` (if any): runs
       of one method are spaced by at least their own share of the budget, so that a budget
       saved up while a first run waited does not come out as a burst of runs,

    and ``S`` grows by ``c(m)`` before the next one is examined (two exceptions, passed by
    the callback: the *monitoring* — the estimate and the incremental certificate — skips
    rule 1 and is spaced by its summed cost, so that the debt of a borrowed anchor does not
    silence it, by twice that when it is too dear for its cadence and a wanted re-anchoring
    fits half the plan left, so that the increments' slack does not grow for the whole fit
    at a dense cadence; a *refresh* — re-anchoring — needs ``S + c(m) <= E`` and room in
    the plan for every remaining monitoring run; :meth:`choose`). A row whose value a chosen
    row already gives is chosen at no cost: the row it answers (``Method.covers``: the estimate,
    at a step where a certificate runs, which computes it anyway; sums of costs — the
    monitoring's, the reserve — leave it out once the unit is known), or a row logging the
    same quantity (``Method.logs``: the quick certificate or the increment after a full
    certificate; it does no work then). A row standing in for a tighter one
    (``Method.fallback_for``: the quick certificate for the full one) is examined only when
    that one is not due or its run does not fit rule 2: while the tighter one merely waits
    for savings, the cheaper one does not spend them. So a long planned fit may
    borrow one run ahead of what it has earned (its first certificate comes early, not after
    ``c / (e t)`` steps), never beyond its planned total, and the debt of one run is repaid
    before the next: in the steady state a method of cost ``c`` runs about every
    ``c / (e t - a)`` steps, ``a`` being the always-run methods' cost per step. Step
    cadences stay upper limits: a skipped method is not made up later. ``max_overhead=None``
    keeps no budget (every selected method runs), but costs are still measured.

    The decision is local (each DDP rank measures its own clock); the callback broadcasts
    rank 0's choice so that every rank runs the same methods. Costs are per fit and are not
    checkpointed (they belong to the machine, not to the run): a resumed fit re-measures.
    """

    def __init__(
        self,
        max_overhead: float | None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.max_overhead = max_overhead
        #: the share of ``max_overhead`` left to the callback's untimed effects on training
        #: (:data:`UNTIMED_SHARE`; tests on a fake clock, which has none, set it to 0)
        self.untimed_share = UNTIMED_SHARE
        #: The clock of every measurement (seconds); tests inject a fake one.
        self.clock = clock
        self.start_fit()

    def start_fit(self) -> None:
        """Forget the previous fit's measurements (a new fit may train another network)."""
        self.costs: dict[str, deque[float]] = {}
        self._medians: dict[str, float] = {}  # of ``costs`` (asked at every decision)
        self.always = 0.0  # seconds of the always-run (unbudgeted) methods in this fit
        self.runs: dict[str, int] = {}  # runs of each method in this fit
        #: the unit of the priors: the fit's first AutoLip estimate (cold, unless warm
        #: vectors came from a checkpoint): what a cold computation costs on this network
        self.unit: float | None = None
        self.last_chosen: dict[str, int] = {}  # k_m: the fit's step of each method's last run
        self.own = 0.0  # S: the callback's seconds in this fit
        self.recorded = 0.0  # seconds of the methods' runs in this fit (part of S)
        #: the callback's seconds besides its methods at its last steps (:data:`UPKEEP_WINDOW`)
        self.upkeep: deque[float] = deque(maxlen=UPKEEP_WINDOW)
        self.start: float | None = None  # the clock at the first batch of the fit
        self.start_step = 0
        self.planned_steps: int | None = None
        self.announced: set[str] = set()
        self._depth = 0

    @property
    def own_share(self) -> float | None:
        """``e``: the fraction of the training time the callback's own time may take."""
        if self.max_overhead is None:
            return None
        return (1.0 - self.untimed_share) * self.max_overhead

    # ------------------------------------------------------------------ measuring
    def begin_training(self, step: int, planned_total: float | None) -> None:
        """The first batch of the fit starts at optimizer step ``step``; ``planned_total`` is
        ``trainer.estimated_stepping_batches`` (``None`` when Lightning could not tell)."""
        if self.start is not None:
            return
        self.start, self.start_step = self.clock(), step
        finite = planned_total is not None and math.isfinite(planned_total)
        remaining = int(planned_total) - step if finite else 0  # type: ignore[arg-type]
        self.planned_steps = remaining if remaining > 0 else None

    @contextmanager
    def counting(self, step: bool = False) -> Iterator[None]:
        """Count the enclosed time as the callback's own (nested uses count once); ``step``:
        the enclosed time is the callback's work at a step, whose part besides the methods'
        runs is a sample of the step's upkeep."""
        if self._depth:
            yield
            return
        self._depth, begin, methods = 1, self.clock(), self.recorded
        try:
            yield
        finally:
            self._depth = 0
            seconds = self.clock() - begin
            self.own += seconds
            if step:
                self.upkeep.append(max(seconds - (self.recorded - methods), 0.0))

    def record(self, method: Method, seconds: float) -> None:
        """One measured run of ``method``."""
        if method.name == "autolip" and self.unit is None:
            # the fit's first estimate is cold (no warm vectors yet): the unit of the priors,
            # not a prediction of the warm ones (it would space the next ones far apart)
            self.unit = seconds
        else:
            runs = self.costs.setdefault(method.name, deque(maxlen=COST_WINDOW))
            runs.append(seconds)
            self._medians[method.name] = statistics.median(runs)
        self.runs[method.name] = self.runs.get(method.name, 0) + 1
        self.recorded += seconds
        if not method.budgeted:
            self.always += seconds

    def measured(self, name: str) -> float | None:
        """Median of the last runs of ``name`` in this fit (``None`` before the first)."""
        return self._medians.get(name)

    def training_seconds(self) -> float:
        """``T``: wall time since the fit's first batch minus the callback's own time."""
        if self.start is None:
            return 0.0
        return max(self.clock() - self.start - self.own, 0.0)

    def predicted(self, method: Method, per_step: float | None) -> float | None:
        """``c(m)``: measured median, else the prior (``None``: nothing to scale it by)."""
        cost = self.measured(method.name)
        if cost is not None:
            return cost
        unit = self.unit or per_step
        return method.prior * unit if unit is not None else None

    # ------------------------------------------------------------------ deciding
    def choose(
        self,
        due: Sequence[Method],
        step: int,
        reserve: Sequence[Method],
        cadences: dict[str, int],
        forced: Collection[str] = (),
        monitoring: Sequence[tuple[Method, int]] = (),
        refresh: Collection[str] = (),
    ) -> list[str]:
        """The names of ``due`` (in order) that run at ``step`` (policy: class docstring);
        ``reserve`` are the methods promised at the fit end, ``cadences`` the step cadence of
        each scheduled method (the smallest: how often the callback is called, for the
        upkeep's reserve; each: for the note a stretched method gets once); ``forced`` run
        whatever they cost (the fit end's promise) and count like the unbudgeted ones.
        ``monitoring`` (methods with their cadences: the estimate and the incremental
        certificate) may run in debt (rule 1 waived: the debt of a borrowed anchor must not
        silence them) as long as rule 2 holds, spaced by their summed cost (rule 3 with
        ``C = Σ c(m')``; ``C = 2 Σ c(m')`` when ``Σ c(m') >= e t n`` — the monitoring cannot
        run at each step of its cadence ``n`` and leave anything — and a due ``refresh`` row
        costs at most half of ``P − S − R``: it then leaves half the budget to it).
        ``refresh``: methods that only refresh what the monitoring keeps logging
        (re-anchoring): they run from savings only (``S + c(m) <= E``) and only if the
        planned fit keeps room for every remaining monitoring run (rule 2 with ``R`` plus
        ``Σ c(m') ⌊(N − k) / max(n(m'), C / (e t))⌋``)."""
        e = self.own_share
        if e is None:
            return [m.name for m in due]
        k, train = step - self.start_step, self.training_seconds()
        per_step = train / k if k > 0 and train > 0 else None
        always = [m for m in due if not m.budgeted or m.name in forced]
        spent = self.own + sum(self.measured(m.name) or 0.0 for m in always)
        earned = e * train
        plan = earned
        if per_step is not None and self.planned_steps is not None:
            plan = max(plan, e * per_step * self.planned_steps)
        # every guess is in units of the estimate: before it is measured, none is set aside
        # (a guess scaled by the step time would keep the estimate itself from running)
        measured = self.unit is not None
        set_aside = self._cost(reserve, per_step) if measured else 0.0
        set_aside += self._upkeep_reserve(k, cadences)
        watch = {m.name for m, _ in monitoring}
        watch_cost = self._cost([m for m, _ in monitoring], per_step)
        # a monitoring too dear for its cadence (C >= e t n) and a wanted re-anchoring that
        # fits half the plan left: the monitoring leaves it half the budget (spaced by twice
        # its cost); else, at a dense cadence, the increments take it all and their slack
        # grows for the whole fit (MLP + Adam at n = 10: 187). At a cadence it can afford,
        # the monitoring runs at every step of it and re-anchoring takes what is left.
        cadence = max((n for _, n in monitoring), default=0)
        room = (plan - spent - set_aside) / 2
        if (
            measured
            and per_step is not None
            and watch_cost >= e * per_step * cadence
            and any(
                m.name in refresh and (self.predicted(m, per_step) or math.inf) <= room for m in due
            )
        ):
            watch_cost *= 2
        later = self._monitoring_reserve(monitoring, k, per_step, watch_cost) if refresh else 0.0
        chosen: list[str] = []
        # the quantities the chosen rows give: what they log, and what they answer (covers)
        given: set[str] = set()
        due_names = {m.name for m in due}
        out_of_plan: set[str] = set()  # rows whose run does not fit the planned budget

        def give(row: Method) -> None:
            given.add(row.logs or row.name)
            if row.covers and measured:
                given.add(row.covers)

        for method in due:
            if (method.logs or method.name) in given:  # a chosen row gives its value: no cost
                chosen.append(method.name)
                self.last_chosen[method.name] = k
                continue
            if not method.budgeted or method.name in forced:
                chosen.append(method.name)
                give(method)
                continue
            if method.needs and not set(method.needs) & set(chosen):
                continue  # nothing to refine at this step
            tighter = method.fallback_for
            if tighter in due_names and tighter not in out_of_plan:
                continue  # the tighter row fits the plan: this one waits for it too
            cost = self.predicted(method, per_step)
            if cost is None or per_step is None:
                continue
            last = self.last_chosen.get(method.name)
            spaced = last is None or (k - last) * e * per_step >= cost
            in_plan = spent + cost + set_aside <= plan
            fits = spent <= earned and in_plan
            if method.name in watch:  # the monitoring: within the plan, even in debt
                spaced = last is None or (k - last) * e * per_step >= watch_cost
                fits = in_plan
            elif method.name in refresh:  # from savings, leaving room for the monitoring
                in_plan = spent + cost + set_aside + later <= plan
                fits = spent + cost <= earned and in_plan
            if not in_plan:
                out_of_plan.add(method.name)
            if spaced and fits:
                chosen.append(method.name)
                self.last_chosen[method.name] = k
                spent += cost
                give(method)
            elif self.unit is not None or all(m.name != "autolip" for m in due):
                # (not on a guess scaled by the step time while the estimate is about to be
                # measured: the note would quote a cost that is guessed twice)
                self._announce(method, cost, per_step, k, cadences.get(method.name, 0))
        return chosen

    def _cost(self, rows: Sequence[Method], per_step: float | None) -> float:
        """``Σ c(m)`` over ``rows``, less the rows another of them answers (``covers``): what
        running them all at one step costs."""
        covered = {m.covers for m in rows if m.covers}
        return sum(self.predicted(m, per_step) or 0.0 for m in rows if m.name not in covered)

    def _upkeep_reserve(self, k: int, cadences: dict[str, int]) -> float:
        """``u * (⌊(N − k) / n⌋ + 1)``: the upkeep of the calls left in the planned fit, this
        one included (0 when its length is unknown, or no upkeep was measured yet)."""
        if self.planned_steps is None or not self.upkeep or k > self.planned_steps:
            return 0.0
        every = min((c for c in cadences.values() if c > 0), default=1)
        return statistics.median(self.upkeep) * ((self.planned_steps - k) // every + 1)

    def _monitoring_reserve(
        self,
        monitoring: Sequence[tuple[Method, int]],
        k: int,
        per_step: float | None,
        spacing_cost: float,
    ) -> float:
        """The predicted cost of every run of ``monitoring`` left in the planned fit, each
        row every ``max(n(m), spacing_cost / (e t))`` steps (its cadence, or rule 3's
        spacing; 0 when the length is unknown: the earned budget alone then governs)."""
        if self.planned_steps is None or per_step is None:
            return 0.0
        e = self.own_share
        assert e is not None
        remaining = max(self.planned_steps - k, 0)
        spacing = spacing_cost / (e * per_step)
        covered = {m.covers for m, _ in monitoring if m.covers}
        return sum(
            (self.predicted(m, per_step) or 0.0) * (remaining // max(cadence, 1, spacing))
            for m, cadence in monitoring
            if m.name not in covered
        )

    def _announce(self, method: Method, cost: float, per_step: float, k: int, cadence: int) -> None:
        """Say once per method and fit that the budget stretches its cadence, and by how much."""
        if method.name in self.announced:
            return
        self.announced.add(method.name)
        e = self.own_share
        assert e is not None
        runs = len(self.costs.get(method.name, ()))
        source = (
            f"median of its last {runs} run(s)"
            if runs
            else f"guessed at {method.prior:g}x the AutoLip estimate before its first run; "
            "measured once it has run"
        )
        free = e * per_step - self.always / k
        if free > 0:
            every = max(math.ceil(cost / free), cadence or 1)
            if cadence:
                every = cadence * math.ceil(every / cadence)
            stretched = f"about every {every} steps"
            if every <= (cadence or 1):  # it fits its cadence: the callback is in debt
                stretched = "at fewer steps while the callback's earlier work is paid for"
        else:
            stretched = "never (the always-run methods alone use the budget)"
        rank_zero_info(
            f"{PREFIX}lipschitz/{method.name} costs {cost:.3g} s ({source}) and training "
            f"{per_step:.3g} s per step: under max_overhead={self.max_overhead:g} (the callback's "
            f"own time at most {e:.1%} of the training time, the rest left to its untimed "
            f"effects on training) it runs {stretched} "
            f"instead of every {cadence} (step cadences are upper limits). To change this, "
            "raise max_overhead, or set max_overhead=None for the step cadences alone."
        )


def planned_steps(trainer: Any) -> float | None:
    """``trainer.estimated_stepping_batches`` (optimizer steps planned for the whole run),
    or ``None`` when Lightning cannot tell (the budget then lends nothing ahead)."""
    try:
        return float(trainer.estimated_stepping_batches)
    except Exception:  # an unsized loader without max_steps, or an older Lightning
        return None
