"""Prototype (issue 10, item 9): certified AutoLip of a sharded model, one merged map at a time.

On 2 CPU processes (gloo), a small MLP and a small CNN are sharded with torch's FSDP2
(``torch.distributed.fsdp.fully_shard``, parameters become ``DTensor`` shards on dim 0) and with
torch's FSDP1 (``FullyShardedDataParallel``, ``device_id=torch.device("cpu")``). Every rank
walks the merged affine maps in the same order and, for each map,

1. gathers the map's parameters only (FSDP2: ``FSDPModule.unshard()`` of the map's modules, or
   ``DTensor.full_tensor()`` per parameter; FSDP1: ``summon_full_params(unit, recurse=False)``),
2. computes lipreg's certified bound of that map alone (``lipreg.autolip`` of a replica
   ``nn.Sequential`` of plain modules that share the gathered tensors: a network made of one
   merged chain has exactly that chain's bound),
3. reshards (frees the gathered tensors) before the next map.

The AutoLip value of these sequential nets is the product of the maps' bounds (ReLU: 1). It is
compared with ``lipreg.autolip`` of an unsharded copy of the same weights, and the ranks'
values are compared bit for bit (``all_gather_object``).

Penalty sketch (FSDP2): ``σ̂ = uᵀ W v`` with ``W = weight.full_tensor()`` (differentiable: its
backward takes this rank's chunk of the replicated gradient, no communication), added to the
data loss; the sharded gradients are compared with the unsharded model's gradients.

Memory: per-rank peak RSS (sampled by a thread every 0.2 ms, one fresh process pair per
scenario, glibc's mmap threshold fixed at 64 KiB so that freed tensors leave RSS) above the
RSS just before the call, while gathering one layer at a time vs all layers, on an MLP of 6 layers 1024x1024
(4 MiB each in float32) built on the meta device and materialised as shards only.

Run: OMP_NUM_THREADS=1 MASTER_PORT=$((20000 + RANDOM % 20000)) \
     .venv/bin/python docs/design/issue10/prototypes/h7_fsdp_autolip.py
"""

# ruff: noqa: E501  (prototype: long report lines)
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import random
import time
import traceback
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lipreg
from lipreg.functional.trace import trace

WORLD = 2


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def plain_copy(m: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded, hook-free) module of ``m``'s torch class holding ``tensors`` (no copy)."""
    cls = next(c for c in (nn.Linear, nn.Conv2d, nn.Flatten) if isinstance(m, c))
    r = object.__new__(cls)  # FSDP2's dynamic class (FSDPLinear) re-runs __init__ in __new__
    r.__dict__.update(m.__dict__)
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
        setattr(r, hooks, type(getattr(m, hooks))())
    r._parameters = {k: nn.Parameter(v.detach(), requires_grad=False) for k, v in tensors.items()}
    r._modules = {}
    return r


# ---------------------------------------------------------------- gathering one map at a time
@contextlib.contextmanager
def gather_fsdp2_unshard(net: nn.Sequential, idx: list[int]) -> Iterator[list[nn.Module]]:
    """FSDP2: ``unshard()`` each module of the map (a collective: every rank, same order)."""
    mods = [net[i] for i in idx]
    for m in mods:
        if hasattr(m, "unshard"):
            m.unshard()
    try:
        yield [plain_copy(m, dict(m.named_parameters(recurse=False))) for m in mods]
    finally:
        for m in mods:
            if hasattr(m, "reshard"):
                m.reshard()


@contextlib.contextmanager
def gather_fsdp2_full_tensor(net: nn.Sequential, idx: list[int]) -> Iterator[list[nn.Module]]:
    """FSDP2: ``DTensor.full_tensor()`` per parameter (an all-gather each; freed on exit)."""
    mods = [net[i] for i in idx]
    yield [
        plain_copy(m, {k: p.full_tensor() for k, p in m.named_parameters(recurse=False)})
        for m in mods
    ]


def fsdp1_gatherer(fsdp_units: dict[int, nn.Module]) -> Callable:
    @contextlib.contextmanager
    def gather(net: nn.Sequential, idx: list[int]) -> Iterator[list[nn.Module]]:
        """FSDP1: ``summon_full_params(unit, recurse=False)`` on each wrapped unit of the map."""
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with contextlib.ExitStack() as stack:
            mods = []
            for i in idx:
                unit = fsdp_units.get(i)
                if unit is None:
                    mods.append(plain_copy(net[i], {}))
                    continue
                stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=False))
                inner = unit.module
                mods.append(plain_copy(inner, dict(inner.named_parameters(recurse=False))))
            yield mods

    return gather


def sharded_autolip(net, maps, gather, split: bool = False) -> tuple[float, list[float]]:
    """Product of the maps' certified bounds, each computed with only that map gathered.

    ``split=True``: every rank still takes part in every gather (collectives), but only rank
    ``j mod world`` certifies map ``j``; one ``all_gather_object`` of the values at the end
    (the certificates' CPU time is divided by the world size; the values are the same)."""
    values: list[float | None] = []
    rank, world = dist.get_rank(), dist.get_world_size()
    for j, (idx, shape) in enumerate(maps):
        with gather(net, idx) as mods:
            mine = not split or j % world == rank
            values.append(lipreg.autolip(nn.Sequential(*mods), shape).value if mine else None)
    if split:
        everyone = [None] * world
        dist.all_gather_object(everyone, values)
        values = [everyone[j % world][j] for j in range(len(maps))]
    return math.prod(values), values


# ---------------------------------------------------------------- checks
def say(rank: int, text: str) -> None:
    if rank == 0:
        print(text, flush=True)


def agree(value) -> bool:
    """Whether every rank holds the same Python value (bit for bit for floats)."""
    got = [None] * WORLD
    dist.all_gather_object(got, value)
    return all(g == got[0] for g in got)


def check_autolip(rank: int, name: str, build: Callable, in_shape, shard: str) -> None:
    torch.manual_seed(0)
    net = build()
    reference = copy.deepcopy(net)
    ref = lipreg.autolip(reference, in_shape)
    fsdp_units: dict[int, nn.Module] = {}
    if shard == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for m in net:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fully_shard(m)
        fully_shard(net)
        net(torch.randn(2, *in_shape)).sum().backward()  # a real step's state: resharded after it
        p = net[0].weight
        say(
            rank,
            f"- {name} FSDP2: `net[0].weight` is {type(p).__name__}, placements {p.placements}, local {tuple(p.to_local().shape)} of {tuple(p.shape)}",
        )
        for what, fn in (
            ("lipreg trace", lambda: trace(net)),
            ("lipreg.autolip(sharded net)", lambda: lipreg.autolip(net, in_shape)),
        ):
            try:
                fn()
                say(rank, f"- {name} FSDP2: {what} OK")
            except Exception as e:
                say(
                    rank,
                    f"- {name} FSDP2: {what} fails: `{type(e).__name__}: {str(e).splitlines()[0][:160]}`",
                )
        gathers = {
            "FSDP2 unshard()": gather_fsdp2_unshard,
            "FSDP2 full_tensor()": gather_fsdp2_full_tensor,
        }
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        use_orig = shard == "fsdp1_orig"
        for i, m in enumerate(net):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                net[i] = fsdp_units[i] = FSDP(
                    m, device_id=torch.device("cpu"), use_orig_params=use_orig
                )
        root = FSDP(net, device_id=torch.device("cpu"), use_orig_params=use_orig)
        root(torch.randn(2, *in_shape)).sum().backward()
        names = [(n, tuple(p.shape)) for n, p in root.named_parameters()][:2]
        say(rank, f"- {name} FSDP1 use_orig_params={use_orig}: first parameters {names}")
        try:
            trace(root)
            say(rank, f"- {name} FSDP1 use_orig_params={use_orig}: lipreg trace OK")
        except Exception as e:
            say(
                rank,
                f"- {name} FSDP1 use_orig_params={use_orig}: lipreg trace fails: `{type(e).__name__}: {str(e).splitlines()[0][:160]}`",
            )
        gathers = {
            f"FSDP1 summon_full_params(recurse=False), use_orig_params={use_orig}": fsdp1_gatherer(
                fsdp_units
            )
        }
    maps = [([i for i in idx], s) for idx, s in _maps_of(reference, in_shape)]
    first = next(iter(gathers))
    gathers = {
        **{k: (g, False) for k, g in gathers.items()},
        f"{first}, maps split over ranks": (gathers[first], True),
    }
    for label, (gather, split) in gathers.items():
        value, per_map = sharded_autolip(net, maps, gather, split)
        ref_maps = [lb.value for lb in ref.layers if lb.kind == "affine"]
        rel = abs(value - ref.value) / ref.value
        say(
            rank,
            f"| {name} | {label} | {value:.17g} | {ref.value:.17g} | {rel:.1e} | {per_map == ref_maps} | {agree(value)} |",
        )


def _maps_of(net: nn.Sequential, in_shape) -> list[tuple[list[int], tuple[int, ...]]]:
    """Maps and input shapes, from an unsharded net (one forward of a zero sample)."""
    out, run, start = [], [], tuple(in_shape)
    x = torch.zeros(1, *in_shape)
    with torch.no_grad():
        for i, m in enumerate(net):
            x = m(x)
            if isinstance(m, nn.ReLU):
                out.append((run, start))
                run, start = [], tuple(x.shape[1:])
            else:
                run.append(i)
    out.append((run, start))
    return out


# ---------------------------------------------------------------- penalty sketch (FSDP2)
def sigma_hat(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``σ̂ = uᵀ W v`` with ``u = Wv/‖Wv‖`` detached: differentiable in W, ∂σ̂/∂W = u vᵀ."""
    av = w @ v
    return torch.dot((av / av.norm()).detach(), av)


def sigma_hat_sharded(m: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """``σ̂`` with no weight gathered. FSDP2 shards dim 0 (a Linear's rows, a Conv's output
    channels), so this rank's slice of ``A v`` is the op applied with the local weight shard;
    only that output slice is all-gathered (``DTensor.from_local(.., Shard(k)).full_tensor()``,
    differentiable: its backward hands each rank its slice of the gradient)."""
    from torch.distributed.tensor import DTensor, Shard

    w = m.weight
    local = w.to_local()  # differentiable: the gradient lands on the DTensor shard
    if isinstance(m, nn.Conv2d):
        out = nn.functional.conv2d(v, local, None, m.stride, m.padding)
        full_shape = (*out.shape[:1], w.shape[0], *out.shape[2:])
        dim = 1
    else:
        out, full_shape, dim = local @ v, (w.shape[0],), 0
    full = torch.empty(full_shape, device="meta")
    av = (
        DTensor.from_local(out, w.device_mesh, [Shard(dim)], shape=full.shape, stride=full.stride())
        .full_tensor()
        .reshape(-1)
    )
    return torch.dot((av / av.norm()).detach(), av)


def penalty_of(net: nn.Sequential, vs: dict[int, torch.Tensor], get_w: Callable) -> torch.Tensor:
    return sum(sigma_hat(get_w(net[i]), v) for i, v in vs.items())


def check_penalty(rank: int) -> None:
    """Data loss + λ Σ σ̂: the sharded gradients equal the unsharded ones (same batch on both
    ranks, so FSDP's averaging over ranks gives the single-process data gradient)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = mlp([20, 32, 32, 10])
    ref = copy.deepcopy(net)
    x, lam = torch.randn(4, 20), 0.1
    vs = {
        i: torch.nn.functional.normalize(torch.randn(m.in_features), dim=0)
        for i, m in enumerate(net)
        if isinstance(m, nn.Linear)
    }
    (ref(x).square().mean() + lam * penalty_of(ref, vs, lambda m: m.weight)).backward()
    for m in net:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(net)
    for order in ("penalty after forward", "penalty before forward"):
        net.zero_grad(set_to_none=True)
        if order == "penalty before forward":
            pen = penalty_of(net, vs, lambda m: m.weight.full_tensor())
            loss = net(x).square().mean() + lam * pen
        else:
            loss = net(x).square().mean()
            loss = loss + lam * penalty_of(net, vs, lambda m: m.weight.full_tensor())
        loss.backward()
        err = max(
            (p.grad.full_tensor() - q.grad).abs().max().item()
            for p, q in zip(net.parameters(), ref.parameters(), strict=True)
        )
        say(
            rank,
            f"- penalty via `full_tensor()` ({order}): max |grad(sharded) - grad(unsharded)| = {err:.1e}; the grads are {type(next(net.parameters()).grad).__name__}",
        )
    net.zero_grad(set_to_none=True)
    (
        net(x).square().mean() + lam * sum(sigma_hat_sharded(net[i], v) for i, v in vs.items())
    ).backward()
    err = max(
        (p.grad.full_tensor() - q.grad).abs().max().item()
        for p, q in zip(net.parameters(), ref.parameters(), strict=True)
    )
    say(
        rank,
        f"- penalty with NO weight gather (`W_local @ v` on the shard, all-gather of the output `Wv` only): max |grad error| = {err:.1e}",
    )
    check_conv_penalty(rank)
    # the other path: unshard() then use the registered unsharded parameter outside forward
    net.zero_grad(set_to_none=True)
    try:
        loss = net(x).square().mean()
        for i in vs:
            net[i].unshard()
        pen = penalty_of(net, vs, lambda m: m.weight)
        (loss + lam * pen).backward()
        for i in vs:
            net[i].reshard()
        got = [p.grad is not None for p in net.parameters()]
        err = max(
            (p.grad.full_tensor() - q.grad).abs().max().item()
            for p, q in zip(net.parameters(), ref.parameters(), strict=True)
            if p.grad is not None
        )
        say(
            rank,
            f"- penalty via `unshard()` + `module.weight` outside forward: grads set {got}, max |grad error| = {err:.1e}",
        )
    except Exception as e:
        say(
            rank,
            f"- penalty via `unshard()` + `module.weight` outside forward fails: `{type(e).__name__}: {str(e).splitlines()[0][:200]}`",
        )


def check_conv_penalty(rank: int) -> None:
    """The no-gather σ̂ of a convolution (DTensor conv2d of a replicated input by an
    output-channel-sharded kernel) against the unsharded one and its gradient."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(1)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    ref = copy.deepcopy(conv)
    v = torch.nn.functional.normalize(torch.randn(3 * 8 * 8), dim=0).reshape(1, 3, 8, 8)
    av = nn.functional.conv2d(v, ref.weight, None, ref.stride, ref.padding).reshape(-1)
    torch.dot((av / av.norm()).detach(), av).backward()
    fully_shard(conv)
    try:
        got = sigma_hat_sharded(conv, v)
        got.backward()
        err = (conv.weight.grad.full_tensor() - ref.weight.grad).abs().max().item()
        say(
            rank,
            f"- conv σ̂ with NO weight gather: value error {abs(got.item() - torch.dot((av / av.norm()), av).item()):.1e}, max |grad error| = {err:.1e}",
        )
    except Exception as e:
        say(
            rank,
            f"- conv σ̂ with NO weight gather fails: `{type(e).__name__}: {str(e).splitlines()[0][:200]}`",
        )


# ---------------------------------------------------------------- memory
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sampled_peak(fn: Callable[[], object]) -> tuple[int, object]:
    """Peak RSS while ``fn`` runs (sampled every 0.2 ms by a thread; torch's kernels and gloo's
    collectives release the GIL), relative to the RSS just before; and fn's result."""
    import threading

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


def memory_scenarios(net: nn.Sequential, lin: list[int]) -> dict[str, Callable[[], object]]:
    def one_full_tensor() -> None:
        for i in lin:
            w = net[i].weight.full_tensor()
            del w

    def one_unshard() -> None:
        for i in lin:
            net[i].unshard()
            net[i].reshard()

    def all_full_tensor() -> None:
        ws = [net[i].weight.full_tensor() for i in lin]
        del ws

    def certify_one() -> None:
        sharded_autolip(net, [([i], (1024,)) for i in lin], gather_fsdp2_full_tensor)

    def certify_all() -> None:
        mods = [
            plain_copy(
                net[i], {k: p.full_tensor() for k, p in net[i].named_parameters(recurse=False)}
            )
            if i in lin
            else nn.ReLU()
            for i in range(len(net))
        ]
        lipreg.autolip(nn.Sequential(*mods), (1024,))

    def penalty() -> int:
        vs = {i: torch.nn.functional.normalize(torch.randn(1024), dim=0) for i in lin}
        before = rss_bytes()
        pen = penalty_of(net, vs, lambda m: m.weight.full_tensor())
        held = (
            rss_bytes() - before
        )  # what autograd keeps between the penalty's forward and backward
        pen.backward()
        return held

    def penalty_no_gather() -> int:
        vs = {i: torch.nn.functional.normalize(torch.randn(1024), dim=0) for i in lin}
        before = rss_bytes()
        pen = sum(sigma_hat_sharded(net[i], v) for i, v in vs.items())
        held = rss_bytes() - before
        pen.backward()
        return held

    return {
        "nothing (noise floor)": lambda: None,
        "full_tensor(), one layer at a time": one_full_tensor,
        "unshard()/reshard(), one module at a time": one_unshard,
        "full_tensor(), all 6 layers held": all_full_tensor,
        "certified AutoLip, one layer gathered at a time": certify_one,
        "certified AutoLip, whole model gathered": certify_all,
        "penalty σ̂ of 6 layers via full_tensor(), forward+backward": penalty,
        "penalty σ̂ of 6 layers, no weight gather (local-shard matvec), forward+backward": penalty_no_gather,
    }


def memory_worker(rank: int, port: str, scenario: str) -> None:
    """One scenario per fresh process pair: ``ru_maxrss`` is a per-process high-water mark.
    The model is built on the meta device and materialised as shards only."""
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        with torch.device("meta"):
            net = mlp([1024] * 7)  # 6 x Linear(1024, 1024): 4 MiB each in float32
        lin = [i for i, m in enumerate(net) if isinstance(m, nn.Linear)]
        for i in lin:
            fully_shard(net[i])
        fully_shard(net)
        net.to_empty(device="cpu")
        torch.manual_seed(0)
        for i in lin:
            net[i].reset_parameters()
        fn = memory_scenarios(net, lin)[scenario]
        dist.barrier()
        cold, out = sampled_peak(fn)  # includes one-time allocations (gloo buffers, imports)
        dist.barrier()
        warm, _ = sampled_peak(fn)
        got = [None] * WORLD
        dist.all_gather_object(got, (cold, warm, out))
        if rank == 0:
            mib = 2.0**20
            cells = [
                f"{c / mib:.1f} / {w / mib:.1f}{'' if o is None else f' (held for backward {o / mib:.1f})'}"
                for c, w, o in got
            ]
            print(f"| {scenario} | " + " | ".join(cells) + " |", flush=True)
    finally:
        dist.destroy_process_group()


def worker(rank: int, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        say(
            rank,
            f"torch {torch.__version__}, backend {dist.get_backend()}, world {WORLD}\n\n## What the callback sees, and AutoLip one map at a time\n",
        )
        rows = []
        for shard in ("fsdp2", "fsdp1", "fsdp1_orig"):
            for name, build, shape in (
                ("MLP 20-32-32-10", lambda: mlp([20, 32, 32, 10]), (20,)),
                ("CNN 3x8x8", cnn, (3, 8, 8)),
            ):
                try:
                    check_autolip(rank, name, build, shape, shard)
                except Exception as e:
                    rows.append(
                        f"- {name} {shard} FAILED: `{type(e).__name__}: {str(e).splitlines()[0][:200]}`"
                    )
                    if rank == 0:
                        traceback.print_exc(limit=4)
        for r in rows:
            say(rank, r)
        say(
            rank,
            "\n(table rows: net | gather | sharded AutoLip | unsharded lipreg.autolip | rel. diff | per-map values equal | ranks agree bitwise)\n\n## Penalty with sharded weights (FSDP2)\n",
        )
        check_penalty(rank)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # fixed threshold: every tensor above 64 KiB is its own mmap, returned to the OS when freed,
    # so RSS follows the live tensors (glibc's dynamic threshold would keep freed blocks)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    port = os.environ.get("MASTER_PORT", str(20000 + random.randrange(20000)))
    only = os.environ.get("H7_ONLY_MEMORY")  # a scenario's name: run just that one
    if not only:
        mp.spawn(worker, args=(port,), nprocs=WORLD, join=True)
    print("\n## Per-rank peak RSS above the RSS before the call, MiB, first call / second call\n")
    print(
        "MLP of 6 x Linear(1024, 1024): 24 MiB in float32, 12 MiB of shards per rank; MALLOC_MMAP_THRESHOLD_=65536.\n"
    )
    print("| what | rank 0 | rank 1 |\n|---|---|---|")
    for scenario in memory_scenarios(nn.Sequential(), []):
        if only and scenario != only:
            continue
        mp.spawn(
            memory_worker,
            args=(str(int(port) + 1 + random.randrange(1000)), scenario),
            nprocs=WORLD,
            join=True,
        )
