"""Running a multi-process ``torch.distributed`` check (gloo on CPU) from a test.

``spawn_with_deadline(worker, args)`` starts ``worker(rank, port, *args)`` in fresh processes
(``torch.multiprocessing.spawn``: ``worker`` must be a module-level, picklable function) on a
free local port, and fails the test instead of blocking the suite when they do not finish in
time (a rank left waiting in a collective is a hang, not an error). Workers report through
files (each process imports torch and lipreg again: group the checks, one spawn per file).
``run_script_with_deadline(script, out_dir)`` does the same for a multi-process Lightning fit,
which Lightning starts by relaunching the calling script (run as ``python script OUT_DIR``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, port: int, world_size: int = 2) -> None:
    """In a spawned worker: one CPU thread, and the gloo process group on ``port``."""
    import os

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def exit_worker() -> None:
    """In a spawned worker whose findings are saved and whose group is destroyed: end the
    process now (``os._exit(0)``), without the interpreter's teardown.

    Why: the FSDP state (``fully_shard``'s device mesh, an FSDP1 wrapper's) keeps the default
    gloo group referenced after ``destroy_process_group``, so its C++ threads still run when
    the static destructors do, and the process aborts ("terminate called without an active
    exception", no Python frame): about 1 exit in 4 of the sharding pair (8 of 30 with FSDP1
    alone, torch 2.14.1; 0 of 15 for a worker that shards nothing). Only reached on success:
    a worker that raised exits through ``spawn``'s error report."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_with_deadline(
    worker: Callable[..., None], args: tuple, *, nprocs: int = 2, timeout_s: float = 240.0
) -> None:
    """Run ``worker(rank, port, *args)`` on ``nprocs`` processes; kill them and fail the test
    after ``timeout_s`` seconds. A worker's exception fails the test when ``join`` reports it."""
    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=(free_port(), *args), nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"{worker.__name__}: {nprocs} processes did not finish in {timeout_s} s")


def run_script_with_deadline(script: Path, out_dir: Path, timeout_s: float = 150.0) -> str:
    """Run ``python script out_dir`` (a Lightning fit whose strategy relaunches the script
    for the other ranks) with ``tests/`` importable, one CPU thread and no inherited
    distributed environment; kill its whole process group and fail the test after
    ``timeout_s`` seconds. Returns its output (stdout and stderr); fails on a non-zero exit."""
    env = dict(os.environ)
    tests_dir = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out_dir)],
        cwd=out_dir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the relaunched rank dies with it
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{script.name} did not finish in {timeout_s} s (a hang?):\n{output[-4000:]}")
    assert proc.returncode == 0, output[-4000:]
    return output
