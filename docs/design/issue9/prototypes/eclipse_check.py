"""Own re-implementation of ECLipsE-Fast (closed form), a float64 certificate for the
sequential quadratic-form chain, and a first-order optimisation of the multipliers
(to check that the chain reaches LipSDP-Neuron).  Written for the lipreg research note."""

import itertools
import math

import numpy as np
import scipy.io as sio
import torch

U = 2.0**-53  # unit roundoff, float64


def gamma(k):
    return k * U / (1 - k * U)


def eclipse_fast(Ws, a=0.0, b=1.0):
    """Ws: list of (out x in) float64 arrays.  Returns (L, lambdas, Ms)."""
    m = 0.5 * (a + b)
    M = np.eye(Ws[0].shape[1])
    lams, Ms = [], [M]
    for W in Ws[:-1]:
        K = W @ np.linalg.solve(M, W.T)
        K = 0.5 * (K + K.T)
        sig = np.linalg.eigvalsh(K)[-1]
        lam = 1.0 / (2 * m * m * sig)
        Mn = lam * np.eye(W.shape[0]) - lam * lam * m * m * K
        if a * b > 0:  # exact generalisation for same-sign slopes: X = M + ab*lam*W^T W
            X = M + a * b * lam * W.T @ W
            Mn = lam * np.eye(W.shape[0]) - lam * lam * m * m * W @ np.linalg.solve(X, W.T)
        M = 0.5 * (Mn + Mn.T)
        lams.append(lam)
        Ms.append(M)
    Wl = Ws[-1]
    rho = np.linalg.eigvalsh(Wl @ np.linalg.solve(M, Wl.T))[-1]
    return math.sqrt(rho), lams, Ms


def chol_certifies_psd(H, extra=0.0):
    """True => the exact symmetric matrix H_true with ||H_true - H||_2 <= extra is PSD
    (in fact PD).  Jacobi-scale to unit diagonal, then chol(S - c I) in float64 with
    c = 2*gamma_{n+1}/(1-gamma_{n+1})*n  (Demmel/Higham backward error, tr(S)=n, factor 2 safety)
      + 3*u*n (rounding of the scaling)  + extra/min(diag H) (scaled formation error)."""
    n = H.shape[0]
    dg = np.diag(H).copy()
    if np.any(dg <= 0):
        return False
    d = 1.0 / np.sqrt(dg)
    S = (d[:, None] * H) * d[None, :]
    g = gamma(n + 1)
    c = (
        2.0 * g / (1 - g) * float(np.trace(S)) + gamma(3) * np.linalg.norm(S, "fro")
    ) * 1.01 + extra / (dg.min() * (1 - 4 * U))
    c *= 1 + 8 * U
    try:
        np.linalg.cholesky(S - c * np.eye(n))
        return True
    except np.linalg.LinAlgError:
        return False


def certify_chain(Ws, lams, Ms_raw, a=0.0, b=1.0, shrink=1e-8, rho_slack=1e-8):
    """Certify L from multipliers (scalar or diagonal per layer) and candidate M_i.
    Shrinks each M_i by shrink*||M_i|| so each block LMI is strictly feasible.
    Returns certified upper bound on L (float, rounded up) or None."""
    # Recompute the chain in float64 FROM THE GIVEN MULTIPLIERS, shrinking each M_i by
    # delta_i = shrink * lambda_min(M_i) so that each block LMI has Schur complement delta_i I.
    Ms = [np.eye(Ws[0].shape[1])]
    for i, W in enumerate(Ws[:-1]):
        lam = np.broadcast_to(np.asarray(lams[i], dtype=np.float64), (W.shape[0],))
        M = Ms[-1]
        X = M + (a * b) * (W.T @ (lam[:, None] * W))
        C = 0.5 * (a + b) * (lam[:, None] * W)
        try:
            Lx = np.linalg.cholesky(0.5 * (X + X.T))
        except np.linalg.LinAlgError:
            return None
        Y = np.linalg.solve(Lx, C.T)
        Mn = np.diag(lam) - Y.T @ Y
        Mn = 0.5 * (Mn + Mn.T)
        lmin = np.linalg.eigvalsh(Mn)[0]
        if not lmin > 0:
            return None
        Ms.append(Mn - shrink * lmin * np.eye(Mn.shape[0]))
    for i, W in enumerate(Ws[:-1]):
        lam = np.broadcast_to(np.asarray(lams[i], dtype=np.float64), (W.shape[0],))
        if np.any(lam < 0):
            return None
        Mp, Mn = Ms[i], Ms[i + 1]
        # B = [[Mp + ab W^T L W, -(a+b)/2 W^T L], [-(a+b)/2 L W, L - Mn]]
        LW = lam[:, None] * W
        top = Mp + (a * b) * (W.T @ LW)
        off = -0.5 * (a + b) * LW
        B = np.block([[top, off.T], [off, np.diag(lam) - Mn]])
        B = 0.5 * (B + B.T)
        # formation error bound (2-norm <= Frobenius of entrywise bound), generous
        k = W.shape[0]
        e = gamma(k + 2) * abs(a * b) * np.linalg.norm(
            np.abs(W), "fro"
        ) ** 2 * lam.max() + 4 * U * (np.linalg.norm(B, "fro"))
        if not chol_certifies_psd(B, extra=e):
            return None
    Wl = Ws[-1]
    rho = np.linalg.eigvalsh(Wl @ np.linalg.solve(Ms[-1], Wl.T))[-1] * (1 + rho_slack)
    # final: [[rho*M, Wl^T],[Wl, I]] >= 0  <=>  rho*M - Wl^T Wl >= 0
    F = np.block([[rho * Ms[-1], Wl.T], [Wl, np.eye(Wl.shape[0])]])
    e = 4 * U * np.linalg.norm(F, "fro")
    if not chol_certifies_psd(F, extra=e):
        return None
    return math.nextafter(math.sqrt(rho) * (1 + 4 * U), math.inf)


def chain_value_torch(Ws, logl):
    """LipSDP-Neuron objective as a function of diagonal multipliers via the ECLipsE chain
    (ReLU).  Returns None if some M_i is not PD (then the value means nothing)."""
    M = torch.eye(Ws[0].shape[1], dtype=torch.float64)
    for W, ll in zip(Ws[:-1], logl):
        Lc, info = torch.linalg.cholesky_ex(M)
        if info.item() != 0:
            return None
        lam = torch.exp(ll)
        LW = lam[:, None] * W
        Y = torch.cholesky_solve(LW.T, Lc)
        Mn = torch.diag(lam) - 0.25 * LW @ Y
        M = 0.5 * (Mn + Mn.T)
    Lc, info = torch.linalg.cholesky_ex(M)
    if info.item() != 0:
        return None
    Wl = Ws[-1]
    return torch.linalg.eigvalsh(Wl @ torch.cholesky_solve(Wl.T, Lc))[-1]


def optimise(Ws_np, lams0, iters=3000, lr=0.02):
    """Adam on log-multipliers with rejection of steps that leave the PD region."""
    Ws = [torch.tensor(W) for W in Ws_np]
    logl = [
        torch.full((W.shape[0],), math.log(l), dtype=torch.float64, requires_grad=True)
        for W, l in zip(Ws_np[:-1], lams0)
    ]
    opt = torch.optim.Adam(logl, lr=lr)
    best = (float("inf"), None)
    prev = [l.detach().clone() for l in logl]
    for t in range(iters):
        opt.zero_grad()
        v = chain_value_torch(Ws, logl)
        if v is None or not torch.isfinite(v):
            with torch.no_grad():
                for l, p in zip(logl, prev):
                    l.copy_(p)
            for gr in opt.param_groups:
                gr["lr"] *= 0.5
            continue
        prev = [l.detach().clone() for l in logl]
        if v.item() < best[0]:
            best = (v.item(), [l.detach().exp().numpy().copy() for l in logl])
        torch.log(v).backward()
        opt.step()
    return best


def ms_from_lams(Ws, lams):
    M = np.eye(Ws[0].shape[1])
    Ms = [M]
    for W, lam in zip(Ws[:-1], lams):
        LW = lam[:, None] * W
        Mn = np.diag(lam) - 0.25 * LW @ np.linalg.solve(M, LW.T)
        M = 0.5 * (Mn + Mn.T)
        Ms.append(M)
    return Ms


def exact_relu_1hidden(W1, W2):
    best = 0.0
    for pat in itertools.product([0, 1], repeat=W1.shape[0]):
        best = max(best, np.linalg.norm(W2 @ np.diag(pat) @ W1, 2))
    return best


def report(name, Ws, opt_iters=0):
    prod = np.prod([np.linalg.norm(W, 2) for W in Ws])
    L, lams, Ms = eclipse_fast(Ws)
    for sh in (1e-8, 1e-6, 1e-4):
        cert = certify_chain(Ws, lams, Ms, shrink=sh)
        if cert is not None:
            break
    import time

    t0 = time.perf_counter()
    [eclipse_fast(Ws) for _ in range(20)]
    tf = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    [[np.linalg.norm(W, 2) for W in Ws] for _ in range(20)]
    tn = (time.perf_counter() - t0) / 20
    bug = eclipse_fast(Ws[1:])[0] if len(Ws) >= 3 else L
    line = f"{name}: prod_norms={prod:.6f} eclipse_fast={L:.6f} certified={cert} [t_fast={tf * 1e3:.2f}ms t_norms={tn * 1e3:.2f}ms; eclipse-nn<=0.1.5 bug value={bug:.6f}]"
    if opt_iters:
        v, lo = optimise(Ws, lams, iters=opt_iters)
        c2, tt = None, None
        for t in (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
            # convex combination with the strictly feasible ECLipsE-Fast point (LMI is linear in Lambda)
            lt = [(1 - t) * x + t * np.full_like(x, lf) for x, lf in zip(lo, lams)]
            for sh in (1e-8, 1e-6, 1e-4):
                c2 = certify_chain(Ws, lt, None, shrink=sh)
                if c2 is not None:
                    break
            if c2 is not None:
                tt = (t, sh)
                break
        line += f" | chain-opt(Adam {opt_iters})={math.sqrt(v):.6f} certified={c2} (t={tt})"
    print(line)


if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)
    # worked example 2 -> 3 -> 1
    W1 = np.array([[1.0, 2.0], [-1.0, 1.0], [0.5, -2.0]])
    W2 = np.array([[1.0, -1.0, 2.0]])
    L, lams, Ms = eclipse_fast([W1, W2])
    print("worked example: K1 = W1 W1^T =\n", W1 @ W1.T)
    print(" sigma1 =", np.linalg.eigvalsh(W1 @ W1.T)[-1], " lambda1 =", lams[0])
    print(" M1 =\n", Ms[1], "\n eig(M1) =", np.linalg.eigvalsh(Ms[1]))
    print(" ECLipsE-Fast L =", L, " certified:", certify_chain([W1, W2], lams, Ms))
    print(" product of norms =", np.linalg.norm(W1, 2) * np.linalg.norm(W2, 2))
    print(" exact (max over D) =", exact_relu_1hidden(W1, W2))
    v, lo = optimise([W1, W2], lams, iters=4000)
    print(" chain optimised (LipSDP-Neuron value) =", math.sqrt(v), " lambdas =", lo[0])
    print(" certified opt:", certify_chain([W1, W2], lo, ms_from_lams([W1, W2], lo)))

    nets = "/work/main/benchmarks/nets/"
    d = sio.loadmat(nets + "lipsdp_random_2-10-30-20-2.mat")
    report("lipsdp 2-10-30-20-2", [np.asarray(w, dtype=np.float64) for w in d["weights"][0]], 3000)
    d = sio.loadmat(nets + "lipsdp_mnist_784-50-10.mat")
    report(
        "lipsdp mnist 784-50-10", [np.asarray(w, dtype=np.float64) for w in d["weights"][0]], 1500
    )
    for arch in ("fnn2", "fnn3"):
        for seed in (0, 1):
            d = sio.loadmat(nets + f"glipsdp_digits_{arch}_seed{seed}.mat")
            ks = sorted(k for k in d if k.startswith("fc") and k.endswith("weight"))
            Ws = [np.asarray(d[k], dtype=np.float64).T for k in ks]
            Ws[-1] = Ws[-1][7:8, :]  # logit 7
            report(f"glipsdp {arch} seed{seed} (logit 7)", Ws, 1500)
