"""Prototype (issue 10, item 2, tight certificates): incremental LipSDP-Neuron with kept multipliers.

MLP 784-1000x3-10 of benchmarks/training_overhead.py, ReLU slopes [0, 1]; anchor multipliers T_s from
ECLipsE-Fast (lipreg.functional.eclipse.eclipse_fast_multipliers, closed form), certified with
lipreg.functional.chain_lmi.certify_multipliers. After k SGD/Adam steps:
  (a) keep T_s, re-certify at W_t: certify_multipliers(chain_t, T_s)  (one block Cholesky)
  (b) no factorisation: rho_t = rho_c + e + ||B||^2 e / (mu (mu - e)) if e < mu, with
      mu = lambda_min(trailing blocks 1..L-1 of P(T_s; W_s)) (eigvalsh here; Rump test in a library),
      B = -s_1 T_1 W_1 (block (1,0)), e >= ||P(T;W_t) - P(T;W_s)||_2 from Frobenius norms of the changes.
Ratios are to sqrt(rho) of fresh ECLipsE-Fast multipliers at W_t (uncertified float64 value).
Run: OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/lipsdp_incremental.py
"""

# ruff: noqa: E501, B023  (prototype: long formula lines; step() runs inside its loop)
from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, "benchmarks")
from training_overhead import mlp

from lipreg.functional.chain_lmi import certify_multipliers, dense_chain, rho_star
from lipreg.functional.eclipse import eclipse_fast_multipliers


def weights(net) -> list[torch.Tensor]:
    return [m.weight.detach().double().clone() for m in net if isinstance(m, torch.nn.Linear)]


def trailing_min_eig(ws, ts) -> float:
    """lambda_min of blocks 1..L-1 of P(T, rho) for ReLU (p = 0, s = 1): diag 2T_k (last minus
    W_L^T W_L), sub-diagonal -T_k W_k for k >= 2."""
    sizes = [W.shape[0] for W in ws[:-1]]
    n = sum(sizes)
    P = torch.zeros(n, n, dtype=torch.float64)
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    for k, t in enumerate(ts):
        P[offs[k] : offs[k + 1], offs[k] : offs[k + 1]] += torch.diag(2 * t)
    P[offs[-2] :, offs[-2] :] -= ws[-1].T @ ws[-1]
    for k in range(1, len(ts)):  # block (k, k-1) = -T_{k+1} W_{k+1} (0-based ts[k], ws[k])
        Bk = -ts[k][:, None] * ws[k]
        P[offs[k] : offs[k + 1], offs[k - 1] : offs[k]] = Bk
        P[offs[k - 1] : offs[k], offs[k] : offs[k + 1]] = Bk.T
    return float(torch.linalg.eigvalsh(P)[0])


def main() -> None:
    torch.set_num_threads(1)
    slopes = [(0.0, 1.0)] * 3
    print(
        "| opt | k | fresh sqrt(rho_E) | (a) kept T: value / fresh | (a) certified? (s) | (b) e/mu | (b) / fresh |"
    )
    print("|---|---|---|---|---|---|---|")
    for opt_name in ("SGD", "Adam"):
        torch.manual_seed(0)
        net = mlp()
        opt = (
            torch.optim.SGD(net.parameters(), lr=0.01)
            if opt_name == "SGD"
            else torch.optim.Adam(net.parameters(), lr=1e-3)
        )
        gen = torch.Generator().manual_seed(0)

        def step() -> None:
            x = torch.randn(128, 1, 28, 28, generator=gen)
            y = torch.randint(0, 10, (128,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()

        for _ in range(200):
            step()
        ws_s = weights(net)
        chain_s = dense_chain(ws_s, slopes)
        rho_e, ts = eclipse_fast_multipliers(chain_s)
        cert_s = certify_multipliers(chain_s, ts)
        assert cert_s is not None
        rho_c = cert_s**2
        mu = trailing_min_eig(ws_s, ts)
        normB = float(ts[0].max()) * float(torch.linalg.matrix_norm(ws_s[0], 2))
        normWL = float(torch.linalg.matrix_norm(ws_s[-1], 2))
        print(
            f"| {opt_name} | 0 | {math.sqrt(rho_e):.4f} | anchor cert {cert_s:.4f} | | mu={mu:.3g} | |"
        )
        done = 0
        for k in (1, 10, 50, 100):
            while done < k:
                step()
                done += 1
            ws_t = weights(net)
            chain_t = dense_chain(ws_t, slopes)
            fresh = math.sqrt(eclipse_fast_multipliers(chain_t)[0])
            kept = math.sqrt(rho_star(chain_t, ts)[0])
            t0 = time.perf_counter()
            cert_t = certify_multipliers(chain_t, ts)
            tc = time.perf_counter() - t0
            d = [float(torch.linalg.matrix_norm(a - b)) for a, b in zip(ws_t, ws_s, strict=True)]
            off = max(float(t.max()) * dk for t, dk in zip(ts, d[:-1], strict=True))
            e = (2 * normWL * d[-1] + d[-1] ** 2) + 2 * off
            b = f"{e / mu:.3g} | " + (
                f"{math.sqrt(rho_c + e + normB**2 * e / (mu * (mu - e))) / fresh:.4f}"
                if e < mu
                else "e >= mu: n/a"
            )
            ca = "no" if cert_t is None else f"{cert_t / fresh:.4f}"
            print(
                f"| {opt_name} | {k} | {fresh:.4f} | {kept / fresh:.4f} | {ca} ({tc:.2f}) | {b} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
