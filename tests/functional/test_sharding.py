"""lipreg on FSDP2-sharded models (``fully_shard``), 2 CPU processes with gloo.

One test spawns one pair of processes (imports dominate its cost) and runs every check in it
(docs/design/issue10/fsdp.md, section 6):

(a) ``lipreg.autolip`` of a sharded MLP, CNN and residual net, certified and not, equals
    (``==``) that of an unsharded copy with the same weights, on both ranks;
(b) at most one FSDP unit is unsharded at any time during the call, and every parameter is a
    ``DTensor`` shard again afterwards;
(c) ``fully_shard`` on the root only: a warning that the whole unit (model) is gathered, and
    the same value;
(e) a ladder entry that raises on rank 1 only: both ranks raise (rank 0 a
    ``ShardedRankError``), no rank hangs, and the next call works;
and FSDP1 (``FullyShardedDataParallel``) is refused with what to do.

Each worker writes its findings to a file; a hang fails the test at the timeout.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lipreg
from lipreg.functional.specs import Affine
from tests.spawn_helpers import exit_worker, join_group, spawn_with_deadline

TIMEOUT_S = 240.0  # the pair imports torch and lipreg again: ~25 s at load


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = _Block()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


NETS = {"mlp": (_mlp, (20,)), "cnn": (_cnn, (3, 8, 8)), "resnet": (_ResNet, (3, 6, 6))}


def _shard(model: nn.Module, root_only: bool = False) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    if not root_only:
        for m in reversed(list(model.modules())[1:]):  # children before their parents
            if isinstance(m, nn.Linear | nn.Conv2d | _Block):
                fully_shard(m)
    fully_shard(model)
    return model


def _count_unsharded(model: nn.Module) -> dict[str, int]:
    """Wrap every unit's unshard/reshard to record the most units unsharded at once."""
    from torch.distributed.fsdp import FSDPModule

    seen = {"now": 0, "max": 0, "calls": 0}
    for unit in model.modules():
        if not isinstance(unit, FSDPModule):
            continue

        def unshard(*a, _u=unit, _f=unit.unshard, **k):
            seen["now"] += 1
            seen["calls"] += 1
            seen["max"] = max(seen["max"], seen["now"])
            return _f(*a, **k)

        def reshard(*a, _f=unit.reshard, **k):
            seen["now"] -= 1
            return _f(*a, **k)

        unit.unshard, unit.reshard = unshard, reshard
    return seen


def _values(result: lipreg.LipschitzResult) -> list:
    return [result.value, result.estimate, [(lb.name, lb.value) for lb in result.layers]]


def _check_equal_values(found: dict) -> None:
    """(a) and (b) on every net, certified and not."""
    from torch.distributed.tensor import DTensor

    for name, (make, shape) in NETS.items():
        model, reference = _shard(make()), make()
        if name == "cnn":  # the state after a training step (FSDP initialised, resharded)
            model(torch.randn(2, *shape)).sum().backward()
        seen = _count_unsharded(model)
        for certify in (True, False):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = lipreg.autolip(model, shape, certify=certify)
            noise = [str(w.message) for w in caught if "hook" in str(w.message).lower()]
            noise += [str(w.message) for w in caught if "FSDP" in str(w.message)]
            want = lipreg.autolip(reference, shape, certify=certify)
            found[f"{name} certify={certify}"] = {
                "sharded": _values(got),
                "unsharded": _values(want),
                "kind": got.kind,
                "noise": noise,
            }
        found[f"{name} units"] = {
            "max unsharded at once": seen["max"],
            "unshard calls": seen["calls"],
            "all DTensor after": all(isinstance(p, DTensor) for p in model.parameters()),
        }


def _check_estimator(found: dict) -> None:
    """(a) through the estimator the callback uses (the cached analysis), twice."""
    make, shape = NETS["resnet"]
    sharded, reference = lipreg.AutoLip(_shard(make()), shape), lipreg.AutoLip(make(), shape)
    found["estimator"] = [[sharded().value, reference().value] for _ in range(2)]
    # outside a gather, an affine spec of the sharded analysis refuses to compute (its
    # gathered weights are freed: reading them would crash the process)
    analysis = sharded.analysis.get()
    spec = next(s for s in analysis.specs.values() if isinstance(s, Affine))
    try:
        spec.linear(torch.zeros(1, *shape))
        found["sealed"] = None
    except RuntimeError as exc:
        found["sealed"] = str(exc)


def _check_root_only(found: dict) -> None:
    """(c): one unit holding the whole model."""
    make, shape = NETS["mlp"]
    model, reference = _shard(make(), root_only=True), make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = lipreg.autolip(model, shape)
    found["root only"] = {
        "warnings": [str(w.message) for w in caught],
        "equal": got.value == lipreg.autolip(reference, shape).value,
    }


def _check_rank_failure(found: dict, rank: int) -> None:
    """(e): a rank-local failure raises on every rank; the model stays usable."""
    from lipreg.functional.ladder import LADDER

    def fails_on_rank_1(ctx):
        if rank == 1:
            raise RuntimeError("injected failure on rank 1")
        return None

    make, shape = NETS["mlp"]
    model = _shard(make())
    try:
        lipreg.autolip(model, shape, ladder=[fails_on_rank_1, *LADDER])
        found["rank failure"] = {"raised": None}
    except Exception as exc:  # what each rank raised
        found["rank failure"] = {"raised": type(exc).__name__, "message": str(exc)}
    found["rank failure"]["after"] = lipreg.autolip(model, shape).value
    found["rank failure"]["want"] = lipreg.autolip(make(), shape).value


def _check_mixed_precision_refused(found: dict) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model, policy = _mlp(), MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    try:
        lipreg.autolip(model, (20,))
        found["mixed precision"] = None
    except Exception as exc:
        found["mixed precision"] = f"{type(exc).__name__}: {exc}"


def _check_nonfinite_shard(found: dict, rank: int) -> None:
    """A NaN in rank 0's shard only: both ranks refuse (the ranks agree on finiteness)."""
    model = _shard(_mlp())
    if rank == 0:
        with torch.no_grad():
            model[2].weight.to_local()[0, 0] = float("nan")
    try:
        lipreg.autolip(model, (20,))
        found["nan shard"] = None
    except ValueError as exc:
        found["nan shard"] = str(exc)


def _check_fsdp1_refused(found: dict) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(_mlp(), device_id=torch.device("cpu"))
    try:
        lipreg.autolip(model, (20,))
        found["fsdp1"] = None
    except NotImplementedError as exc:
        found["fsdp1"] = str(exc)


def worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: every check, findings (and an error, if any) written to rank<k>.json."""
    import torch.distributed as dist

    join_group(rank, port)
    found: dict = {}
    try:
        _check_equal_values(found)
        _check_estimator(found)
        _check_root_only(found)
        _check_rank_failure(found, rank)
        _check_mixed_precision_refused(found)
        _check_nonfinite_shard(found, rank)
        _check_fsdp1_refused(found)
        everyone = [None, None]
        same = {k: found[k] for k in found if k not in ("rank failure", "nan shard")}
        dist.all_gather_object(everyone, same)
        found["ranks agree"] = everyone[0] == everyone[1]
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(found))
        dist.destroy_process_group()
    exit_worker()  # see its docstring: torch's teardown after FSDP can abort


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    if not torch.distributed.is_available():
        pytest.skip("torch built without distributed support")
    out = tmp_path_factory.mktemp("sharding")
    spawn_with_deadline(worker, (str(out),), timeout_s=TIMEOUT_S)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_sharded_autolip_on_two_ranks(ranks: list[dict]) -> None:
    for rank, found in enumerate(ranks):
        for name in NETS:
            for certify in (True, False):
                entry = found[f"{name} certify={certify}"]
                assert entry["sharded"] == entry["unsharded"], (rank, name, certify)
                assert entry["kind"] == ("upper" if certify else "estimate")
                assert entry["noise"] == [], entry["noise"]  # FSDP's hooks, per-layer units
            units = found[f"{name} units"]
            assert units["max unsharded at once"] == 1, (rank, name, units)
            assert units["unshard calls"] > 0 and units["all DTensor after"], (rank, name)
        assert all(a == b for a, b in found["estimator"]), found["estimator"]
        assert "outside the gather" in (found["sealed"] or ""), found["sealed"]
        root = found["root only"]
        assert root["equal"]
        assert any("whole model" in w for w in root["warnings"]), root["warnings"]
        failure = found["rank failure"]
        want = "RuntimeError" if rank == 1 else "ShardedRankError"
        assert failure["raised"] == want, failure
        assert failure["after"] == failure["want"]
        assert "non-finite" in (found["nan shard"] or ""), found["nan shard"]
        refusal = found["mixed precision"] or ""
        assert refusal.startswith("NotImplementedError") and "mixed-precision" in refusal
        assert found["fsdp1"] is not None and "fully_shard" in found["fsdp1"]
        assert found["ranks agree"]


def test_plain_models_take_the_unsharded_path() -> None:
    """Without shards or a process group, every helper is a no-op (the unsharded path)."""
    from lipreg.functional import sharding

    model = _mlp()
    assert not sharding.is_sharded(model) and not sharding.is_fsdp1(model)
    sharding.check_shardable(model)
    assert sharding.fsdp_units(model, list(model.modules())) == []
    before = [p.detach().clone() for p in model.parameters()]
    with sharding.gathered(model, list(model.modules())):
        pass
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert sharding.agree_ok(True) and not sharding.agree_ok(False)
    with pytest.raises(ValueError, match="local"), sharding.all_ranks_succeed("testing"):
        raise ValueError("local")
