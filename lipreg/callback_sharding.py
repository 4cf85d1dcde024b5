"""What :class:`lipreg.LipschitzCallback` does differently on an FSDP2-sharded model.

On a model sharded with ``torch.distributed.fsdp.fully_shard`` (with Lightning:
``ModelParallelStrategy`` and ``fully_shard`` in ``configure_model``) lipreg bounds one
merged map at a time, every rank gathering the same map in the same order
(:mod:`lipreg.functional.sharding`, ``docs/design/issue10/fsdp.md`` §8). Two consequences
for the callback:

- **What runs.** The AutoLip estimate and *full* AutoLip certificates only
  (:func:`sharded_methods`). SeqLip (merged convolution pairs read two chains' specs at once),
  the incremental certificates (the anchor keeps every map's weights and Ritz vectors
  outside their gather), the LMI tightening (``lipschitz/certified``: specs of several maps
  at once) would read a sharded analysis's *sealed* specs (weights freed at ``reshard()``);
  the lower bound copies the model (``copy.deepcopy``), which FSDP refuses.
- **Collectives.** Every gather is a collective: a rank that skipped a computation the others
  run would leave them waiting in an all-gather. So every decision that starts lipreg's work
  is agreed across ranks: the list of computations of a step (:func:`plans_agree`), the
  success of each (:func:`attempt`), and the retry / non-finite decisions after a failure
  (:func:`any_rank`, :func:`every_rank`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lipreg.callback_inputs import SwitchOff
from lipreg.callback_records import Method
from lipreg.functional.sharding import ShardedRankError, agree_ok, check_shardable
from lipreg.functional.trace import check_finite_parameters

__all__ = [
    "SHARDED_OFF_ROWS",
    "ShardedGuards",
    "any_rank",
    "attempt",
    "every_rank",
    "nonfinite_weights",
    "plans_agree",
    "sharded_methods",
]

#: Rows of :data:`lipreg.callback_methods.METHOD_TABLE` switched off on a sharded model (the
#: incremental certificate is off by having no anchor: ``_has_anchor`` stays false).
SHARDED_OFF_ROWS = frozenset({"certified", "seqlip", "lower_bound"})


def sharded_methods(
    network: nn.Module, requested: list[str] | None
) -> tuple[list[str], str | None]:
    """The entries of ``methods=`` that run on the sharded ``network``, and the one warning
    naming what is off and why (``None`` when nothing the user asked for is lost).

    Raises :class:`SwitchOff` when lipreg cannot bound this sharding
    (:func:`lipreg.functional.sharding.check_shardable`: FSDP1, parameters sharded outside
    the network's own FSDP units) or when no requested method can run."""
    try:
        check_shardable(network)
    except NotImplementedError as exc:
        raise SwitchOff(str(exc)) from exc
    wanted = ["autolip", "seqlip"] if requested is None else list(requested)
    kept = [m for m in wanted if m == "autolip"]
    off = ["the incremental certificates (every certified value is a full certificate)"]
    off += ["lipschitz/certified (the LMI tightening)"] if kept else []
    off += [f"lipschitz/{m}" for m in wanted if m != "autolip"]
    name = type(network).__name__
    why = (
        f"{name} is sharded with FSDP2 (fully_shard): lipreg bounds it one merged map at a "
        "time, every rank gathering the same map. Off for this fit: "
        f"{', '.join(off)}: they read several maps' weights outside their gather (a sharded "
        "model's specs are sealed there, as FSDP frees the gathered weights) or copy the "
        "model (FSDP refuses deepcopy). "
    )
    if not kept:
        raise SwitchOff(
            why + f"methods={requested} leaves nothing to compute; 'autolip' runs sharded "
            "(or bound an unsharded copy of the weights, e.g. from a full state dict)."
        )
    return kept, why + (
        "lipschitz/autolip and full certificates (lipschitz/autolip_certified) run. For "
        "the others, bound an unsharded copy of the weights (e.g. from a full state dict)."
    )


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def plans_agree(plan: Any) -> tuple[bool, list[Any]]:
    """Whether every rank holds the same ``plan`` (what it is about to compute), and every
    rank's plan (rank order): one ``all_gather_object`` in the default group; every rank
    must call it at the same point."""
    if _world_size() < 2:
        return True, [plan]
    plans: list[Any] = [None] * _world_size()
    torch.distributed.all_gather_object(plans, plan)
    return all(p == plans[0] for p in plans), plans


def every_rank(flag: bool, collective: bool) -> bool:
    """``flag`` on every rank (an all-reduce when ``collective``, else ``flag``)."""
    return agree_ok(flag) if collective else flag


def any_rank(flag: bool, collective: bool) -> bool:
    """``flag`` on some rank (an all-reduce when ``collective``, else ``flag``)."""
    return not every_rank(not flag, collective)


def attempt(
    compute: Callable[[nn.Module], Any], network: nn.Module, collective: bool
) -> tuple[Any, Exception | None]:
    """``(compute(network), None)``, or ``(None, the exception)``; when ``collective``, the
    ranks agree on success afterwards, so a rank whose computation succeeded while another
    failed gets a :class:`ShardedRankError` and every rank takes the failure path."""
    result, failed = None, None
    try:
        result = compute(network)
    except Exception as exc:
        failed = exc
    if collective and not agree_ok(failed is None) and failed is None:
        failed = ShardedRankError(
            "another rank failed in this computation (see its error); every rank treats it "
            "as failed, so that none waits in the next all-gather."
        )
    return result, failed


def nonfinite_weights(network: nn.Module, collective: bool) -> str:
    """Why ``network``'s weights are not finite (``""`` when they are), the same answer on
    every rank when ``collective`` (a rank with finite weights says "on another rank")."""
    try:
        check_finite_parameters(network)
        reason = ""
    except ValueError as exc:
        reason = str(exc)
    if any_rank(bool(reason), collective) and not reason:
        reason = "non-finite (NaN/Inf) weights on another rank"
    return reason


class ShardedGuards:
    """The callback's part that handles sharded models (mixed into
    :class:`lipreg.LipschitzCallback`, whose per-fit state it reads and sets)."""

    methods: list[str] | None
    _disabled: set[str]
    _prepared: bool
    _off: bool
    _network_cache: nn.Module | None
    _report: Callable[[str, str], None]
    _tasks: Callable[[set[str]], list[Method]]

    def _prepare_sharded(self, network: nn.Module, requested: list[str] | None) -> list[str]:
        """Restrict this fit's methods to what runs sharded (:func:`sharded_methods`; one
        warning saying what is off and why) and return them."""
        kept, notice = sharded_methods(network, requested)
        self.methods = list(kept)
        self._disabled |= SHARDED_OFF_ROWS
        if notice is not None:
            self._report("sharded", notice)
        return kept

    def _check_ranks_agree(self, due: set[str], step: int) -> None:
        """Switch the callback off on every rank unless every rank is about to run the
        same computations at ``step`` (a rank skipping one would leave the others in its
        all-gathers): one ``all_gather_object`` of each rank's plan."""
        ready = self._prepared and not self._off and self._network_cache is not None
        same, plans = plans_agree([m.name for m in self._tasks(due)] if ready else None)
        if not same:
            self._off = True
            self._report(
                "ranks_disagree",
                f"at step {step} the ranks would compute different things (per rank: "
                f"{plans}; None: the callback is off there, see that rank's warnings). On a "
                "sharded model that would leave a rank waiting in an all-gather: the callback "
                "is off on every rank for this fit; training continues.",
            )
