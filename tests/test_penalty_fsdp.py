"""``LipschitzPenalty`` on FSDP2-sharded models (``fully_shard``), 2 CPU processes with gloo.

One test spawns one pair of processes (imports dominate its cost) and runs every check in it
(docs/design/issue10/fsdp.md, section 6, item (d)). Ground truth: an unsharded copy of the
network with the same weights, trained in each process with the same batch (FSDP averages the
data gradients of identical batches: the one-process gradient):

- the gradients of ``loss + λ·penalty`` on every shard equal the unsharded copy's (rtol 1e-6),
  over two SGD steps (so that the second call refines ``v`` on moved weights), for the three
  forms, with the penalty called after and before the model's forward, and for a penalty
  built before the model was sharded;
- the ``v`` buffers and the penalty values are bitwise equal on both ranks, and every
  parameter is a ``DTensor`` shard again after each call;
- a failure on one rank only raises on both ranks (no hang) and the next call works.

Each worker saves its findings to a file; a hang fails the test at the timeout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lipreg
from tests.spawn_helpers import exit_worker, join_group, spawn_with_deadline

TIMEOUT_S = 240.0  # the pair imports torch and lipreg again: ~25 s at load
RTOL, ATOL = 1e-6, 1e-9


def _mlp() -> nn.Module:
    """Uneven shards (33 and 10 rows on 2 ranks) and a merged Linear → Linear chain."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 33), nn.ReLU(), nn.Linear(33, 33), nn.Linear(33, 10), nn.Tanh()
    )


def _cnn() -> nn.Module:
    """A merged conv → BN chain and a parametrised activation (PReLU: a spec outside the
    chains that reads a shard)."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.PReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
    )


# name: (network, input shape, form, penalty called before the forward, shard after building,
# fully_shard on the root only: after the forward FSDP keeps the root unit unsharded, so
# the penalty reads FSDP's unsharded parameters and FSDP reduce-scatters their gradient)
CASES = {
    "mlp log": (_mlp, (20,), "log", False, False, False),
    "cnn linear": (_cnn, (3, 6, 6), "linear", True, False, False),
    "mlp hinge, sharded after": (_mlp, (20,), "hinge", False, True, False),
    "cnn log, root only": (_cnn, (3, 6, 6), "log", False, False, True),
}


def _shard(model: nn.Module, root_only: bool = False) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in reversed(list(model.modules())[1:]):  # children before their parents
        if not root_only and isinstance(m, nn.Linear | nn.Conv2d | nn.BatchNorm2d | nn.PReLU):
            fully_shard(m)
    fully_shard(model)
    return model


def _penalty(model: nn.Module, shape: tuple[int, ...], form: str) -> lipreg.LipschitzPenalty:
    return lipreg.LipschitzPenalty(model, shape, form=form, weight=0.1, target=0.05)


def _step(model, penalty, x: torch.Tensor, penalty_first: bool) -> tuple[float, float]:
    """``loss + λ·penalty``, backward; the penalty's value and the total."""
    if penalty_first:
        pen = penalty()
        loss = model(x).pow(2).mean() + pen
    else:
        loss = model(x).pow(2).mean()
        pen = penalty()
        loss = loss + pen
    loss.backward()
    return pen.item(), loss.item()


def _sgd(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.5 * p.grad)
            p.grad = None


def _check_case(name: str, found: dict) -> None:
    from torch.distributed.tensor import DTensor

    make, shape, form, penalty_first, shard_after, root_only = CASES[name]
    model, reference = make(), make()
    if shard_after:
        penalty = _penalty(model, shape, form)
        _shard(model, root_only)
    else:
        penalty = _penalty(_shard(model, root_only), shape, form)
    ref_penalty = _penalty(reference, shape, form)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(3))
    steps = []
    for _ in range(2):
        got = _step(model, penalty, x, penalty_first)
        want = _step(reference, ref_penalty, x, penalty_first)
        grads = [
            (p.grad.full_tensor(), q.grad)
            for p, q in zip(model.parameters(), reference.parameters(), strict=True)
        ]
        steps.append(
            {
                "values": got,
                "reference values": want,
                "grads close": all(torch.allclose(g, h, rtol=RTOL, atol=ATOL) for g, h in grads),
                "max grad diff": max((g - h).abs().max().item() for g, h in grads),
                "v": [getattr(penalty, b).clone() for b in penalty.buffer_names],
                "reference v": [getattr(ref_penalty, b).clone() for b in penalty.buffer_names],
                "all DTensor": all(isinstance(p, DTensor) for p in model.parameters()),
            }
        )
        _sgd(model)
        _sgd(reference)
    found[name] = {
        "steps": steps,
        "state keys": sorted(penalty.state_dict()) == sorted(ref_penalty.state_dict()),
        "state tensors plain": all(
            type(t) is torch.Tensor
            for t in penalty.state_dict().values()
            if isinstance(t, torch.Tensor)
        ),
    }


def _check_rank_failure(found: dict, rank: int) -> None:
    """A rank-local failure (power iteration raising on rank 1): both ranks raise."""
    model = _shard(_mlp())
    penalty = _penalty(model, (20,), "log")
    refine = penalty._refine

    def fails_on_rank_1(op, v):
        if rank == 1:
            raise RuntimeError("injected failure on rank 1")
        refine(op, v)

    penalty._refine = fails_on_rank_1
    try:
        penalty()
        found["rank failure"] = {"raised": None}
    except Exception as exc:  # what each rank raised
        found["rank failure"] = {"raised": type(exc).__name__, "message": str(exc)}
    penalty._refine = refine
    found["rank failure"]["after"] = penalty().item()
    found["rank failure"]["v after"] = [getattr(penalty, b).clone() for b in penalty.buffer_names]


def worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: every check, findings (and an error, if any) saved to rank<k>.pt."""
    import torch.distributed as dist

    join_group(rank, port)
    found: dict = {}
    try:
        for name in CASES:
            _check_case(name, found)
        _check_rank_failure(found, rank)
    except Exception as exc:
        found["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        torch.save(found, Path(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    exit_worker()  # see its docstring: torch's teardown after FSDP can abort


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    if not torch.distributed.is_available():
        pytest.skip("torch built without distributed support")
    out = tmp_path_factory.mktemp("penalty_fsdp")
    spawn_with_deadline(worker, (str(out),), timeout_s=TIMEOUT_S)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _equal_vectors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_sharded_penalty_on_two_ranks(ranks: list[dict]) -> None:
    for rank, found in enumerate(ranks):
        assert "error" not in found, found["error"]
        for name in CASES:
            entry = found[name]
            assert entry["state keys"] and entry["state tensors plain"], (rank, name)
            for k, step in enumerate(entry["steps"]):
                where = (rank, name, k)
                assert step["grads close"], (where, step["max grad diff"])
                penalty, total = step["values"]
                want_penalty, want_total = step["reference values"]
                assert penalty != 0, where  # e.g. the hinge is active: its gradient is tested
                assert penalty == pytest.approx(want_penalty, rel=RTOL), where
                assert total == pytest.approx(want_total, rel=RTOL), where
                for v, w in zip(step["v"], step["reference v"], strict=True):
                    torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=str(where))
                assert step["all DTensor"], where
        failure = found["rank failure"]
        want = "RuntimeError" if rank == 1 else "ShardedRankError"
        assert failure["raised"] == want, failure
        assert failure["after"] != 0  # the next call works (and the ranks agree: below)
    # the ranks agree bit for bit: values and power-iteration vectors
    first, second = ranks
    for name in CASES:
        for a, b in zip(first[name]["steps"], second[name]["steps"], strict=True):
            assert a["values"] == b["values"], name
            assert _equal_vectors(a["v"], b["v"]), name
    assert first["rank failure"]["after"] == second["rank failure"]["after"]
    assert _equal_vectors(first["rank failure"]["v after"], second["rank failure"]["v after"])
