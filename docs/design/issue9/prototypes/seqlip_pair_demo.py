"""Certified SeqLip pairs via a 1-hidden-layer LipSDP-Neuron LMI in weighted norms (demo).

Pair for hidden layer k (W = W_k : R^{n_{k-1}} -> R^{n_k}), metrics G_in (on x_{k-1}), G_out (on x_k):
    P = [[rho G_in + 2ab W^T T W,  -(a+b) W^T T],
         [-(a+b) T W,               2T - G_out ]]  >= 0
 =>  dx_k^T G_out dx_k <= rho dx_{k-1}^T G_in dx_{k-1}  for every phi slope-restricted in [a,b],
     in particular  ||Z_out D W Z_in^{-1}||^2 <= rho  for all D = diag(d), d in [a,b]^n  (G = Z^T Z).
Chaining with G_1, ..., G_L and Lip^2 <= lambda_max(G_1) * prod_k rho_k * lambda_max(G_L^{-1} W_L^T W_L).
SeqLip (Virmaux & Scaman 2018) is the choice G_k = |W_k| = (W_k^T W_k)^{1/2}; any float G works.
"""

import itertools

import numpy as np
import scipy.io as sio
import scipy.linalg as sla
import torch
from lipsdp_fo_demo import U, chol_certifies, gamma

torch.set_default_dtype(torch.float64)


def pair_rho_star(W, Lin_inv, G_out, t, a, b):
    s, p = a + b, 2.0 * a * b
    S = 2.0 * torch.diag(t) - G_out
    C, info = torch.linalg.cholesky_ex(S)
    if int(info) != 0:
        return torch.tensor(float("inf"))
    Gm = s * s * torch.diag(t) @ torch.cholesky_solve(torch.diag(t), C) - p * torch.diag(t)
    M = Lin_inv @ W.T @ Gm @ W @ Lin_inv.T
    return torch.linalg.eigvalsh(0.5 * (M + M.T))[-1]


def pair_optimise(W, G_in, G_out, a=0.0, b=1.0, steps=1500, lr=0.05):
    W, G_in, G_out = map(torch.tensor, (W, G_in, G_out))
    Lin_inv = torch.linalg.inv(torch.linalg.cholesky(G_in))
    t0 = torch.full((W.shape[0],), float(torch.linalg.eigvalsh(G_out)[-1]) * 1.0001 + 1e-300)
    th = torch.log(t0).clone().requires_grad_(True)
    opt = torch.optim.Adam([th], lr=lr)
    best = (float(pair_rho_star(W, Lin_inv, G_out, t0, a, b)), t0.clone())
    last = th.detach().clone()
    for _ in range(steps):
        opt.zero_grad()
        r = pair_rho_star(W, Lin_inv, G_out, torch.exp(th), a, b)
        if not torch.isfinite(r):
            with torch.no_grad():
                th.copy_(last)
            for g in opt.param_groups:
                g["lr"] *= 0.5
            continue
        if r.item() < best[0]:
            best = (r.item(), torch.exp(th).detach().clone())
        last = th.detach().clone()
        torch.log(r).backward()
        opt.step()
    return best[0], best[1].numpy()


def pair_certify(W, G_in, G_out, t, rho_hat, a=0.0, b=1.0):
    s, p = a + b, 2.0 * a * b
    n, m = W.shape
    delta = max(1e-14 * rho_hat, 1e-300)
    for _ in range(80):
        rho = rho_hat + delta
        P = np.zeros((m + n, m + n))
        Rad = np.zeros_like(P)
        P[:m, :m] = rho * G_in
        Rad[:m, :m] = gamma(1) * np.abs(P[:m, :m])
        if p != 0.0:
            P[:m, :m] += p * (W.T @ (t[:, None] * W))
            Rad[:m, :m] += gamma(n + 4) * abs(p) * (np.abs(W).T @ (t[:, None] * np.abs(W)))
        B = -s * (t[:, None] * W)
        P[m:, :m] = B
        P[:m, m:] = B.T
        Rad[m:, :m] = gamma(2) * np.abs(B)
        Rad[:m, m:] = Rad[m:, :m].T
        P[m:, m:] = 2.0 * np.diag(t) - G_out
        Rad += gamma(2) * np.abs(P)
        if chol_certifies(P, Rad):
            return rho
        delta *= 2.0
    return float("inf")


def ceil_lmax_pencil(A, G):
    """Certified c >= lambda_max(G^{-1/2} A G^{-1/2}): c G - A >= 0 checked by Cholesky."""
    c = float(sla.eigh(A, G, eigvals_only=True)[-1])
    d = max(abs(c) * 1e-14, 1e-300)
    for _ in range(80):
        P = (c + d) * G - A
        Rad = gamma(2) * (np.abs((c + d) * G) + np.abs(A)) + gamma(2) * np.abs(P)
        if chol_certifies(P, Rad):
            return c + d
        d *= 2
    return float("inf")


def abs_sqrt(W, eps_rel=1e-9):
    """Float approximation of |W| = (W^T W)^{1/2}, shifted to be safely PD (any SPD G is sound)."""
    _, sv, Vt = np.linalg.svd(W, full_matrices=True)
    s = np.zeros(W.shape[1])
    s[: len(sv)] = sv
    G = (Vt.T * s) @ Vt
    G = 0.5 * (G + G.T) + eps_rel * sv[0] * np.eye(W.shape[1])
    return G


def certified_chain(Ws, Gs, a=0.0, b=1.0, steps=1500):
    """Gs[k] is the metric on x_k, k = 0..L-1. Returns certified bound and per-pair rhos."""
    L = len(Ws)
    lip2 = ceil_lmax_pencil(Gs[0], np.eye(Gs[0].shape[0]))  # lambda_max(G_0)
    rhos = []
    for k in range(1, L):
        r, t = pair_optimise(Ws[k - 1], Gs[k - 1], Gs[k], a, b, steps)
        rc = pair_certify(Ws[k - 1], Gs[k - 1], Gs[k], t, r, a, b)
        rhos.append(rc)
        lip2 *= rc
    lip2 *= ceil_lmax_pencil(Ws[-1].T @ Ws[-1], Gs[-1])
    lip2 *= 1 + 8 * (L + 2) * U  # the float products above (and sqrt below)
    return float(np.nextafter(np.sqrt(lip2), np.inf)), rhos


def exact_seqlip(Ws):
    """Virmaux-Scaman SeqLip with exact enumeration of each pair (small widths only)."""
    svd = [np.linalg.svd(W, full_matrices=False) for W in Ws]
    val = np.sqrt(svd[0][1][0]) * np.sqrt(svd[-1][1][0])
    for k in range(1, len(Ws)):
        Uk, sk, _ = svd[k - 1]
        _, sk1, Vk1t = svd[k]
        A = np.sqrt(sk1)[:, None] * Vk1t
        B = Uk * np.sqrt(sk)[None, :]
        val *= max(
            np.linalg.norm(A @ (np.array(d)[:, None] * B), 2)
            for d in itertools.product([0.0, 1.0], repeat=Ws[k - 1].shape[0])
        )
    return val


if __name__ == "__main__":
    rng = np.random.default_rng(1)
    Ws = [rng.standard_normal((5, 3)), rng.standard_normal((6, 5)), rng.standard_normal((2, 6))]
    Gs_seq = [abs_sqrt(Ws[0])] + [abs_sqrt(Ws[k]) for k in range(1, 3)]  # G on x_0, x_1, x_2
    cert, _ = certified_chain(Ws, Gs_seq)
    ex = exact_seqlip(Ws)
    Gs_merge = [np.eye(3), Gs_seq[1], Ws[2].T @ Ws[2] + 1e-9 * np.eye(6)]
    cert_m, _ = certified_chain(Ws, Gs_merge)
    prod = np.prod([np.linalg.norm(W, 2) for W in Ws])
    allD = max(
        np.linalg.norm(Ws[2] @ np.diag(d2) @ Ws[1] @ np.diag(d1) @ Ws[0], 2)
        for d1 in itertools.product([0.0, 1.0], repeat=5)
        for d2 in itertools.product([0.0, 1.0], repeat=6)
    )
    print(
        f"3-5-6-2 ReLU: product {prod:.6f} | exact SeqLip {ex:.6f} | certified pair-LMI SeqLip {cert:.6f} "
        f"(ratio {cert / ex:.5f}) | certified with merged ends (G_0=I, G_2=W3^T W3) {cert_m:.6f} "
        f"| max over all D {allD:.6f}"
    )
    d = sio.loadmat("/work/shared/benchmark-nets/glipsdp_digits_fnn3_seed0.mat")
    Ws = [d[f"fc{i}_weight"].T.astype(np.float64) for i in (1, 2, 3)]
    Ws[-1] = Ws[-1][7:8, :]
    Gs_seq = [abs_sqrt(Ws[0]), abs_sqrt(Ws[1]), abs_sqrt(Ws[2])]
    cert, _ = certified_chain(Ws, Gs_seq)
    cert_m, _ = certified_chain(Ws, [np.eye(64), Gs_seq[1], Ws[2].T @ Ws[2] + 1e-9 * np.eye(32)])
    print(
        f"FNN-3 seed0 logit 7: certified pair-LMI SeqLip {cert:.6f} | merged ends {cert_m:.6f} "
        f"| published heuristic SeqLip 11.3097, LipSDP 9.7286"
    )
