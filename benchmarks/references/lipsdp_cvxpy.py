"""LipSDP-Neuron (Fazlyab et al., NeurIPS 2019) solved by cvxpy, and its verified value.

``min ρ  s.t.  P(T, ρ) ⪰ 0, T_k = diag(t_k), t_k ≥ 0`` with ``P`` the block-tridiagonal matrix
of :mod:`references.lipsdp_lmi` (the published formulation, except that a wide first layer
is first reduced to a square one, :func:`reduce_input`: same optimum, smaller LMI, so the
reference is faster, not slower, than the published code), solved by Clarabel (interior
point) if installed, else SCS. A solver's
"optimal" is not a proof: its multipliers may leave the LMI slightly (or, as SCS did on two
of the paper's MLPs, badly) infeasible. So the multipliers are re-checked in float64 with an
explicit rounding margin (:func:`references.lipsdp_lmi.verified_rho`); ``ρ`` is raised
minimally until the check passes and the raise is reported.

Solves can be stored (:func:`save_solution`) and reused (:func:`load_solution`, which re-runs
the verification, so a stored value is never trusted as such).

cvxpy is an optional benchmark-only dependency (``pip install 'lipreg[bench]'``); it is
imported on the first call, never by lipreg.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from references.lipsdp_lmi import Slopes, VerifiedRho, verified_rho


@dataclass
class LipSDPSolution:
    """One cvxpy solve: ``solver_value = √ρ_solver`` (unverified), ``verified`` (see
    :class:`references.lipsdp_lmi.VerifiedRho`), solver name and status, and the CPU seconds
    of building + solving (``cpu_solve``) and of the float64 verification (``cpu_verify``)."""

    solver_value: float
    verified: VerifiedRho
    solver: str
    status: str
    cpu_solve: float
    cpu_verify: float
    t: list[np.ndarray]


def import_cvxpy() -> Any:
    """cvxpy, or an ImportError saying how to install the benchmark extra."""
    try:
        return importlib.import_module("cvxpy")
    except ImportError as exc:
        raise ImportError(
            "The LipSDP-Neuron reference needs cvxpy: pip install 'lipreg[bench]' "
            "(cvxpy, clarabel)."
        ) from exc


def pick_solver(cp: Any) -> str:
    """Clarabel if cvxpy has it, else SCS (the cvxpy default SDP solver)."""
    installed = cp.installed_solvers()
    for name in ("CLARABEL", "SCS"):
        if name in installed:
            return name
    raise ImportError(f"no SDP solver in cvxpy (installed: {installed}); pip install clarabel")


def lipsdp_problem(
    cp: Any, weights: Sequence[np.ndarray], slopes: Slopes
) -> tuple[Any, Any, list[Any]]:
    """The cvxpy problem ``min ρ s.t. P(T, ρ) ⪰ 0``: ``(problem, ρ, [t_1, …])``."""
    n_hidden = len(weights) - 1
    rho = cp.Variable(nonneg=True)
    t = [cp.Variable(w.shape[0], nonneg=True) for w in weights[:-1]]
    sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights[:-1]]
    grid: list[list[Any]] = [[np.zeros((r, c)) for c in sizes] for r in sizes]
    for k in range(n_hidden + 1):
        block: Any = rho * np.eye(sizes[0]) if k == 0 else 2 * cp.diag(t[k - 1])
        if k < n_hidden:
            a, b = slopes[k]
            if a * b != 0.0:
                block = block + 2 * a * b * (weights[k].T @ cp.diag(t[k]) @ weights[k])
            off = -(a + b) * (cp.diag(t[k]) @ weights[k])
            grid[k + 1][k] = off
            grid[k][k + 1] = off.T
        else:
            block = block - weights[-1].T @ weights[-1]
        grid[k][k] = block
    matrix = cp.bmat(grid)
    # Symmetric by construction; the explicit symmetrisation tells cvxpy so.
    constraints = [0.5 * (matrix + matrix.T) >> 0]
    return cp.Problem(cp.Minimize(rho), constraints), rho, t


def reduce_input(weights: list[np.ndarray]) -> list[np.ndarray]:
    """The chain with ``W_1`` (``n_1 × n_0``, ``n_0 > n_1``) replaced by the ``n_1 × n_1``
    matrix ``Rᵀ`` of ``W_1ᵀ = QR``: the same LipSDP-Neuron optimum on a smaller LMI.

    With ``[Q Q⊥]`` orthogonal, the congruence ``blkdiag([Q Q⊥], I)`` maps the LMI of ``W_1``
    to that of ``Rᵀ`` plus a decoupled block ``ρ I`` (``W_1 Q⊥ = 0``), so for ``ρ > 0`` the two
    are feasible for the same ``(T, ρ)``. Only the solve uses it; the multipliers are
    verified on the original chain. (MNIST 784-50-10: an LMI of side 100 instead of 834.)
    """
    w1 = weights[0]
    if w1.shape[1] <= w1.shape[0]:
        return weights
    r = np.linalg.qr(w1.T, mode="r")
    return [r.T, *weights[1:]]


def lipsdp_neuron_cvxpy(
    weights: Sequence[np.ndarray], slopes: Slopes, *, solver: str | None = None
) -> LipSDPSolution:
    """Solve LipSDP-Neuron with cvxpy and verify the solver's multipliers in float64.

    CPU seconds (``time.process_time``: all threads of this process) of the build + solve and
    of the verification are reported separately. The solver's ``ρ`` is the verification's
    starting point: a value that passes as returned is reported with ``inflation = 0``.
    """
    cp = import_cvxpy()
    weights = [np.asarray(w, dtype=np.float64) for w in weights]
    name = solver or pick_solver(cp)
    start = time.process_time()
    problem, rho, t = lipsdp_problem(cp, reduce_input(weights), slopes)
    problem.solve(solver=name)
    cpu_solve = time.process_time() - start
    t_values = [
        np.full(tk.shape, np.nan) if tk.value is None else np.asarray(tk.value, np.float64)
        for tk in t
    ]
    rho_value = float(rho.value) if rho.value is not None else math.nan
    start = time.process_time()
    if math.isfinite(rho_value) and all(np.all(np.isfinite(tk)) for tk in t_values):
        verified = verified_rho(weights, slopes, t_values, rho_value)
    else:
        verified = VerifiedRho(False, math.nan, math.nan, math.nan, f"status {problem.status}")
    cpu_verify = time.process_time() - start
    return LipSDPSolution(
        solver_value=math.sqrt(rho_value) if rho_value >= 0 else math.nan,
        verified=verified,
        solver=name,
        status=str(problem.status),
        cpu_solve=cpu_solve,
        cpu_verify=cpu_verify,
        t=t_values,
    )


# --- a cache of solves: the SDP is the slow part, the verification is re-run on loading ----


def chain_digest(weights: Sequence[np.ndarray], slopes: Slopes) -> str:
    """SHA-256 of the float64 weights (shapes and bytes) and slopes: a cached solve is used
    only for exactly the same chain."""
    h = hashlib.sha256()
    for w in weights:
        w = np.ascontiguousarray(w, dtype=np.float64)
        h.update(repr(w.shape).encode())
        h.update(w.tobytes())
    h.update(repr([tuple(map(float, s)) for s in slopes]).encode())
    return h.hexdigest()


def save_solution(path: Path, key: str, digest: str, sol: LipSDPSolution) -> None:
    """Store the solver's raw output (``ρ``, multipliers, status, CPU) under ``key``."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = {
        "digest": digest,
        "solver": sol.solver,
        "status": sol.status,
        "rho": sol.solver_value**2,
        "cpu_solve": sol.cpu_solve,
        "t": [tk.tolist() for tk in sol.t],
    }
    path.write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")


def load_solution(
    path: Path, key: str, weights: Sequence[np.ndarray], slopes: Slopes
) -> LipSDPSolution | None:
    """A stored solve of exactly this chain, RE-VERIFIED now in float64 (the verification
    never comes from the file), or ``None``. ``status`` is suffixed ``(cached)`` and
    ``cpu_solve`` is the stored solve's CPU time."""
    if not path.is_file():
        return None
    entry = json.loads(path.read_text()).get(key)
    weights = [np.asarray(w, dtype=np.float64) for w in weights]
    if entry is None or entry["digest"] != chain_digest(weights, slopes):
        return None
    t = [np.asarray(tk, dtype=np.float64) for tk in entry["t"]]
    start = time.process_time()
    verified = verified_rho(weights, slopes, t, float(entry["rho"]))
    return LipSDPSolution(
        solver_value=math.sqrt(float(entry["rho"])),
        verified=verified,
        solver=entry["solver"],
        status=f"{entry['status']} (cached)",
        cpu_solve=float(entry["cpu_solve"]),
        cpu_verify=time.process_time() - start,
        t=t,
    )
