"""paper_mlp (paper.md §3.2): ReLU MLPs trained on the synthetic GP set, then the Frobenius
product, AutoLip, exact and greedy SeqLip and three lower bounds next to the poster's table.

    python experiments/train.py experiment=paper_mlp logger=csv
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

import lipreg
from experiments import reporting
from experiments.bounds import network_bounds
from experiments.studies import driver
from experiments.studies.driver import FitResult, RunSpec, study
from experiments.studies.measure import bound_columns, final_values, frobenius_product
from experiments.studies.paper_values import PAPER_MLP
from lipreg.functional.trace import eval_function

__all__ = ["grid_lower_bound", "run"]

MAIN_COLUMNS = [
    "network",
    "AutoLip (certified upper)",
    "SeqLip exact (certified upper)",
    "best LB (certified lower)",
    "AutoLip/SeqLip",
    "paper AutoLip",
    "paper SeqLip",
    "paper AutoLip/SeqLip",
]
PAPER_COLUMNS = {  # our column -> paper key, for the table and the plot
    "Frobenius product (certified upper)": ("paper Frobenius", "frob"),
    "AutoLip (certified upper)": ("paper AutoLip", "autolip"),
    "SeqLip exact (certified upper)": ("paper SeqLip", "seqlip"),
    "greedy SeqLip (estimate)": ("paper greedy SeqLip", "greedy"),
    "LB data (certified lower)": ("paper LB data", "lb_data"),
    "LB annealing (certified lower)": ("paper LB annealing", "lb_annealing"),
    "LB grid (certified lower)": ("paper LB grid", "lb_grid"),
}


def grid_lower_bound(net: nn.Module, lo: Sequence[float], hi: Sequence[float], size: int) -> float:
    """Largest Jacobian norm of a 2-D-input network on a ``size × size`` grid over the box
    ``[lo, hi]`` (float64 copy, evaluation semantics): a certified lower bound."""
    net64 = copy.deepcopy(net).double()
    fn, _ = eval_function(net64)
    gx = torch.linspace(float(lo[0]), float(hi[0]), size, dtype=torch.float64)
    gy = torch.linspace(float(lo[1]), float(hi[1]), size, dtype=torch.float64)
    pts = torch.cartesian_prod(gx, gy)
    best = 0.0
    gen = torch.Generator().manual_seed(0)
    for chunk in pts.split(8192):
        sig, _ = lipreg.jacobian_norms(fn, chunk, n_iter=30, tol=1e-10, generator=gen)
        best = max(best, float(sig.max()))
    return best


def _evaluate(cfg: DictConfig, p: dict[str, Any]) -> Any:
    """The measurements of one trained MLP: its table row and its final values."""
    shape = tuple(int(s) for s in cfg.model.input_shape)

    def evaluate(fit: FitResult, spec: RunSpec) -> tuple[dict[str, Any], dict[str, Any]]:
        net, dm = fit.net, fit.datamodule
        lower = {
            "data": {"inputs": dm.train_dataset.tensors[0], "n_random": 0, "n_anneal_steps": 0},
            "annealing": {
                "n_random": p["anneal_points"],
                "scale": float(dm.scale),
                "n_anneal_steps": p["anneal_steps"],
            },
        }
        # seqlip_max_iter=None: lipreg's default, as in the published table
        b = network_bounds(net, shape, exact=p["exact_seqlip"], seqlip_max_iter=None, lower=lower)
        lb_grid = grid_lower_bound(net, dm.x.min(0).values, dm.x.max(0).values, p["grid_size"])
        depth = int(spec.name.removeprefix("depth"))
        width, epochs = p["width"], p["epochs"]
        row: dict[str, Any] = {
            "network": f"MLP 2-{width}x{depth - 1}-1 ({depth} linear layers, ReLU)",
            "data": driver.description(dm),
            "weights": f"trained {epochs} epochs (Adam lr {cfg.lr:g}, MSE, seed {cfg.seed})",
            "test MSE": fit.metrics.get("test/loss"),
            "Frobenius product (certified upper)": frobenius_product(net),
            **bound_columns(b, {"grid": lb_grid}),
            "train time (s)": fit.train_time,
            "exact SeqLip time (s)": b.times.get("exact") if b.exact is not None else None,
            "bounds time (s)": b.times["total"],
        }
        paper = PAPER_MLP.get(depth, {})
        row.update({col: paper.get(key) for col, key in PAPER_COLUMNS.values()})
        row["paper AutoLip/SeqLip"] = reporting.ratio(paper.get("autolip"), paper.get("seqlip"))
        final = {"frobenius": row["Frobenius product (certified upper)"]}
        final |= final_values(b, {"grid": lb_grid})
        return row, final

    return evaluate


@study
def run(
    cfg: DictConfig,
    *,
    depths: Sequence[int] = (4, 5, 7, 10),
    epochs: int = 400,
    width: int | None = None,
    exact_seqlip: bool = True,
    grid_size: int = 200,
    anneal_points: int = 256,
    anneal_steps: int = 100,
    quick: bool = False,
    quick_depths: Sequence[int] = (3,),
    quick_epochs: int = 2,
    quick_width: int = 8,
) -> dict[str, float]:
    """ReLU MLPs (2-D input, ``width`` units, ``depth`` linear layers) trained on the GP set:
    Frobenius product, AutoLip, exact and greedy SeqLip, lower bounds (data, annealing, grid)
    next to the poster's table; bound curves over training and AutoLip/SeqLip vs depth."""
    width = int(width if width is not None else cfg.model.get("width", 20))
    updates: dict[str, Any] = {}
    if quick:
        depths, epochs, width = quick_depths, quick_epochs, quick_width
        grid_size, anneal_points, anneal_steps = min(grid_size, 40), 32, 10
        updates = driver.callback_updates(
            cfg, every_n_train_steps=5, certify_every_n_train_steps=10, seqlip_every_n_train_steps=5
        )
    p = {
        "width": width,
        "epochs": epochs,
        "exact_seqlip": exact_seqlip,
        "grid_size": grid_size,
        "anneal_points": anneal_points,
        "anneal_steps": anneal_steps,
    }
    runs = [
        RunSpec(
            f"depth{d}",
            driver.run_cfg(
                cfg,
                f"depth{d}",
                {"model.depth": int(d), "model.width": width, "trainer.max_epochs": epochs}
                | updates,
            ),
        )
        for d in depths
    ]
    return driver.train_runs(cfg, runs, _evaluate(cfg, p), _writer(cfg, p))


def _writer(cfg: DictConfig, p: dict[str, Any]) -> Any:
    notes = [
        "Paper: Scaman & Virmaux (NeurIPS 2018), poster table 'AutoLip and SeqLip for MLPs of "
        "various size' (paper.md §3.2). 'paper *' columns are the poster's values for the "
        "paper's own trained networks (the paper's '# layers' is taken as linear layers; its "
        "data set size, ~15k points, and epochs are not recoverable).",
        "Data: the paper's synthetic protocol (2-D GP sample) regenerated here (not the "
        "paper's exact sample); weights: trained here from a seeded random init.",
        "LB data: lower_bound(inputs=training points, n_random=0, n_anneal_steps=0). "
        f"LB annealing: {p['anneal_points']} random N(0, scale²) points + {p['anneal_steps']} "
        "annealing steps (16 chains), no data. LB grid: max Jacobian norm on a "
        f"{p['grid_size']}x{p['grid_size']} grid over the data's bounding box (float64).",
        "AutoLip/SeqLip and SeqLip/best LB use exact SeqLip when computed, else greedy.",
        f"Training: {p['epochs']} epochs, Adam lr {cfg.lr:g}, batch "
        f"{cfg.data.get('batch_size')}; bound curves from lipreg.LipschitzCallback in "
        "bound_curves.png / curves.csv.",
    ]

    def write(out: Path, rows: list[dict[str, Any]], fits: list[FitResult]) -> None:
        title = "paper_mlp: AutoLip and SeqLip for MLPs of various size"
        reporting.write_table(out, title, rows, notes, main_columns=MAIN_COLUMNS)
        driver.write_curves(out, fits)
        curves = {f.run: f.curve for f in fits}
        reporting.plot_curves(
            out / "bound_curves.png", curves, "MLPs on the GP set: bounds during training"
        )
        depths = [int(f.run.removeprefix("depth")) for f in fits]
        plot_depth(out / "ratio_vs_depth.png", rows, depths)

    return write


def plot_depth(path: Path, rows: list[dict[str, Any]], depths: list[int]) -> None:
    """Bounds vs depth (ours solid, the paper's dashed) and AutoLip/SeqLip vs depth."""
    fig, (ax1, ax2) = reporting.new_figure(1, 2, figsize=(14, 4.6))
    series = [  # (our column, label, colour, marker size): exact SeqLip drawn larger, as
        # greedy SeqLip usually coincides with it
        ("Frobenius product (certified upper)", "Frobenius", "C4", 6),
        ("AutoLip (certified upper)", "AutoLip", "C0", 6),
        ("SeqLip exact (certified upper)", "SeqLip exact", "C1", 11),
        ("greedy SeqLip (estimate)", "greedy SeqLip", "C2", 5),
        ("LB grid (certified lower)", "LB grid", "C3", 6),
    ]
    for ours, label, color, ms in series:
        pts = [(d, r.get(ours)) for d, r in zip(depths, rows, strict=True)]
        reporting.plot_points(ax1, pts, color=color, ms=ms, label=f"{label} (ours)")
        key = PAPER_COLUMNS[ours][1]
        ppts = [(d, PAPER_MLP[d][key]) for d in depths if d in PAPER_MLP]
        reporting.plot_points(
            ax1,
            ppts,
            ls="--",
            marker="s",
            color=color,
            ms=ms,
            mfc="none",
            alpha=0.7,
            label=f"{label} (paper)",
        )
    reporting.finish_axes(
        ax1,
        "depth (linear layers)",
        "Lipschitz bound",
        "bounds vs depth (solid: ours, dashed: paper)",
        legend_size=7,
        legend_outside=True,
    )
    ours = [(d, r.get("AutoLip/SeqLip")) for d, r in zip(depths, rows, strict=True)]
    reporting.plot_points(ax2, ours, label="ours: AutoLip / SeqLip")
    pap = [(d, v["autolip"] / v["seqlip"]) for d, v in PAPER_MLP.items()]
    reporting.plot_points(
        ax2, pap, ls="--", marker="s", mfc="none", label="paper: AutoLip / SeqLip"
    )
    reporting.finish_axes(
        ax2,
        "depth (linear layers)",
        "AutoLip / SeqLip",
        "improvement of SeqLip over AutoLip",
        logy=False,
    )
    reporting.save_figure(fig, path)
