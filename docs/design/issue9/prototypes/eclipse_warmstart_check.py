# Check: ECLipsE-Fast (own re-derivation of its closed form) == LipSDP-Neuron with T_k = rho*lam_k/2*I,
# so it is a feasible warm start for the first-order method (ReLU).
import numpy as np
import scipy.io as sio
import torch
from lipsdp_fo_demo import certify, optimise, rho_star

torch.set_default_dtype(torch.float64)
d = sio.loadmat("/work/shared/benchmark-nets/lipsdp_mnist_784-50-10.mat")
Ws = [w.astype(np.float64) for w in d["weights"][0]]
X = np.eye(Ws[0].shape[1])
lams = []
for W in Ws[:-1]:
    M = W @ np.linalg.solve(X, W.T)
    lam = 1.0 / (2 * 0.25 * np.linalg.eigvalsh(0.5 * (M + M.T))[-1])
    X = lam * np.eye(W.shape[0]) - lam**2 * 0.25 * M
    lams.append(lam)
rhoE = np.max(np.real(np.linalg.eigvals(Ws[-1].T @ Ws[-1] @ np.linalg.inv(X))))
ts = [np.full(W.shape[0], rhoE * (1 + 1e-9) * l / 2) for W, l in zip(Ws[:-1], lams)]
Wt = [torch.tensor(W) for W in Ws]
r = float(rho_star(Wt, [torch.tensor(t) for t in ts], 0.0, 1.0))
print(
    "ECLipsE-Fast (re-derived) Lip =",
    rhoE**0.5,
    "| rho*(T_E)^(1/2) =",
    r**0.5,
    "| certified from T_E:",
    certify(Ws, ts, r, 0.0, 1.0)[0],
)
best, tb = optimise(Wt, 0.0, 1.0, steps=300, lr=0.05, ts0=[torch.tensor(t) for t in ts])
print("300 Adam steps warm-started from T_E: sqrt(rho*) =", best**0.5)
