"""paper_random (paper.md §3.1, the "ideal scenario"): SeqLip / AutoLip on random MLPs whose
every layer has spectral norm 1 and second singular value r, vs the number of layers.

    python experiments/train.py experiment=paper_random
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from experiments.bounds import network_bounds
from experiments.reporting import finish_axes, new_figure, plot_points, save_figure, write_table
from experiments.studies.driver import finish_study, output_dir, study
from experiments.studies.measure import linear_layers
from experiments.studies.paper_values import PAPER_RANDOM
from lipreg.models import mlp

__all__ = ["haar_orthogonal", "random_spectrum_mlp", "run", "theorem3_ratio_bound"]

log = logging.getLogger(__name__)

MAIN_COLUMNS = [
    "r (s2/s1)",
    "linear layers K",
    "AutoLip (certified upper), mean",
    "greedy SeqLip (estimate), mean",
    "SeqLip/AutoLip mean",
    "Theorem 3 bound on SeqLip/AutoLip (mean)",
    "1/π^(K−1)",
    "poster reading (±15%)",
]


def haar_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-distributed ``n × n`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return q * d


def random_spectrum_mlp(
    n_layers: int, ratio: float, width: int = 100, seed: int = 0, d_in: int = 2, d_out: int = 1
) -> nn.Sequential:
    """ReLU MLP ``d_in → width × (n_layers − 1) → d_out`` (float64, zero biases) whose every
    weight is ``U diag(1, r, ..., r) Vᵀ`` with Haar-random ``U``, ``V``: every layer has
    spectral norm 1 and second singular value ``ratio``. ``U``, ``V`` depend on
    ``(seed, n_layers)`` only, so the ratios share them."""
    net = mlp(d_in, (width,) * (n_layers - 1), d_out).double()
    gen = torch.Generator().manual_seed(10_007 * seed + n_layers)
    with torch.no_grad():
        for layer in linear_layers(net):
            n_out, n_in = layer.weight.shape
            u, v = haar_orthogonal(n_out, gen), haar_orthogonal(n_in, gen)
            k = min(n_out, n_in)
            s = torch.full((k,), float(ratio), dtype=torch.float64)
            s[0] = 1.0
            layer.weight.copy_(u[:, :k] @ torch.diag(s) @ v[:, :k].T)
            layer.bias.zero_()
    return net


def theorem3_ratio_bound(net: nn.Module) -> float:
    """Theorem 3's bound on SeqLip/AutoLip (paper.md §2.9) from the weights:
    ``Π_k sqrt((1 − r_k − r_{k+1}) m_k² + r_k + r_{k+1} + r_k r_{k+1})`` with
    ``m_k = max_σ |⟨σ·v_{k+1}, u_k⟩|``."""
    svds = [torch.linalg.svd(m.weight.detach().double()) for m in linear_layers(net)]
    r = [float(S[1] / S[0]) if S.numel() > 1 else 0.0 for _, S, _ in svds]
    bound = 1.0
    for k in range(len(svds) - 1):
        u_k = svds[k][0][:, 0]
        v_next = svds[k + 1][2][0, :]
        prod = u_k * v_next
        m = max(float(prod.clamp_min(0).sum()), float((-prod).clamp_min(0).sum()))
        a, b = r[k], r[k + 1]
        bound *= math.sqrt(max((1 - a - b) * m * m + a + b + a * b, 0.0))
    return bound


def _row(ratio: float, n_layers: int, width: int, seeds: int) -> dict[str, Any]:
    """Mean AutoLip and greedy SeqLip over ``seeds`` random networks of one (r, K)."""
    als, gsls, thm = [], [], []
    t0 = time.perf_counter()
    for seed in range(seeds):
        net = random_spectrum_mlp(n_layers, ratio, width, seed)
        # seqlip_max_iter=None: lipreg's default, as in the published table
        b = network_bounds(net, (2,), exact=False, seqlip_max_iter=None)
        if not b.autolip.certified:
            raise RuntimeError(f"AutoLip could not be certified: {b.autolip.notes}")
        als.append(b.autolip.value)
        gsls.append(b.greedy.value)
        thm.append(theorem3_ratio_bound(net))
    ratios_k = [g / a for g, a in zip(gsls, als, strict=True)]
    poster = PAPER_RANDOM.get(float(ratio), [])
    return {
        "network": f"MLP 2-{width}x{n_layers - 1}-1 ({n_layers} linear layers)",
        "data": "none (bounds of the weights only)",
        "weights": f"RANDOM: U·diag(1, r, …, r)·Vᵀ, Haar U, V; seeds 0..{seeds - 1}",
        "r (s2/s1)": float(ratio),
        "linear layers K": n_layers,
        "seeds": seeds,
        "AutoLip (certified upper), mean": sum(als) / seeds,
        "SeqLip exact (certified upper)": None,
        "greedy SeqLip (estimate), mean": sum(gsls) / seeds,
        "SeqLip/AutoLip mean": sum(ratios_k) / seeds,
        "SeqLip/AutoLip min": min(ratios_k),
        "SeqLip/AutoLip max": max(ratios_k),
        "Theorem 3 bound on SeqLip/AutoLip (mean)": sum(thm) / seeds,
        "1/π^(K−1)": math.pi ** -(n_layers - 1),
        "poster reading (±15%)": poster[n_layers - 1] if n_layers <= len(poster) else None,
        "time (s)": time.perf_counter() - t0,
    }


@study
def run(
    cfg: DictConfig,
    *,
    width: int = 100,
    max_layers: int = 10,
    ratios: Sequence[float] = (0.5, 0.1, 0.01),
    seeds: int = 5,
    quick: bool = False,
    quick_max_layers: int = 3,
    quick_seeds: int = 1,
) -> dict[str, float]:
    """Random MLPs with normalised spectra (the ideal scenario): AutoLip (= 1 by construction,
    certified) and greedy SeqLip vs the number of linear layers, for several ratios r of the
    second to the first singular value; against 1/π^(K−1) and the poster's curves."""
    if quick:
        max_layers, seeds = quick_max_layers, quick_seeds
    rows: list[dict[str, Any]] = []
    summary: dict[str, float] = {}
    start = time.perf_counter()
    for ratio in ratios:
        for n_layers in range(1, max_layers + 1):
            row = _row(ratio, n_layers, width, seeds)
            rows.append(row)
            summary[f"r{ratio:g}/K{n_layers}/seqlip_over_autolip"] = row["SeqLip/AutoLip mean"]
        log.info("ratio %g done (%.1f s)", ratio, time.perf_counter() - start)
    out = output_dir(cfg)
    notes = [
        "Setup (paper.md §3.1, reference lip_cst_comparison.py): MLP with input 2, output 1, "
        f"hidden width {width}, K = number of LINEAR layers (K − 1 hidden ReLU layers), "
        "K = 1 is a single Linear(2, 1). Every weight is U·S·Vᵀ with Haar-random orthogonal "
        "U, V (QR of a Gaussian, sign-fixed, seeded) and S = diag(1, r, ..., r); zero biases.",
        "AutoLip = product of spectral norms = 1 by construction (certified). Greedy SeqLip "
        f"uses full SVDs (width {width} is beyond exact enumeration); mean over {seeds} seeds.",
        "Theorem 3 (paper.md §2.9) bounds exact SeqLip/AutoLip from above, hence also greedy.",
        "Poster readings: approximate values read off the poster's plot (about ±15%); the "
        "poster's exact setup is uncertain (see paper.md §3.1).",
        f"Total time {time.perf_counter() - start:.1f} s.",
    ]
    title = "paper_random: SeqLip in the ideal scenario (random weights)"
    write_table(out, title, rows, notes, main_columns=MAIN_COLUMNS)
    plot_ratios(out / "ratio_vs_layers.png", rows, width)
    return finish_study(cfg, rows, summary)


def plot_ratios(path: Path, rows: list[dict[str, Any]], width: int) -> None:
    """SeqLip/AutoLip vs K per ratio r (ours: line + min-max band; poster: hollow squares)."""
    fig, ax = new_figure(figsize=(10, 5))
    ks = sorted({int(r["linear layers K"]) for r in rows})
    plot_points(ax, [(k, 1.0) for k in ks], ls=":", marker="", color="k", label="AutoLip (= 1)")
    limit = [(k, math.pi ** -(k - 1)) for k in ks]
    plot_points(ax, limit, ls="--", marker="", color="k", label="1/π^(K−1) (limit)")
    ratios = list(dict.fromkeys(float(r["r (s2/s1)"]) for r in rows))
    for i, ratio in enumerate(ratios):
        sel = sorted(
            (r for r in rows if float(r["r (s2/s1)"]) == ratio),
            key=lambda r: int(r["linear layers K"]),
        )
        k = [int(r["linear layers K"]) for r in sel]
        color = f"C{i}"
        means = [(kk, r["SeqLip/AutoLip mean"]) for kk, r in zip(k, sel, strict=True)]
        label = f"greedy SeqLip / AutoLip, r = {ratio:g} (ours)"
        plot_points(ax, means, color=color, ms=4, label=label)
        lo = [float(r["SeqLip/AutoLip min"]) for r in sel]
        hi = [float(r["SeqLip/AutoLip max"]) for r in sel]
        ax.fill_between(k, lo, hi, color=color, alpha=0.15)
        poster = PAPER_RANDOM.get(ratio, [])
        ppts = [(kk, poster[kk - 1]) for kk in ks if kk <= len(poster)]
        plot_points(
            ax,
            ppts,
            join=False,
            marker="s",
            color=color,
            mfc="none",
            ms=7,
            label=f"poster reading, r = {ratio:g}",
        )
    title = f"SeqLip in the ideal scenario (random orthogonal layers, width {width})"
    finish_axes(
        ax,
        "number of linear layers K",
        "SeqLip / AutoLip",
        title,
        legend_size=7,
        legend_outside=True,
    )
    save_figure(fig, path)
