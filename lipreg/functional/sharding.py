"""Bounding sharded models (FSDP2 ``fully_shard``) one merged map at a time.

Under FSDP each rank holds a slice of every parameter (a ``DTensor`` shard), so lipreg must
gather a map's weights before reading them. The rule here is the one of
``docs/design/issue10/fsdp.md``: **every rank runs the same computation on the same gathered
map, in graph order**, and only the FSDP units that hold the map at hand are gathered
(:func:`gathered`: ``FSDPModule.unshard()`` before, ``reshard()`` after), so that the memory
of a certificate scales with the largest map, not with the model.

Gathers are collectives: a rank that raises between two of them would leave the others
waiting in the next all-gather. :func:`agree_ok` all-reduces a success flag after every
rank-local step (a rule, a certificate), so that a failure on one rank raises on all.

**Guarantee.** A gathered parameter is a bit-for-bit copy of the full parameter (an
all-gather moves bytes, it computes nothing), so a certificate of the gathered map is a
certificate of the map the model holds; under a ``MixedPrecisionPolicy`` it is the map at
``param_dtype``, the weights the forward computes with.

The differentiable penalty gathers parameters instead with :func:`full_parameters`
(``DTensor.full_tensor()``, differentiable: its backward hands each rank the gradient of its
own shard, without communication), and keeps its power-iteration vectors identical on every
rank with :func:`shared_from_first_rank`.

FSDP1 (``FullyShardedDataParallel``) is refused by :func:`check_shardable` with what to do.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, fx, nn

from lipreg.functional.specs import Affine, Spec

if TYPE_CHECKING:
    from lipreg.functional.analysis import Analysis

__all__ = [
    "ShardedRankError",
    "agree_ok",
    "all_ranks_succeed",
    "check_shardable",
    "fsdp_units",
    "full_parameters",
    "gathered",
    "gathered_agreed",
    "gathered_on_call",
    "is_dtensor",
    "is_fsdp1",
    "is_fsdp_hook",
    "is_sharded",
    "local_tensor",
    "refreshed_specs",
    "sealed",
    "shared_from_first_rank",
]


class ShardedRankError(RuntimeError):
    """Another rank failed while every rank bounded the same sharded map."""


@functools.cache  # imported once: these run per tensor on the unsharded path too
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


@functools.cache
def _fsdp2_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


@functools.cache
def _fsdp1_type() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    return FullyShardedDataParallel


def is_dtensor(t: object) -> bool:
    """``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 shard)."""
    kind = _dtensor_type()
    return kind is not None and isinstance(t, kind)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of ``t`` (``to_local()`` of a ``DTensor``, else ``t`` itself): what
    lipreg may read without a collective."""
    return t.to_local() if is_dtensor(t) else t


def is_fsdp1(model: nn.Module) -> bool:
    """``model`` or one of its submodules is a ``FullyShardedDataParallel`` wrapper."""
    kind = _fsdp1_type()
    return kind is not None and any(isinstance(m, kind) for m in model.modules())


def is_sharded(model: nn.Module) -> bool:
    """``model`` holds sharded state: a ``DTensor`` parameter, an FSDP2 module
    (``fully_shard``) or an FSDP1 wrapper. ``False`` for every plain model, so that callers
    keep their unsharded path (one pass over the modules)."""
    kinds = tuple(k for k in (_fsdp2_type(), _fsdp1_type()) if k is not None)
    if kinds and any(isinstance(m, kinds) for m in model.modules()):
        return True
    return any(is_dtensor(p) for p in model.parameters())


def check_shardable(model: nn.Module) -> None:
    """Refuse the sharded models lipreg cannot bound one map at a time, saying what to do."""
    if is_fsdp1(model):
        raise NotImplementedError(
            f"{type(model).__name__} is or holds a FullyShardedDataParallel (FSDP1) wrapper: "
            "lipreg bounds sharded models through FSDP2 only. Shard with "
            "torch.distributed.fsdp.fully_shard (with Lightning: ModelParallelStrategy and "
            "fully_shard in configure_model), or bound an unsharded copy of the weights "
            "(e.g. loaded from a full state dict)."
        )
    unowned = _unowned_shards(model)
    if unowned:
        raise NotImplementedError(
            f"{type(model).__name__} holds sharded (DTensor) parameters in {unowned[:5]} that "
            "no FSDP2 unit inside it owns (fully_shard was applied to a module around it, "
            "or the parameters are tensor-parallel): lipreg gathers a map through the "
            "FSDPModule holding it, so it cannot gather these. Bound the module fully_shard "
            "was applied to (e.g. the LightningModule: model_attr=None), or apply "
            "fully_shard to this network itself."
        )


def _unowned_shards(model: nn.Module) -> list[str]:
    """Paths of the submodules of ``model`` with their own ``DTensor`` parameters and no
    ``FSDPModule`` among themselves and their ancestors inside ``model`` (``[]`` at the
    cost of one pass over the parameters for an unsharded model)."""
    if not any(is_dtensor(p) for p in model.parameters()):
        return []
    fsdp2 = _fsdp2_type()
    units = [n for n, m in model.named_modules() if fsdp2 is not None and isinstance(m, fsdp2)]
    return [
        name or "(root)"
        for name, m in model.named_modules()
        if any(is_dtensor(p) for p in m.parameters(recurse=False))
        and not any(u == "" or name == u or name.startswith(f"{u}.") for u in units)
    ]


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def agree_ok(ok: bool) -> bool:
    """``True`` iff ``ok`` is true on every rank: an all-reduce (MIN) of the flag in the
    default process group (``ok`` itself when no group is initialised). Every rank must
    call it at the same point, as for any collective."""
    if not _is_distributed() or torch.distributed.get_world_size() < 2:
        return ok
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


@contextlib.contextmanager
def all_ranks_succeed(what: str) -> Iterator[None]:
    """Run a rank-local block, then agree (:func:`agree_ok`): a rank whose block raised
    re-raises its own exception, the others raise :class:`ShardedRankError`; no rank is
    left waiting in the next collective. The block must not run collectives itself."""
    try:
        yield
    except BaseException:
        agree_ok(False)
        raise
    if not agree_ok(True):
        raise ShardedRankError(
            f"another rank failed while lipreg was {what}; see that rank's error. Every "
            "rank stopped here so that none waits in the next all-gather."
        )


def _managed(unit: nn.Module, fsdp2: type) -> list[nn.Parameter]:
    """Parameters gathered by ``unit.unshard()``: its subtree's, minus those of nested units."""
    nested = [n for n, m in unit.named_modules() if n and isinstance(m, fsdp2)]
    return [
        p
        for name, p in unit.named_parameters()
        if not any(name.startswith(f"{prefix}.") for prefix in nested)
    ]


def fsdp_units(root: nn.Module, modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The FSDP2 units (``FSDPModule``s) that hold the sharded parameters of ``modules``
    (each module's nearest enclosing unit, itself included), in the order of ``modules``."""
    fsdp2 = _fsdp2_type()
    modules = list(modules)
    if fsdp2 is None or not modules:
        return []
    paths = {id(m): name for name, m in root.named_modules()}
    units = {name: m for name, m in root.named_modules() if isinstance(m, fsdp2)}
    found: list[nn.Module] = []
    for module in modules:
        if id(module) not in paths or not any(is_dtensor(p) for p in module.parameters()):
            continue  # unsharded (or already gathered): nothing to gather
        parts = paths[id(module)].split(".") if paths[id(module)] else []
        owner = next(
            (units[p] for k in range(len(parts), -1, -1) if (p := ".".join(parts[:k])) in units),
            None,
        )
        if owner is not None and all(owner is not u for u in found):
            found.append(owner)
    return found


_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # roots already examined


def _warn_if_whole_model(root: nn.Module, unit: nn.Module) -> None:
    """Warn once per model when its root is its only FSDP unit holding parameters
    (``fully_shard`` on the root only): every map then gathers the whole model. Units
    larger than one map (a block) are the user's choice of granularity and are not warned
    about: a gather then costs that unit."""
    if unit is not root or root in _WARNED:
        return
    _WARNED.add(root)
    managed = _managed(root, _fsdp2_type())
    if len(managed) < 2 or len(managed) < len(list(root.parameters())):
        return  # nested units hold parameters, or there is a single tensor to gather
    size = sum(p.numel() * p.element_size() for p in managed)
    warnings.warn(
        f"lipreg gathers the FSDP unit of the root ({type(root).__name__}), which holds all "
        f"{len(managed)} parameters ({size} bytes in full): fully_shard was applied to the "
        "root only, so bounding each map gathers the whole model on every rank. Call "
        "fully_shard on each layer (or block) before the root to gather one map at a time.",
        stacklevel=4,
    )


@contextlib.contextmanager
def gathered(root: nn.Module, modules: Sequence[nn.Module]) -> Iterator[None]:
    """Gather the full parameters of ``modules`` (submodules of ``root``) for the block.

    ``unshard()`` of every FSDP2 unit holding a sharded parameter of ``modules`` (one
    all-gather per unit, in the order of ``modules``: every rank must enter with the same
    modules), and ``reshard()`` of those units afterwards, also when the block raises. A
    unit found already unsharded is left as it was. Tensors read inside the block are valid
    only inside it (FSDP frees the gathered storage at ``reshard()``).
    """
    units = fsdp_units(root, modules)
    for unit in units:
        _warn_if_whole_model(root, unit)
    stored = [p.dtype for m in modules for p in m.parameters()] if units else []
    done: list[nn.Module] = []
    try:
        for unit in units:
            unit.unshard()
            done.append(unit)
        if units:
            _check_same_dtypes(stored, [p.dtype for m in modules for p in m.parameters()])
        yield
    finally:
        for unit in reversed(done):
            unit.reshard()


def _check_same_dtypes(stored: list[torch.dtype], full: list[torch.dtype]) -> None:
    """Refuse a unit that gathers its parameters at another dtype than it stores them (a
    ``MixedPrecisionPolicy(param_dtype=...)``): the model computes with the cast weights and
    at that dtype, which lipreg's probe and specs (at the stored dtype) do not model yet.
    Every rank holds the same policy, so every rank raises."""
    if stored != full:
        changed = sorted({f"{a} -> {b}" for a, b in zip(stored, full, strict=True) if a != b})
        raise NotImplementedError(
            f"FSDP gathers these parameters at another dtype than it stores them ({changed}: "
            "a MixedPrecisionPolicy with param_dtype); lipreg does not bound mixed-precision "
            "sharded models yet. Bound without param_dtype, or an unsharded copy of the "
            "weights cast to that dtype."
        )


@contextlib.contextmanager
def gathered_agreed(root: nn.Module, modules: Sequence[nn.Module], what: str) -> Iterator[None]:
    """:func:`gathered` around :func:`all_ranks_succeed`: gather, run the rank-local block,
    agree that every rank succeeded, reshard (what every per-map step of lipreg does)."""
    with gathered(root, modules), all_ranks_succeed(what):
        yield


def _outside_gather(x: Tensor) -> Tensor:
    raise RuntimeError(
        "this affine spec of an FSDP-sharded model was read outside the gather of its unit: "
        "its weights are freed there. Re-read it inside lipreg.functional.sharding.gathered "
        "(Analysis.refresh_specs(nodes)), as ChainBounder.bound does."
    )


def sealed(spec: Spec) -> Spec:
    """``spec`` as a sharded analysis keeps it outside a gather: an :class:`Affine` keeps its
    kind and loses every field made from the weights (their gathered storage is freed at
    ``reshard()``: reading it would crash the process), so that a reader outside the gather
    gets a clear error and no stale promise; other specs are returned unchanged."""
    if not isinstance(spec, Affine):
        return spec
    return Affine(linear=_outside_gather)


@contextlib.contextmanager
def refreshed_specs(analyses: Sequence[Analysis], nodes: Sequence[fx.Node]) -> Iterator[None]:
    """Re-read the specs of ``nodes`` in every analysis for the block (inside their gather),
    and put the previous ones back after it: specs made from gathered weights (float64
    copies, reshaped kernels) are then freed with the block instead of accumulating over
    the chains (measured: the whole model in float64 otherwise)."""
    saved = [{n: a.specs[n] for n in nodes if n in a.specs} for a in analyses]
    try:
        for analysis in analyses:
            analysis.refresh_specs(nodes)
        yield
    finally:
        for analysis, specs in zip(analyses, saved, strict=True):
            analysis.specs.update(specs)


@contextlib.contextmanager
def gathered_on_call(root: nn.Module) -> Iterator[None]:
    """While active, every call of a submodule of ``root`` that owns sharded parameters
    gathers them around its ``forward`` (forward pre/post hooks running :func:`gathered`):
    ``root.forward(x)`` then runs one unit at a time, as FSDP's own hooks would, without
    them (lipreg runs forward with the model's hooks disabled)."""
    handles = []
    active: dict[int, contextlib.ExitStack] = {}

    def pre(module: nn.Module, args: object) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(gathered(root, [module]))
        active[id(module)] = stack

    def post(module: nn.Module, args: object, output: object) -> None:
        active.pop(id(module)).close()

    owners = [m for m in root.modules() if any(is_dtensor(p) for p in m.parameters(recurse=False))]
    try:
        for m in owners:
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        yield
    finally:
        for handle in handles:
            handle.remove()
        for stack in active.values():  # a forward that raised: reshard what it gathered
            stack.close()


def is_fsdp_hook(hook: object) -> bool:
    """``hook`` is one of FSDP2's own forward hooks (a bound method of its per-module state,
    defined in ``torch.distributed``): the all-gathers lipreg does itself while bounding."""
    owner = getattr(hook, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("torch.distributed.fsdp")


@contextlib.contextmanager
def full_parameters(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Replace, for the block, every ``DTensor`` parameter of ``modules`` (and of their
    submodules) by its ``full_tensor()``, a plain tensor attached to autograd; put the
    ``DTensor`` parameters back afterwards, also when the block raises.

    One all-gather per parameter, in the order of ``modules`` then of ``named_parameters``
    (every rank must enter with the same modules). Unlike :func:`gathered` the full tensors
    are new allocations, not FSDP's unsharded storage: closures and autograd may keep them
    after the block (the penalty's graph does until its backward), and the gradient of
    anything computed from them reaches each rank's shard (``grad(full_tensor()) = the
    gradient's chunk of this rank``, measured exact: docs/design/issue10/fsdp.md, section 4).
    Other parameters (unsharded models, a unit FSDP left unsharded) are read as they are.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    full: dict[int, Tensor] = {}  # one gather per parameter, also when modules share it
    try:
        for module in modules:
            for owner in module.modules():
                for name, p in list(owner._parameters.items()):
                    if p is None or not is_dtensor(p):
                        continue
                    if id(p) not in full:
                        full[id(p)] = p.full_tensor()  # a collective: every rank, same order
                    # the module's own dict, as torch.func.functional_call does: a plain
                    # tensor cannot be assigned through nn.Module.__setattr__
                    owner._parameters[name] = full[id(p)]  # type: ignore[assignment]
                    swapped.append((owner, name, p))
        yield
    finally:
        for owner, name, p in reversed(swapped):
            owner._parameters[name] = p


@contextlib.contextmanager
def shared_from_first_rank(t: Tensor, what: str) -> Iterator[None]:
    """Run a rank-local block that updates ``t`` in place, then, in ONE all-reduce, agree
    that every rank succeeded and give every rank rank 0's ``t``.

    The all-reduce sums ``[t, failed]`` with ``t`` zeroed on the other ranks: ``x + 0 = x``
    exactly, so every rank receives rank 0's values bit for bit (a ``-0.0`` becomes
    ``+0.0``), whatever the summation order. A rank whose block raised re-raises its own
    exception, the others raise :class:`ShardedRankError`, as in
    :func:`all_ranks_succeed`. Without a process group (or with one rank) this is the block
    alone. The block must not run collectives itself."""
    if not _is_distributed() or torch.distributed.get_world_size() < 2:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:  # re-raised below, after the collective
        error = exc
    first = torch.distributed.get_rank() == 0
    flat = t.detach().reshape(-1)
    payload = torch.cat([flat if first else torch.zeros_like(flat), flat.new_ones(1)])
    payload[-1] = 1 if error is not None else 0
    torch.distributed.all_reduce(payload, op=torch.distributed.ReduceOp.SUM)
    if error is not None:
        raise error
    if payload[-1].item() != 0:
        raise ShardedRankError(
            f"another rank failed while lipreg was {what}; see that rank's error. Every "
            "rank stopped here so that none waits in the next all-gather."
        )
    with torch.no_grad():
        t.copy_(payload[:-1].reshape(t.shape))
