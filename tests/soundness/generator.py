"""A seeded generator of small random networks covering every rule family of lipreg.

``generate(seed)`` builds a network of 2–5 random *blocks* (each a small ``nn.Module`` whose
``forward`` uses the pattern of one family: a module, a functional form, a method call, an
in-place update, a subclass overriding ``forward``...), on inputs of at most ~200 numbers:
vectors ``(d,)``, sequences or 1-d signals ``(C, L)``, images ``(C, H, W)`` or volumes
``(C, D, H, W)``. The first block's family is ``FAMILIES[seed % len(FAMILIES)]``, so every
family appears once every ``len(FAMILIES)`` seeds; the others are drawn at random.

Every block also declares the words a refusal caused by it should contain (``names``), so the
harness can check that an ``UnsupportedOperationError`` names the offending op.

Weights come from PyTorch's default initialisation under ``torch.manual_seed(seed)`` inside
``torch.random.fork_rng`` (the global RNG is left untouched).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations as P

__all__ = [
    "FAMILIES",
    "Block",
    "Generated",
    "GeneratedNet",
    "generate",
    "randomise_batchnorm",
]

Shape = tuple[int, ...]
MAX_NUMEL = 512


@dataclass
class Block:
    module: nn.Module
    family: str
    names: tuple[str, ...]


@dataclass
class Generated:
    model: nn.Module
    input_shape: Shape
    families: list[str]
    names: list[str]
    train_mode: bool
    seed: int
    shapes: list[Shape] = field(default_factory=list)
    block_names: list[tuple[str, ...]] = field(default_factory=list)

    def describe(self) -> str:
        mode = "train" if self.train_mode else "eval"
        chain = " -> ".join(self.families)
        return f"seed {self.seed}: input {self.input_shape}, {mode} mode, {chain}"


class GeneratedNet(nn.Module):
    """The blocks applied in order."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


# --------------------------------------------------------------------------------------------
# Block modules
# --------------------------------------------------------------------------------------------


class Call(nn.Module):
    """``fn(x, *args, **kwargs)`` for a torch function ``fn``."""

    def __init__(self, fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x, *self.args, **self.kwargs)


class Method(nn.Module):
    """``x.<name>(*args, **kwargs)``."""

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.name, self.args, self.kwargs = name, args, kwargs

    def forward(self, x: Tensor) -> Tensor:
        return getattr(x, self.name)(*self.args, **self.kwargs)


class Const(nn.Module):
    """Arithmetic with a constant ``c``: a Python float, a buffer, a parameter, or a plain
    tensor attribute (neither buffer nor parameter)."""

    def __init__(self, op: str, c: float | Tensor, store: str = "float") -> None:
        super().__init__()
        self.op, self.store = op, store
        if store == "buffer":
            self.register_buffer("c", torch.as_tensor(c))
        elif store == "param":
            self.c = nn.Parameter(torch.as_tensor(c))
        else:
            self.c = c  # a float, or a plain tensor attribute

    def forward(self, x: Tensor) -> Tensor:
        c = self.c
        if self.op == "mul":
            return x * c
        if self.op == "rmul":
            return c * x
        if self.op == "div":
            return x / c
        if self.op == "add":
            return x + c
        if self.op == "sub":
            return x - c
        if self.op == "rsub":
            return c - x
        if self.op == "neg":
            return -x
        if self.op == "torch.mul":
            return torch.mul(x, c)
        if self.op == "torch.add":
            return torch.add(x, c)
        if self.op == "method.mul":
            return x.mul(c)
        if self.op == "method.div":
            return x.div(c)
        if self.op == "expand_mul":  # broadcasting that duplicates x: (B, d) * (k, d)
            return x.unsqueeze(1) * c
        raise ValueError(self.op)


class Residual(nn.Module):
    def __init__(self, body: nn.Module, mode: str, other: nn.Module | None = None) -> None:
        super().__init__()
        self.body, self.mode, self.other = body, mode, other

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "add":
            return x + self.body(x)
        if self.mode == "radd":
            return self.body(x) + x
        if self.mode == "sub":
            return x - self.body(x)
        if self.mode == "alpha":
            return torch.add(x, self.body(x), alpha=0.5)
        if self.mode == "scaled":
            return 2.0 * x + self.body(x)
        if self.mode == "two":
            assert self.other is not None
            return self.body(x) + self.other(x)
        raise ValueError(self.mode)


class Concat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module, mode: str, dim: int) -> None:
        super().__init__()
        self.a, self.b, self.mode, self.dim = a, b, mode, dim

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "cat":
            return torch.cat([self.a(x), self.b(x)], dim=self.dim)
        if self.mode == "cat_x":
            return torch.cat((x, self.a(x)), self.dim)
        if self.mode == "stack":
            return torch.stack([self.a(x), self.b(x)], dim=self.dim)
        raise ValueError(self.mode)


class SplitJoin(nn.Module):
    def __init__(self, f: nn.Module, mode: str, k: int) -> None:
        super().__init__()
        self.f, self.mode, self.k = f, mode, k

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "chunk":
            a, b = x.chunk(2, dim=-1)
            return torch.cat([self.f(a), b], dim=-1)
        if self.mode == "split":
            a, b = torch.split(x, [self.k, x.shape[-1] - self.k], dim=-1)
            return torch.cat([b, self.f(a)], dim=-1)
        if self.mode == "chunk_add":
            a, b = torch.chunk(x, 2, dim=-1)
            return a + self.f(b)
        if self.mode == "unbind":
            parts = x.unbind(1)
            return torch.stack([self.f(parts[0]), parts[-1]], dim=1)
        raise ValueError(self.mode)


class Slice(nn.Module):
    def __init__(self, mode: str, k: int, index: Tensor | None = None) -> None:
        super().__init__()
        self.mode, self.k = mode, k
        if index is not None:
            self.register_buffer("index", index)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "head":
            return x[..., : self.k]
        if self.mode == "step":
            return x[..., ::2]
        if self.mode == "narrow":
            return x.narrow(-1, 1, self.k)
        if self.mode == "torch.narrow":
            return torch.narrow(x, 1, 0, self.k)
        if self.mode == "index_select":
            return torch.index_select(x, -1, self.index)
        if self.mode == "select":
            return x.select(1, self.k)
        if self.mode == "int":
            return x[:, self.k]
        raise ValueError(self.mode)


class Reshape(nn.Module):
    def __init__(self, mode: str, shape: Shape = ()) -> None:
        super().__init__()
        self.mode, self.shape = mode, shape

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "flatten":
            return x.flatten(1)
        if self.mode == "torch.flatten":
            return torch.flatten(x, 1)
        if self.mode == "view":
            return x.view(x.shape[0], -1)
        if self.mode == "reshape":
            return x.reshape(-1, *self.shape)
        if self.mode == "unsqueeze":
            return x.unsqueeze(1).squeeze(1)
        if self.mode == "torch.reshape":
            return torch.reshape(x, (-1, *self.shape))
        raise ValueError(self.mode)


class Permute(nn.Module):
    def __init__(self, mode: str, rank: int) -> None:
        super().__init__()
        self.mode = mode
        self.dims = (0, *range(rank, 0, -1))  # batch first, sample axes reversed

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "transpose":
            return x.transpose(-1, -2)
        if self.mode == "torch.transpose":
            return torch.transpose(x, 1, 2)
        if self.mode == "permute":
            return x.permute(*self.dims)
        if self.mode == "movedim":
            return torch.movedim(x, 1, -1)
        raise ValueError(self.mode)


class Shared(nn.Module):
    """One module called twice."""

    def __init__(self, inner: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.inner, self.act = inner, act

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(self.act(self.inner(x)))


class InPlace(nn.Module):
    """In-place updates of an intermediate tensor (never of the block's input)."""

    def __init__(self, lin: nn.Module, g: nn.Module, mode: str) -> None:
        super().__init__()
        self.lin, self.g, self.mode = lin, g, mode
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        a = self.lin(x)
        if self.mode == "add_":
            a.add_(0.5)
            return a
        if self.mode == "mul_":
            a.mul_(2.5)
            return a
        if self.mode == "relu_fn":
            F.relu(a, inplace=True)  # result used through the alias a
            return a
        if self.mode == "relu_mod":
            return self.relu(a)
        if self.mode == "alias":
            keep = a
            a += self.g(a)
            return a + keep
        if self.mode == "add_tensor":
            a.add_(self.g(a))
            return a
        if self.mode == "iadd_return":
            b = a
            b *= 3.0
            return a
        raise ValueError(self.mode)


class TrainingBranch(nn.Module):
    def __init__(self, inner: nn.Module, mode: str) -> None:
        super().__init__()
        self.inner, self.mode = inner, mode

    def forward(self, x: Tensor) -> Tensor:
        y = self.inner(x)
        if self.mode == "scale":
            if self.training:
                y = y * 10.0
            return y
        if self.mode == "else":
            if not self.training:
                return y
            return 10.0 * y + x.sum()
        raise ValueError(self.mode)


class LoRALinear(nn.Linear):
    """``F.linear(x, W + A B)``: a LoRA-style subclass overriding ``forward``."""

    def __init__(self, n_in: int, n_out: int, rank: int = 2) -> None:
        super().__init__(n_in, n_out)
        self.lora_a = nn.Parameter(torch.randn(n_out, rank))
        self.lora_b = nn.Parameter(torch.randn(rank, n_in) / math.sqrt(n_in))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight + self.lora_a @ self.lora_b, self.bias)


class ScaledLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return 2.5 * super().forward(x)


class FlattenLinear(nn.Linear):
    """A subclass that changes shapes: flattens its input first."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.flatten(1))


class WSConv2d(nn.Conv2d):
    """Weight-standardised convolution."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True)
        w = (w - mean) / (std + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledConv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return 2.5 * super().forward(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, residual: bool) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.mha(x, x, x, need_weights=False)[0]
        return x + out if self.residual else out


class Recurrent(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x)[0]


class PairOut(nn.Module):
    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.lin(x), None


class TupleFirst(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)[0]


class FunctionalConv(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(conv.kernel_size)]

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class FunctionalLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        lin = nn.Linear(n_in, n_out)
        self.weight, self.bias = lin.weight, lin.bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class FunctionalBatchNorm(nn.Module):
    def __init__(self, channels: int, use_training_flag: bool) -> None:
        super().__init__()
        bn = randomise_batchnorm(nn.BatchNorm1d(channels))
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("rm", bn.running_mean.clone())
        self.register_buffer("rv", bn.running_var.clone())
        self.use_training_flag = use_training_flag

    def forward(self, x: Tensor) -> Tensor:
        training = self.training if self.use_training_flag else False
        return F.batch_norm(x, self.rm, self.rv, self.weight, self.bias, training, 0.0, 1e-5)


class Product(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "square":
            return x * x
        if self.mode == "exp":
            return torch.exp(x)
        raise ValueError(self.mode)


def randomise_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> Any:
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.2, 3.0)
        if bn.weight is not None:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------

Factory = Callable[[random.Random, Shape], tuple[nn.Module, tuple[str, ...]]]


@dataclass
class Family:
    name: str
    ranks: tuple[int, ...]
    build: Factory


FAMILIES: list[Family] = []


def family(name: str, ranks: tuple[int, ...]) -> Callable[[Factory], Factory]:
    def deco(fn: Factory) -> Factory:
        FAMILIES.append(Family(name, ranks, fn))
        return fn

    return deco


ANY = (1, 2, 3, 4)


def _last(shape: Shape) -> int:
    return shape[-1]


def _width(rng: random.Random) -> int:
    return rng.randint(3, 16)


def _activations(rng: random.Random, channels: int) -> list[tuple[nn.Module, tuple[str, ...]]]:
    return [
        (nn.ReLU(), ("ReLU",)),
        (nn.ReLU6(), ("ReLU6",)),
        (nn.LeakyReLU(rng.choice([0.01, 0.2, 1.5, 3.0, -0.5])), ("LeakyReLU",)),
        (nn.ELU(alpha=rng.choice([0.5, 1.0, 2.0])), ("ELU",)),
        (nn.CELU(alpha=rng.choice([0.5, 2.0])), ("CELU",)),
        (nn.SELU(), ("SELU",)),
        (nn.GELU(), ("GELU",)),
        (nn.GELU(approximate="tanh"), ("GELU",)),
        (nn.SiLU(), ("SiLU",)),
        (nn.Mish(), ("Mish",)),
        (nn.Sigmoid(), ("Sigmoid",)),
        (nn.Tanh(), ("Tanh",)),
        (nn.Softplus(beta=rng.choice([0.5, 1.0, 2.0])), ("Softplus",)),
        (nn.Hardswish(), ("Hardswish",)),
        (nn.Hardsigmoid(), ("Hardsigmoid",)),
        (nn.Hardtanh(-2.0, 2.0), ("Hardtanh",)),
        (nn.Softsign(), ("Softsign",)),
        (nn.LogSigmoid(), ("LogSigmoid",)),
        (nn.Tanhshrink(), ("Tanhshrink",)),
        (nn.Softshrink(0.3), ("Softshrink",)),
        (_prelu(rng, channels), ("PReLU",)),
        (nn.RReLU(0.1, 0.4), ("RReLU",)),
    ]


def _prelu(rng: random.Random, channels: int) -> nn.PReLU:
    m = nn.PReLU(rng.choice([1, channels]))
    with torch.no_grad():
        m.weight.uniform_(-0.5, 2.0)
    return m


def _functional_acts(rng: random.Random) -> list[tuple[nn.Module, tuple[str, ...]]]:
    slope = rng.choice([0.1, 2.0])
    return [
        (Call(F.relu), ("relu",)),
        (Call(torch.relu), ("relu",)),
        (Method("relu"), ("relu",)),
        (Call(F.relu6), ("relu6",)),
        (Call(torch.sigmoid), ("sigmoid",)),
        (Method("sigmoid"), ("sigmoid",)),
        (Call(torch.tanh), ("tanh",)),
        (Method("tanh"), ("tanh",)),
        (Call(F.softsign), ("softsign",)),
        (Call(F.softplus, beta=2.0), ("softplus",)),
        (Call(F.hardtanh), ("hardtanh",)),
        (Call(F.hardsigmoid), ("hardsigmoid",)),
        (Call(F.hardswish), ("hardswish",)),
        (Call(F.logsigmoid), ("logsigmoid",)),
        (Call(F.silu), ("silu",)),
        (Call(F.mish), ("mish",)),
        (Call(F.selu), ("selu",)),
        (Call(F.celu, alpha=0.5), ("celu",)),
        (Call(F.elu, alpha=1.5), ("elu",)),
        (Call(F.gelu), ("gelu",)),
        (Call(F.gelu, approximate="tanh"), ("gelu",)),
        (Call(F.leaky_relu, negative_slope=slope), ("leaky_relu",)),
        (Call(F.leaky_relu, slope), ("leaky_relu",)),
        (Call(torch.abs), ("abs",)),
        (Method("abs"), ("abs",)),
        (Call(torch.sin), ("sin",)),
        (Call(torch.cos), ("cos",)),
        (Call(torch.atan), ("atan",)),
        (Call(torch.clamp, -1.0, 1.0), ("clamp",)),
        (Method("clamp", min=0.0), ("clamp",)),
        (Call(torch.clamp_min, 0.2), ("clamp_min",)),
    ]


def _module_activation(rng: random.Random, shape: Shape) -> nn.Module:
    channels = shape[0]
    return rng.choice(_activations(rng, channels))[0]


for _i, _name in enumerate(
    [
        "ReLU",
        "ReLU6",
        "LeakyReLU",
        "ELU",
        "CELU",
        "SELU",
        "GELU",
        "GELU-tanh",
        "SiLU",
        "Mish",
        "Sigmoid",
        "Tanh",
        "Softplus",
        "Hardswish",
        "Hardsigmoid",
        "Hardtanh",
        "Softsign",
        "LogSigmoid",
        "Tanhshrink",
        "Softshrink",
        "PReLU",
        "RReLU",
    ]
):

    def _act_factory(rng: random.Random, shape: Shape, _k: int = _i) -> Any:
        return _activations(rng, shape[0])[_k]

    family(f"act/{_name}", ANY)(_act_factory)


@family("act/functional", ANY)
def _functional_act(rng: random.Random, shape: Shape) -> Any:
    return rng.choice(_functional_acts(rng))


@family("act/method", ANY)
def _method_act(rng: random.Random, shape: Shape) -> Any:
    return rng.choice([a for a in _functional_acts(rng) if isinstance(a[0], Method)])


@family("linear", (1,))
def _linear(rng: random.Random, shape: Shape) -> Any:
    return nn.Linear(shape[-1], _width(rng), bias=rng.random() < 0.8), ("Linear",)


@family("linear/multidim", (2, 3))
def _linear_multidim(rng: random.Random, shape: Shape) -> Any:
    return nn.Linear(shape[-1], rng.randint(2, 8)), ("Linear",)


@family("linear/functional", (1, 2))
def _linear_functional(rng: random.Random, shape: Shape) -> Any:
    return FunctionalLinear(shape[-1], _width(rng)), ("linear",)


@family("batchnorm", (1, 2, 3, 4))
def _batchnorm(rng: random.Random, shape: Shape) -> Any:
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}
    bn = cls[len(shape)](shape[0], affine=rng.random() < 0.8)
    return randomise_batchnorm(bn), ("BatchNorm",)


@family("batchnorm/functional", (1, 2))
def _batchnorm_functional(rng: random.Random, shape: Shape) -> Any:
    return FunctionalBatchNorm(shape[0], rng.random() < 0.5), ("batch_norm",)


@family("softmax", ANY)
def _softmax(rng: random.Random, shape: Shape) -> Any:
    return rng.choice(
        [
            (nn.Softmax(dim=-1), ("Softmax",)),
            (nn.Softmax(dim=1), ("Softmax",)),
            (Call(F.softmax, dim=-1), ("softmax",)),
            (Method("softmax", -1), ("softmax",)),
            (Call(torch.softmax, 1), ("softmax",)),
        ]
    )


@family("log_softmax", ANY)
def _log_softmax(rng: random.Random, shape: Shape) -> Any:
    return rng.choice(
        [
            (nn.LogSoftmax(dim=-1), ("LogSoftmax",)),
            (Call(F.log_softmax, dim=1), ("log_softmax",)),
            (Method("log_softmax", -1), ("log_softmax",)),
        ]
    )


def _const_tensor(rng: random.Random, shape: Shape, positive: bool = False) -> Tensor:
    options = [(shape[-1],), tuple(shape)]
    if len(shape) >= 2:
        options.append((shape[0],) + (1,) * (len(shape) - 1))
    t = torch.randn(rng.choice(options))
    return t.abs() + 0.5 if positive else t


@family("arith/scalar", ANY)
def _arith_scalar(rng: random.Random, shape: Shape) -> Any:
    op = rng.choice(
        [
            "mul",
            "rmul",
            "div",
            "add",
            "sub",
            "rsub",
            "neg",
            "torch.mul",
            "method.mul",
            "method.div",
            "torch.add",
        ]
    )
    c = rng.choice([-2.5, -0.3, 0.5, 1.7, 3.0])
    return Const(op, c), (op.split(".")[-1],)


@family("arith/tensor", ANY)
def _arith_tensor(rng: random.Random, shape: Shape) -> Any:
    op = rng.choice(["mul", "rmul", "div", "add", "rsub", "torch.mul", "method.div"])
    t = _const_tensor(rng, shape, positive=op in ("div", "method.div"))
    store = rng.choice(["buffer", "param"])
    return Const(op, t, store), (op.split(".")[-1],)


@family("arith/scalar-tensor", ANY)
def _arith_scalar_tensor(rng: random.Random, shape: Shape) -> Any:
    op = rng.choice(["mul", "div", "add"])
    return Const(op, torch.tensor(rng.choice([-1.5, 0.7, 2.0])), "buffer"), (op,)


@family("arith/plain-attr", ANY)
def _arith_plain_attr(rng: random.Random, shape: Shape) -> Any:
    op = rng.choice(["mul", "div", "add"])
    return Const(op, _const_tensor(rng, shape, positive=op == "div"), "attr"), (op,)


@family("arith/broadcast-expand", (1,))
def _arith_expand(rng: random.Random, shape: Shape) -> Any:
    return Const("expand_mul", torch.randn(rng.randint(2, 3), shape[-1]), "buffer"), ("mul",)


def _shape_preserving(rng: random.Random, shape: Shape) -> nn.Module:
    """A random shape-preserving sub-block."""
    act = _module_activation(rng, shape)
    if len(shape) == 1 or rng.random() < 0.3:
        lin = nn.Linear(shape[-1], shape[-1])
    else:
        d = len(shape) - 1
        conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1]
        lin = conv_cls(shape[0], shape[0], 3, padding=1)
    return nn.Sequential(lin, act) if rng.random() < 0.5 else nn.Sequential(act, lin)


@family("residual", ANY)
def _residual(rng: random.Random, shape: Shape) -> Any:
    mode = rng.choice(["add", "radd", "sub", "alpha", "scaled", "two"])
    other = _shape_preserving(rng, shape) if mode == "two" else None
    return Residual(_shape_preserving(rng, shape), mode, other), ("add",)


@family("concat", ANY)
def _concat(rng: random.Random, shape: Shape) -> Any:
    mode = rng.choice(["cat", "cat_x", "stack"])
    dim = rng.choice([1, -1]) if mode != "stack" else 1
    return Concat(_shape_preserving(rng, shape), _shape_preserving(rng, shape), mode, dim), ("cat",)


@family("split", ANY)
def _split(rng: random.Random, shape: Shape) -> Any:
    n = shape[-1]
    modes = ["unbind"] if len(shape) >= 2 else []
    if n >= 2:
        modes += ["split"]
    if n % 2 == 0:
        modes += ["chunk", "chunk_add"]
    if not modes:
        raise _Skip
    mode = rng.choice(modes)
    k = rng.randint(1, n - 1) if n >= 2 else 1
    if mode == "unbind":
        piece: Shape = tuple(shape[1:])
    elif mode == "split":
        piece = (*shape[:-1], k)
    else:
        piece = (*shape[:-1], n // 2)
    if mode in ("chunk_add", "unbind") or len(piece) == 1:
        f: nn.Module = _shape_preserving(rng, piece)
    else:
        f = _module_activation(rng, piece)
    return SplitJoin(f, mode, k), ("split", "chunk", "unbind")


@family("getitem", ANY)
def _getitem(rng: random.Random, shape: Shape) -> Any:
    n = shape[-1]
    modes = ["step", "head"]
    if n >= 3:
        modes += ["narrow"]
    if len(shape) >= 2:
        modes += ["select", "int", "torch.narrow"]
    modes += ["index_select"]
    mode = rng.choice(modes)
    k = max(1, n - 2) if mode in ("head", "narrow") else 0
    if mode == "torch.narrow":
        k = max(1, shape[0] - 1)
    index = None
    if mode == "index_select":
        index = torch.tensor([rng.randrange(n) for _ in range(rng.randint(1, n + 2))])
    return Slice(mode, k, index), ("getitem", "narrow", "select", "index")


@family("reshape", ANY)
def _reshape(rng: random.Random, shape: Shape) -> Any:
    numel = math.prod(shape)
    modes = ["flatten", "torch.flatten", "view", "unsqueeze", "nn.Flatten"]
    divisors = [d for d in range(2, numel) if numel % d == 0]
    if divisors:
        modes += ["reshape", "torch.reshape", "nn.Unflatten"]
    mode = rng.choice(modes)
    target: Shape = ()
    if divisors:
        a = rng.choice(divisors)
        target = (a, numel // a)
    if mode == "nn.Flatten":
        return nn.Flatten(), ("Flatten",)
    if mode == "nn.Unflatten":
        return nn.Sequential(nn.Flatten(), nn.Unflatten(1, target)), ("Unflatten",)
    return Reshape(mode, target), ("flatten", "view", "reshape")


@family("permute", (2, 3, 4))
def _permute(rng: random.Random, shape: Shape) -> Any:
    mode = rng.choice(["transpose", "torch.transpose", "permute", "movedim"])
    return Permute(mode, len(shape)), (
        "transpose",
        "permute",
        "movedim",
    )


@family("shared", ANY)
def _shared(rng: random.Random, shape: Shape) -> Any:
    if len(shape) == 1 or rng.random() < 0.4:
        inner: nn.Module = nn.Linear(shape[-1], shape[-1])
    else:
        conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(shape) - 2]
        inner = conv_cls(shape[0], shape[0], 3, padding=1)
    return Shared(inner, _module_activation(rng, shape)), ("Linear", "Conv")


@family("inplace", ANY)
def _inplace(rng: random.Random, shape: Shape) -> Any:
    mode = rng.choice(["add_", "mul_", "relu_fn", "relu_mod", "alias", "add_tensor", "iadd_return"])
    lin = nn.Linear(shape[-1], shape[-1])
    return InPlace(lin, _shape_preserving(rng, shape), mode), (
        "add_",
        "mul_",
        "iadd",
        "imul",
        "relu",
        "inplace",
        "in-place",
    )


@family("training-branch", ANY)
def _training_branch(rng: random.Random, shape: Shape) -> Any:
    return TrainingBranch(_shape_preserving(rng, shape), rng.choice(["scale", "else"])), (
        "training",
    )


@family("subclass/lora", (1, 2))
def _lora(rng: random.Random, shape: Shape) -> Any:
    return LoRALinear(shape[-1], _width(rng)), ("LoRALinear",)


@family("subclass/scaled-linear", (1, 2))
def _scaled_linear(rng: random.Random, shape: Shape) -> Any:
    return ScaledLinear(shape[-1], _width(rng)), ("ScaledLinear",)


@family("subclass/flatten-linear", (2, 3, 4))
def _flatten_linear(rng: random.Random, shape: Shape) -> Any:
    return FlattenLinear(math.prod(shape), _width(rng)), ("FlattenLinear",)


@family("subclass/ws-conv", (3,))
def _ws_conv(rng: random.Random, shape: Shape) -> Any:
    return WSConv2d(shape[0], rng.randint(2, 6), 3, padding=1), ("WSConv2d",)


@family("subclass/scaled-conv", (3,))
def _scaled_conv(rng: random.Random, shape: Shape) -> Any:
    return ScaledConv2d(shape[0], rng.randint(2, 6), 3, padding=1), ("ScaledConv2d",)


@family("tuple/attention", (2,))
def _attention(rng: random.Random, shape: Shape) -> Any:
    e = shape[-1]
    heads = rng.choice([h for h in (1, 2, 3, 4) if e % h == 0])
    return Attention(e, heads, residual=rng.random() < 0.5), (
        "MultiheadAttention",
        "multi_head_attention",
        "attention",
    )


@family("tuple/lstm", (2,))
def _lstm(rng: random.Random, shape: Shape) -> Any:
    return Recurrent(nn.LSTM(shape[-1], rng.randint(2, 6), batch_first=True)), ("LSTM",)


@family("tuple/gru", (2,))
def _gru(rng: random.Random, shape: Shape) -> Any:
    return Recurrent(nn.GRU(shape[-1], rng.randint(2, 6), batch_first=True)), ("GRU",)


@family("tuple/pair-none", ANY)
def _pair_none(rng: random.Random, shape: Shape) -> Any:
    return TupleFirst(PairOut(nn.Linear(shape[-1], _width(rng)))), ("getitem", "Linear")


@family("param/spectral_norm", (1, 3))
def _spectral_norm(rng: random.Random, shape: Shape) -> Any:
    if len(shape) == 1:
        m: nn.Module = nn.Linear(shape[0], _width(rng))
    else:
        m = nn.Conv2d(shape[0], rng.randint(2, 5), 3, padding=1)
    return P.spectral_norm(m), ("Linear", "Conv2d", "parametriz")


@family("param/weight_norm", (1, 3))
def _weight_norm(rng: random.Random, shape: Shape) -> Any:
    if len(shape) == 1:
        m: nn.Module = nn.Linear(shape[0], _width(rng))
    else:
        m = nn.Conv2d(shape[0], rng.randint(2, 5), 3, padding=1)
    return P.weight_norm(m), ("Linear", "Conv2d", "parametriz")


@family("param/orthogonal", (1,))
def _orthogonal(rng: random.Random, shape: Shape) -> Any:
    return P.orthogonal(nn.Linear(shape[0], rng.randint(2, shape[0] + 3))), (
        "Linear",
        "parametriz",
    )


@family("refuse/layernorm", ANY)
def _layernorm(rng: random.Random, shape: Shape) -> Any:
    return nn.LayerNorm(shape[-1]), ("LayerNorm",)


@family("refuse/groupnorm", (2, 3, 4))
def _groupnorm(rng: random.Random, shape: Shape) -> Any:
    return nn.GroupNorm(1, shape[0]), ("GroupNorm",)


@family("refuse/product", ANY)
def _product(rng: random.Random, shape: Shape) -> Any:
    mode = rng.choice(["square", "exp"])
    return Product(mode), ("product", "mul") if mode == "square" else ("exp",)


_CONV = {2: nn.Conv1d, 3: nn.Conv2d, 4: nn.Conv3d}
_CONVT = {2: nn.ConvTranspose1d, 3: nn.ConvTranspose2d, 4: nn.ConvTranspose3d}


def _groups(rng: random.Random, c_in: int, c_out: int) -> int:
    common = [g for g in range(1, min(c_in, c_out) + 1) if c_in % g == 0 and c_out % g == 0]
    return rng.choice(common)


def _random_conv(rng: random.Random, shape: Shape) -> nn.Module:
    c = shape[0]
    c_out = rng.choice([2, 3, 4, 6])
    k = rng.choice([1, 2, 3])
    stride = rng.choice([1, 1, 2])
    dilation = rng.choice([1, 1, 2])
    mode = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
    padding: Any = rng.choice([0, 1, 1, 2])
    if stride == 1 and rng.random() < 0.2:
        padding = "same"
    return _CONV[len(shape)](
        c,
        c_out,
        k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=_groups(rng, c, c_out),
        bias=rng.random() < 0.7,
        padding_mode=mode,
    )


@family("conv", (2, 3, 4))
def _conv(rng: random.Random, shape: Shape) -> Any:
    m = _random_conv(rng, shape)
    return m, (type(m).__name__,)


@family("conv/functional", (2, 3, 4))
def _conv_functional(rng: random.Random, shape: Shape) -> Any:
    conv = _CONV[len(shape)](
        shape[0], rng.choice([2, 4]), rng.choice([1, 3]), stride=rng.choice([1, 2]), padding=1
    )
    return FunctionalConv(conv), ("conv",)


@family("conv-transpose", (2, 3, 4))
def _conv_transpose(rng: random.Random, shape: Shape) -> Any:
    c = shape[0]
    c_out = rng.choice([2, 3, 4])
    stride = rng.choice([1, 2])
    dilation = rng.choice([1, 1, 2])
    out_pad = rng.randrange(max(stride, dilation)) if stride > 1 else 0
    m = _CONVT[len(shape)](
        c,
        c_out,
        rng.choice([1, 2, 3]),
        stride=stride,
        padding=rng.choice([0, 1]),
        output_padding=out_pad,
        dilation=dilation,
        groups=_groups(rng, c, c_out),
        bias=rng.random() < 0.7,
    )
    return m, (type(m).__name__,)


@family("pool/max", (2, 3, 4))
def _max_pool(rng: random.Random, shape: Shape) -> Any:
    d = len(shape) - 1
    k = rng.choice([2, 3])
    s = rng.choice([1, 2, k])
    p = rng.choice([0, 1]) if k == 3 else 0
    dil = rng.choice([1, 1, 2])
    ceil = rng.random() < 0.3
    cls = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[d - 1]
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[d - 1]
    if rng.random() < 0.3:
        return Call(fn, k, s, p), ("max_pool",)
    return cls(k, s, p, dilation=dil, ceil_mode=ceil), ("MaxPool",)


@family("pool/avg", (2, 3, 4))
def _avg_pool(rng: random.Random, shape: Shape) -> Any:
    d = len(shape) - 1
    k = rng.choice([2, 3])
    s = rng.choice([1, 2, k])
    p = rng.choice([0, 1])
    cls = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[d - 1]
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[d - 1]
    if rng.random() < 0.3:
        return Call(fn, k, s), ("avg_pool",)
    return cls(k, s, p, ceil_mode=rng.random() < 0.3, count_include_pad=rng.random() < 0.5), (
        "AvgPool",
    )


@family("pool/adaptive", (2, 3, 4))
def _adaptive_pool(rng: random.Random, shape: Shape) -> Any:
    d = len(shape) - 1
    out = tuple(rng.randint(1, max(1, s - 1)) for s in shape[1:])
    if rng.random() < 0.5:
        cls = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[d - 1]
    else:
        cls = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)[d - 1]
    return cls(out), (cls.__name__,)


@family("pool/global-mean", (2, 3, 4))
def _global_mean(rng: random.Random, shape: Shape) -> Any:
    dims = tuple(range(2, len(shape) + 1))
    if rng.random() < 0.5:
        return Method("mean", dim=dims), ("mean",)
    return Call(torch.sum, dims), ("sum",)


@family("pad", (2, 3, 4))
def _pad(rng: random.Random, shape: Shape) -> Any:
    d = len(shape) - 1
    p = rng.choice([1, 2]) if min(shape[1:]) > 2 else 1
    mode = rng.choice(["zero", "constant", "reflect", "replicate", "circular", "F.pad", "crop"])
    if mode == "zero":
        return (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)[d - 1](p), ("ZeroPad",)
    if mode == "constant":
        cls = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)[d - 1]
        return cls(p, rng.choice([0.0, 1.5])), ("ConstantPad",)
    if mode == "reflect":
        return (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d)[d - 1](p), (
            "ReflectionPad",
        )
    if mode == "replicate":
        cls = (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)[d - 1]
        return cls(p), ("ReplicationPad",)
    if mode == "circular":
        return (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)[d - 1](p), ("CircularPad",)
    if mode == "crop":
        return Call(F.pad, (-1, 0) * d), ("pad",)
    fmode = rng.choice(["constant", "reflect", "replicate", "circular"])
    return Call(F.pad, (p, 1) * d, mode=fmode), ("pad",)


@family("upsample", (2, 3, 4))
def _upsample(rng: random.Random, shape: Shape) -> Any:
    d = len(shape) - 1
    linear_mode = ("linear", "bilinear", "trilinear")[d - 1]
    modes = ["nearest", "nearest-exact", linear_mode] + (["bicubic"] if d == 2 else [])
    mode = rng.choice(modes)
    align = rng.random() < 0.5 if mode in (linear_mode, "bicubic") else None
    if rng.random() < 0.3:
        size = tuple(s + rng.randint(1, 3) for s in shape[1:])
        return Call(F.interpolate, size=size, mode=mode, align_corners=align), ("interpolate",)
    if d == 2 and rng.random() < 0.3:
        return rng.choice(
            [nn.UpsamplingNearest2d(scale_factor=2), nn.UpsamplingBilinear2d(scale_factor=2)]
        ), ("Upsampling",)
    return nn.Upsample(scale_factor=2, mode=mode, align_corners=align), ("Upsample",)


@family("shuffle/pixel", (3,))
def _pixel_shuffle(rng: random.Random, shape: Shape) -> Any:
    c = shape[0]
    m = 4 * rng.randint(1, 2)
    chain = nn.Sequential(
        nn.Conv2d(c, m, 3, padding=1), nn.PixelShuffle(2), nn.Conv2d(m // 4, 2, 3, stride=2)
    )
    return chain, ("PixelShuffle",)


@family("shuffle/pixel-unshuffle", (3,))
def _pixel_unshuffle(rng: random.Random, shape: Shape) -> Any:
    if shape[1] % 2 or shape[2] % 2:
        raise _Skip
    c = shape[0]
    chain = nn.Sequential(nn.Conv2d(c, 2, 3, padding=1), nn.PixelUnshuffle(2), nn.Conv2d(8, 3, 1))
    return chain, ("PixelUnshuffle",)


@family("shuffle/channel", (3,))
def _channel_shuffle(rng: random.Random, shape: Shape) -> Any:
    c = shape[0]
    chain = nn.Sequential(
        nn.Conv2d(c, 6, 1), nn.ChannelShuffle(rng.choice([2, 3])), nn.Conv2d(6, 3, 3, padding=1)
    )
    return chain, ("ChannelShuffle",)


@family("head/flatten-linear", (2, 3, 4))
def _flatten_head(rng: random.Random, shape: Shape) -> Any:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), rng.randint(2, 10))), ("Linear",)


class _Skip(Exception):
    """The family does not apply to this shape."""


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------


def _initial_shape(rng: random.Random, rank: int) -> Shape:
    if rank == 1:
        return (rng.randint(5, 30),)
    if rank == 2:
        return (rng.choice([2, 3, 4, 6]), rng.choice([4, 6, 8, 10, 12]))
    if rank == 3:
        return (rng.choice([2, 3, 4]), rng.choice([5, 6, 8]), rng.choice([5, 6, 7]))
    return (2, rng.choice([3, 4]), 4, rng.choice([3, 4]))


def _out_shape(prefix: list[nn.Module], module: nn.Module, input_shape: Shape) -> Shape | None:
    """Per-sample output shape of the network ``prefix + [module]`` (eval mode, batches of 2
    and 1), or None if it fails or the output is not a reasonable tensor."""
    net = GeneratedNet([*prefix, module])
    flags = [(m, m.training) for m in net.modules()]
    try:
        for m, _ in flags:
            m.training = False
        with torch.no_grad():
            y = net(torch.randn(2, *input_shape))
            y1 = net(torch.randn(1, *input_shape))
    except Exception:
        return None
    finally:
        for m, flag in flags:
            m.training = flag
    if not isinstance(y, Tensor) or y.dim() < 2 or y.shape[0] != 2:
        return None
    out = tuple(y.shape[1:])
    if not isinstance(y1, Tensor) or tuple(y1.shape) != (1, *out):
        return None
    if math.prod(out) == 0 or math.prod(out) > MAX_NUMEL or not torch.isfinite(y).all():
        return None
    return out


def _try_family(
    fam: Family, rng: random.Random, prefix: list[nn.Module], shape: Shape, input_shape: Shape
) -> tuple[Block, Shape] | None:
    if len(shape) not in fam.ranks:
        return None
    for _ in range(6):
        try:
            module, names = fam.build(rng, shape)
        except _Skip:
            return None
        except (ValueError, RuntimeError):
            continue
        out = _out_shape(prefix, module, input_shape)
        if out is not None:
            return Block(module, fam.name, tuple(names)), out
    return None


_WEIGHTS = [0.25 if f.name.startswith("act/") else 1.0 for f in FAMILIES]


def generate(seed: int, *, n_blocks: tuple[int, int] = (2, 5)) -> Generated:
    """The random network of ``seed`` (deterministic; global RNG untouched)."""
    rng = random.Random(seed)
    first = FAMILIES[seed % len(FAMILIES)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(50):
            shape = _initial_shape(rng, rng.choice(first.ranks))
            got = _try_family(first, rng, [], shape, shape)
            if got is not None:
                break
        else:
            raise RuntimeError(f"family {first.name} could not be built")
        input_shape = shape
        blocks, shapes = [got[0]], [input_shape, got[1]]
        shape = got[1]
        target = rng.randint(*n_blocks)
        attempts = 0
        while len(blocks) < target and attempts < 100:
            attempts += 1
            fam = rng.choices(FAMILIES, weights=_WEIGHTS)[0]
            if fam.name.startswith(("refuse/", "tuple/", "training")) and rng.random() < 0.7:
                continue  # keep most models certifiable
            got = _try_family(fam, rng, [b.module for b in blocks], shape, input_shape)
            if got is None:
                continue
            blocks.append(got[0])
            shape = got[1]
            shapes.append(shape)
        if math.prod(shape) > 64 and rng.random() < 0.6:
            head = Block(
                nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), rng.randint(2, 10))),
                "head/flatten-linear",
                ("Linear",),
            )
            blocks.append(head)
            shapes.append(_out_shape([b.module for b in blocks], head.module, input_shape) or ())
        model = GeneratedNet([b.module for b in blocks])
    train_mode = rng.random() < 0.5 or any(b.family == "training-branch" for b in blocks)
    model.train(train_mode)
    names = sorted({n for b in blocks for n in b.names})
    return Generated(
        model=model,
        input_shape=input_shape,
        families=[b.family for b in blocks],
        names=names,
        train_mode=train_mode,
        seed=seed,
        shapes=shapes,
        block_names=[b.names for b in blocks],
    )
