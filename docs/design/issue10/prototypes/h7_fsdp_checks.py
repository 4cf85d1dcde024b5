"""Prototype (issue 10, item 9): three facts the design of fsdp.md depends on, on 2 CPU processes.

1. After ``unshard()`` of every FSDP2 unit, does ``lipreg.autolip`` run on the FSDP2 module itself
   (rules reading ``module.weight``, the probe, the certificates) and give the unsharded value?
2. With ``fully_shard`` on the root only, what is a "unit": are the leaves ``FSDPModule``s, and
   what does ``unshard()`` of the root gather?
3. Under ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``, which dtype do ``unshard()`` and
   ``full_tensor()`` give (which weights would be certified)?

Run: OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/h7_fsdp_checks.py
"""

# ruff: noqa: E501  (prototype: long report lines)
from __future__ import annotations

import os
import random

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import lipreg


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)
    )


def say(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def check_unsharded_in_place(rank: int) -> None:
    model, ref = net(), net()
    for m in model:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fully_shard(m)
    fully_shard(model)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for u in units:
        u.unshard()
    kinds = sorted({type(p).__name__ for p in model.parameters()})
    try:
        got = lipreg.autolip(model, (3, 6, 6)).value
        want = lipreg.autolip(ref, (3, 6, 6)).value
        say(
            rank,
            f"1. all {len(units)} units unshard()-ed: parameters are {kinds}; lipreg.autolip(FSDP2 module) = {got!r}, unsharded copy = {want!r}, equal: {got == want}",
        )
    except Exception as e:
        say(
            rank,
            f"1. all units unshard()-ed: parameters are {kinds}; lipreg.autolip(FSDP2 module) fails: `{type(e).__name__}: {str(e).splitlines()[0][:200]}`",
        )
    for u in units:
        u.reshard()
    say(
        rank,
        f"   after reshard(): parameters are {sorted({type(p).__name__ for p in model.parameters()})}",
    )


def check_root_only(rank: int) -> None:
    model = net()
    fully_shard(model)
    model(torch.randn(2, 3, 6, 6))
    leaves = [type(m).__name__ for m in model]
    model.unshard()
    full = [tuple(p.shape) for p in model.parameters() if not hasattr(p, "to_local")]
    model.reshard()
    say(
        rank,
        f"2. fully_shard on the root only: children are {leaves} (FSDPModule: {[isinstance(m, FSDPModule) for m in model]}); root.unshard() makes {len(full)} of {len(list(model.parameters()))} parameters plain full tensors {full}: the whole model",
    )


def check_mixed_precision(rank: int) -> None:
    model = net()
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for m in model:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fully_shard(m, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)
    model(torch.randn(2, 3, 6, 6)).float().sum().backward()
    lin = model[3]
    sharded = lin.weight.dtype
    full = lin.weight.full_tensor()
    lin.unshard()
    unsharded = lin.weight
    differs = (unsharded.float() - full).abs().max().item()
    say(
        rank,
        f"3. MixedPrecisionPolicy(param_dtype=bfloat16): sharded parameter {sharded}, full_tensor() {full.dtype}, unshard() registers {unsharded.dtype} (max |bf16 - fp32| = {differs:.1e}): the forward computes with the bf16 weights",
    )
    lin.reshard()


def worker(rank: int, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        say(rank, f"torch {torch.__version__}, gloo, 2 processes\n")
        for check in (check_unsharded_in_place, check_root_only, check_mixed_precision):
            try:
                check(rank)
            except Exception as e:
                say(
                    rank,
                    f"{check.__name__} FAILED: `{type(e).__name__}: {str(e).splitlines()[0][:200]}`",
                )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(
        worker,
        args=(os.environ.get("MASTER_PORT", str(20000 + random.randrange(20000))),),
        nprocs=2,
        join=True,
    )
