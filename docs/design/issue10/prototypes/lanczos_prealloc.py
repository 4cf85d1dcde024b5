# ruff: noqa: B023  (lambdas are called at once, inside the loop)
"""Item 6 of issue 10: Lanczos with a preallocated basis (views, no torch.stack per step).

Same recurrence as ``power_iteration._lanczos`` (full re-orthogonalisation twice, the top
Ritz value of T every step, the same gap-free stopping rule), but the basis lives in one
preallocated ``(max_iter, n)`` tensor and T in a preallocated matrix. Compares CPU time and
the value with today's ``operator_norm`` on (a) the float64 refinement run of the Gram test
(small CNN's 2nd conv, tol 1e-9) and (b) a float32 estimate of the same conv (tol 1e-4).
Run: OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/lanczos_prealloc.py
"""

import math
import statistics
import time

import torch
import torch.nn.functional as F

from lipreg.functional.linear_map import LinearMap
from lipreg.functional.power_iteration import operator_norm


def lanczos_prealloc(op: LinearMap, q: torch.Tensor, tol: float, max_iter: int):
    n = op.in_features
    max_iter = min(max_iter, n)
    tol = max(tol, 4.0 * torch.finfo(op.dtype).eps)
    Q = torch.empty(max_iter, n, dtype=op.dtype)
    T = torch.zeros(max_iter, max_iter, dtype=torch.float64)
    sigma = 0.0
    for k in range(max_iter):
        Q[k] = q
        w, _ = op.gram_matvec(q[None])
        w = w[0]
        T[k, k] = float(torch.dot(q, w))
        B = Q[: k + 1]
        w = w - B.T @ (B @ w)
        w = w - B.T @ (B @ w)
        beta = float(w.norm())
        evals, evecs = torch.linalg.eigh(T[: k + 1, : k + 1])
        theta = max(float(evals[-1]), 0.0)
        sigma = math.sqrt(theta)
        err = beta * abs(float(evecs[-1, -1])) / (2 * theta) if theta > 0 else math.inf
        if err <= tol or k + 1 == n:
            return sigma, k + 1
        T[k, k + 1] = T[k + 1, k] = beta
        q = w / beta
    return sigma, max_iter


def cpu(fn, reps=3):
    ts, out = [], None
    for _ in range(reps):
        t = time.process_time()
        out = fn()
        ts.append(time.process_time() - t)
    return statistics.median(ts), out


torch.set_num_threads(1)
torch.manual_seed(0)
for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
    w = (torch.randn(16, 16, 3, 3) / 12).to(dtype)
    op = LinearMap(
        lambda x: F.conv2d(x, w, padding=1),
        (16, 32, 32),
        (16, 32, 32),
        dtype,
        torch.device("cpu"),
        "conv",
    )
    q0 = torch.randn(op.in_features, dtype=dtype, generator=torch.Generator().manual_seed(1))
    q0 /= q0.norm()
    t_old, r = cpu(lambda: operator_norm(op, v0=q0, tol=tol, max_iter=300))
    t_new, (s, it) = cpu(lambda: lanczos_prealloc(op, q0.clone(), tol, 300))
    t_mv, _ = cpu(lambda: [op.gram_matvec(q0[None]) for _ in range(r.n_iter)])
    print(
        f"{dtype} tol {tol:g}: today {t_old:.3f}s ({r.n_iter} it, {r.sigma:.12g}); "
        f"preallocated {t_new:.3f}s ({it} it, {s:.12g}); the {r.n_iter} products alone "
        f"{t_mv:.3f}s"
    )
