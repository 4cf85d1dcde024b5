"""First-order LipSDP-Neuron with a float64 Cholesky certificate (research demo).

Network  f(x) = W_L phi(W_{L-1} ... phi(W_1 x)),  phi slope-restricted in [a, b].
Unknowns: diagonal multipliers t_k > 0 (k = 1..L-1) and rho.
P(T, rho) (block tridiagonal over x_0..x_{L-1}) must be PSD; then sqrt(rho) bounds Lip_2(f).

Method: for fixed T the smallest feasible rho is a closed form obtained by eliminating
blocks from the output side (Schur complements); minimise log rho*(T) over log t with Adam.
Certificate: rebuild P in float64 at rho_c >= rho*, subtract Rump's Cholesky backward-error
shift plus a bound on the rounding of the matrix formation, run LAPACK Cholesky.

Run: OMP_NUM_THREADS=1 /work/main/.venv/bin/python lipsdp_fo_demo.py [--bench]
"""

import itertools
import sys
import time

import numpy as np
import scipy.io as sio
import scipy.linalg as sla
import torch

torch.set_default_dtype(torch.float64)
U = 2.0**-53  # unit roundoff, binary64, round to nearest
ETA = 2.0**-1074  # smallest subnormal


def gamma(k):
    return k * U / (1.0 - k * U)


# ----------------------------------------------------------------------------------------
# value function rho*(T) by backward Schur elimination (torch, differentiable)
# ----------------------------------------------------------------------------------------
def rho_star(Ws, ts, a, b, R1=None):
    """Ws = [W_1..W_L] (out x in), ts = [t_1..t_{L-1}] (positive vectors).

    Returns rho*(T) = min{rho : P(T, rho) >= 0}, or +inf if a lower Schur complement is not PD.
    If R1 is given (W_1^T = Q R1), the final eigenproblem is reduced to n_1 x n_1.
    """
    L = len(Ws)
    s, p = a + b, 2.0 * a * b
    S = 2.0 * torch.diag(ts[-1]) - Ws[-1].T @ Ws[-1]  # S_{L-1}
    for k in range(L - 1, 0, -1):  # hidden layer k
        C, info = torch.linalg.cholesky_ex(S)
        if int(info) != 0:
            return torch.tensor(float("inf"))
        Wk, tk = Ws[k - 1], ts[k - 1]
        if k >= 2:
            B = s * tk[:, None] * Wk  # P_{k,k-1} = -(a+b) T_k W_k
            H = B.T @ torch.cholesky_solve(B, C)
            S = 2.0 * torch.diag(ts[k - 2]) + p * Wk.T @ (tk[:, None] * Wk) - H
        else:
            # rho* = lambda_max(W_1^T G W_1), G = (a+b)^2 T S^-1 T - 2ab T
            G = s * s * torch.diag(tk) @ torch.cholesky_solve(torch.diag(tk), C) - p * torch.diag(
                tk
            )
            G = 0.5 * (G + G.T)
            if R1 is not None:
                M = R1 @ G @ R1.T
                return torch.clamp(torch.linalg.eigvalsh(0.5 * (M + M.T))[-1], min=0.0)
            M = Wk.T @ G @ Wk
            return torch.linalg.eigvalsh(0.5 * (M + M.T))[-1]


def init_relu(Ws):
    """Scalar multipliers reproducing the product of norms (feasible for ReLU, a=0, b=1)."""
    norms = [torch.linalg.matrix_norm(W, 2) for W in Ws]
    ts = [None] * (len(Ws) - 1)
    t = norms[-1] ** 2 * 1.0001
    for k in range(len(Ws) - 1, 0, -1):
        ts[k - 1] = torch.full((Ws[k - 1].shape[0],), float(t))
        t = t * norms[k - 1] ** 2 * 1.0001
    return ts


def optimise(Ws, a, b, steps=300, lr=0.05, ts0=None, verbose=False):
    R1 = None
    if Ws[0].shape[1] > Ws[0].shape[0]:
        # W_1^T = Q R  =>  W_1^T G W_1 = Q (R G R^T) Q^T : same nonzero spectrum, n1 x n1
        R1 = torch.linalg.qr(Ws[0].T, mode="reduced").R
    ts0 = ts0 if ts0 is not None else init_relu(Ws)
    th = [torch.log(t).clone().requires_grad_(True) for t in ts0]
    opt = torch.optim.Adam(th, lr=lr)
    best = (float(rho_star(Ws, ts0, a, b, R1)), [t.clone() for t in ts0])
    last_ok = [x.detach().clone() for x in th]
    for it in range(steps):
        opt.zero_grad()
        rho = rho_star(Ws, [torch.exp(x) for x in th], a, b, R1)
        if not torch.isfinite(rho):  # left the domain: back off
            with torch.no_grad():
                for x, y in zip(th, last_ok):
                    x.copy_(y)
            for g in opt.param_groups:
                g["lr"] *= 0.5
            continue
        if float(rho) < best[0]:
            best = (float(rho), [torch.exp(x).detach().clone() for x in th])
        last_ok = [x.detach().clone() for x in th]
        torch.log(rho).backward()
        opt.step()
        if verbose and it % 50 == 0:
            print(f"  it {it:4d}  sqrt(rho*) = {float(rho) ** 0.5:.6f}")
    return best


# ----------------------------------------------------------------------------------------
# float64 certificate
# ----------------------------------------------------------------------------------------
def build_P(Ws, ts, rho, a, b):
    """Dense P(T, rho) in float64 plus an entrywise bound Rad on its formation error."""
    L = len(Ws)
    dims = [Ws[0].shape[1]] + [W.shape[0] for W in Ws[:-1]]
    off = np.concatenate([[0], np.cumsum(dims)])
    N = int(off[-1])
    P = np.zeros((N, N))
    Rad = np.zeros((N, N))
    s, p = a + b, 2.0 * a * b
    blk = lambda i, j: (slice(off[i], off[i + 1]), slice(off[j], off[j + 1]))
    P[blk(0, 0)] += rho * np.eye(dims[0])  # exact
    for k in range(1, L):  # hidden layer k
        W, t = Ws[k - 1], ts[k - 1]
        P[blk(k, k)] += 2.0 * np.diag(t)  # exact (x2)
        Bk = -s * (t[:, None] * W)  # <= 2 roundings/entry
        P[blk(k, k - 1)] = Bk
        P[blk(k - 1, k)] = Bk.T
        e = gamma(2) * abs(s) * (t[:, None] * np.abs(W))
        Rad[blk(k, k - 1)] += e
        Rad[blk(k - 1, k)] += e.T
        if p != 0.0:
            G = W.T @ (t[:, None] * W)
            P[blk(k - 1, k - 1)] += p * G
            Rad[blk(k - 1, k - 1)] += (
                gamma(W.shape[0] + 4) * abs(p) * (np.abs(W).T @ (t[:, None] * np.abs(W)))
            )
    WL = Ws[-1]
    P[blk(L - 1, L - 1)] -= WL.T @ WL
    Rad[blk(L - 1, L - 1)] += gamma(WL.shape[0] + 3) * (
        np.abs(WL).T @ np.abs(WL) + np.abs(P[blk(L - 1, L - 1)])
    )
    # every diagonal block that received two contributions was rounded once more when added
    Rad += gamma(2) * np.abs(P)
    return P, Rad


def chol_certifies(P, Rad):
    """True => every symmetric X with |X - P| <= Rad is positive definite (Rump 2006, Cor 2.4/2.7)."""
    N = P.shape[0]
    d = np.diag(P)
    if np.any(d < 0) or 4 * (N + 1) * U >= 1:
        return False
    c = 0.5 * gamma(2 * (N + 1)) * d.sum() + 4 * ETA * N * (2 * (N + 1) + d.max())
    r = np.abs(Rad).sum(axis=1).max()  # ||Rad||_inf >= ||X - P||_2 for symmetric X - P
    shift = (c + r) * (1.0 + 1e-6)  # 1e-6 covers the rounding of this small sum
    Pt = P.copy()
    Pt[np.diag_indices(N)] = np.nextafter(d - shift, -np.inf)  # guarantees Pt_ii <= P_ii - shift
    try:
        sla.cholesky(Pt, lower=False, check_finite=True)  # LAPACK dpotrf
        return True
    except np.linalg.LinAlgError:
        return False


def certify(Ws_np, ts_np, rho_hat, a, b, max_tries=80):
    """Smallest rho_c = rho_hat + delta (delta doubling) whose LMI passes; returns sqrt bound."""
    delta = max(1e-14 * rho_hat, 1e-300)
    for _ in range(max_tries):
        rho_c = rho_hat + delta
        P, Rad = build_P(Ws_np, ts_np, rho_c, a, b)
        if chol_certifies(P, Rad):
            return float(np.nextafter(np.sqrt(rho_c), np.inf)), rho_c
        delta *= 2.0
    return float("inf"), float("inf")


def run(name, Ws_np, a=0.0, b=1.0, steps=300, lr=0.05, verbose=False):
    Ws = [torch.tensor(W) for W in Ws_np]
    t0 = time.process_time()
    rho_hat, ts = optimise(Ws, a, b, steps=steps, lr=lr, verbose=verbose)
    t1 = time.process_time()
    ts_np = [t.numpy().astype(np.float64) for t in ts]
    # recompute rho*(T) in float64 for the T actually certified
    rho_hat = float(rho_star(Ws, [torch.tensor(t) for t in ts_np], a, b))
    cert, rho_c = certify(Ws_np, ts_np, rho_hat, a, b)
    t2 = time.process_time()
    prod = float(np.prod([np.linalg.norm(W, 2) for W in Ws_np]))
    print(
        f"{name}: product of norms {prod:.6f} | first-order sqrt(rho*) {rho_hat**0.5:.6f} "
        f"| certified {cert:.9f} (rho inflation {rho_c / rho_hat - 1:.1e}) "
        f"| CPU optimise {t1 - t0:.2f}s certify {t2 - t1:.2f}s"
    )
    return cert, prod


def tiny_example():
    rng = np.random.default_rng(0)
    W1 = rng.standard_normal((4, 2))
    W2 = rng.standard_normal((1, 4))
    print("W1 =\n", W1, "\nW2 =", W2)
    cert, prod = run("tiny 2-4-1 ReLU", [W1, W2], steps=300, lr=0.05, verbose=True)
    # max over all diagonal patterns D in {0,1}^4 (what LipSDP-Neuron upper-bounds)
    allD = max(
        np.linalg.norm(W2 @ np.diag(d) @ W1, 2) for d in itertools.product([0.0, 1.0], repeat=4)
    )
    # exact Lipschitz constant: bias-free ReLU net -> patterns are cones; sample all directions
    ang = (np.arange(200000) + 0.5) * (2 * np.pi / 200000)
    X = np.stack([np.cos(ang), np.sin(ang)])
    pats = np.unique((W1 @ X > 0).T, axis=0)
    exact = max(np.linalg.norm(W2 @ np.diag(d.astype(float)) @ W1, 2) for d in pats)
    print(f"  certified LipSDP bound   {cert:.9f}")
    print(f"  product of norms         {prod:.9f}")
    print(f"  max_D in {{0,1}}^4 ||W2 D W1|| {allD:.9f}")
    print(f"  exact Lipschitz constant {exact:.9f}  ({len(pats)} reachable patterns)")


def bench():
    base = "/work/shared/benchmark-nets/"
    d = sio.loadmat(base + "lipsdp_random_2-10-30-20-2.mat")
    run(
        "LipSDP random 2-10-30-20-2 (pub. 36.482)",
        [w.astype(np.float64) for w in d["weights"][0]],
        steps=1500,
        lr=0.05,
    )
    d = sio.loadmat(base + "lipsdp_mnist_784-50-10.mat")
    run(
        "LipSDP MNIST 784-50-10 (pub. 24.367)",
        [w.astype(np.float64) for w in d["weights"][0]],
        steps=1500,
        lr=0.05,
    )
    pub = {"fnn2": 5.1097, "fnn3": 9.7286}
    for net, nl in (("fnn2", 2), ("fnn3", 3)):
        d = sio.loadmat(base + f"glipsdp_digits_{net}_seed0.mat")
        Ws = [d[f"fc{i}_weight"].T.astype(np.float64) for i in range(1, nl + 1)]
        Ws[-1] = Ws[-1][7:8, :]  # logit 7
        run(f"GLipSDP {net} seed0 logit 7 (pub. LipSDP {pub[net]})", Ws, steps=1500, lr=0.05)


if __name__ == "__main__":
    torch.manual_seed(0)
    tiny_example()
    if "--bench" in sys.argv:
        bench()
