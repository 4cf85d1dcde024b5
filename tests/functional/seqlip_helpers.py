"""Independent reference computations shared by ``test_seqlip.py`` and ``test_seqlip_pairs.py``:
brute force over activation patterns, our own SVD factors, dense Jacobians, closed forms."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.autograd.functional import jacobian

from tests.helpers import gen, init_weights

F64 = torch.float64
REL = 1e-8  # exact SeqLip carries a relative margin of 1e-9 per pair
RELU = (0.0, 1.0)


def norm2(M: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(M.detach().to(F64), 2))


def patterns(n: int, lo: float, hi: float) -> torch.Tensor:
    """All 2^n vertices of the box [lo, hi]^n, as float64 rows."""
    return torch.tensor(list(itertools.product([lo, hi], repeat=n)), dtype=F64)


def brute_pair(A: torch.Tensor, B: torch.Tensor, lo: float, hi: float) -> float:
    """max over σ ∈ {lo, hi}^n of ||A diag(σ) B||_2 by enumeration."""
    S = patterns(A.shape[1], lo, hi)
    M = (A.to(F64)[None] * S[:, None, :]) @ B.to(F64)
    return float(torch.linalg.matrix_norm(M, 2).max())


def ref_factors(Ms: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A_i, B_i) of every SeqLip pair, from our own full thin SVDs (paper eq. 8)."""
    svds = [torch.linalg.svd(M.detach().to(F64), full_matrices=False) for M in Ms]
    K = len(Ms)
    tilde = [S if i in (0, K - 1) else S.sqrt() for i, (_, S, _) in enumerate(svds)]
    out = []
    for i in range(K - 1):
        A = tilde[i + 1][:, None] * svds[i + 1][2]  # Σ̃_{i+1} V_{i+1}ᵀ
        B = svds[i][0] * tilde[i][None, :]  # U_i Σ̃_i
        out.append((A, B))
    return out


def ref_pairs(Ms: list[torch.Tensor], boxes: list[tuple[float, float]]) -> list[float]:
    return [brute_pair(A, B, *box) for (A, B), box in zip(ref_factors(Ms), boxes, strict=True)]


def ref_seqlip(Ms: list[torch.Tensor], boxes: list[tuple[float, float]]) -> float:
    return math.prod(ref_pairs(Ms, boxes))


def ref_pairs_all_hi(Ms: list[torch.Tensor], boxes: list[tuple[float, float]]) -> list[float]:
    """Pair values at σ = hi everywhere (the greedy's starting point)."""
    return [norm2(hi * (A @ B)) for (A, B), (_, hi) in zip(ref_factors(Ms), boxes, strict=True)]


def joint_max_sigma(Ms: list[torch.Tensor], boxes: list[tuple[float, float]]) -> float:
    """§2.6 bound: max over all hidden patterns jointly of ||M_K diag(σ) ... diag(σ) M_1||."""
    pats = [patterns(M.shape[0], *b) for M, b in zip(Ms[:-1], boxes, strict=True)]
    idx = torch.cartesian_prod(*[torch.arange(p.shape[0]) for p in pats]).reshape(-1, len(pats))
    P = Ms[0].detach().to(F64).expand(idx.shape[0], -1, -1)
    for k, p in enumerate(pats):
        P = Ms[k + 1].detach().to(F64) @ (p[idx[:, k]][:, :, None] * P)
    return float(torch.linalg.matrix_norm(P, 2).max())


def orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return Q * torch.sign(torch.diagonal(R))


def linear(W: torch.Tensor, b: torch.Tensor | None = None) -> nn.Linear:
    layer = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(W)
        if b is not None:
            layer.bias.copy_(b)
    return layer


def net_from(
    Ms: list[torch.Tensor], act: type[nn.Module] = nn.ReLU, biases: list | None = None
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, M in enumerate(Ms):
        if i:
            layers.append(act())
        layers.append(linear(M, None if biases is None else biases[i]))
    return nn.Sequential(*layers)


def random_mlp(widths: list[int], seed: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    g = gen(seed)
    Ms = [torch.randn(b, a, generator=g, dtype=F64) for a, b in itertools.pairwise(widths)]
    bs = [torch.randn(b, generator=g, dtype=F64) for b in widths[1:]]
    return net_from(Ms, act, bs)


def weights(net: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in net.modules() if isinstance(m, nn.Linear)]


def batched_jacobians(net: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """Dense per-sample Jacobians (N, out, in) of a network that treats samples independently."""
    J = jacobian(lambda z: net(z).sum(0), X)  # (out, N, *in)
    return J.reshape(J.shape[0], X.shape[0], -1).transpose(0, 1)


def dense(fn, in_shape: tuple[int, ...]) -> torch.Tensor:
    """Matrix of a linear map given as a function of one batched input."""
    x = torch.zeros(1, *in_shape, dtype=F64)
    J = jacobian(fn, x)
    return J.reshape(-1, math.prod(in_shape))


def init_(model: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    return init_weights(model, seed, scale=scale)


def m_abs(u: torch.Tensor, v: torch.Tensor) -> float:
    """max_{σ ∈ [0,1]^n} |<σ·v, u>| = max(Σ(u∘v)_+, Σ(u∘v)_-)  (paper §2.9)."""
    p = u * v
    return max(float(p.clamp_min(0).sum()), float((-p).clamp_min(0).sum()))


def gelu_slope_range() -> tuple[float, float]:
    """GELU' = Φ(x) + x φ(x) has its extrema at x = ±√2 (closed form)."""

    def slope(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2))) + x * math.exp(-x * x / 2) / math.sqrt(
            2 * math.pi
        )

    return slope(-math.sqrt(2)), slope(math.sqrt(2))
