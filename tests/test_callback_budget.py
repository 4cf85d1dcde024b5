"""The cost budget of ``LipschitzCallback`` (``max_overhead``) inside real Lightning fits.

Timings are not the machine's: the callback's clock (``callback.budget.clock``) is a fake one
that moves only when the test says so. A training step takes 1 s on it, the AutoLip estimate
1/64 s, a full certificate 1/2 s, a quick one (the first anchor) 1/4 s and an incremental one
1/32 s (the real computations run, in no time on that clock; a certificate gives the estimate
of its step, which then costs nothing, and a row whose value another row of the step already
gives does no work). The test network is small enough for the quick certificate to equal the
full one (its anchor is not quick, so no upgrade is wanted) unless a test says otherwise. Every
number is dyadic, so the budget's sums are exact in floating point and the steps at which a
certificate runs follow from the documented rule by hand (worked out in each test), not from
the code under test.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lipreg.callback import LipschitzCallback
from lipreg.callback_budget import UNTIMED_SHARE
from tests._lightning_helpers import (
    RegressionModule,
    capture_logs,
    lipschitz_rows,
    loader,
    make_trainer,
    regression_data,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("seeded")

STEP, ESTIMATE, FULL, QUICK, INCREMENT = 1.0, 1 / 64, 0.5, 1 / 4, 1 / 32
EPSILON = 1 / 16  # max_overhead of these tests (dyadic: exact sums)
CERTIFIED = "lipschitz/autolip_certified"


class FakeClock:
    """Seconds that pass only when :meth:`advance` is called."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TimedModule(RegressionModule):
    """Each training step takes :data:`STEP` seconds on the fake clock."""

    def __init__(self, clock: FakeClock, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clock = clock

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.clock.advance(STEP)
        return super().training_step(batch, batch_idx)


class TimedCallback(LipschitzCallback):
    """The real callback whose estimate, full, quick and incremental certificates take fixed
    fake times (when they do work: an estimate answered by a certificate takes none)."""

    def __init__(self, clock: FakeClock, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.budget.clock = clock
        self.budget.untimed_share = 0.0  # the fake clock's steps have no untimed slow-down
        self.clock = clock

    def _run_estimator(self, network: nn.Module):
        self.clock.advance(ESTIMATE)
        return super()._run_estimator(network)

    def _full_certificate(self, network: nn.Module):
        self.clock.advance(FULL)
        return super()._full_certificate(network)

    def _quick_certificate(self, network: nn.Module):
        if self._fresh_cert is None:  # (else a full certificate of this step answered)
            self.clock.advance(QUICK)
        return super()._quick_certificate(network)

    #: the fake seconds of an incremental certificate (subclasses change it)
    increment_cost = INCREMENT

    def _incremental_certificate(self, network: nn.Module):
        result = super()._incremental_certificate(network)
        if result is not None:
            self.clock.advance(self.increment_cost)
        return result


def fit(tmp_path, steps: int, data: Any = None, **options: Any):
    """A fit of ``steps`` steps (or of ``data``) with the timed callback estimating and
    certifying at every step (one anchor: ``recertify_slack`` too large to re-anchor);
    returns the callback, the global steps of its CSV rows holding a certified value, those
    holding an estimate, the callback's budget notes (rank-zero infos, by method) and the
    rows."""
    clock = FakeClock()
    options = {
        "methods": ["autolip"],
        "every_n_train_steps": 1,
        "certify_every_n_train_steps": 1,
        "max_overhead": EPSILON,
        "compute_at_fit_end": False,
        "recertify_slack": 1e9,
        **options,
    }
    callback = TimedCallback(clock, **options)
    logger = CSVLogger(tmp_path, name="csv")
    limits = {"max_steps": steps} if data is None else {"max_epochs": 1}
    trainer = make_trainer(tmp_path, [callback], logger=logger, log_every_n_steps=1000, **limits)
    with capture_logs(logging.getLogger("lightning.pytorch")) as notes:
        trainer.fit(TimedModule(clock), data if data is not None else loader(n=4 * steps))
    rows = lipschitz_rows(logger)
    # Lightning's index of the values of optimizer step s is s - 1 (csv_step); the fit-end
    # row has the index of the last step, after it
    steps_with = [
        [int(r["step"]) + 1 for r in rows if r.get(key)] for key in (CERTIFIED, "lipschitz/autolip")
    ]
    by_method: dict[str, list[str]] = {}
    for note in notes:
        match = re.search(r"lipschitz/(\w+) costs", note)
        if "max_overhead" in note and match:
            by_method.setdefault(match.group(1), []).append(note)
    return callback, steps_with[0], steps_with[1], by_method, rows


def anchored_fit(tmp_path, callback_class: type, **options: Any):
    """A 100-step fit of ``callback_class`` (a :class:`TimedCallback`) estimating and
    certifying at every step, no fit-end promise unless ``options`` say so; returns the
    callback and its CSV rows."""
    clock = FakeClock()
    options = {
        "compute_at_fit_end": False,
        "methods": ["autolip"],
        "every_n_train_steps": 1,
        "max_overhead": EPSILON,
        **options,
    }
    callback = callback_class(clock, **options)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [callback], logger=logger, max_steps=100)
    trainer.fit(TimedModule(clock), loader(n=400))
    return callback, lipschitz_rows(logger)


def steps_with(rows: list[dict[str, str]], key: str) -> list[int]:
    """The optimizer steps whose CSV row holds ``key`` (Lightning's index is the step - 1)."""
    return [int(r["step"]) + 1 for r in rows if r.get(key)]


def test_the_anchor_is_borrowed_for_and_increments_run_at_every_step(tmp_path):
    """100 planned steps: plan P = e * t * N = 1/16 * 1 * 100 = 6.25 s; no fit-end reserve.
    Step 1: the estimate (guess 0.5 t = 0.5 s <= P) runs first (cold: the unit of the
    guesses); the quick certificate's guess 10 t = 10 s does not fit (the full one is not
    ready: no anchor to upgrade). Step 2 (priors now in units of the first estimate, 1/64):
    the quick certificate (guess 10/64; S = 1/64 <= E = 2/16, S + 10/64 <= P), which anchors
    and answers the estimate; the tightening (guess 1000/64 = 15.6 s) never fits. Now S =
    17/64 > E = 8/64: in debt until step 6 (S = (11 + 2k)/64 <= k/16 before step k), but the
    monitoring (the increment, which answers the estimate) runs in debt within the plan,
    spaced by its cost (1/32 <= e t = 4/64): at every step from 3 on (S = 17/64 + 98 * 2/64
    = 3.33 s <= P at the end). The estimate is computed once; logged at every step."""
    callback, certified, estimated, notes, _ = fit(tmp_path, 100)
    assert certified == list(range(2, 101))
    assert estimated == list(range(1, 101))
    assert callback.budget.runs == {"autolip": 1, "quick_certificate": 1, "autolip_certified": 98}
    assert callback.budget.own == ESTIMATE + QUICK + 98 * INCREMENT <= EPSILON * 100
    # the monitoring never waited; the anchor ran without ever being stretched
    assert "autolip" not in notes and "autolip_certified" not in notes
    assert "quick_certificate" not in notes
    # the tightened certificate (guessed at 1000 estimates = 15.6 s > P) never runs, said once
    (other,) = notes["certified"]
    assert "lipschitz/certified costs 15.6 s (guessed at 1000x" in other
    assert "lipschitz/certified" not in callback.last_metrics
    assert callback.last_metrics["lipschitz/full_certificates"] == 1


def test_without_a_budget_the_cadences_are_exact(tmp_path):
    callback, certified, estimated, notes, _ = fit(tmp_path, 12, max_overhead=None)
    assert certified == estimated == list(range(1, 13))
    assert notes == {}
    # the estimate (cold) then the (quick) anchor; then increments answering the estimates;
    # the tightened certificate with each certified value
    assert callback.budget.runs == {
        "autolip": 1,
        "quick_certificate": 1,
        "autolip_certified": 11,
        "certified": 12,
    }


class Stream(IterableDataset):
    """``n`` regression samples with no length: Lightning cannot plan the fit's steps."""

    def __init__(self, n: int) -> None:
        self.data = regression_data(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return iter(self.data)


def test_an_unplanned_fit_waits_for_the_earned_budget(tmp_path):
    """No planned length (estimated_stepping_batches is inf): P = E, nothing is lent. The
    estimate's guess 0.5 t fits at k/16 >= 0.5: step 8 (with a planned fit, step 1). At step
    9: S = 1/64, the quick certificate (1/64 + 10/64 <= 9/16) answering the estimate; S =
    17/64: from step 10 the increment with the estimate (S + 2/64 <= k/16, guessed 1/64 at
    step 10) at every step to 120."""
    data = DataLoader(Stream(4 * 120), batch_size=4)
    callback, certified, estimated, notes, _ = fit(tmp_path, 0, data=data)
    assert callback.budget.planned_steps is None
    assert certified == list(range(9, 121))
    assert estimated == list(range(8, 121))
    assert "quick_certificate" not in notes


def test_the_fit_end_certificate_is_kept_and_counted(tmp_path):
    """5 planned steps: P = 5/16 s is below even the estimate's first guess (0.5 t), so
    nothing runs during the fit; the fit end's promise (the estimate and, with no anchor to
    increment from, a quick full certificate) runs anyway, and counts."""
    callback, certified, estimated, notes, _ = fit(tmp_path, 5, compute_at_fit_end=True)
    # one row: the fit end's, at Lightning's index of step 5, with both values
    assert certified == estimated == [5]
    assert callback.budget.runs == {"autolip": 1, "quick_certificate": 1}
    assert callback.budget.own == ESTIMATE + QUICK
    assert notes == {}  # nothing was measured before the fit end: no cadence to announce
    assert math.isfinite(callback.last_metrics[CERTIFIED])


def test_an_anchored_fit_ends_with_an_increment(tmp_path):
    """The same 100-step fit as the first test with the fit-end promise: step 2 needs
    S + 10/64 + R <= P with R = 1/64 (the increment's guess; it answers the estimate):
    12/64 <= 400/64, the anchor still comes at step 2; everything after as in the first test
    (the reserve, then 2/64, never binds: S <= 3.33 s). The final step computed both values,
    so the fit end adds nothing."""
    callback, certified, _, _, _ = fit(tmp_path, 100, compute_at_fit_end=True)
    assert certified == list(range(2, 101))
    assert callback.budget.runs["quick_certificate"] == 1
    assert "full_certificate" not in callback.budget.runs


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-0.1, ValueError),
        (math.inf, ValueError),
        (math.nan, ValueError),
        ("0.05", TypeError),
        (True, TypeError),
        ([0.05], TypeError),
    ],
)
def test_bad_max_overhead_is_refused_at_construction(value, error):
    with pytest.raises(error, match=r"^LipschitzCallback: max_overhead must be a positive"):
        LipschitzCallback(max_overhead=value)


def test_max_overhead_accepts_numbers_and_none():
    assert LipschitzCallback().max_overhead == 0.05
    # 40 % of it left to the callback's untimed effects on the training steps
    assert UNTIMED_SHARE == 0.4
    assert LipschitzCallback().budget.own_share == pytest.approx(0.03, rel=1e-15)
    assert LipschitzCallback(max_overhead=None).budget.max_overhead is None
    assert LipschitzCallback(max_overhead=1).max_overhead == 1.0


class ReAnchoring(TimedCallback):
    """Wants a new anchor at every step (as if the increments' slack always grew)."""

    def _wants_anchor(self) -> bool:
        return True


def test_re_anchoring_runs_from_savings_after_the_monitoring(tmp_path):
    """100 planned steps, a new anchor always wanted. Steps 1-3 as in the first test (the
    first anchor, quick and borrowed, at step 2; nothing was left to a looser certificate, so
    the anchor is tight and the quick certificate re-anchors: the full one is not ready).
    From step 3 a re-anchor is tried before the increment: the quick certificate (measured
    16/64, spaced by 16/64 / e t = 4 steps); the increment (answering the estimate) costs
    2/64 per step and is not run at a re-anchor's step. After j re-anchors, S = (11 + 2k +
    14j)/64 before step k. From savings the quick one needs S + 16/64 <= k/16, i.e. k >= (27
    + 14j)/2: k = 14 + 7j, with room for the remaining monitoring, (100 - k) * 2/64, within
    P (227 + 14j <= 400: j <= 12): steps 14, 21, ..., 98. The increments never skip a step:
    a certified value at every step from step 2 on (S = (11 + 202 + 14 * 13)/64 = 395/64 at
    the end)."""
    callback, rows = anchored_fit(tmp_path, ReAnchoring)
    certified = steps_with(rows, CERTIFIED)
    quick = steps_with(rows, "lipschitz/quick_certificate_time_s")
    assert quick == [2, *range(14, 99, 7)]
    assert certified == list(range(2, 101))
    assert callback.budget.runs == {"autolip": 1, "quick_certificate": 14, "autolip_certified": 85}
    assert callback.budget.own == ESTIMATE + 14 * QUICK + 85 * INCREMENT == 395 / 64


class QuickAnchor(TimedCallback):
    """Its quick certificates give a quick anchor (as if the quick ladder had left a map to a
    cheaper certificate), to be upgraded by a full one."""

    def _quick_certificate(self, network: nn.Module):
        result = super()._quick_certificate(network)
        if result is not None:
            self._anchor_is_quick = True
        return result


def test_a_quick_anchor_is_upgraded_from_savings(tmp_path):
    """100 planned steps, no re-anchoring wanted (``recertify_slack`` huge). Steps 1-3 as in
    the first test: the quick anchor at step 2 (S = 17/64 after it), the increments from step
    3 (S = (11 + 2k)/64 before step k). The full certificate is ready from step 3 (the anchor
    is quick) and runs from savings: S + 20/64 (its guess) <= k/16 at k >= 15.5, with room
    for the remaining increments within P ((11 + 32 + 20 + 84 * 2)/64 = 231/64 <= 400/64):
    step 16. Its anchor is not quick: nothing more is wanted; increments to the end (S = (43
    + 32 + 84 * 2)/64 = 243/64)."""
    callback, rows = anchored_fit(tmp_path, QuickAnchor, recertify_slack=1e9)
    certified = steps_with(rows, CERTIFIED)
    full = steps_with(rows, "lipschitz/full_certificate_time_s")
    assert full == [16]
    assert certified == list(range(2, 101))
    assert callback.budget.runs == {
        "autolip": 1,
        "quick_certificate": 1,
        "full_certificate": 1,
        "autolip_certified": 97,
    }
    assert callback.budget.own == ESTIMATE + QUICK + FULL + 97 * INCREMENT == 243 / 64
    assert callback.last_metrics["lipschitz/full_certificates"] == 2
    assert not callback._anchor_is_quick


class QuickReAnchoring(QuickAnchor):
    """Quick anchors (to be upgraded) and a new anchor always wanted."""

    def _wants_anchor(self) -> bool:
        return True


def test_a_quick_anchor_waits_for_its_upgrade_while_it_fits_the_plan(tmp_path):
    """100 planned steps, a new anchor always wanted, every quick anchor quick (to be
    upgraded). S in 64ths before step k. Step 2: the quick anchor (S = 17 after it). While
    the anchor is quick both anchor rows are ready, the full one first; the quick one stands
    in for it only if the full one's run does not fit the plan (rule 2 with the remaining
    monitoring, (100 - k) * 2): otherwise it waits too. Steps 3-15: S = 11 + 2k; the full
    one (guess 20) fits the plan (231 <= 400) but not the savings (11 + 2k + 20 <= 4k from
    k = 16): full at 16 (S = 75 after it); its anchor is tight, so re-anchoring is the
    quick one's (16): S = 41 + 2k, 41 + 2k + 16 <= 4k at k = 29 (S = 115 after it), quick
    again; then the full one (measured 32, plan 55 + 32 + 200 = 287): 55 + 2k + 32 <= 4k at
    k = 44; quick at 51 (85 + 2k + 16 <= 4k), full at 66 (99 + 2k + 32 <= 4k), quick at 73
    (129 + 2k + 16 <= 4k), full at 88 (143 + 2k + 32 <= 4k), quick at 95 (173 + 2k + 16 <=
    4k). From step 96 (S = 187 + 2k) the full one no longer fits the plan (187 + 32 + 200 =
    419 > 400) and the quick one neither (403 > 400): increments to the end (S = 379 + 5 * 2
    = 389). Quick anchors 2, 29, 51, 73, 95; full 16, 44, 66, 88; 90 increments."""
    callback, rows = anchored_fit(tmp_path, QuickReAnchoring)
    steps = {
        row: steps_with(rows, f"lipschitz/{row}_time_s")
        for row in ("quick_certificate", "full_certificate")
    }
    assert steps == {
        "quick_certificate": [2, 29, 51, 73, 95],
        "full_certificate": [16, 44, 66, 88],
    }
    assert steps_with(rows, CERTIFIED) == list(range(2, 101))
    assert callback.budget.runs == {
        "autolip": 1,
        "quick_certificate": 5,
        "full_certificate": 4,
        "autolip_certified": 90,
    }
    assert callback.budget.own == ESTIMATE + 5 * QUICK + 4 * FULL + 90 * INCREMENT == 389 / 64


class DearIncrements(TimedCallback):
    """Its increments cost 1/2 s (twice a quick certificate), as on resnet18 in train mode."""

    increment_cost = 1 / 2


def test_quick_certificates_replace_increments_that_cost_more(tmp_path):
    """100 planned steps (P = 400/64), no re-anchoring for slack; S in 64ths. Step 1: the
    estimate (cold, S = 1); step 2: the quick anchor (S = 17); step 3: the first increment
    (guessed at 1, measured 32: S = 49). From then on the quick certificate (measured 16)
    costs no more than an increment: it is the monitoring in the increment's place, spaced by
    its cost (16 / e t = 4 steps since its last run at 2), running in debt within the plan
    (S + 16 <= 400); the increment, no longer monitoring, would need its own spacing (8
    steps) and savings, and the estimate is given by each quick certificate. Quick
    certificates at 6, 10, ..., 86 (S = 49 + 16 * 21 = 385); at 90 the next one would
    overrun the plan (401), and so would an increment (417): the estimate alone, spaced by
    the monitoring's cost (4 steps), at 90, 94 and 98 (its guess 1/2, then 1: S = 388). So a
    certified value every 4 steps instead of every 8 (the increments' spacing), each a fresh
    anchor (no increment's slack)."""
    callback, rows = anchored_fit(tmp_path, DearIncrements, recertify_slack=1e9)
    quick = steps_with(rows, "lipschitz/quick_certificate_time_s")
    assert quick == [2, *range(6, 87, 4)]
    assert steps_with(rows, CERTIFIED) == [2, 3, *range(6, 87, 4)]
    assert steps_with(rows, "lipschitz/autolip") == [1, 2, 3, *range(6, 87, 4), 90, 94, 98]
    assert callback.budget.runs == {"autolip": 4, "quick_certificate": 22, "autolip_certified": 1}
    assert callback.budget.own == 4 * ESTIMATE + 22 * QUICK + 1 / 2 == 388 / 64
    counts = [float(r["lipschitz/full_certificates"]) for r in rows if r.get(CERTIFIED)]
    assert counts == [1, 1, *range(2, 23)]  # every quick certificate is a new anchor


def test_with_dear_increments_the_fit_ends_with_a_quick_certificate(tmp_path):
    """The previous fit with the fit-end promise (S in 64ths): its reserve R is an
    increment's cost (it answers the estimate), guessed at 1 until step 3, then 32. Quick
    certificates while S + 16 + R <= 400: at 6, 10, ..., 78 (S = 49 + 16 * 19 = 353); then
    the estimate alone (guess 1/2, then 1, plus R within the plan) at 82, ..., 98 (S = 358).
    Nothing at step 100 (the estimate's spacing), so the fit end keeps its promise: the
    estimate and, since an increment costs more than a quick certificate, a quick
    certificate, run whatever they cost (S = 374)."""
    callback, rows = anchored_fit(
        tmp_path, DearIncrements, recertify_slack=1e9, compute_at_fit_end=True
    )
    quick = steps_with(rows, "lipschitz/quick_certificate_time_s")
    assert quick == [2, *range(6, 79, 4), 100]
    assert steps_with(rows, "lipschitz/autolip") == [1, 2, 3, *range(6, 99, 4), 100]
    assert callback.budget.runs == {"autolip": 6, "quick_certificate": 21, "autolip_certified": 1}
    assert callback.budget.own == 6 * ESTIMATE + 21 * QUICK + 1 / 2 == 374 / 64


class CostlyIncrements(TimedCallback):
    """Its increments cost 1/16 s."""

    increment_cost = 1 / 16


class CostlyUpkeep(CostlyIncrements):
    """Its increments cost 1/16 s (e t: one every step) and each step at which it is called
    takes 1/64 s besides its methods, after deciding (as logging does)."""

    def _affordable(self, *args: Any, **kwargs: Any) -> set[str]:
        chosen = super()._affordable(*args, **kwargs)
        self.clock.advance(1 / 64)
        return chosen


def test_the_upkeep_of_the_steps_left_is_set_aside(tmp_path):
    """100 planned steps (P = 400/64), S in 64ths, the upkeep u = 1 at every step (the
    callback is called at every step), so the plan sets aside u * (100 - k + 1) at step k.
    Step 1: the estimate (cold: 1), S = 2. Step 2: the quick anchor (2 + 10 + 99 <= 400),
    S = 19. From step 3 the increment (4, spaced by 4 <= e t = 4) at every step while
    S + 4 + (101 - k) <= 400, with S = 5k + 4 before step k >= 4 (24 before step 4): up to
    step 72 (S = 369 before 73). Then the estimate alone (guessed at 1/2, then measured 1)
    while S + c + (101 - k) <= 400: at 73 (397.5), 74 (399), 75 (400), S = 375 after it,
    and the upkeep of the 25 steps left ends the fit at S = 400 = e T exactly. Without the
    upkeep set aside, the increments would run to step 78 (S + 4 <= 400), the estimate at
    79, and the upkeep of the 21 steps left end the fit at S = 422 > e T (checked once)."""
    callback, rows = anchored_fit(tmp_path, CostlyUpkeep, recertify_slack=1e9)
    assert steps_with(rows, CERTIFIED) == list(range(2, 73))
    assert steps_with(rows, "lipschitz/autolip") == list(range(1, 76))
    assert callback.budget.runs == {"autolip": 4, "quick_certificate": 1, "autolip_certified": 70}
    assert callback.budget.own == 1 / 64 + QUICK + 70 / 16 + 3 / 64 + 100 / 64 == 400 / 64
    assert callback.budget.own <= EPSILON * callback.budget.training_seconds()


class DearReAnchoring(CostlyIncrements, ReAnchoring):
    """A new anchor always wanted, and increments costing 1/16 s: e t, the whole budget."""


def test_the_monitoring_leaves_half_the_budget_to_a_wanted_re_anchoring(tmp_path):
    """100 planned steps (P = 400), S in 64ths, a new anchor always wanted. Increments (4)
    spaced by their cost alone would run at every step and take the whole budget (S = 4k + 5
    > E = 4k before step k): no re-anchoring ever, the slack growing for the whole fit.
    While the re-anchoring (the quick certificate, 16) fits half of P - S, the monitoring is
    spaced by twice its cost: 8 / e t = 2 steps. Step 1 the estimate (1), step 2 the quick
    anchor (S = 17), step 3 the first increment (guessed 1, spaced by 2; S = 21), then
    increments at odd steps; the quick one tried first, from savings: S + 16 <= 4k, with S =
    11 + 12j + 2k before an odd step k after j re-anchors (each replaces an increment: 12
    more), at k = 15 + 6j (the even steps come later), with room in the plan for the
    increments left (57 + 24j + 4 * (42 - 3j) <= 400). After the one at 93 (S = 369), half
    of P - S (15.5) is below its cost: the increments run at every step again, 94-100
    (S = 397), and a quick one no longer fits with them (S + 16 + 4 (100 - k) = 409)."""
    callback, rows = anchored_fit(tmp_path, DearReAnchoring)
    quick = steps_with(rows, "lipschitz/quick_certificate_time_s")
    assert quick == [2, *range(15, 94, 6)]
    assert steps_with(rows, CERTIFIED) == [2, *range(3, 94, 2), *range(94, 101)]
    assert callback.budget.runs == {"autolip": 1, "quick_certificate": 15, "autolip_certified": 39}
    assert callback.budget.own == ESTIMATE + 15 * QUICK + 39 / 16 == 397 / 64


def test_the_untimed_share_is_left_out_of_the_callback_s_own_time(tmp_path):
    """A share of max_overhead left to the untimed effects (1/4 here, for dyadic sums; the
    default's mechanism): the callback's own share is e = 3/4 * 1/16 = 3/64 (so e t = 3 in
    64ths of a second per step, P = 300). Step 1 the estimate (1), step 2 the quick anchor
    (1 + 10 <= 300; S = 17), step 3 the first increment (guessed at 1; 4); then increments
    spaced by their cost, 4 / e t: every 2 steps (every step without the share), 3, 5, ...,
    99 (S = 17 + 49 * 4 = 213 <= 300)."""
    clock = FakeClock()
    callback = CostlyIncrements(
        clock,
        methods=["autolip"],
        every_n_train_steps=1,
        max_overhead=EPSILON,
        compute_at_fit_end=False,
        recertify_slack=1e9,
    )
    callback.budget.untimed_share = 1 / 4  # (the default's mechanism, with dyadic sums)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [callback], logger=logger, max_steps=100)
    trainer.fit(TimedModule(clock), loader(n=400))
    rows = lipschitz_rows(logger)
    assert callback.budget.own_share == 3 / 64
    assert steps_with(rows, CERTIFIED) == [2, *range(3, 100, 2)]
    assert callback.budget.runs == {"autolip": 1, "quick_certificate": 1, "autolip_certified": 49}
    assert callback.budget.own == ESTIMATE + QUICK + 49 / 16 == 213 / 64


class ReAnchoringAtSixSixtyFourths(ReAnchoring):
    """A new anchor always wanted, increments costing 6/64 s."""

    increment_cost = 6 / 64


def test_a_monitoring_its_cadence_affords_keeps_every_step_of_it(tmp_path):
    """Every 2 steps, increments costing 6 (in 64ths) < e t n = 8: the monitoring affords its
    cadence, so it keeps every step of it although a re-anchoring is always wanted (spaced
    by twice its cost it would skip every other one). Step 2 the estimate (1), step 4 the
    quick anchor (S = 17), step 6 the first increment; S = 3k - 1 + 10j before an even step
    k after j re-anchors (each replaces an increment: 10 more); the quick one from savings
    (S + 16 <= 4k) at k = 16 + 10j, with room for the increments left (315 + 10j <= 400):
    16, 26, ..., 96; increments at the other even steps (S = 395 at the end)."""
    callback, rows = anchored_fit(tmp_path, ReAnchoringAtSixSixtyFourths, every_n_train_steps=2)
    quick = steps_with(rows, "lipschitz/quick_certificate_time_s")
    assert quick == [4, *range(16, 97, 10)]
    assert steps_with(rows, CERTIFIED) == list(range(4, 101, 2))
    assert callback.budget.runs == {"autolip": 1, "quick_certificate": 10, "autolip_certified": 39}
    assert callback.budget.own == ESTIMATE + 10 * QUICK + 39 * 6 / 64 == 395 / 64
