"""LipschitzPenalty(method="lipsdp"): the tight LipSDP-Neuron value as a training penalty."""

from __future__ import annotations

import itertools

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

import lipreg
from lipreg import LipschitzPenalty
from tests._lightning_helpers import RegressionModule, make_mlp, regression_data
from tests.helpers import init_weights

F64 = torch.float64


def _mlp() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    return init_weights(net.double(), 0, scale=0.7)


def _pattern_maximum(net: nn.Sequential) -> float:
    """max over all 2^9 ReLU patterns of ‖W3 D2 W2 D1 W1‖: ≥ the class's Lipschitz constant."""
    W = [m.weight.detach() for m in net if isinstance(m, nn.Linear)]
    best = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=9):
        d1, d2 = torch.tensor(bits[:5], dtype=F64), torch.tensor(bits[5:], dtype=F64)
        J = W[2] @ torch.diag(d2) @ W[1] @ torch.diag(d1) @ W[0]
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    return best


def test_linear_form_is_the_lipsdp_value_between_patterns_and_autolip():
    net = _mlp()
    penalty = LipschitzPenalty(net, (3,), method="lipsdp", weight=1.0, form="linear").eval()
    value = penalty().item()
    assert _pattern_maximum(net) <= value * (1 + 1e-9)
    assert value < 0.99 * lipreg.autolip(net, (3,)).value
    certified = lipreg.certified_bound(net, (3,)).value
    assert abs(value - certified) <= 1e-6 * certified  # the same multipliers' value


class _Owner(nn.Module):
    """Owns the network and the penalty, as a LightningModule does (functional_call target)."""

    def __init__(self, model: nn.Module, penalty: LipschitzPenalty) -> None:
        super().__init__()
        self.model, self.penalty = model, penalty

    def forward(self) -> torch.Tensor:
        return self.penalty()


def test_gradcheck_with_the_multipliers_fixed():
    net = _mlp()
    penalty = LipschitzPenalty(net, (3,), method="lipsdp", weight=0.5, form="log").eval()
    penalty()  # multipliers computed once, then held (eval mode: no refresh)
    owner = _Owner(net, penalty)
    names = [n for n, _ in owner.named_parameters()]
    inputs = tuple(p.detach().clone().requires_grad_() for _, p in owner.named_parameters())

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(owner, dict(zip(names, ps, strict=True)), ())

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_weights_leaving_the_feasible_set_trigger_a_refresh():
    net = _mlp()
    penalty = LipschitzPenalty(net, (3,), method="lipsdp", weight=1.0, form="linear").eval()
    before = penalty().item()
    with torch.no_grad():
        net[4].weight.mul_(10.0)  # S = 2T − W3ᵀW3 is no longer positive definite
    after = penalty().item()
    assert after > 5 * before
    assert _pattern_maximum(net) <= after * (1 + 1e-9)


def _fit(penalty_weight: float | None) -> float:
    pl.seed_everything(0, verbose=False)
    net = make_mlp((6, 32, 32, 3))
    penalty = None
    if penalty_weight is not None:
        penalty = LipschitzPenalty(net, (6,), method="lipsdp", weight=penalty_weight, form="linear")
    module = RegressionModule(net, lr=0.05, penalty=penalty)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=20,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(regression_data(64, seed=1), batch_size=16))
    return lipreg.certified_bound(net, (6,)).value


def test_training_with_the_lipsdp_penalty_lowers_the_tight_certificate():
    plain, penalised = _fit(None), _fit(0.1)
    assert penalised < 0.8 * plain, (penalised, plain)
