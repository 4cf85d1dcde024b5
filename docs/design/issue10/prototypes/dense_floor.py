# ruff: noqa: B023  (lambdas are called at once, inside the loop)
"""Algebraic floor of a dense certificate of a 1024x1024 float32 weight (issue 10, item 4).

Compares, in CPU seconds (OMP_NUM_THREADS=1, median of 3): the float64 Gram product (addmm
as today, and syrk-like ``W @ W.T``), the full ``eigh`` used today for sides <= 1024,
``eigvalsh``, and one ``cholesky_ex`` of ``mu I - G`` (the Rump/Demmel test), plus a Lanczos
on G to tol 1e-12 (the lambda-hat of the test). Run:
    OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/dense_floor.py [n ...]
"""

import statistics
import sys
import time

import torch

from lipreg.functional.linear_map import LinearMap
from lipreg.functional.power_iteration import operator_norm


def cpu(fn, reps=3):
    ts = []
    for _ in range(reps):
        t = time.process_time()
        out = fn()
        ts.append(time.process_time() - t)
    return statistics.median(ts), out


torch.set_num_threads(1)
for n in [int(a) for a in sys.argv[1:]] or [256, 512, 1024, 2048]:
    W = torch.randn(n, n) / n**0.5
    W64 = W.double()
    t_addmm, G = cpu(lambda: torch.zeros(n, n, dtype=torch.float64).addmm_(W64, W64.T))
    t_conv = cpu(lambda: W.double())[0]
    t_eigh, (ev, _) = cpu(lambda: torch.linalg.eigh(G))
    t_eigvalsh, _ = cpu(lambda: torch.linalg.eigvalsh(G))
    lam = float(ev[-1])
    P = -G
    P.diagonal().add_(lam * (1 + 1e-9))
    t_chol, (_, info) = cpu(lambda: torch.linalg.cholesky_ex(P))
    op = LinearMap(lambda x: x @ G, (n,), (n,), G.dtype, G.device, "Gram")
    t_lz, est = cpu(lambda: operator_norm(op, tol=1e-12, max_iter=300))
    print(
        f"n={n}: float64 copy {t_conv:.4f}s  gram(addmm) {t_addmm:.4f}s  eigh {t_eigh:.4f}s  "
        f"eigvalsh {t_eigvalsh:.4f}s  cholesky {t_chol:.4f}s (info {int(info)})  "
        f"lanczos(G,1e-12) {t_lz:.4f}s ({est.n_iter} it, rel err {abs(est.sigma - lam) / lam:.1e})"
    )
