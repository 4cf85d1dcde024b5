# soundness spot-checks of the certificate: it must reject rho below rho*(T) and infeasible T

import numpy as np
import torch
from lipsdp_fo_demo import build_P, chol_certifies, optimise, rho_star

rng = np.random.default_rng(0)
W1 = rng.standard_normal((4, 2))
W2 = rng.standard_normal((1, 4))
Ws = [torch.tensor(W1), torch.tensor(W2)]
for steps in (300, 3000, 20000):
    r, ts = optimise(Ws, 0.0, 1.0, steps=steps, lr=0.05)
    print(steps, "steps: sqrt(rho*) =", r**0.5)
tn = [t.numpy() for t in ts]
rs = float(rho_star(Ws, [torch.tensor(t) for t in tn], 0.0, 1.0))
for f in (1 - 1e-6, 1 - 1e-10, 1 + 1e-14, 1 + 1e-10, 1 + 1e-6):
    P, Rad = build_P([W1, W2], tn, rs * f, 0.0, 1.0)
    print(
        f"rho = rho*(1{f - 1:+.0e}): certified = {chol_certifies(P, Rad)}  lambda_min = {np.linalg.eigvalsh(P)[0]:.2e}"
    )
bad = [tn[0] * 0.1]
P, Rad = build_P([W1, W2], bad, 1e6, 0.0, 1.0)
print("T scaled by 0.1 (2T - W2^T W2 indefinite), rho = 1e6: certified =", chol_certifies(P, Rad))
