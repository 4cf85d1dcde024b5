"""The LipschitzCallback under FSDP2 (``fully_shard``) in a real Lightning fit on 2 CPU ranks.

``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` with ``fully_shard``
in ``configure_model`` (``docs/design/issue10/fsdp.md`` §1: the CPU setup that works; Lightning's
``FSDPStrategy`` refuses CPU). The strategy relaunches the calling script, so the fit runs
as ``python tests/test_callback_fsdp.py OUT`` (this file's ``__main__``) in a subprocess with
a timeout: a rank left waiting in an all-gather fails the test instead of hanging it.

Ground truth: ``lipreg.autolip(copy, certify=True)`` of an unsharded copy of the final
weights (gathered with ``DTensor.full_tensor()``, a bit-for-bit copy), computed on each rank
after the fit; it does not go through the sharded path (no FSDP module, no gathers).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
TIMEOUT_S = 150


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    # imported here: this file also runs as the fit's script, where "tests" is no package
    from tests.spawn_helpers import run_script_with_deadline

    output = run_script_with_deadline(Path(__file__).resolve(), out, TIMEOUT_S)

    def read(stem: str) -> list:
        return [json.loads((out / f"{stem}{r}.json").read_text()) for r in (0, 1)]

    return {
        "out": out,
        "output": output,
        "metrics": read("rank"),
        "ref": read("ref"),
        "warnings": read("warn"),
    }


@pytest.mark.slow
def test_fsdp_fit_logs_the_certificate_of_the_final_weights(fsdp_run: dict) -> None:
    # imported here: this file also runs as the fit's script, where "tests" is no package
    from tests._lightning_helpers import FSDP_STEPS

    ranks, refs = fsdp_run["metrics"], fsdp_run["ref"]
    # really sharded: DTensor parameters, each rank holding a part of every Linear's rows
    assert all(set(ref["sharded"]) == {"DTensor"} for ref in refs)
    local = [a + b for a, b in zip(refs[0]["local_rows"], refs[1]["local_rows"], strict=True)]
    assert local == refs[0]["full_rows"]
    assert all(
        n < full for n, full in zip(refs[0]["local_rows"], refs[0]["full_rows"], strict=True)
    )
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [FSDP_STEPS] * 2
    assert ranks[0]["pid"] != ranks[1]["pid"]
    m0, ref = ranks[0]["last_metrics"], refs[0]
    values = ("reference", "reference_warm", "norm_product")
    assert [ref[k] for k in values] == [refs[1][k] for k in values]  # on both ranks
    # steps 3 and 6 (6 is also the fit end): full certificates, no anchor, no increment
    assert m0["lipschitz/full_certificates"] == 2.0
    certified = m0["lipschitz/autolip_certified"]
    # the unsharded copy certified from the callback's own warm-start vectors: the same
    # float64 operations on the same gathered (bit-for-bit) weights, hence ==
    assert certified == ref["reference_warm"]
    # lipreg.autolip(copy, certify=True) cold: its iterations start from other vectors, so
    # the certified bound (both are upper bounds) differs in the last bits (measured 1.2e-12
    # from the estimator's vectors, 4.7e-11 from a previous certificate's), well within the
    # certificates' own relative rounding margin of 1e-9
    assert certified == pytest.approx(ref["reference"], rel=1e-9, abs=0)
    # sound and tight against the exact float64 spectral norms of the final weights (the
    # certificate's rounding margin: measured 3e-9 relative)
    assert ref["norm_product"] <= certified <= ref["norm_product"] * (1 + 1e-8)
    for off in ("seqlip", "seqlip_over_autolip", "lower_bound", "certified"):
        assert f"lipschitz/{off}" not in ranks[0]["callback_metrics"]


@pytest.mark.slow
def test_fsdp_fit_ranks_agree_and_warn_once(fsdp_run: dict) -> None:
    ranks = fsdp_run["metrics"]
    assert ranks[0]["last_metrics"] == ranks[1]["last_metrics"]
    assert ranks[0]["callback_metrics"] == ranks[1]["callback_metrics"]
    warned = fsdp_run["warnings"][0]  # rank_zero_warn: rank 0 only
    sharded = [w for w in warned if "sharded with FSDP2" in w]
    assert len(sharded) == 1, warned
    for name in ("incremental certificates", "lipschitz/certified", "lipschitz/seqlip"):
        assert name in sharded[0]
    assert "deepcopy" in sharded[0]
    assert fsdp_run["warnings"][1] == []
    # nothing else went wrong (no method switched off after a failure, no disagreement)
    assert [w for w in warned if w not in sharded] == [], warned


# ------------------------------------------------------------------ fast: what runs sharded
def _mlp():
    from torch import nn

    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize(
    "requested,kept,off",
    [
        (None, ["autolip"], ["lipschitz/seqlip"]),
        (["autolip"], ["autolip"], []),
        (["lower_bound", "autolip"], ["autolip"], ["lipschitz/lower_bound"]),
    ],
)
def test_sharded_methods_keep_autolip_and_name_what_is_off(requested, kept, off):
    from lipreg.callback_sharding import sharded_methods

    found, notice = sharded_methods(_mlp(), requested)
    assert found == kept
    for name in ["incremental certificates", "lipschitz/certified", *off]:
        assert name in notice
    assert ("lipschitz/seqlip" in notice) == ("lipschitz/seqlip" in off)
    assert "deepcopy" in notice and "full certificates" in notice


def test_sharded_methods_without_autolip_switch_off():
    from lipreg.callback_inputs import SwitchOff
    from lipreg.callback_sharding import sharded_methods

    with pytest.raises(SwitchOff, match=r"lipschitz/seqlip, lipschitz/lower_bound.*nothing"):
        sharded_methods(_mlp(), ["seqlip", "lower_bound"])


def test_fsdp1_and_unowned_shards_switch_the_callback_off(one_rank_group):
    import torch
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    from lipreg.callback_inputs import SwitchOff
    from lipreg.callback_sharding import sharded_methods

    wrapped = FullyShardedDataParallel(_mlp(), device_id=torch.device("cpu"))
    with pytest.raises(SwitchOff, match="FSDP1"):
        sharded_methods(wrapped, None)
    # fully_shard on an outer module only: the inner network's shards have no unit inside it
    outer = nn.Sequential(_mlp())
    fully_shard(outer)
    with pytest.raises(SwitchOff, match="no FSDP2 unit inside it owns"):
        sharded_methods(outer[0], None)
    assert sharded_methods(outer, None)[0] == ["autolip"]  # the unit's own root is fine


def test_ranks_with_different_plans_switch_the_callback_off(monkeypatch):
    # the other rank (simulated) is off: every rank switches off instead of hanging
    import lipreg.callback_sharding as cs
    from lipreg.callback import LipschitzCallback

    seen = []

    def plans_agree(plan):
        seen.append(plan)
        return False, [plan, None]

    monkeypatch.setattr(cs, "plans_agree", plans_agree)
    callback = LipschitzCallback(methods=["autolip"], max_overhead=None)
    callback._prepared, callback._network_cache = True, _mlp()
    callback._estimator = object()  # stands for a prepared estimator (only its presence counts)
    with pytest.warns(UserWarning, match=r"ranks would compute different things.*off on every"):
        callback._check_ranks_agree({"autolip", "lower_bound"}, 3)
    assert seen == [["autolip"]] and callback._off


def test_a_rank_that_succeeded_takes_the_failure_path_of_another(monkeypatch):
    import lipreg.callback_sharding as cs

    monkeypatch.setattr(cs, "agree_ok", lambda ok: False)  # another rank failed
    result, failed = cs.attempt(lambda net: 1.0, _mlp(), collective=True)
    assert result == 1.0 and isinstance(failed, cs.ShardedRankError)
    monkeypatch.setattr(cs, "agree_ok", lambda ok: ok)
    assert cs.attempt(lambda net: 1.0, _mlp(), collective=True) == (1.0, None)
    assert cs.any_rank(False, collective=True) is False
    result, failed = cs.attempt(lambda net: 1 / 0, _mlp(), collective=False)
    assert result is None and isinstance(failed, ZeroDivisionError)


if __name__ == "__main__":  # the fit itself (Lightning relaunches this script for rank 1)
    sys.path.insert(0, str(TESTS_DIR))
    import _lightning_helpers

    _lightning_helpers.run_fsdp(sys.argv[1])
