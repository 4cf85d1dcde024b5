"""Hand-written networks for the patterns of issue 7 ("Trust").

Each builder returns a :class:`Case`: the model (in the mode it is bounded in), the input
shape, the words a refusal should contain, and the exact Lipschitz constant where a closed
form exists (affine models: the spectral norm of the float64 weight, or of the dense Jacobian).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations as P

from tests.soundness.generator import (
    FlattenLinear,
    LoRALinear,
    ScaledLinear,
    WSConv2d,
    randomise_batchnorm,
)
from tests.soundness.oracle import eval_mode, float64_copy

__all__ = ["CASES", "Case", "affine_norm", "spectral"]


@dataclass
class Case:
    model: nn.Module
    input_shape: tuple[int, ...]
    names: tuple[str, ...]
    truth: float | None = None  # exact Lipschitz constant, when known in closed form


def spectral(w: Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach().double(), ord=2))


def affine_norm(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Exact Lipschitz constant of a model that is affine in evaluation mode: the spectral
    norm of its (constant) float64 Jacobian."""
    clone = float64_copy(model)
    with eval_mode(clone):
        n = math.prod(input_shape)

        def fn(x: Tensor) -> Tensor:
            return clone(x.reshape(1, *input_shape)).reshape(-1)

        jac = torch.autograd.functional.jacobian(fn, torch.zeros(n, dtype=torch.float64))
    return spectral(jac)


class AttnThenLinear(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2, out: int = 4) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc = nn.Linear(dim, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


class AttnResidual(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attn(x, x, x, need_weights=False)[0]


class LSTMThenLinear(nn.Module):
    def __init__(self, dim: int = 6, hidden: int = 5) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.lstm(x)[0])


class GRUThenLinear(nn.Module):
    def __init__(self, dim: int = 6, hidden: int = 5) -> None:
        super().__init__()
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.gru(x)[0])


class ConvShuffleConv(nn.Module):
    """conv → shuffle → conv with nothing between: one merged affine chain."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "pixel":
            self.a, self.s = nn.Conv2d(3, 8, 3, padding=1), nn.PixelShuffle(2)
            self.b = nn.Conv2d(2, 3, 3, padding=1)
        elif kind == "unshuffle":
            self.a, self.s = nn.Conv2d(3, 2, 3, padding=1), nn.PixelUnshuffle(2)
            self.b = nn.Conv2d(8, 3, 3, padding=1)
        else:
            self.a, self.s = nn.Conv2d(3, 6, 1), nn.ChannelShuffle(3)
            self.b = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.s(self.a(x)))


class TrainingScaled(nn.Module):
    """Multiplies by 10 only in training mode: the eval-mode function is ``fc``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        if self.training:
            y = y * 10.0
        return y


class AliasUpdate(nn.Module):
    """``keep = a; a += g(a); return a + keep``: ``keep`` IS the updated ``a``."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.g = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())

    def forward(self, x: Tensor) -> Tensor:
        a = self.fc(x)
        keep = a
        a += self.g(a)
        return a + keep


class AddInplaceReturnAlias(nn.Module):
    """``y.add_(g(y)); return y``: the returned name is the updated tensor."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.g = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        y.add_(self.g(y))
        return y


class MulInplace(nn.Module):
    """``y.mul_(4.0)`` on an intermediate: the function is ``4 · fc(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        y.mul_(4.0)
        return y


class ReluInplaceAlias(nn.Module):
    """``F.relu(y, inplace=True)`` whose result is used through the name ``y``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc1(x)
        F.relu(y, inplace=True)
        return self.fc2(self.act(y)) + y.sum(dim=1, keepdim=True)


class PlainAttrScale(nn.Module):
    """A scale stored as a plain tensor attribute (neither buffer nor parameter)."""

    def __init__(self, scale: Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.scale


def _seeded(builder: Callable[[], Case]) -> Callable[[], Case]:
    def build() -> Case:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            return builder()

    build.__name__ = builder.__name__
    return build


def _lora() -> Case:
    m = LoRALinear(10, 6)
    return Case(m, (10,), ("LoRALinear",), spectral(m.weight + m.lora_a @ m.lora_b))


def _scaled_linear() -> Case:
    m = ScaledLinear(8, 5)
    return Case(m, (8,), ("ScaledLinear",), 2.5 * spectral(m.weight))


def _ws_conv() -> Case:
    m = WSConv2d(3, 4, 3, padding=1)
    return Case(m, (3, 6, 6), ("WSConv2d",), affine_norm(m, (3, 6, 6)))


def _flatten_linear() -> Case:
    m = FlattenLinear(3 * 4 * 4, 5)
    return Case(m, (3, 4, 4), ("FlattenLinear", "Linear", "shape"), spectral(m.weight))


def _attn_linear() -> Case:
    return Case(AttnThenLinear(), (5, 8), ("MultiheadAttention", "attention"))


def _attn_residual() -> Case:
    return Case(AttnResidual(), (5, 8), ("MultiheadAttention", "attention"))


def _lstm() -> Case:
    return Case(LSTMThenLinear(), (4, 6), ("LSTM",))


def _gru() -> Case:
    return Case(GRUThenLinear(), (4, 6), ("GRU",))


def _shuffle(kind: str) -> Callable[[], Case]:
    def build() -> Case:
        m = ConvShuffleConv(kind)
        name = {"pixel": "PixelShuffle", "unshuffle": "PixelUnshuffle"}.get(kind, "ChannelShuffle")
        return Case(m, (3, 6, 6), (name,), affine_norm(m, (3, 6, 6)))

    build.__name__ = f"_shuffle_{kind}"
    return build


def _training_branch() -> Case:
    m = TrainingScaled().train()
    return Case(m, (6,), ("training",), spectral(m.fc.weight))


def _spectral_norm_train() -> Case:
    m = nn.Sequential(P.spectral_norm(nn.Linear(8, 6)), nn.ReLU(), nn.Linear(6, 3)).train()
    return Case(m, (8,), ("Linear", "parametriz"))


def _weight_norm_train() -> Case:
    m = nn.Sequential(P.weight_norm(nn.Conv2d(3, 4, 3, padding=1)), nn.Flatten()).train()
    return Case(m, (3, 5, 5), ("Conv2d", "parametriz"), affine_norm(m, (3, 5, 5)))


def _orthogonal_eval() -> Case:
    m = P.orthogonal(nn.Linear(6, 6)).eval()
    return Case(m, (6,), ("Linear", "parametriz"), affine_norm(m, (6,)))


def _alias_update() -> Case:
    return Case(AliasUpdate(), (6,), ("iadd", "add", "in-place", "inplace", "alias"))


def _add_inplace_return_alias() -> Case:
    return Case(AddInplaceReturnAlias(), (6,), ("add_", "in-place", "inplace", "alias"))


def _mul_inplace() -> Case:
    m = MulInplace()
    return Case(m, (6,), ("mul_", "in-place", "inplace"), 4.0 * spectral(m.fc.weight))


def _relu_inplace() -> Case:
    return Case(ReluInplaceAlias(), (6,), ("relu", "in-place", "inplace"))


def _plain_attr() -> Case:
    scale = torch.tensor([0.5, 3.0, -2.0, 1.0, 0.1, 4.0])
    m = PlainAttrScale(scale)
    return Case(m, (6,), ("mul", "scale"), spectral(torch.diag(scale) @ m.fc.weight.detach()))


def _batchnorm_train() -> Case:
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3), randomise_batchnorm(nn.BatchNorm2d(4)), nn.Flatten()
    ).train()
    return Case(m, (3, 5, 5), ("BatchNorm",), affine_norm(m, (3, 5, 5)))


CASES: dict[str, Callable[[], Case]] = {
    f.__name__.lstrip("_"): _seeded(f)
    for f in [
        _attn_linear,
        _attn_residual,
        _lora,
        _scaled_linear,
        _ws_conv,
        _flatten_linear,
        _lstm,
        _gru,
        _shuffle("pixel"),
        _shuffle("unshuffle"),
        _shuffle("channel"),
        _training_branch,
        _spectral_norm_train,
        _weight_norm_train,
        _orthogonal_eval,
        _alias_update,
        _add_inplace_return_alias,
        _mul_inplace,
        _relu_inplace,
        _plain_attr,
        _batchnorm_train,
    ]
}
