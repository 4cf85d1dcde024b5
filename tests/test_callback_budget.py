"""The cost budget of ``LipschitzCallback`` (``max_overhead``) inside real Lightning fits.

Timings are not the machine's: the callback's clock (``callback.budget.clock``) is a fake one
that moves only when the test says so. A training step takes 1 s on it, the AutoLip estimate
1/64 s and a certificate 1/2 s (the real computations run, in no time on that clock). Every
number is dyadic, so the budget's sums are exact in floating point and the steps at which a
certificate runs follow from the documented rule by hand (worked out in each test), not from
the code under test.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lipreg.callback import LipschitzCallback
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

STEP, ESTIMATE, CERTIFICATE = 1.0, 1 / 64, 0.5
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
    """The real callback whose estimate and certificate take fixed fake times."""

    def __init__(self, clock: FakeClock, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.budget.clock = clock
        self.clock = clock

    def _autolip_estimate(self, network: nn.Module):
        self.clock.advance(ESTIMATE)
        return super()._autolip_estimate(network)

    def _certify(self, network: nn.Module):
        self.clock.advance(CERTIFICATE)
        return super()._certify(network)


def fit(tmp_path, steps: int, data: Any = None, **options: Any):
    """A fit of ``steps`` steps (or of ``data``) with the timed callback certifying at every
    step; returns the callback, the global steps of its CSV rows holding a certified value,
    those holding an estimate, the callback's budget notes (rank-zero infos) and the rows."""
    clock = FakeClock()
    options = {
        "methods": ["autolip"],
        "every_n_train_steps": 1,
        "certify_every_n_train_steps": 1,
        "max_overhead": EPSILON,
        "compute_at_fit_end": False,
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
    # the certificate's notes (lipschitz/certified, the LMI tightening, has its own)
    budget_notes = [n for n in notes if "max_overhead" in n and CERTIFIED + " costs" in n]
    callback.other_notes = [n for n in notes if "max_overhead" in n and n not in budget_notes]
    return callback, steps_with[0], steps_with[1], budget_notes, rows


def test_an_expensive_method_is_stretched_and_said_once(tmp_path):
    """100 planned steps: plan P = e * t * N = 1/16 * 1 * 100 = 6.25 s. Step 1: no estimate
    measured yet, the certificate's guess is 300 x t = 300 s > P: skipped. Step 2: guess
    300/64 = 4.6875 s; spent S = 2/64 (two estimates) <= E = 2/16 and S + 4.6875 <= 6.25: it
    runs (the plan lends it). After n certificates, at step k: S = n/2 + k/64 <= k/16 (not in
    debt) iff k >= 32n/3, the spacing k - k_last >= 0.5/(1/16) = 8 never binds, and the plan
    S + 1/2 <= 6.25 holds up to n = 8 (n = 9 at k = 96 would need 6.5): k = 11, 22, 32, 43,
    54, 64, 75, 86."""
    callback, certified, estimated, notes, _ = fit(tmp_path, 100)
    assert certified == [2, 11, 22, 32, 43, 54, 64, 75, 86]
    assert estimated == list(range(1, 101))  # the estimate is never skipped
    assert callback.budget.runs == {"autolip": 100, "autolip_certified": 9}
    # the callback's own time: 100 estimates + 9 certificates, under e x 100 s
    assert callback.budget.own == 100 * ESTIMATE + 9 * CERTIFICATE <= EPSILON * 100
    (note,) = notes  # once, at step 3, with the measured cost and the way out
    assert "lipschitz/autolip_certified costs 0.5 s (median of its last 1 run(s))" in note
    assert "training 1 s per step" in note and "max_overhead=0.0625" in note
    # free budget per step at step 3: 1/16 - (2/64)/3; 0.5 / that = 9.6 -> about every 10
    assert "about every 10 steps instead of every 1" in note
    assert "raise max_overhead, or set max_overhead=None" in note
    # the tightened certificate (guessed at 3000 estimates = 46.9 s > P) never runs, said once
    (other,) = callback.other_notes
    assert "lipschitz/certified costs 46.9 s (guessed at 3000x" in other
    assert "lipschitz/certified" not in callback.last_metrics


def test_without_a_budget_the_cadences_are_exact(tmp_path):
    callback, certified, estimated, notes, _ = fit(tmp_path, 12, max_overhead=None)
    assert certified == estimated == list(range(1, 13))
    assert notes == []
    # and the tightened certificate with each certificate, as before the budget
    assert callback.budget.runs == {"autolip": 12, "autolip_certified": 12, "certified": 12}


class Stream(IterableDataset):
    """``n`` regression samples with no length: Lightning cannot plan the fit's steps."""

    def __init__(self, n: int) -> None:
        self.data = regression_data(n)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return iter(self.data)


def test_an_unplanned_fit_waits_for_the_earned_budget(tmp_path):
    """No planned length (estimated_stepping_batches is inf): P = E, nothing is lent. The
    first certificate needs S + 300/64 <= k/16 with S = k/64: k >= 100 (exactly 6.25 s at
    k = 100). Then the spacing rule, 8 steps: 108, 116 (the earned budget alone would allow
    a burst at 101, 102, ...)."""
    data = DataLoader(Stream(4 * 120), batch_size=4)
    callback, certified, _, notes, _ = fit(tmp_path, 0, data=data)
    assert callback.budget.planned_steps is None
    assert certified == [100, 108, 116]
    assert len(notes) == 1


def test_the_fit_end_certificate_is_kept_and_counted(tmp_path):
    """20 planned steps: P = 1.25 s < the certificate's guess (4.6875 s, reserved for the fit
    end too): no certificate during the fit, one at its end (the promise), and it counts."""
    callback, certified, _, notes, rows = fit(tmp_path, 20, compute_at_fit_end=True)
    # one row: the fit end's, at Lightning's index of step 20, with the certificate alone
    assert certified == [20]
    assert not [r for r in rows if r.get(CERTIFIED) and r.get("lipschitz/autolip")]
    assert callback.budget.runs["autolip_certified"] == 1
    assert callback.budget.own == 20 * ESTIMATE + CERTIFICATE
    assert len(notes) == 1 and "guessed at 300x the AutoLip estimate" in notes[0]
    assert math.isfinite(callback.last_metrics[CERTIFIED])


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
    assert LipschitzCallback(max_overhead=None).budget.max_overhead is None
    assert LipschitzCallback(max_overhead=1).max_overhead == 1.0
