"""The benchmark scripts' own machinery (``benchmarks/scaling.py``, ``benchmarks/_common.py``
and ``benchmarks/lockstep_overhead.py``'s turn-taking) against independent ground truths, and
smoke runs of ``scaling.py``, ``speed.py`` and ``lockstep_overhead.py`` with ``--quick`` on
their smallest networks.

``training_overhead.py --quick`` is NOT run here: it fits three networks with Lightning several
times (minutes of CPU), too long for the suite; run it by hand.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


@pytest.fixture(scope="module")
def scaling() -> ModuleType:
    """``benchmarks/scaling.py`` imported with ``benchmarks/`` on ``sys.path`` meanwhile."""
    import importlib

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        return importlib.import_module("scaling")


def test_fit_exponents_recovers_a_power_law(scaling: ModuleType) -> None:
    """Exact data ``t = 3 d^1.5 w^2.25`` on a grid: the least-squares exponents are 1.5 and
    2.25 (closed form), and a size that does not vary gets none."""
    points = [
        ({"depth": d, "width": w, "input": 7}, 3.0 * d**1.5 * w**2.25)
        for d in (10, 30, 100)
        for w in (256, 1024)
    ]
    fitted = scaling.fit_exponents(points)
    assert fitted is not None
    exponents, count = fitted
    assert count == 6
    assert set(exponents) == {"depth", "width"}
    assert exponents["depth"] == pytest.approx(1.5, abs=1e-9)
    assert exponents["width"] == pytest.approx(2.25, abs=1e-9)
    assert scaling.fit_exponents(points[:1]) is None  # one point: nothing to fit


def test_time_cap_interrupts_a_long_call(scaling: ModuleType) -> None:
    """A CPU-bound loop under a 0.05 s cap raises OverCap after about 0.05 s of CPU time, and
    the timer is disarmed afterwards (a later long call is not interrupted)."""
    cpu = torch.device("cpu")
    start = time.process_time()
    with pytest.raises(scaling.OverCap), scaling.time_cap(0.05, cpu):
        while time.process_time() - start < 10:
            sum(range(10_000))
    assert time.process_time() - start < 5
    with scaling.time_cap(0.05, cpu):
        pass
    later = time.process_time()
    while time.process_time() - later < 0.1:  # past the old deadline: nothing fires
        sum(range(10_000))


def test_dominates_orders_networks_of_one_family(scaling: ModuleType) -> None:
    """A network dominates another when it is of the same family and no size is smaller."""
    net = scaling.Network
    small = net("MLP", {"depth": 10, "width": 256}, (256,), list)
    deep = net("MLP", {"depth": 30, "width": 256}, (256,), list)
    wide = net("MLP", {"depth": 10, "width": 512}, (512,), list)
    cnn = net("small CNN", {"width": 16, "input": 32}, (3, 32, 32), list)
    assert deep.dominates(small) and wide.dominates(small) and small.dominates(small)
    assert not small.dominates(deep) and not deep.dominates(wide) and not wide.dominates(deep)
    assert not cnn.dominates(small)
    over = {"cold certificate": [deep], "warm estimate": []}
    bigger = net("MLP", {"depth": 100, "width": 256}, (256,), list)
    assert scaling.skipped_columns(bigger, over) == {"cold certificate"}
    assert scaling.skipped_columns(wide, over) == set()


def run_script(args: list[str], timeout: float) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_scaling_quick_runs() -> None:
    """``scaling.py --quick --families mlp`` prints the table, exponents and footer (≈ 15 s)."""
    stdout = run_script([str(BENCHMARKS / "scaling.py"), "--quick", "--families", "mlp"], 120)
    assert "| MLP" in stdout and "depth 30, width 256" in stdout
    assert "Growth exponents" in stdout
    assert "CPU time of the process" in stdout
    assert "--quick" in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("| MLP ")]
    cold = [float(r.split("|")[5]) for r in rows[:2]]  # cold estimate multiples
    assert all(math.isfinite(c) and c > 0 for c in cold)


@pytest.mark.slow
def test_speed_quick_runs() -> None:
    """``speed.py --quick --networks mnist`` prints every row of the MNIST CNN (≈ 20 s)."""
    stdout = run_script([str(BENCHMARKS / "speed.py"), "--quick", "--networks", "mnist"], 180)
    assert "AutoLip certified" in stdout and "SeqLip greedy" in stdout
    assert "Device: cpu" in stdout


def test_cuda_device_is_refused_without_a_gpu(scaling: ModuleType) -> None:
    """``--device cuda`` on a machine without CUDA exits with a message, not a stack trace
    (``_common.resolve_device``, as the scripts use it)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match=r"torch\.cuda\.is_available"):
        scaling.resolve_device("cuda")
    assert scaling.resolve_device("cpu") == torch.device("cpu")


@pytest.fixture(scope="module")
def lockstep() -> ModuleType:
    """``benchmarks/lockstep_overhead.py`` imported with ``benchmarks/`` on ``sys.path``."""
    import importlib

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        return importlib.import_module("lockstep_overhead")


def test_the_baton_alternates_fits_and_counts_each_ones_turns(
    lockstep: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three threads of 4, 2 and 3 steps, each step advancing a fake clock by 1/2, 1/4 and
    1/8 s (the first step of each is taken at ``take`` like ``on_train_start``): the turns go
    round robin, skipping finished fits (0 1 2 0 1 2 0 2 0 by hand), each fit's held time is
    its own steps only (2, 1/2, 3/8 s: exact, dyadic), and its clock reads that time."""
    now = [0.0]
    monkeypatch.setattr(lockstep.time, "perf_counter", lambda: now[0])
    baton = lockstep.Baton(3)
    steps, cost = [4, 2, 3], [0.5, 0.25, 0.125]
    order: list[int] = []
    clocks: list[float] = [0.0] * 3

    def fit(i: int) -> None:
        baton.take(i)
        for k in range(steps[i]):
            if k:
                baton.hand_over(i)
                baton.take(i)
            order.append(i)
            now[0] += cost[i]
        clocks[i] = baton.clock(i)()
        baton.hand_over(i, finished=True)

    threads = [threading.Thread(target=fit, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert order == [0, 1, 2, 0, 1, 2, 0, 2, 0]
    assert baton.held == clocks == [2.0, 0.5, 0.375]


def test_lockstep_overhead_quick_runs() -> None:
    """``lockstep_overhead.py --quick`` on the MLP with SGD, one cadence: both rows (≈ 20 s)."""
    stdout = run_script(
        [
            str(BENCHMARKS / "lockstep_overhead.py"),
            "--quick",
            "--networks",
            "mlp",
            "--optimizers",
            "sgd",
            "--every",
            "10",
        ],
        240,
    )
    assert "fit, no callback" in stdout
    assert "LipschitzCallback(every_n_train_steps=10)" in stdout
    assert "--quick" in stdout


def test_certified_log_counts_anchors_and_the_increments_slack(lockstep: ModuleType) -> None:
    """The note's certified history from a hand-made sequence of logged metrics: a step with
    the estimate alone is not certified, a repeated dict (a step where the callback logged
    nothing) is read once, a rise of the full-certificate count is an anchor; the increments'
    slacks 0.3 and 0.5 give median 0.4, max 0.5 (by hand)."""
    overhead = sys.modules["training_overhead"]
    watched = SimpleNamespace(last_metrics={})
    log = overhead.CertifiedLog(watched)
    trainer = SimpleNamespace(global_step=0)
    full, slack = "lipschitz/full_certificates", "lipschitz/certified_slack"
    sequence = [
        {"lipschitz/autolip": 2.0},
        {full: 1.0, slack: 0.1},
        {full: 1.0, slack: 0.3},
        None,  # the same dict again
        {full: 2.0, slack: 0.0},
        {full: 2.0, slack: 0.5},
    ]
    for step, metrics in enumerate(sequence, start=1):
        if metrics is not None:
            watched.last_metrics = metrics
        trainer.global_step = 50 * step
        log.on_train_batch_end(trainer, None, None, None, step)
    assert [(s, anchored) for s, _, anchored in log.entries] == [
        (100, True),
        (150, False),
        (250, True),
        (300, False),
    ]
    assert log.summary() == (
        "certified at 4 step(s) (2 anchor(s)); increment slack median 0.4, max 0.5"
    )
