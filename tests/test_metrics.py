"""Tests of ``lipreg.metrics.LipschitzLowerBound``.

Ground truths, independent of the code under test: ``torch.linalg.matrix_norm`` of float64
weights, and float64 dense Jacobians from ``torch.autograd.functional.jacobian`` (one per
sample) of an eval-mode float64 copy of the model, with their exact spectral norms.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import doctest
import itertools
import math
import os
import socket
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

import lipreg.metrics
from lipreg.metrics import LipschitzLowerBound
from tests.helpers import dense_jacobian_norms, init_weights, randn

torch.set_num_threads(1)

F64 = torch.float64
REL = 1e-5


def init_(model: nn.Module, seed: int, scale: float = 0.6) -> nn.Module:
    return init_weights(model, seed, scale=scale)


def relu_mlp(seed: int, widths: tuple[int, ...] = (6, 16, 12, 4)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return init_(nn.Sequential(*layers[:-1]), seed)


def dense_max(model: nn.Module, *batches: torch.Tensor) -> float:
    return float(torch.cat([dense_jacobian_norms(model, X) for X in batches]).max())


def assert_rel(actual: torch.Tensor | float, expected: float, rel: float = REL) -> None:
    assert float(actual) == pytest.approx(expected, rel=rel)


# ---------------------------------------------------------------------------------------------
# Exact values
# ---------------------------------------------------------------------------------------------


def test_linear_model_equals_spectral_norm() -> None:
    model = init_(nn.Linear(7, 5), seed=1)
    metric = LipschitzLowerBound(model)
    metric.update(randn(4, 7, seed=2))
    value = metric.compute()
    exact = float(torch.linalg.matrix_norm(model.weight.detach().to(F64), 2))
    assert isinstance(value, torch.Tensor)
    assert value.ndim == 0
    assert value.dtype == torch.float32
    assert_rel(value, exact)


def test_float64_model_is_evaluated_in_float64() -> None:
    model = init_(nn.Linear(7, 5), seed=1).double()
    metric = LipschitzLowerBound(model, n_iter=200, tol=0.0)
    metric.set_dtype(F64)
    metric.update(randn(3, 7, seed=2))  # float32 input, cast to the model's dtype
    exact = float(torch.linalg.matrix_norm(model.weight.detach(), 2))
    assert metric.compute().dtype == F64
    # a certified quotient: the explicit rounding margin (1e-10 of the output, which includes
    # the bias, over a step of 1e-3) costs up to ~1e-7 relative
    assert_rel(metric.compute(), exact, rel=1e-6)
    assert float(metric.compute()) <= exact * (1 + 1e-14)


def test_relu_mlp_max_over_samples_accumulates_and_resets() -> None:
    model = relu_mlp(seed=3)
    metric = LipschitzLowerBound(model)
    batches = [randn(5, 6, seed=s) for s in (10, 11, 12)]
    per_batch = [dense_max(model, X) for X in batches]
    assert len({round(v, 6) for v in per_batch}) == 3  # the batches have distinct maxima
    for k, X in enumerate(batches, start=1):
        metric.update(X)
        assert_rel(metric.compute(), max(per_batch[:k]))
    # every value is a lower bound of the local norms' maximum (power iteration ≤ exact)
    assert float(metric.compute()) <= max(per_batch) * (1 + 1e-6)
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert float(metric.compute()) == 0.0
    metric.update(batches[0])
    assert_rel(metric.compute(), per_batch[0])


def test_forward_returns_batch_value_and_accumulates() -> None:
    model = relu_mlp(seed=4)
    metric = LipschitzLowerBound(model)
    Xa, Xb = randn(4, 6, seed=20), randn(4, 6, seed=21)
    a, b = dense_max(model, Xa), dense_max(model, Xb)
    assert_rel(metric(Xa), a)
    assert_rel(metric(Xb), b)
    assert_rel(metric.compute(), max(a, b))


def test_conv_model_with_image_inputs() -> None:
    model = init_(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)
        ),
        seed=5,
        scale=0.3,
    )
    metric = LipschitzLowerBound(model, n_iter=60)
    X = randn(3, 2, 5, 5, seed=6)
    metric.update(X)
    assert_rel(metric.compute(), dense_max(model, X))


def test_max_samples_per_update_subsamples_with_private_generator() -> None:
    model = relu_mlp(seed=7)
    X = randn(12, 6, seed=8)
    norms = dense_jacobian_norms(model, X)
    values = []
    for _ in range(2):
        metric = LipschitzLowerBound(model, max_samples_per_update=3, seed=5)
        metric.update(X)
        values.append(float(metric.compute()))
    assert values[0] == values[1]  # reproducible: same seed, same subset
    # the value is the norm at one of the samples, and at most the full maximum
    assert float((norms - values[0]).abs().min()) <= REL * values[0]
    assert values[0] <= float(norms.max()) * (1 + 1e-6)
    full = LipschitzLowerBound(model, max_samples_per_update=12)
    full.update(X)
    assert_rel(full.compute(), float(norms.max()))


# ---------------------------------------------------------------------------------------------
# Eval semantics, no side effects, grad modes
# ---------------------------------------------------------------------------------------------


def bn_dropout_model() -> nn.Sequential:
    model = init_(
        nn.Sequential(
            nn.Linear(5, 16),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(16, 3),
        ),
        seed=9,
    )
    # non-trivial running statistics
    with torch.no_grad():
        for s in range(3):
            model(randn(32, 5, seed=100 + s) * 2 + 1)
    return model


def test_train_mode_model_with_batchnorm_and_dropout_is_untouched() -> None:
    model = bn_dropout_model()
    model.train()
    loss = model(randn(8, 5, seed=30)).square().sum()
    loss.backward()  # populate .grad, which must stay as it is
    before_state = copy.deepcopy(model.state_dict())
    before_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before_modes = [m.training for m in model.modules()]
    eval_copy = copy.deepcopy(model).eval()
    rng = torch.get_rng_state()

    X = randn(6, 5, seed=31)
    metric = LipschitzLowerBound(model)
    metric.update(X)
    with torch.no_grad():
        metric.update(randn(6, 5, seed=32))
    value = float(metric.compute())

    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == before_modes
    after_state = model.state_dict()
    assert after_state.keys() == before_state.keys()
    for k, v in before_state.items():
        assert torch.equal(after_state[k], v), k
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before_grads[n]), n

    reference = LipschitzLowerBound(eval_copy)
    reference.update(X)
    reference.update(randn(6, 5, seed=32))
    assert value == pytest.approx(float(reference.compute()), rel=1e-6)
    assert_rel(value, dense_max(eval_copy, X, randn(6, 5, seed=32)))


def test_forward_hooks_of_leaf_modules_are_not_fired() -> None:
    model = relu_mlp(seed=17)
    calls: list[str] = []
    model[0].register_forward_hook(lambda *_: calls.append("hook"))
    metric = LipschitzLowerBound(model)
    metric.update(randn(4, 6, seed=36))
    assert calls == []
    model._forward_hooks.clear()
    model[0]._forward_hooks.clear()
    assert_rel(metric.compute(), dense_max(model, randn(4, 6, seed=36)))


class Untraceable(nn.Module):
    """Value-dependent control flow: torch.fx cannot trace it (eval-mode-call fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Dropout())
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.detach().abs().sum()) >= 0:  # always true, but not traceable
            x = self.body(x)
        return self.head(x)


def test_untraceable_model_in_train_mode() -> None:
    model = init_(Untraceable(), seed=18).train()
    before = copy.deepcopy(model.state_dict())
    X = randn(5, 6, seed=37)
    metric = LipschitzLowerBound(model)
    metric.update(X)
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert_rel(metric.compute(), dense_max(model, X))


def test_model_without_grad_requirements() -> None:
    model = relu_mlp(seed=10).requires_grad_(False)
    X = randn(5, 6, seed=33)
    metric = LipschitzLowerBound(model)
    metric.update(X)
    assert_rel(metric.compute(), dense_max(model, X))
    assert all(p.grad is None for p in model.parameters())


CONTEXTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "plain": contextlib.nullcontext,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


@pytest.mark.parametrize("context", list(CONTEXTS))
def test_works_under_no_grad_and_inference_mode(context: str) -> None:
    model = relu_mlp(seed=11)
    expected = dense_max(model, randn(5, 6, seed=34), randn(5, 6, seed=35))
    metric = LipschitzLowerBound(model)
    with CONTEXTS[context]():
        metric.reset()  # the default state is then created in this context too
        X = randn(5, 6, seed=34)  # an inference tensor under inference_mode
        metric.update(X)
        metric.update(randn(5, 6, seed=35))
        value = metric.compute()
    assert_rel(value, expected)
    assert not metric.value.is_inference()
    # and the state keeps working outside the context
    metric.update(randn(5, 6, seed=34))
    assert_rel(metric.compute(), expected)


def test_model_is_not_a_submodule() -> None:
    class Owner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = relu_mlp(seed=12)
            self.metric = LipschitzLowerBound(self.net)

    owner = Owner()
    assert owner.metric.model is owner.net
    assert list(owner.metric.children()) == []
    assert list(owner.metric.parameters()) == []
    assert set(owner.state_dict()) == {f"net.{k}" for k in owner.net.state_dict()}
    assert len(list(owner.parameters())) == len(list(owner.net.parameters()))
    dup = copy.deepcopy(owner)  # memoised: the copy's metric watches the copy's network
    assert dup.metric.model is dup.net
    assert dup.net is not owner.net


# ---------------------------------------------------------------------------------------------
# Distributed reduction
# ---------------------------------------------------------------------------------------------


def test_merge_state_takes_the_max() -> None:
    model = relu_mlp(seed=13)
    Xa, Xb = randn(5, 6, seed=40), randn(5, 6, seed=41)
    a, b = dense_max(model, Xa), dense_max(model, Xb)
    assert a != pytest.approx(b, rel=1e-3)
    rank0, rank1 = LipschitzLowerBound(model), LipschitzLowerBound(model)
    rank0.update(Xa)
    rank1.update(Xb)
    rank0.merge_state(rank1)
    assert_rel(rank0.compute(), max(a, b))
    # the registered reduction is max over the gathered (stacked) states
    reduce_fx = rank1._reductions["value"]
    stacked = torch.stack([torch.tensor(a, dtype=torch.float32), rank1.value])
    assert_rel(reduce_fx(stacked), max(a, b))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dist_data(rank: int) -> torch.Tensor:
    return randn(5, 6, seed=50 + rank)


def _dist_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        metric = LipschitzLowerBound(relu_mlp(seed=14))
        metric.update(_dist_data(rank))
        synced = metric.compute()  # gathers and reduces across ranks
        local = metric.value.clone()  # compute() restores the local state afterwards
        torch.save({"synced": synced, "local": local}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_real_two_process_gloo_sync(tmp_path) -> None:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    world_size = 2
    ctx = mp.spawn(
        _dist_worker,
        args=(world_size, _free_port(), str(tmp_path)),
        nprocs=world_size,
        join=False,
    )
    deadline = time.monotonic() + 90  # a guard against hangs, not a timing assertion
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("the 2-process gloo run did not finish (hang guard)")
    model = relu_mlp(seed=14)
    local = [dense_max(model, _dist_data(r)) for r in range(world_size)]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for r, res in enumerate(results):
        assert_rel(res["synced"], max(local))
        assert_rel(res["local"], local[r])


# ---------------------------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------------------------


def test_lightning_validation_run() -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = relu_mlp(seed=15, widths=(4, 8, 2))
            self.metric = LipschitzLowerBound(self.net)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, _ = batch
            self.metric.update(x)
            self.log("val/lipschitz_lower_bound", self.metric)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    train = TensorDataset(randn(16, 4, seed=60), randn(16, 2, seed=61))
    val_x = randn(24, 4, seed=62)
    val = TensorDataset(val_x, randn(24, 2, seed=63))
    module = Module()
    before = copy.deepcopy(module.net.state_dict())
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(
        module,
        DataLoader(train, batch_size=4),
        DataLoader(val, batch_size=4),
    )
    after = module.net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it did train
    # the validation run saw the first 2 batches of 4, with the trained weights
    expected = dense_max(module.net, val_x[:8])
    logged = trainer.callback_metrics["val/lipschitz_lower_bound"]
    assert_rel(logged, expected, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Errors and documentation
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_helpful_errors() -> None:
    metric = LipschitzLowerBound(relu_mlp(seed=16))
    with pytest.raises(TypeError, match="expects a tensor batch"):
        metric.update([[0.0] * 6] * 3)
    with pytest.raises(TypeError, match="pass x only"):
        metric.update((randn(3, 6, seed=0), randn(3, 4, seed=1)))
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*x\[None\]"):
        metric.update(randn(6, seed=0))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        metric.update(torch.tensor(1.0))
    with pytest.raises(TypeError, match="real-valued"):
        metric.update(torch.zeros(3, 6, dtype=torch.complex64))
    with pytest.raises(ValueError, match="non-finite"):
        metric.update(torch.full((3, 6), math.nan))
    with pytest.raises(RuntimeError, match=r"(?s)batch of shape \(3, 5\).*\(B, \*input_shape\)"):
        metric.update(randn(3, 5, seed=0))  # wrong feature size for the model
    metric.update(randn(3, 6, seed=0))
    with pytest.raises(ValueError, match="batch dimension"):
        metric.update(randn(2, 3, 6, seed=0))  # rank changed after the first batch
    metric.update(torch.zeros(0, 6))  # an empty batch is a no-op
    assert float(metric.compute()) > 0


def test_bad_constructor_arguments() -> None:
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        LipschitzLowerBound(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_iter"):
        LipschitzLowerBound(nn.Linear(2, 2), n_iter=0)
    with pytest.raises(ValueError, match="tol"):
        LipschitzLowerBound(nn.Linear(2, 2), tol=-1.0)
    with pytest.raises(ValueError, match="max_samples_per_update"):
        LipschitzLowerBound(nn.Linear(2, 2), max_samples_per_update=0)
    with pytest.raises(ValueError, match="Unexpected keyword"):
        LipschitzLowerBound(nn.Linear(2, 2), bogus=1)


def test_metric_attributes() -> None:
    assert LipschitzLowerBound.full_state_update is False
    assert LipschitzLowerBound.is_differentiable is False
    assert LipschitzLowerBound.higher_is_better is None
    assert LipschitzLowerBound.plot_lower_bound == 0.0


def test_docstring_example() -> None:
    torch.manual_seed(0)  # the example draws its weights and inputs from the global RNG
    result = doctest.testmod(lipreg.metrics, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


# ---------------------------------------------------------------------------------------------
# Certified by definition: difference quotients, not autograd derivatives
# ---------------------------------------------------------------------------------------------


class KinkZero(nn.Module):
    """``relu(x) − relu(−x) − x ≡ 0``; autograd's Jacobian at 0 is ``−I`` (norm 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) - torch.relu(-x) - x


def test_identically_zero_network_at_its_kink_gives_zero() -> None:
    metric = LipschitzLowerBound(KinkZero())
    metric.update(torch.zeros(3, 4))
    assert float(metric.compute()) == 0.0


def test_abs_at_its_kink_is_at_most_one() -> None:
    class Abs(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.abs()

    metric = LipschitzLowerBound(Abs())
    metric.update(torch.zeros(2, 3))  # autograd's Jacobian is 0 here, L = 1
    assert 1 - 1e-6 <= float(metric.compute()) <= 1.0


class NaNOffset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.offset = torch.tensor(float("nan"))  # plain attribute: finite Jacobian, NaN output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.offset


def test_non_finite_output_raises() -> None:
    metric = LipschitzLowerBound(NaNOffset())
    with pytest.raises(ValueError, match="non-finite"):
        metric.update(randn(4, 3, seed=1))
    assert float(metric.compute()) == 0.0
