"""Cost of dense certificates (issue 10, items 4 and 6), as multiples of ONE forward+backward of
ONE sample, before and after the change, and next to the algebraic floor.

* ``mlp``: ``lipreg.autolip(mlp, (1024,), certify=True)``, MLP = 1024→1024 ×9 → 10 with ReLU;
* ``alexnet``: torchvision ``alexnet()`` at 3×224×224, ``certify=True``;
* ``floor`` (MLP): per linear layer, one float64 conversion, one float64 Gram product on the
  smaller side (``M Mᵀ``) and one Cholesky of ``μI − G``: what any Gram-based certificate pays;
* ``warm`` (MLP, after only): per layer, ``matrix_norm_certificate(W', v0=v)`` with ``W'`` the
  weight after a relative perturbation of 1e-3 and ``v`` the previous certificate's vector.

"before" runs the library with this change's files (``certify.py``, ``power_iteration.py``)
taken from ``--baseline`` (a git revision; ``gram.py``/``lanczos.py`` unused there) and every
other file from ``HEAD``; "after" is the working tree. Each repetition runs one child process
per variant, interleaved (before, after, before, after, ...), and each child measures its own
forward+backward unit, so every ratio comes from one process. CPU time
(``time.process_time``), ``OMP_NUM_THREADS`` threads (default 1), medians over repetitions; the
load is printed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dense_certificates.py [--reps 3] \
        [--nets mlp alexnet] [--baseline c1e07f4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHANGED = ("lipreg/functional/certify.py", "lipreg/functional/power_iteration.py")


def _cpu(fn, reps: int = 1) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t = time.process_time()
        out = fn()
        times.append(time.process_time() - t)
    return statistics.median(times), out


def _net(name: str):
    import torch
    import torchvision
    from torch import nn

    torch.manual_seed(0)
    if name == "alexnet":
        return torchvision.models.alexnet(weights=None).eval(), (3, 224, 224)
    layers: list[nn.Module] = [nn.Linear(1024, 1024), nn.ReLU()]
    for _ in range(8):
        layers += [nn.Linear(1024, 1024), nn.ReLU()]
    layers.append(nn.Linear(1024, 10))
    return nn.Sequential(*layers).eval(), (1024,)


def _unit(model, shape) -> float:
    """CPU seconds of one forward+backward pass of one sample (median of 3 × 20 steps)."""
    import torch

    x = torch.randn(1, *shape)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    for _ in range(3):
        step()
    t, _ = _cpu(lambda: [step() for _ in range(20)], 3)
    model.zero_grad(set_to_none=True)
    return t / 20


def _floor(model) -> float:
    """One float64 Gram product (smaller side) and one Cholesky of μI − G per linear layer."""
    import torch

    total = 0.0
    for layer in model.modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        W = layer.weight.detach()
        t = time.process_time()
        M = (W if W.shape[0] <= W.shape[1] else W.T).double()
        G = M @ M.T
        P = -G
        P.diagonal().add_(float(G.diagonal().sum()))  # μ = trace ≥ λ_max: the factorisation runs
        torch.linalg.cholesky_ex(P)
        total += time.process_time() - t
    return total


def _warm(model) -> float:
    """Warm dense certificates: Σ over linear layers after a 1e-3 relative perturbation."""
    import torch

    from lipreg.functional.certify import matrix_norm_certificate

    gen = torch.Generator().manual_seed(1)
    total = 0.0
    for layer in model.modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        W = layer.weight.detach()
        v = matrix_norm_certificate(W).v
        W2 = W + 1e-3 * W.abs().mean() * torch.randn(W.shape, generator=gen)
        t = time.process_time()
        matrix_norm_certificate(W2, v0=v)
        total += time.process_time() - t
    return total


def child(name: str, variant: str) -> None:
    import torch

    import lipreg

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, shape = _net(name)
    unit = _unit(model, shape)
    t_cert, res = _cpu(lambda: lipreg.autolip(model, shape, certify=True))
    out = {"unit": unit, "cert": t_cert / unit, "cert_s": t_cert, "value": res.value}
    out["methods"] = sorted({lb.method for lb in res.layers if lb.kind == "affine"})
    if name == "mlp":
        floor = _floor(model)
        out["floor"] = floor / unit
        out["cert/floor"] = t_cert / floor
        if variant == "after":
            out["warm"] = _warm(model) / unit
    print(json.dumps(out))


def _baseline_tree(rev: str, where: Path) -> None:
    """HEAD's ``lipreg`` with this change's files taken from ``rev``."""
    archive = subprocess.run(
        ["git", "archive", "HEAD", "lipreg"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(where, filter="data")
    for path in CHANGED:
        old = subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        (where / path).write_bytes(old)


def _run(name: str, variant: str, path: Path) -> dict:
    env = dict(
        os.environ, PYTHONPATH=str(path), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", __file__, "--child", name, variant],
        cwd=tempfile.gettempdir(),  # never import the working tree by accident
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nets", nargs="+", default=["mlp", "alexnet"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--baseline", default="c1e07f4")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(*a.child)
        return
    print(f"load before: {os.getloadavg()} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        _baseline_tree(a.baseline, base)
        for name in a.nets:
            runs: dict[str, list[dict]] = {"before": [], "after": []}
            for _ in range(a.reps):
                runs["before"].append(_run(name, "before", base))
                runs["after"].append(_run(name, "after", ROOT))
            print(f"\n### {name} (medians of {a.reps}; load {os.getloadavg()})")
            print(
                "| variant | fwd+bwd (ms) | certificate (s) | certificate | floor | "
                "certificate / floor | warm dense | value | methods |"
            )
            print("|---|---|---|---|---|---|---|---|---|")
            for variant, rs in runs.items():

                def med(key: str, rs=rs, unit: str = "x") -> str:
                    vals = [r[key] for r in rs if key in r]
                    return (
                        f"{statistics.median(vals):.{3 if unit == 's' else 1}f}{unit}"
                        if vals
                        else "-"
                    )

                unit = statistics.median(r["unit"] for r in rs) * 1e3
                print(
                    f"| {variant} | {unit:.2f} | {med('cert_s', unit='s')} | {med('cert')} | "
                    f"{med('floor')} | {med('cert/floor')} | {med('warm')} | "
                    f"{rs[-1]['value']:.9g} | {', '.join(rs[-1]['methods'])} |"
                )
    print(f"\nload after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
