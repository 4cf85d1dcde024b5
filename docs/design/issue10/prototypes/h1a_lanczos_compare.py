"""Issue 10 item 6: today's Lanczos (HEAD copy passed as argv[1]) vs lipreg.functional.lanczos.

CPU time (median of 3, interleaved) and values on (a) the float64 refinement of a 16->16 conv on
32x32 (tol 1e-9, warm from a random vector) and (b) the float32 estimate (tol 1e-4), and (c) a
1024x1024 float32 dense layer (tol 1e-4).
Run: OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/h1a_lanczos_compare.py OLD.py
"""

import importlib.util
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lipreg.functional.linear_map import LinearMap
from lipreg.functional.power_iteration import operator_norm

spec = importlib.util.spec_from_file_location("old_pi", sys.argv[1])
old = importlib.util.module_from_spec(spec)
sys.modules["old_pi"] = old
spec.loader.exec_module(old)
torch.set_num_threads(1)
torch.manual_seed(0)
print("load", os.getloadavg())
cases = []
for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
    w = (torch.randn(16, 16, 3, 3) / 12).to(dtype)
    op = LinearMap(
        lambda x, w=w: F.conv2d(x, w, padding=1),
        (16, 32, 32),
        (16, 32, 32),
        dtype,
        torch.device("cpu"),
        "conv",
    )
    cases.append((f"conv {dtype} tol {tol:g}", op, tol))
W = torch.randn(1024, 1024) / 32
cases.append(
    (
        "dense 1024 f32 tol 1e-4",
        LinearMap(lambda x: x @ W.T, (1024,), (1024,), torch.float32, torch.device("cpu"), "dense"),
        1e-4,
    )
)
for label, op, tol in cases:
    q0 = torch.randn(op.in_features, dtype=op.dtype, generator=torch.Generator().manual_seed(1))
    t_old, t_new = [], []
    for _ in range(3):
        t = time.process_time()
        r_old = old.operator_norm(op, v0=q0, tol=tol, max_iter=300)
        t_old.append(time.process_time() - t)
        t = time.process_time()
        r_new = operator_norm(op, v0=q0, tol=tol, max_iter=300)
        t_new.append(time.process_time() - t)
    t = time.process_time()
    for _ in range(r_new.n_iter):
        op.gram_matvec(q0[None])
    t_mv = time.process_time() - t
    print(
        f"{label}: today {statistics.median(t_old):.3f}s ({r_old.n_iter} it, {r_old.sigma:.12g}); "
        f"new {statistics.median(t_new):.3f}s ({r_new.n_iter} it, {r_new.sigma:.12g}, "
        f"rel diff {abs(r_new.sigma - r_old.sigma) / r_old.sigma:.1e}); "
        f"{r_new.n_iter} products alone {t_mv:.3f}s"
    )
