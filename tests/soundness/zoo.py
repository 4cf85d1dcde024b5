"""The torchvision zoo: every classification model certified soundly or refused by name.

Each model is built with random weights (``weights=None``: nothing is downloaded),
``num_classes=10``, in evaluation mode, at a small input (3×32×32; larger only where the
architecture needs it, 16×16 for the deep ResNet-like families). ``lipreg.autolip`` either

* returns a certified bound (``certify=True``; see ``autolip_options``), checked against
  the independent oracle's certified lower bound (dense float64 Jacobian of the 10 outputs
  at random points — cheap with 10 outputs — certified by a float64 difference quotient), or
* refuses with an ``UnsupportedOperationError``/``TraceError`` naming the op.
"""

from __future__ import annotations

import gc
import math
import re
import time
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

import lipreg
from tests.soundness.oracle import oracle_lower_bound

__all__ = ["ZOO", "ZooRow", "autolip_options", "input_shape", "run_zoo_model"]

ZOO: list[str] = sorted(torchvision.models.list_models(module=torchvision.models))

# Inputs other than 3×32×32: larger where the architecture needs it; 16×16 for the deep
# ResNet-like families (their /32 stems end in a 1×1 map, which is still valid), to keep the
# whole zoo within minutes.
_SIZES = {
    "alexnet": 64,  # its third max-pool needs a 3×3 map: at least 63×63
    "inception_v3": 75,  # its stem needs at least 75×75
    "maxvit_t": 224,  # partitions of 7×7 windows down to a 7×7 map: 224 = 7 · 2⁵
}
_SMALL = ("resnet", "resnext", "wide_resnet", "regnet_x", "mnasnet", "mobilenet_v2", "shufflenet")
# AutoLip options: certify=True (the default) with dense_limit=64: maps with a side above 64
# get the FFT / Schur / product certificates instead of a dense materialisation — still
# certified upper bounds, looser, and 2–10× faster on these networks. The heaviest models
# also get a 16 MB memory budget per certificate (VGG's 25088×4096 classifier: a 36 s Gram
# matrix otherwise), which exercises the budget fallbacks.
AUTOLIP_OPTIONS: dict = {"certify": True, "dense_limit": 64}
_HEAVY = ("vgg", "resnext101", "regnet_x_16gf", "regnet_x_32gf", "wide_resnet101")
HEAVY_OPTIONS: dict = {**AUTOLIP_OPTIONS, "memory_limit_bytes": 16e6}


def autolip_options(name: str) -> dict:
    return HEAVY_OPTIONS if name.startswith(_HEAVY) else AUTOLIP_OPTIONS


# Constructor options that shrink the fixed input size of ViTs (their patch grid).
_KWARGS: dict[str, dict] = {
    "vit_b_16": {"image_size": 32},
    "vit_b_32": {"image_size": 32},
    "vit_l_16": {"image_size": 32},
    "vit_l_32": {"image_size": 32},
    "vit_h_14": {"image_size": 28},
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}


def input_shape(name: str) -> tuple[int, int, int]:
    default = 16 if name.startswith(_SMALL) else 32
    size = _KWARGS.get(name, {}).get("image_size", _SIZES.get(name, default))
    return (3, size, size)


@dataclass
class ZooRow:
    name: str
    input_shape: tuple[int, ...]
    params: int
    status: str  # "certified", "refused", "unsound", "error"
    upper: float | None = None
    lower: float | None = None
    reason: str = ""
    seconds: float = 0.0
    bound_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("certified", "refused")


def _short_reasons(message: str, limit: int = 3) -> str:
    """The refused ops of a lipreg refusal, one short phrase each."""
    items = [ln.strip()[2:] for ln in message.splitlines() if ln.strip().startswith("- ")]
    if not items:
        return re.sub(r"\s+", " ", message.split(". ")[0])[:160]
    out = []
    for raw in items:
        more = re.search(r" \(and (\d+) more of the same kind: [^)]*\)", raw)
        item = raw.replace(more.group(0), "") if more else raw
        count = f" ×{int(more.group(1)) + 1}" if more else ""
        found = re.match(r"(module '[^']*' \((\w+)\)|function (\w+)|method \.?(\w+)\(?\)?)", item)
        what = next((g for g in (found.groups()[1:] if found else ()) if g), item[:40])
        why = item.split(": ", 1)[1] if ": " in item else ""
        phrase = f"{what}{count}: {why.split('. ')[0].split('; ')[0]}"[:110]
        if phrase not in out:
            out.append(phrase)
    more = f" (+{len(out) - limit} more)" if len(out) > limit else ""
    return "; ".join(out[:limit]) + more


def build(name: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.get_model(
            name, weights=None, num_classes=10, **_KWARGS.get(name, {})
        )
    return model.eval()


def run_zoo_model(name: str) -> ZooRow:
    """Bound one zoo model and judge the result (see the module docstring)."""
    start = time.perf_counter()
    shape = input_shape(name)
    model = build(name)
    row = ZooRow(name, shape, sum(p.numel() for p in model.parameters()), "certified")
    try:
        t0 = time.perf_counter()
        try:
            result = lipreg.autolip(model, shape, **autolip_options(name))
        except (lipreg.UnsupportedOperationError, lipreg.TraceError) as exc:
            row.status, row.reason = "refused", _short_reasons(str(exc))
            if not re.search(r"node|module|function|method|trace", str(exc), re.IGNORECASE):
                row.status = "error"
                row.reason = f"refusal names no op: {exc}"
        except Exception as exc:  # a raw error is a bug
            row.status, row.reason = "error", f"{type(exc).__name__}: {exc}"[:300]
        else:
            row.upper = float(result.value)
            row.bound_seconds = time.perf_counter() - t0
            oracle = oracle_lower_bound(model, shape, n_random=2, scales=(0.01, 1.0), n_ascent=0)
            row.lower = oracle.lower
            if not (result.certified and result.kind == "upper"):
                row.status, row.reason = "unsound", f"not certified ({result.kind})"
            elif not math.isfinite(row.upper) or row.upper < oracle.lower * (1 - 1e-6):
                row.status = "unsound"
                row.reason = f"certified {row.upper:.6g} < oracle lower bound {oracle.lower:.6g}"
        if not row.bound_seconds:
            row.bound_seconds = time.perf_counter() - t0
    finally:
        del model
        gc.collect()
        row.seconds = time.perf_counter() - start
    return row
