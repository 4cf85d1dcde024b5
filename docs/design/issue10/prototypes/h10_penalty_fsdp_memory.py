"""Measurement (issue 10, item 9): peak memory of ``lipreg.LipschitzPenalty`` on an FSDP2 model.

Per rank, 2 CPU processes with gloo, an MLP of 6 x Linear(1024, 1024) (4 MiB per layer in
float32, 24 MiB in all, 12 MiB of shards per rank), built on the meta device and materialised
as shards only (as in h7_fsdp_autolip.py, whose RSS sampler this repeats):

- "single-op chains": Linear, ReLU, Linear, ReLU, ... (6 chains of one Linear each);
- "two-op chains": Linear, Linear, ReLU, Linear, Linear, ReLU, ... (3 merged chains
  ``W2 W1``): autograd keeps the later op's gathered weight until the backward (it is needed
  for the gradient of the earlier one), so one full weight per chain stays alive;
- the same penalty on an unsharded copy (its 24 MiB of weights predate the call).

Peak RSS above the RSS just before the call (a forward of the penalty and its backward), and
the RSS held between the two; one fresh process pair per row; first call / second call (the
first adds one-time allocations and the shards' ``.grad``).

Run: OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/h10_penalty_fsdp_memory.py
"""

# ruff: noqa: E501  (prototype: long report lines)
from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lipreg

WORLD = 2
MIB = 2.0**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sampled_peak(fn: Callable[[], object]) -> tuple[int, object]:
    """Peak RSS while ``fn`` runs (sampled every 0.2 ms by a thread), relative to before."""
    start, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(2e-4)

    t = threading.Thread(target=sample)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], rss_bytes()) - start, out


def mlp(two_op: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(6):
        layers.append(nn.Linear(1024, 1024))
        if not two_op or k % 2 == 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def build(two_op: bool, sharded: bool) -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    if not sharded:
        torch.manual_seed(0)
        return mlp(two_op)
    with torch.device("meta"):
        net = mlp(two_op)
    for m in net:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(net)
    net.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in net:
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    return net


SCENARIOS = {
    "sharded, single-op chains": (False, True),
    "sharded, two-op chains": (True, True),
    "unsharded copy, single-op chains": (False, False),
    "unsharded copy, two-op chains": (True, False),
}


def worker(rank: int, port: str, scenario: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        net = build(*SCENARIOS[scenario])
        penalty = lipreg.LipschitzPenalty(net, (1024,), form="log")

        def call() -> int:
            before = rss_bytes()
            value = penalty()
            held = rss_bytes() - before  # what the graph keeps between forward and backward
            value.backward()
            return held

        dist.barrier()
        cold, held_cold = sampled_peak(call)
        dist.barrier()
        warm, held_warm = sampled_peak(call)
        got = [None] * WORLD
        dist.all_gather_object(got, (cold, held_cold, warm, held_warm))
        if rank == 0:
            cells = [
                f"{c / MIB:.1f} ({hc / MIB:.1f}) / {w / MIB:.1f} ({hw / MIB:.1f})"
                for c, hc, w, hw in got
            ]
            print(
                f"| {scenario} ({len(penalty.chain_names)} chains) | " + " | ".join(cells) + " |",
                flush=True,
            )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = (
        "65536"  # freed tensors leave RSS (see h7_fsdp_autolip.py)
    )
    port = int(os.environ.get("MASTER_PORT", str(20000 + random.randrange(20000))))
    print(f"torch {torch.__version__}, gloo, world {WORLD}; MLP of 6 x Linear(1024, 1024)\n")
    print(
        "Peak RSS above the call's start, MiB (held between forward and backward), first call / second call\n"
    )
    print("| penalty | rank 0 | rank 1 |\n|---|---|---|")
    for k, scenario in enumerate(SCENARIOS):
        mp.spawn(worker, args=(str(port + 1 + k), scenario), nprocs=WORLD, join=True)
