"""The paper studies (experiments/studies/): every experiment config composes, and every
study runs end-to-end in quick mode into its run directory (never into results/), writes its
table and plots, and its numbers satisfy truths that do not depend on lipreg:

- AutoLip (certified) of an MLP = the product of ``torch.linalg.matrix_norm(W, 2)``;
- lower bounds ≤ exact SeqLip ≤ AutoLip ≤ Frobenius product; greedy SeqLip ≤ exact SeqLip;
- exact SeqLip ≥ the brute-force max over activation patterns of
  ``‖W_K diag(σ) ⋯ diag(σ) W_1‖`` (paper.md §2.6-2.7), and ≥ any Jacobian norm (autograd);
- paper_random: AutoLip = 1, greedy SeqLip/AutoLip ≤ 1 and ≤ Theorem 3's bound.

Publishing a finished run into results/ is an explicit step that replaces whole files.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import inspect
import itertools
import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from experiments import reporting
from experiments.models import paper_mlp
from experiments.studies import driver, paper_cnn, paper_random
from experiments.studies.publish import publish
from experiments.train import train
from lipreg.models import mnist_cnn4
from tests.hydra_helpers import clear_hydra, compose_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NOT_OVERRIDDEN = (
    "conf/train.yaml must list `_self_` BEFORE `experiment` in its defaults, otherwise its own "
    "task_name/study override the experiment config's."
)
REL = 1e-6  # relative slack for float64 comparisons of independently computed numbers


def make_cfg(tmp_path: Path, experiment: str, overrides: list[str] | None = None) -> DictConfig:
    """The experiment as Hydra composes it (run dir tmp_path/run, results tmp_path/results)."""
    return compose_config(
        [f"experiment={experiment}", "logger=none", *(overrides or [])],
        tmp_path,
        run_subdir="run",
    )


@pytest.fixture(autouse=True)
def _no_wandb_network(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    yield
    clear_hydra()


def read_table(folder: Path) -> list[dict[str, str]]:
    with open(folder / "table.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def num(row: dict[str, str], column: str) -> float | None:
    """A table cell as a float; ``None`` for '–' (not computed)."""
    value = row[column]
    return None if value == reporting.DASH else float(value)


def run_quick(tmp_path: Path, experiment: str, overrides: list[str] | None = None) -> Path:
    """Run a study in quick mode; it writes into its run directory only (returned)."""
    cfg = make_cfg(tmp_path, experiment, ["study.quick=true", *(overrides or [])])
    assert cfg.task_name == experiment, NOT_OVERRIDDEN
    summary = train(cfg)
    assert summary and all(math.isfinite(v) for v in summary.values())
    out = tmp_path / "run"
    assert not (tmp_path / "results").exists(), "a study run wrote into the results folder"
    assert (out / "table.md").is_file() and (out / "table.csv").is_file()
    md = (out / "table.md").read_text()
    assert "certified" in md and "estimate" in md  # every number says what it is
    header = next(line for line in md.splitlines() if line.startswith("| "))
    assert header.count("|") - 1 <= 9, f"the main table should be narrow: {header}"
    assert not list(out.glob(".*tmp")), "a temporary file was left behind"
    manifest = json.loads((out / driver.MANIFEST).read_text())
    assert manifest["study"] == experiment and manifest["quick"] is True
    assert {"table.md", "table.csv"} <= set(manifest["files"])
    return out


def assert_pngs(folder: Path, names: list[str]) -> None:
    for name in names:
        data = (folder / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name


def spectral_product(net: torch.nn.Module) -> float:
    return math.prod(
        float(torch.linalg.matrix_norm(m.weight.detach().double(), 2))
        for m in net.modules()
        if isinstance(m, torch.nn.Linear)
    )


def frobenius_product(net: torch.nn.Module) -> float:
    return math.prod(
        float(torch.linalg.matrix_norm(m.weight.detach().double(), "fro"))
        for m in net.modules()
        if isinstance(m, torch.nn.Linear)
    )


def max_pattern_bound(net: torch.nn.Module) -> float:
    """max over σ ∈ {0,1}^n of ‖W_K diag(σ_{K-1}) ⋯ diag(σ_1) W_1‖ by enumeration (paper.md
    §2.6: a bound on L(f) that exact SeqLip dominates)."""
    weights = [m.weight.detach().double() for m in net.modules() if isinstance(m, torch.nn.Linear)]
    best = 0.0
    widths = [w.shape[0] for w in weights[:-1]]
    for pattern in itertools.product(*[itertools.product((0.0, 1.0), repeat=n) for n in widths]):
        m = weights[0]
        for sigma, w in zip(pattern, weights[1:], strict=True):
            m = w @ (torch.tensor(sigma, dtype=torch.float64)[:, None] * m)
        best = max(best, float(torch.linalg.matrix_norm(m, 2)))
    return best


def jacobian_norm_max(net: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest spectral norm of the autograd Jacobian over the points ``x``."""
    net = net.double().eval()
    best = 0.0
    for xi in x.double():
        jac = torch.autograd.functional.jacobian(lambda z: net(z[None])[0], xi)
        best = max(best, float(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), 2)))
    return best


# --------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_config_composes_and_names_its_study(tmp_path, experiment):
    cfg = make_cfg(tmp_path, experiment)
    assert cfg.task_name == experiment and cfg.get("study"), (
        f"experiment={experiment} composed with task_name={cfg.task_name!r} and study="
        f"{cfg.get('study')!r}: {NOT_OVERRIDDEN}"
    )
    target = cfg.study._target_
    assert target.startswith("experiments.studies.")
    fn = get_method(target)
    params = {k: v for k, v in cfg.study.items() if not k.startswith("_")}
    signature = inspect.signature(fn)  # the study's parameters + the driver's `publish`
    signature.bind(cfg, **params)  # every parameter exists
    assert "quick" in signature.parameters and "publish" in signature.parameters
    assert set(signature.parameters) - {"publish"} == set(
        inspect.signature(fn.__wrapped__).parameters
    )
    bound = instantiate(cfg.study, _recursive_=False)
    assert callable(bound)
    for group in ("data", "model", "trainer"):  # every interpolation resolves
        OmegaConf.to_container(cfg[group], resolve=True)


def test_a_study_also_runs_without_partial(tmp_path):
    """``study: {_target_: ...}`` without ``_partial_`` works too (returns a bound study)."""
    bound = paper_random.run(quick=True)
    assert callable(bound) and bound.keywords == {"quick": True}


# --------------------------------------------------------------------------------------------
# Building blocks with closed-form truths
# --------------------------------------------------------------------------------------------


def test_random_spectrum_weights_are_as_specified():
    gen = torch.Generator().manual_seed(0)
    q = paper_random.haar_orthogonal(7, gen)
    torch.testing.assert_close(q.T @ q, torch.eye(7, dtype=torch.float64))
    net = paper_random.random_spectrum_mlp(4, 0.1, width=12, seed=3)
    for m in net.modules():
        if isinstance(m, torch.nn.Linear):
            s = torch.linalg.svdvals(m.weight.detach())
            assert s[0].item() == pytest.approx(1.0, rel=1e-12)
            if len(s) > 1:
                assert torch.allclose(s[1:], torch.full_like(s[1:], 0.1), rtol=1e-10)
            assert m.bias.abs().max() == 0
    assert spectral_product(net) == pytest.approx(1.0, rel=1e-12)


def test_markdown_and_csv_say_dash_for_missing_values(tmp_path):
    rows = [{"a": 1.23456789, "b": None, "c": "x|y"}, {"a": float("nan"), "d": True}]
    reporting.write_table(tmp_path, "t", rows, ["a note"])
    md = (tmp_path / "table.md").read_text()
    assert "| 1.235 | – | x\\|y |" in md and "- a note" in md
    table = read_table(tmp_path)
    assert table[0]["a"] == "1.23456789" and table[0]["b"] == reporting.DASH
    assert table[1]["a"] == reporting.DASH and table[1]["d"] == "yes"


# --------------------------------------------------------------------------------------------
# Each study end to end (quick mode)
# --------------------------------------------------------------------------------------------


def test_paper_random_quick(tmp_path):
    out = run_quick(tmp_path, "paper_random")
    rows = read_table(out)
    assert {float(r["r (s2/s1)"]) for r in rows} == {0.5, 0.1, 0.01}
    for r in rows:
        k = int(r["linear layers K"])
        al = num(r, "AutoLip (certified upper), mean")
        ratio = num(r, "SeqLip/AutoLip mean")
        assert al == pytest.approx(1.0, rel=REL)  # Π ‖W‖ = 1 by construction
        assert 0 < num(r, "SeqLip/AutoLip min") <= ratio <= num(r, "SeqLip/AutoLip max")
        assert num(r, "SeqLip/AutoLip max") <= 1 + REL  # greedy ≤ exact SeqLip ≤ AutoLip
        assert ratio <= num(r, "Theorem 3 bound on SeqLip/AutoLip (mean)") * (1 + REL)
        assert ratio >= 0.5 / math.pi ** (k - 1)  # near 1/π per pair, never far below
        assert num(r, "1/π^(K−1)") == pytest.approx(math.pi ** -(k - 1))
        if k == 1:
            assert ratio == pytest.approx(1.0, rel=REL)
        assert "RANDOM" in r["weights"]
    assert_pngs(out, ["ratio_vs_layers.png"])


@pytest.mark.slow
def test_paper_mlp_quick(tmp_path):
    out = run_quick(tmp_path, "paper_mlp")
    (row,) = read_table(out)
    depth, width = 3, 8  # the quick network
    net = paper_mlp(depth, width)
    net.load_state_dict(torch.load(tmp_path / "run" / "weights" / f"depth{depth}.pt"))
    al = num(row, "AutoLip (certified upper)")
    sl = num(row, "SeqLip exact (certified upper)")
    gsl = num(row, "greedy SeqLip (estimate)")
    assert al == pytest.approx(spectral_product(net), rel=REL)
    assert num(row, "Frobenius product (certified upper)") == pytest.approx(
        frobenius_product(net), rel=REL
    )
    assert al <= num(row, "Frobenius product (certified upper)") * (1 + REL)
    assert sl <= al * (1 + REL)
    assert gsl <= sl * (1 + REL)
    assert sl >= max_pattern_bound(net) * (1 - REL)
    x = 4 * torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    assert jacobian_norm_max(net, x) <= sl * (1 + REL)
    for column in ("LB data", "LB annealing", "LB grid"):
        assert 0 < num(row, f"{column} (certified lower)") <= sl * (1 + REL)
    assert num(row, "AutoLip/SeqLip") == pytest.approx(al / sl, rel=REL)
    assert num(row, "paper AutoLip") is None  # no paper row for depth 3
    assert "GP" in row["data"] and "trained" in row["weights"]
    curves = list(csv.DictReader((out / "curves.csv").read_text().splitlines()))
    assert curves and all(r["run"] == "depth3" for r in curves)
    assert_pngs(out, ["bound_curves.png", "ratio_vs_depth.png"])


@pytest.mark.slow
def test_paper_cnn_quick(tmp_path):
    out = run_quick(tmp_path, "paper_cnn", ["study.prefer_fashion_mnist=false"])
    (row,) = read_table(out)
    assert "SUBSTITUTE for MNIST" in row["data"]
    assert "SUBSTITUTE" in (out / "table.md").read_text()
    al = num(row, "AutoLip (certified upper)")
    assert num(row, "AutoLip estimate") <= al * (1 + REL)
    gsl = next(num(row, c) for c in row if c.startswith("greedy SeqLip top-"))
    assert 0 < gsl <= al * (1 + REL)
    lb_data = num(row, "LB data (certified lower)")
    lb_anneal = num(row, "LB annealing (certified lower)")
    assert 0 < lb_data <= lb_anneal * (1 + REL)  # annealing starts from the same images
    assert lb_anneal <= al
    assert num(row, "SeqLip exact (certified upper)") is None
    assert num(row, "paper AutoLip") == 174.0
    net = mnist_cnn4()
    net.load_state_dict(torch.load(tmp_path / "run" / "weights" / "cnn.pt"))
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert jacobian_norm_max(net, x) <= al * (1 + REL)
    assert_pngs(out, ["bound_curves.png", "bounds_vs_depth.png"])


def test_paper_cnn_prefers_installed_fashion_mnist_and_labels_it(tmp_path, monkeypatch):
    import experiments.data as data_module

    root = tmp_path / "fashion-mnist"
    root.mkdir()
    gen = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 120), ("t10k", 40)):
        images = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        labels = (torch.arange(n) % 10).to(torch.uint8)
        head = struct.pack(">IIII", 2051, n, 28, 28)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(head + images.numpy().tobytes())
        )
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">II", 2049, n) + labels.numpy().tobytes())
        )
    monkeypatch.setattr(data_module, "DEFAULT_FASHION_MNIST_ROOT", str(root))
    cfg = make_cfg(tmp_path, "paper_cnn")
    assert paper_cnn.cnn_data(cfg, False, 100) is None  # study.prefer_fashion_mnist=false
    data = paper_cnn.cnn_data(cfg, True, 100)
    assert data is not None and data._target_.endswith("FashionMNISTDataModule")
    datamodule = instantiate(driver.run_cfg(cfg, "cnn", data=data).data)
    datamodule.setup("fit")
    driver.mark_substitute(datamodule, "MNIST")
    assert "Fashion-MNIST" in datamodule.description
    assert "SUBSTITUTE for MNIST" in datamodule.description


@pytest.mark.slow
def test_paper_alexnet_quick(tmp_path):
    out = run_quick(tmp_path, "paper_alexnet")
    (row,) = read_table(out)
    assert "RANDOM weights" in row["weights"] and "quick" in row["network"]
    al = num(row, "AutoLip (certified upper)")
    est = num(row, "AutoLip estimate")
    pools = num(row, "max-pool factors")
    product = next(num(row, c) for c in row if c.startswith("product of the"))
    assert est <= al * (1 + REL)
    assert pools in (1.0, 2.0, 4.0, 8.0)  # each 3x3/2 max-pool contributes 1 or 2
    assert product * pools == pytest.approx(est, rel=REL)
    gsl = next(num(row, c) for c in row if c.startswith("greedy SeqLip top-"))
    assert 0 < gsl <= al * (1 + REL)
    assert 0 < num(row, "LB (certified lower)") <= al
    assert num(row, "paper AutoLip (product of 8 layer norms)") == 3.62e7
    assert "SUBSTITUTE for ImageNet" in row["data"]
    assert (out / "layers.csv").is_file()
    assert_pngs(out, ["bounds.png"])


@pytest.mark.slow
def test_penalty_sweep_quick(tmp_path):
    out = run_quick(tmp_path, "penalty_sweep")
    rows = read_table(out)
    assert [float(r["penalty weight"]) for r in rows] == [0.0, 0.1]
    for r in rows:
        al = num(r, "AutoLip (certified upper)")
        assert 0 <= num(r, "test accuracy") <= 1
        assert num(r, "greedy SeqLip (estimate)") <= al * (1 + REL)
        assert num(r, "LB annealing (certified lower)") <= al
        assert "SUBSTITUTE for MNIST" in r["data"]
    assert num(rows[0], "final penalty term") == 0.0  # weight 0 adds nothing to the loss
    assert num(rows[1], "final penalty term") != 0.0
    assert_pngs(out, ["accuracy_vs_bound.png", "bound_curves.png"])


@pytest.mark.slow
def test_penalty_sweep_mlp_seqlip_penalty_quick(tmp_path):
    out = run_quick(tmp_path, "penalty_sweep_mlp")
    rows = read_table(out)
    for r in rows:
        al = num(r, "AutoLip (certified upper)")
        sl = num(r, "SeqLip exact (certified upper)")
        assert num(r, "test MSE") > 0
        assert sl <= al * (1 + REL)
        assert num(r, "greedy SeqLip (estimate)") <= sl * (1 + REL)
        assert num(r, "LB annealing (certified lower)") <= sl * (1 + REL)
        assert "seqlip" in r["weights"]
    net = paper_mlp(4, 8)
    net.load_state_dict(torch.load(tmp_path / "run" / "weights" / "weight0.1.pt"))
    assert num(rows[1], "AutoLip (certified upper)") == pytest.approx(
        spectral_product(net), rel=REL
    )
    assert_pngs(out, ["accuracy_vs_bound.png", "bound_curves.png"])


# --------------------------------------------------------------------------------------------
# Outputs: the run directory by default; results/ only through an explicit, atomic publish
# --------------------------------------------------------------------------------------------


def tree_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_study_run_leaves_the_committed_results_untouched(tmp_path):
    """With the repository's real results/ as paths.results_dir, a study run (quick) writes
    into its run directory and not one byte of results/ changes."""
    results = ROOT / "results"
    before = tree_digest(results)
    assert before, "the repository's results/ folder is expected to hold the committed tables"
    cfg = make_cfg(tmp_path, "paper_random", ["study.quick=true", f"paths.results_dir={results}"])
    assert str(cfg.paths.results_dir) == str(results)
    train(cfg)
    assert tree_digest(results) == before
    assert (tmp_path / "run" / "table.md").is_file()
    assert (tmp_path / "run" / "ratio_vs_layers.png").is_file()


def test_publish_replaces_whole_tables_and_refuses_unfinished_or_quick_runs(tmp_path):
    out = run_quick(tmp_path, "paper_random")
    results = tmp_path / "published"
    old = results / "paper_random"
    old.mkdir(parents=True)
    (old / "table.md").write_text("# the old table\n")
    (old / "notes.txt").write_text("kept")
    with pytest.raises(ValueError, match="quick"):
        publish(out, results)
    assert (old / "table.md").read_text() == "# the old table\n"
    dest = publish(out, results, allow_quick=True)
    assert dest == old
    manifest = json.loads((out / driver.MANIFEST).read_text())
    for name in manifest["files"]:
        assert (dest / name).read_bytes() == (out / name).read_bytes(), name
    assert (dest / "notes.txt").read_text() == "kept"  # files it does not publish stay
    assert not list(dest.glob(".*tmp"))
    unfinished = tmp_path / "killed_run"
    shutil.copytree(out, unfinished)
    (unfinished / driver.MANIFEST).unlink()  # a killed study never wrote its manifest
    with pytest.raises(FileNotFoundError, match="did not finish"):
        publish(unfinished, results, allow_quick=True)


def test_a_publish_killed_mid_file_leaves_the_old_table_whole(tmp_path, monkeypatch):
    """A failure while a table is being written (here: os.replace never happens) leaves the
    committed file as it was and no temporary file behind."""
    out = run_quick(tmp_path, "paper_random")
    dest = tmp_path / "published" / "paper_random"
    dest.mkdir(parents=True)
    (dest / "table.md").write_text("# the old table\n")

    def killed(src, dst):
        raise KeyboardInterrupt("killed during publish")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        publish(out, tmp_path / "published", allow_quick=True)
    assert (dest / "table.md").read_text() == "# the old table\n"
    assert sorted(p.name for p in dest.iterdir()) == ["table.md"]


def test_study_publish_flag_publishes_after_the_run(tmp_path):
    small = ["study.max_layers=2", "study.seeds=1", "study.ratios=[0.5]"]  # a full, small run
    cfg = make_cfg(tmp_path, "paper_random", [*small, "study.publish=true"])
    train(cfg)
    published = tmp_path / "results" / "paper_random"
    for name in ("table.md", "table.csv", "ratio_vs_layers.png"):
        assert (published / name).read_bytes() == (tmp_path / "run" / name).read_bytes()
    quick = make_cfg(tmp_path / "q", "paper_random", ["study.quick=true", "study.publish=true"])
    with pytest.raises(ValueError, match="quick"):  # quick numbers are never published
        train(quick)
    assert not (tmp_path / "q" / "results").exists()


def test_main_table_is_narrow_and_csv_is_complete(tmp_path):
    out = run_quick(tmp_path, "paper_random")  # checks the main table's width
    md = (out / "table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| "))
    assert "time (s)" not in header and "weights" not in header
    assert "time (s)" in read_table(out)[0] and "weights" in read_table(out)[0]


def test_plot_points_sorts_sweeps_and_skips_missing_values():
    """A sweep given out of order is drawn in x order (no zig-zag line); values that were not
    computed ('–', None, NaN) or are not positive (log axis) are left out; the legend shows
    the marker."""
    fig, ax = reporting.new_figure()
    drawn = reporting.plot_points(
        ax,
        [(3, 9.0), (1, 1.0), (2, None), (4, "–"), (5, float("nan")), (6, 0.0), (0, 0.5)],
        label="sweep",
    )
    assert drawn
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0.0, 1.0, 3.0] and list(line.get_ydata()) == [0.5, 1.0, 9.0]
    assert line.get_marker() == "o"
    reporting.finish_axes(ax, "x", "y", "t")
    assert ax.get_yscale() == "log" and ax.get_legend() is not None
    assert not reporting.plot_points(ax, [(1, None)])
    scatter_fig, scatter_ax = reporting.new_figure()
    reporting.plot_points(scatter_ax, [(2, 1.0), (1, 2.0)], join=False)
    assert scatter_ax.get_lines()[0].get_linestyle() == "None"
    import matplotlib.pyplot as plt

    plt.close(fig)
    plt.close(scatter_fig)
