"""penalty_sweep (not in the paper): test accuracy (or MSE) vs the Lipschitz bound when the
same network is trained with ``lipreg.LipschitzPenalty`` at several weights.

    python experiments/train.py experiment=penalty_sweep logger=csv
    python experiments/train.py experiment=penalty_sweep_mlp      # SeqLip penalty, GP MLP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from experiments import reporting
from experiments.bounds import network_bounds
from experiments.studies import driver
from experiments.studies.driver import FitResult, RunSpec, study
from experiments.studies.measure import ImageLowerSearch, bound_columns, final_values

__all__ = ["run"]


def _quick_updates(cfg: DictConfig, limit: int, width: int, top_k: int | None) -> dict:
    updates: dict[str, Any] = {}
    if "limit" in cfg.data:
        updates["data.limit"] = limit
    elif "n_train" in cfg.data:
        updates["data.n_train"] = limit
    if "width" in cfg.model:  # the paper MLP: exact SeqLip in milliseconds
        updates["model.width"] = width
    return updates | driver.callback_updates(cfg, seqlip_top_k=top_k, **driver.QUICK_CALLBACK)


def _evaluate(cfg: DictConfig, p: dict[str, Any]) -> Any:
    shape = tuple(int(s) for s in cfg.model.input_shape)
    metric, metric_key = p["metric"]

    def evaluate(fit: FitResult, spec: RunSpec) -> tuple[dict[str, Any], dict[str, Any]]:
        lower = p["lb"].searches(driver.test_inputs(fit.datamodule, p["lb"].points))
        b = network_bounds(fit.net, shape, exact=True, top_k=p["top_k"], lower=lower)
        row = {
            "network": str(cfg.model.get("name")),
            "data": driver.description(fit.datamodule),
            "weights": f"trained {p['epochs']} epochs (Adam lr {cfg.lr:g}, seed {cfg.seed}) "
            f"with penalty {p['method']}/{p['form']}",
            "penalty weight": float(spec.cfg.penalty.weight),
            metric: fit.metrics.get(metric_key),
            "final penalty term": fit.metrics.get("train/lipschitz_penalty"),
            **bound_columns(b),
            "train time (s)": fit.train_time,
            "bounds time (s)": b.times["total"],
        }
        final = final_values(b) | {"test_metric": row[metric]}
        return row, final

    return evaluate


def _writer(cfg: DictConfig, p: dict[str, Any]) -> Any:
    metric = p["metric"][0]
    main = [
        "penalty weight",
        metric,
        "AutoLip (certified upper)",
        "SeqLip exact (certified upper)",
        "greedy SeqLip (estimate)",
        "best LB (certified lower)",
        "AutoLip/SeqLip",
    ]
    notes = [
        "Not in the paper (the paper claims regularisation in its abstract only): the "
        "trade-off between test performance and the Lipschitz bound when training with "
        f"lipreg.LipschitzPenalty(method={p['method']!r}, form={p['form']!r}) × weight.",
        f"Same seed ({cfg.seed}), data and {p['epochs']} epochs for every weight; weight 0 "
        "trains with the penalty module but adds nothing to the loss.",
        f"Greedy SeqLip: top-{p['top_k']} singular triplets on maps too large for a full SVD. "
        "SeqLip exact only where every activation width is <= 20.",
        p["lb"].notes("inputs"),
    ]
    if p["paper_data"]:
        notes.append("DATA IS A SUBSTITUTE for MNIST (see the data column in table.csv).")

    def write(out: Path, rows: list[dict[str, Any]], fits: list[FitResult]) -> None:
        title = f"penalty_sweep: {p['method']} penalty on {cfg.model.get('name')}"
        reporting.write_table(out, title, rows, notes, main_columns=main)
        driver.write_curves(out, fits)
        curves = {f.run: f.curve for f in fits}
        reporting.plot_curves(
            out / "bound_curves.png", curves, "bounds during training, per weight"
        )
        plot_tradeoff(out / "accuracy_vs_bound.png", rows, metric)

    return write


@study
def run(
    cfg: DictConfig,
    *,
    weights: Sequence[float] = (0.0, 1e-3, 1e-2, 1e-1),
    epochs: int = 10,
    top_k: int | None = 200,
    lb_points: int = 512,
    lb_random: int = 128,
    lb_anneal_steps: int = 30,
    quick: bool = False,
    quick_weights: Sequence[float] = (0.0, 0.1),
    quick_epochs: int = 1,
    quick_limit: int = 300,
    quick_width: int = 8,
) -> dict[str, float]:
    """Accuracy vs Lipschitz bound: the same network, data, seed and epochs for every
    ``penalty.weight`` in ``weights`` (``cfg.penalty`` gives the method and form). The
    weights run in one process (see :func:`experiments.studies.driver.train_runs`); the same
    sweep as independent runs is the Hydra multirun in ``conf/experiment/penalty_sweep.yaml``."""
    if not cfg.get("penalty"):
        raise ValueError("penalty_sweep needs a penalty: penalty=autolip or penalty=seqlip.")
    updates: dict[str, Any] = {}
    if quick:
        weights, epochs = quick_weights, quick_epochs
        top_k = 10 if top_k is not None else None
        updates = _quick_updates(cfg, quick_limit, quick_width, top_k)
    classification = cfg.model.task == "classification"
    is_mnist_model = str(cfg.model.get("name")).startswith("mnist")
    paper_data = "MNIST" if classification and is_mnist_model else None
    p = {
        "epochs": epochs,
        "top_k": top_k,
        "lb": ImageLowerSearch.of(quick, lb_points, lb_random, lb_anneal_steps),
        "method": cfg.penalty.get("method", "autolip"),
        "form": cfg.penalty.get("form", "log"),
        "metric": ("test accuracy", "test/acc") if classification else ("test MSE", "test/loss"),
        "paper_data": paper_data,
    }
    runs = [
        RunSpec(
            f"weight{w:g}",
            driver.run_cfg(
                cfg,
                f"weight{w:g}",
                {"penalty.weight": float(w), "trainer.max_epochs": epochs, **updates},
            ),
            paper_data=paper_data,
        )
        for w in weights
    ]
    return driver.train_runs(cfg, runs, _evaluate(cfg, p), _writer(cfg, p))


def plot_tradeoff(path: Path, rows: list[dict[str, Any]], metric: str) -> None:
    """Test metric vs the bound of each trained network: points (a weight sweep is not
    ordered along the bound axis, so no line joins them), each AutoLip point labelled with its
    penalty weight."""
    fig, ax = reporting.new_figure(figsize=(6.5, 4.5))
    for key, marker, label in (
        ("AutoLip (certified upper)", "o", "AutoLip (certified)"),
        ("greedy SeqLip (estimate)", "^", "greedy SeqLip (estimate)"),
    ):
        pts = [
            (r, float(r[key]), reporting.num(r.get(metric)))
            for r in rows
            if reporting.num(r.get(key))
        ]
        pts = [(r, x, y) for r, x, y in pts if y is not None]
        if not pts:
            continue
        xs, ys = [x for _, x, _ in pts], [y for _, _, y in pts]
        ax.plot(xs, ys, linestyle="none", marker=marker, ms=7, alpha=0.85, label=label)
        if key.startswith("AutoLip"):
            # labels in order of the bound, staggered vertically: close points stay legible
            for i, (r, x, y) in enumerate(sorted(pts, key=lambda p: p[1])):
                ax.annotate(
                    f"w={float(r['penalty weight']):g}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(6, (6, -12, 14)[i % 3]),
                    fontsize=8,
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"},
                )
    ax.set_xscale("log")
    ax.margins(x=0.08, y=0.15)  # room for the labels inside the frame
    reporting.finish_axes(
        ax,
        "Lipschitz bound of the trained network",
        metric,
        f"{metric} vs Lipschitz bound (penalty weight sweep)",
        logy=False,
    )
    reporting.save_figure(fig, path)
