"""Running a multi-process ``torch.distributed`` check (gloo on CPU) from a test.

``spawn_with_deadline(worker, args)`` starts ``worker(rank, port, *args)`` in fresh processes
(``torch.multiprocessing.spawn``: ``worker`` must be a module-level, picklable function) on a
free local port, and fails the test instead of blocking the suite when they do not finish in
time (a rank left waiting in a collective is a hang, not an error). Workers report through
files (each process imports torch and lipreg again: group the checks, one spawn per file).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

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
