"""Measurements of the library path (issue 10, item 9): ``lipreg.autolip`` on an FSDP2 model.

On 2 CPU processes (gloo), for an MLP of 6 x Linear(1024, 1024) (24 MiB in float32; 12 MiB of
shards per rank) sharded per layer with ``fully_shard``:

1. gathers per call: ``unshard()`` calls and bytes all-gathered, for ``lipreg.autolip`` and the
   cached estimator ``lipreg.AutoLip`` (what the callback uses), certified and not;
2. peak RSS above the RSS before the call (sampled every 0.2 ms), second call of each, of
   ``lipreg.autolip`` on the sharded model and on an unsharded copy of the same weights;
3. the values (``==`` between the two).

Run: MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/h9_sharded_autolip.py
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
from torch.distributed.fsdp import FSDPModule, fully_shard

import lipreg


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sampled_peak(fn: Callable[[], object]) -> tuple[int, object, float]:
    start, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(2e-4)

    t = threading.Thread(target=sample)
    t.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        t.join()
    return max(peak[0], rss_bytes()) - start, out, seconds


def net() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def count_gathers(model: nn.Module) -> dict[str, int]:
    seen = {"calls": 0, "bytes": 0}
    for unit in model.modules():
        if isinstance(unit, FSDPModule):

            def unshard(*a, _u=unit, _f=unit.unshard, **k):
                seen["calls"] += 1
                seen["bytes"] += sum(
                    p.numel() * p.element_size() for p in _u.parameters(recurse=False)
                )
                return _f(*a, **k)

            unit.unshard = unshard
    return seen


def say(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def worker(rank: int, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, reference = net(), net()
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
        seen = count_gathers(model)
        say(rank, "| call | unshard() calls | MiB all-gathered (full size) | value == unsharded |")
        say(rank, "|---|---|---|---|")
        for certify in (True, False):
            for kind in ("autolip", "AutoLip (2nd call)"):
                if kind == "autolip":
                    run = lambda c=certify: lipreg.autolip(model, (1024,), certify=c)  # noqa: E731
                    ref = lipreg.autolip(reference, (1024,), certify=certify)
                else:
                    est = lipreg.AutoLip(model, (1024,), certify=certify)
                    ref_est = lipreg.AutoLip(reference, (1024,), certify=certify)
                    est(), ref_est()
                    run = est
                    ref = ref_est()  # the same warm start as the sharded 2nd call
                seen.update(calls=0, bytes=0)
                got = run()
                say(
                    rank,
                    f"| {kind}, certify={certify} | {seen['calls']} | {seen['bytes'] / 2**20:.0f} | {got.value == ref.value} |",
                )
        rows = []
        calls = {
            "sharded (per-layer units), lipreg.autolip": lambda: lipreg.autolip(model, (1024,)),
            "sharded, lipreg.AutoLip (cached analysis)": lipreg.AutoLip(model, (1024,)),
            "unsharded copy, lipreg.autolip": lambda: lipreg.autolip(reference, (1024,)),
        }
        for what, call in calls.items():
            call()
            dist.barrier()
            peak, result, seconds = sampled_peak(call)
            got = [None, None]
            dist.all_gather_object(got, (peak, result.value, seconds))
            rows.append((what, got))
        say(
            rank,
            "\n| certified call (2nd) | peak RSS MiB, rank 0 / rank 1 | s, rank 0 / 1 | value (both ranks) |",
        )
        say(rank, "|---|---|---|---|")
        for what, got in rows:
            say(
                rank,
                f"| {what} | {got[0][0] / 2**20:.1f} / {got[1][0] / 2**20:.1f} | {got[0][2]:.2f} / {got[1][2]:.2f} | {got[0][1]!r}, {got[1][1]!r} |",
            )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    port = os.environ.get("MASTER_PORT", str(20000 + random.randrange(20000)))
    mp.spawn(worker, args=(port,), nprocs=2, join=True)
