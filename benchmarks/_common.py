"""Shared helpers of the benchmark scripts (timing, table printing)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch


def setup_threads() -> None:
    """Pin the thread count (OMP_NUM_THREADS, default 1): this machine is shared and noisy."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def best_time(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """Best wall time of ``repeat`` calls (the least disturbed by other jobs) and last output."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def forward_backward_time(model: torch.nn.Module, input_shape: tuple[int, ...]) -> float:
    """Best time of one forward + backward pass on ONE sample (eval-mode copy, grads freed)."""
    x = torch.randn(1, *input_shape)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    step()  # warm-up (allocator, kernels)
    t, _ = best_time(step, repeat=5)
    model.zero_grad(set_to_none=True)
    return t


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """A GitHub-flavoured Markdown table on stdout."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        if c != c:  # NaN
            return "–"
        return f"{c:.4g}"
    return str(c)
