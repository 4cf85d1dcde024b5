"""lipreg's columns of ``benchmarks/tightness.py``: each filled only when its function is
committed in lipreg, and lipreg's dense-chain certificates re-checked by the reference test.
"""

from __future__ import annotations

import importlib
import inspect
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from references.lipsdp_lmi import U, verified_rho, verify_lipsdp

import lipreg

UPPER_COLUMNS = {
    "autolip": "AutoLip",
    "tight": "lipreg LipSDP-Neuron",
    "eclipse": "lipreg ECLipsE-Fast",
    "seqlip_cert": "lipreg SeqLip (cert.)",
    "certified_bound": "certified_bound",
    "seqlip_exact": "SeqLip exact",
    "eclipse_ref": "ECLipsE-Fast ref",
    "lipsdp_ref": "LipSDP-Neuron cvxpy",
}


NOT_YET = "n/a (not yet in lipreg)"
REPO = Path(__file__).resolve().parents[1]


def committed(path: str) -> bool:
    """Whether ``path`` (relative to the repository) is tracked by git: a module another
    helper is still writing (untracked) is not measured."""
    out = subprocess.run(
        ["git", "ls-files", "--error-unmatch", path], cwd=REPO, capture_output=True, check=False
    )
    return out.returncode == 0


def lipreg_attr(module: str, name: str) -> Callable[..., Any] | None:
    """``module.name`` if its file is committed and defines it, else ``None``."""
    if not committed(module.replace(".", "/") + ".py"):
        return None
    return getattr(importlib.import_module(module), name, None)


def certified_value(result: Any) -> float:
    """The value of a lipreg result that claims to be certified; raise if it does not."""
    if getattr(result, "certified", True) is not True:
        raise RuntimeError(f"returned certified={result.certified} (value {result.value:.6g})")
    return float(result.value)


def torch_chain(weights: list[Any]) -> list[torch.Tensor]:
    return [torch.as_tensor(w, dtype=torch.float64) for w in weights]


#: The last certificate of each dense-chain column, re-checked by the reference verifier
#: after the timed calls (:func:`cross_check`).
LAST_CERTIFICATE: dict[str, Any] = {}


def dense_certificate(key: str, fn: Callable[..., Any]) -> Callable[[Any, Any], float]:
    """A column calling ``fn(weights, slopes)`` (a lipreg dense-chain certificate)."""

    def run(_net: Any, chain: Any) -> float:
        cert = fn(torch_chain(chain[0]), chain[1])
        LAST_CERTIFICATE[key] = cert
        return certified_value(cert)

    return run


def cross_check(key: str, chain: Any) -> str:
    """Re-verify lipreg's certificate (its multipliers ``t`` and ``ρ = value²``) with the
    reference's own float64 test; a note saying whether it passed."""
    cert = LAST_CERTIFICATE.pop(key)
    ts = [np.asarray(t.detach().cpu(), dtype=np.float64) for t in cert.multipliers]
    if not ts:
        return ""
    rho = cert.value * cert.value * (1.0 - 4 * U)  # ≤ value², so a pass proves ≤ value
    name = f"{UPPER_COLUMNS[key]} {cert.value:.8g} ({cert.method})"
    if verify_lipsdp(chain[0], chain[1], ts, rho):
        return f"{name}: re-verified by the reference test"
    again = verified_rho(chain[0], chain[1], ts, rho)
    if again.passed and again.inflation <= CROSS_CHECK_SLACK:
        return (
            f"{name}: the reference's (more conservative) test passes its multipliers at "
            f"+{again.inflation:.1e} relative, within rounding margins"
        )
    extra = f"passes only at +{again.inflation:.2e}" if again.passed else again.reason
    return f"{name}: the reference test REJECTS its multipliers ({extra})"


#: A lipreg certificate whose multipliers the reference test accepts only after raising the
#: value by more than this (relative) is flagged: far above the rounding margins (≈ n²u).
CROSS_CHECK_SLACK = 1e-9


def lipreg_columns() -> dict[str, Callable[[Any, Any], float] | None]:
    """lipreg's upper-bound methods, each a ``(net, (weights, slopes)) -> value`` callable,
    or ``None`` when not (yet) in lipreg. The dense-chain functions receive float64 torch
    weights (``out × in``) and one ``(a, b)`` slope pair per hidden layer."""
    lipsdp = lipreg_attr("lipreg.functional.lipsdp", "lipsdp_neuron")
    eclipse = lipreg_attr("lipreg.functional.eclipse", "eclipse_fast")
    seqlip_cert = committed("lipreg/functional/seqlip_certified.py") and (
        "certify" in inspect.signature(lipreg.seqlip).parameters
    )
    bound = getattr(lipreg, "certified_bound", None)
    if not committed("lipreg/functional/tight.py"):
        bound = None
    return {
        "autolip": lambda n, _c: certified_value(
            lipreg.autolip(n.model, n.shape, certify=True, dtype=torch.float64)
        ),
        "tight": None if lipsdp is None else dense_certificate("tight", lipsdp),
        "eclipse": None if eclipse is None else dense_certificate("eclipse", eclipse),
        "seqlip_cert": None
        if not seqlip_cert
        else lambda n, _c: certified_value(
            lipreg.seqlip(n.model, n.shape, certify=True, dtype=torch.float64)
        ),
        "certified_bound": None
        if bound is None
        else lambda n, _c: certified_value(bound(n.model, n.shape)),
    }
