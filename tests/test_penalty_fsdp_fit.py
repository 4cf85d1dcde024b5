"""``LipschitzPenalty`` in a real Lightning fit of an FSDP2-sharded network on 2 CPU ranks.

``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model`` (as in
``tests/test_callback_fsdp.py``; the fit runs as ``python tests/test_penalty_fsdp_fit.py OUT``,
this file's ``__main__``, in a subprocess with a timeout), the penalty built on the network
before it is sharded and added to the loss in ``training_step``.

Ground truth: the same fit in one process without FSDP, from the same initial weights, on
the union of the two ranks' batches: each rank's batch is its whole half of the data (24 of
48 samples, whatever split the distributed sampler makes) and FSDP averages the ranks'
gradients, so a step is the one-process step on all 48 samples (the mean squared error plus
the same penalty). The final weights and the penalty's ``v`` buffers must agree to float32
rounding (summation orders differ; measured 1.5e-8), and a one-process fit without the
penalty must end elsewhere (so that the agreement says something about the penalty).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
TIMEOUT_S = 150


@pytest.mark.slow
def test_a_penalised_fsdp_fit_takes_the_unsharded_steps(tmp_path: Path) -> None:
    # imported here: this file also runs as the fit's script, where "tests" is no package
    import torch

    from lipreg.penalty import LipschitzPenalty
    from tests._lightning_helpers import (
        D_IN,
        FSDP_FULL_BATCH,
        FSDP_PENALTY,
        FSDP_STEPS,
        RegressionModule,
        fsdp_loader,
        make_mlp,
        make_trainer,
    )
    from tests.spawn_helpers import run_script_with_deadline

    run_script_with_deadline(Path(__file__).resolve(), tmp_path, TIMEOUT_S)
    ranks = [torch.load(tmp_path / f"weights{r}.pt") for r in (0, 1)]
    assert all(set(rank["sharded"]) == {"DTensor"} for rank in ranks)  # really sharded
    for key in ("start", "end", "buffers"):  # the ranks agree bit for bit
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), (key, name)

    def one_process_fit(with_penalty: bool):
        net = make_mlp()
        net.load_state_dict(ranks[0]["start"])
        penalty = LipschitzPenalty(net, (D_IN,), **FSDP_PENALTY) if with_penalty else None
        trainer = make_trainer(tmp_path / f"reference{with_penalty}", [], max_steps=FSDP_STEPS)
        trainer.fit(RegressionModule(net, penalty=penalty), fsdp_loader(2 * FSDP_FULL_BATCH))
        return net.state_dict(), penalty

    weights, penalty = one_process_fit(True)
    end = ranks[0]["end"]
    moved = max(float((end[k] - ranks[0]["start"][k]).abs().max()) for k in end)
    assert moved > 1e-3  # the fit trained (the comparison below is not of initial weights)
    for name, value in weights.items():
        torch.testing.assert_close(end[name], value, rtol=1e-5, atol=1e-6)
    for name, value in penalty.named_buffers():
        torch.testing.assert_close(ranks[0]["buffers"][name], value, rtol=1e-5, atol=1e-6)
    unpenalised, _ = one_process_fit(False)
    assert max(float((end[k] - unpenalised[k]).abs().max()) for k in end) > 1e-4


if __name__ == "__main__":  # the fit itself (Lightning relaunches this script for rank 1)
    sys.path.insert(0, str(TESTS_DIR))
    import _lightning_helpers

    _lightning_helpers.run_fsdp_penalty(sys.argv[1])
