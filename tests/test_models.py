"""Tests of ``lipreg.models``: the paper's architectures and the benchmark-network loaders.

Ground truths used here are independent of the code under test: layer shapes from
``paper.md`` section 3.3, numbers published in ``benchmarks/nets/README.md`` and the
per-seed values of the GLipSDP authors' own summary file, the raw ``.mat`` arrays read with
scipy, exact operator norms of dense matrices, and the accuracy of the trained digits networks
on scikit-learn's digits.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipreg.models import (
    GLIPSDP_SEEDS,
    PAPER_INPUT_SHAPES,
    PAPER_MODELS,
    PUBLISHED,
    FeaturePermute,
    default_benchmark_dir,
    load_glipsdp,
    load_glipsdp_summary,
    load_lipsdp,
    mlp,
    mnist_cnn4,
    mnist_cnn5,
    mnist_cnn7,
    mnist_cnn10,
)

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
ORDERS = ("chw", "hwc", "whc")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def dense_ops(model: nn.Sequential, input_shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Dense matrices of the affine layers of ``model`` (biases dropped), in order.

    A convolution's matrix is built by applying ``F.conv2d`` to the identity basis of its input
    space, so its spectral norm is the exact operator norm on that input size.
    """
    ops: list[torch.Tensor] = []
    shape = tuple(input_shape)
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            n = math.prod(shape)
            basis = torch.eye(n, dtype=layer.weight.dtype).reshape(n, *shape)
            out = F.conv2d(basis, layer.weight.detach(), None, layer.stride, layer.padding)
            ops.append(out.reshape(n, -1).T)
            shape = tuple(out.shape[1:])
        elif isinstance(layer, nn.Linear):
            ops.append(layer.weight.detach())
            shape = (layer.out_features,)
        elif isinstance(layer, nn.Flatten):
            shape = (math.prod(shape),)
        elif isinstance(layer, FeaturePermute):
            shape = tuple(shape[d] for d in layer.dims)
        elif not isinstance(layer, nn.ReLU):
            raise TypeError(f"unexpected layer {layer}")
    return ops


def spec(a: torch.Tensor) -> float:
    """Spectral norm."""
    return float(torch.linalg.matrix_norm(a, ord=2))


def product_of_norms(ops: list[torch.Tensor]) -> float:
    return math.prod(spec(a) for a in ops)


def liplt(ops: list[torch.Tensor]) -> float:
    """LipLT bound for ``W_K relu(... relu(W_1 x))`` (ReLU slopes in [0, 1]).

    Writing relu = 1/2 id + 1/2 psi with psi 1-Lipschitz gives
    ``L_k = ||W_k m W_{k-1} ... m W_1|| + r sum_j ||W_k m W_{k-1} ... m W_{j+1}|| L_j``
    with ``m = r = 1/2``.
    """
    bounds: list[float] = [spec(ops[0])]
    for k in range(1, len(ops)):
        chain = ops[k]
        total = 0.0
        for j in range(k - 1, -1, -1):
            total += 0.5 * spec(chain) * bounds[j]
            chain = 0.5 * chain @ ops[j]
        bounds.append(total + spec(chain))
    return bounds[-1]


def sampled_gradient_lb(model: nn.Module, shape: tuple[int, ...], n: int, seed: int) -> float:
    """max ||grad f(x)|| over Gaussian points: a lower bound of the Lipschitz constant of a
    scalar-output piecewise-linear network (the points are a.s. differentiability points)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, dtype=torch.float64, generator=gen, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    return float(grad.flatten(1).norm(dim=1).max())


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------------------------------------
# paper models
# ---------------------------------------------------------------------------------------------


def test_mlp_structure_and_shapes() -> None:
    model = mlp()
    assert isinstance(model, nn.Sequential)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (2, 20),
        (20, 20),
        (20, 20),
        (20, 1),
    ]
    assert sum(isinstance(m, nn.ReLU) for m in model) == 3
    assert isinstance(model[-1], nn.Linear)
    assert model(torch.zeros(5, 2)).shape == (5, 1)

    other = mlp(3, (7,), 4, activation=nn.Tanh)
    assert [type(m) for m in other] == [nn.Linear, nn.Tanh, nn.Linear]
    assert other(torch.zeros(2, 3)).shape == (2, 4)
    assert [type(m) for m in mlp(hidden=())] == [nn.Linear]


def _spatial_sizes(model: nn.Sequential, x: torch.Tensor) -> list[int]:
    sizes = [x.shape[-1]]
    for layer in model:
        x = layer(x)
        if isinstance(layer, nn.Conv2d):
            assert x.shape[-1] == x.shape[-2]
            sizes.append(x.shape[-1])
    return sizes


@pytest.mark.parametrize(
    ("factory", "n_convs", "sizes"),
    [
        (mnist_cnn4, 4, [28, 12, 5, 2, 1]),
        (mnist_cnn5, 5, [28, 12, 5, 5, 2, 1]),
        (mnist_cnn7, 7, [28, 12, 12, 5, 5, 2, 2, 1]),
        (mnist_cnn10, 10, [28, 12, 12, 12, 5, 5, 5, 2, 2, 2, 1]),
    ],
)
def test_mnist_cnns(factory, n_convs: int, sizes: list[int]) -> None:
    model = factory()
    assert isinstance(model, nn.Sequential)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert len(convs) == n_convs
    assert sum(isinstance(m, nn.ReLU) for m in model) == n_convs - 1
    assert all(isinstance(m, nn.Conv2d | nn.ReLU | nn.Flatten) for m in model)
    assert isinstance(model[-1], nn.Flatten) and isinstance(model[-2], nn.Conv2d)
    assert convs[0].in_channels == 1 and convs[-1].out_channels == 10
    x = torch.randn(3, 1, 28, 28)
    assert _spatial_sizes(model, x) == sizes
    assert model(x).shape == (3, 10)


def test_mnist_cnn4_matches_reference_layers() -> None:
    convs = [m for m in mnist_cnn4() if isinstance(m, nn.Conv2d)]
    got = [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs]
    assert got == [
        (1, 32, (5, 5), (2, 2), (0, 0)),
        (32, 64, (3, 3), (2, 2), (0, 0)),
        (64, 128, (3, 3), (2, 2), (0, 0)),
        (128, 10, (2, 2), (1, 1), (0, 0)),
    ]
    convs5 = [m for m in mnist_cnn5() if isinstance(m, nn.Conv2d)]
    assert (convs5[2].in_channels, convs5[2].out_channels, convs5[2].padding) == (64, 64, (1, 1))


def test_registry_forward() -> None:
    assert set(PAPER_MODELS) == set(PAPER_INPUT_SHAPES)
    for name, factory in PAPER_MODELS.items():
        if name == "alexnet":
            continue  # covered by test_alexnet
        shape = PAPER_INPUT_SHAPES[name]
        out = factory()(torch.zeros(2, *shape))
        assert out.shape[0] == 2


def test_alexnet() -> None:
    pytest.importorskip("torchvision")
    model = PAPER_MODELS["alexnet"]()
    assert model(torch.zeros(2, *PAPER_INPUT_SHAPES["alexnet"])).shape == (2, 1000)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [64, 192, 384, 256, 256]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (9216, 4096),
        (4096, 4096),
        (4096, 1000),
    ]


# ---------------------------------------------------------------------------------------------
# benchmark networks
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_dir() -> Path:
    path = default_benchmark_dir()
    if not path.is_dir():
        pytest.skip(f"benchmark-network folder {path} not found (set LIPREG_BENCHMARK_NETS)")
    return path


@pytest.fixture(scope="module")
def summary(bench_dir: Path) -> dict:
    return load_glipsdp_summary(bench_dir)


def test_default_benchmark_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LIPREG_BENCHMARK_NETS", raising=False)
    assert default_benchmark_dir() == REPO_ROOT / "benchmarks" / "nets"
    assert (REPO_ROOT / "benchmarks" / "nets" / "lipsdp_random_2-10-30-20-2.mat").is_file()
    monkeypatch.setenv("LIPREG_BENCHMARK_NETS", str(tmp_path))
    assert default_benchmark_dir() == tmp_path
    with pytest.raises(FileNotFoundError):
        load_lipsdp("random", tmp_path / "missing")


@pytest.mark.parametrize(
    ("name", "sizes"), [("random", [2, 10, 30, 20, 2]), ("mnist", [784, 50, 10])]
)
def test_lipsdp_product_of_norms(bench_dir: Path, name: str, sizes: list[int]) -> None:
    from scipy.io import loadmat

    net = load_lipsdp(name, bench_dir)
    assert net.meta["layer_sizes"] == sizes
    linears = [m for m in net.model if isinstance(m, nn.Linear)]
    assert all(m.bias is None and m.weight.dtype == torch.float64 for m in linears)
    raw = loadmat(net.meta["path"])["weights"].ravel()
    for layer, w in zip(linears, raw, strict=True):
        np.testing.assert_array_equal(layer.weight.detach().numpy(), w)
    published = PUBLISHED["lipsdp"][name]["product_of_norms"]
    assert rel(product_of_norms([m.weight.detach() for m in linears]), published) < 1e-3


def test_lipsdp_random_exact_constant(bench_dir: Path) -> None:
    """The random net has a 2-D input and no biases: it is positively homogeneous, so its
    Lipschitz constant is the max of the Jacobian norm over directions (README: 36.48223)."""
    model = load_lipsdp("random", bench_dir).model
    theta = torch.linspace(0, 2 * math.pi, 100_001, dtype=torch.float64)[:-1]
    x = torch.stack([theta.cos(), theta.sin()], dim=1).requires_grad_(True)
    y = model(x)
    rows = [torch.autograd.grad(y[:, k].sum(), x, retain_graph=True)[0] for k in range(2)]
    jac = torch.stack(rows, dim=1)
    best = float(torch.linalg.matrix_norm(jac, ord=2).max())
    exact = PUBLISHED["lipsdp"]["random"]["exact"]
    assert abs(best - exact) < 1e-5 * exact
    assert best <= PUBLISHED["lipsdp"]["random"]["lipsdp_neuron"] + 1e-3


def test_glipsdp_summary_matches_readme(summary: dict) -> None:
    for arch, methods in PUBLISHED["glipsdp"].items():
        for method, value in methods.items():
            entry = summary[arch][method]
            assert abs(entry["mean"] - value) <= 5e-4 + 1e-12, (arch, method)
            assert entry["values"].shape == (len(GLIPSDP_SEEDS),)
            assert abs(entry["values"].mean() - entry["mean"]) < 1e-9


def test_glipsdp_fnn_matches_raw_arrays(bench_dir: Path) -> None:
    """Logit 7 of the loaded FNN-2 equals the computation done by hand on the stored arrays."""
    from scipy.io import loadmat

    net = load_glipsdp("fnn2", 3, bench_dir)
    raw = {
        k: np.asarray(v, dtype=np.float64)
        for k, v in loadmat(net.meta["path"]).items()
        if not k.startswith("__")
    }
    x = np.random.default_rng(0).standard_normal((7, 64))
    hidden = np.maximum(x @ raw["fc1_weight"] + raw["fc1_bias"], 0.0)
    expected = hidden @ raw["fc2_weight"][:, 7] + raw["fc2_bias"][0, 7]
    got = net.model(torch.from_numpy(x)).detach().numpy()
    assert got.shape == (7, 1)
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-12)
    assert net.meta["input_mean"].shape == (64,) and np.all(net.meta["input_scale"] > 0)
    full = load_glipsdp("fnn2", 3, bench_dir, output_index=None).model
    assert full(torch.zeros(1, 64, dtype=torch.float64)).shape == (1, 10)
    with pytest.raises(ValueError):
        load_glipsdp("fnn2", 3, bench_dir, output_index=10)


@pytest.mark.parametrize("arch", ["fnn2", "fnn3"])
def test_glipsdp_fnn_product_of_norms(bench_dir: Path, summary: dict, arch: str) -> None:
    """The published product of norms uses the last layer's zero-based row 7 (MATLAB row 8).

    Neither the README's "index 8, zero-based" nor the full 10-row last layer reproduces it.
    """
    per_seed = {}
    for index in (7, 8, None):
        per_seed[index] = np.array(
            [
                product_of_norms(
                    dense_ops(load_glipsdp(arch, s, bench_dir, output_index=index).model, (64,))
                )
                for s in GLIPSDP_SEEDS
            ]
        )
    published = summary[arch]["product_of_norms"]["values"]
    np.testing.assert_allclose(per_seed[7], published, rtol=1e-9)
    assert rel(per_seed[7].mean(), PUBLISHED["glipsdp"][arch]["product_of_norms"]) < 1e-3
    for index in (8, None):
        assert rel(per_seed[index].mean(), PUBLISHED["glipsdp"][arch]["product_of_norms"]) > 0.05
    # The FNNs' LipLT values are reproduced too (a check of the layer orientation).
    liplt_values = [
        liplt(dense_ops(load_glipsdp(arch, s, bench_dir).model, (64,))) for s in GLIPSDP_SEEDS
    ]
    np.testing.assert_allclose(liplt_values, summary[arch]["liplt"]["values"], rtol=1e-9)


@pytest.mark.parametrize("arch", ["cnn2", "cnn3"])
def test_glipsdp_cnn_bounds_and_flatten_order(bench_dir: Path, summary: dict, arch: str) -> None:
    """Product of norms (order-independent) and LipLT (order-dependent) against the published
    per-seed values: only the ``"whc"`` flatten order reproduces LipLT."""
    products = {o: [] for o in ORDERS}
    liplts = {o: [] for o in ORDERS}
    for s in GLIPSDP_SEEDS:
        for order in ORDERS:
            ops = dense_ops(load_glipsdp(arch, s, bench_dir, flatten_order=order).model, (1, 8, 8))
            products[order].append(product_of_norms(ops))
            liplts[order].append(liplt(ops))
    # a permutation of the features is an isometry: the product of norms does not see it
    np.testing.assert_allclose(products["hwc"], products["chw"], rtol=1e-12)
    np.testing.assert_allclose(products["whc"], products["chw"], rtol=1e-12)
    np.testing.assert_allclose(
        products["chw"], summary[arch]["product_of_norms"]["values"], rtol=1e-9
    )
    assert (
        rel(float(np.mean(products["chw"])), PUBLISHED["glipsdp"][arch]["product_of_norms"]) < 1e-3
    )
    # LipLT depends on the order; the published values are those of "whc"
    published_lt = summary[arch]["liplt"]["values"]
    np.testing.assert_allclose(liplts["whc"], published_lt, rtol=1e-9)
    for order in ("chw", "hwc"):
        assert np.max(np.abs(np.array(liplts[order]) - published_lt) / published_lt) > 1e-2


def test_glipsdp_published_lipsdp_is_not_a_bound_of_the_chw_network(
    bench_dir: Path, summary: dict
) -> None:
    """A gradient norm of the PyTorch-ordered ("chw", as trained) CNN-2 of seed 1 exceeds the
    published LipSDP value, so the published numbers cannot refer to that network; the
    "whc" network stays below it."""
    seed = 1
    lipsdp = float(summary["cnn2"]["lipsdp"]["values"][seed])
    lb = {
        order: sampled_gradient_lb(
            load_glipsdp("cnn2", seed, bench_dir, flatten_order=order).model, (1, 8, 8), 4000, 0
        )
        for order in ("chw", "whc")
    }
    assert lb["chw"] > 1.1 * lipsdp
    assert lb["whc"] <= lipsdp


def test_glipsdp_cnn_orders_differ_and_fold_is_exact(bench_dir: Path) -> None:
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs = {}
    for order in ORDERS:
        folded = load_glipsdp("cnn3", 0, bench_dir, flatten_order=order, output_index=None).model
        explicit = load_glipsdp(
            "cnn3", 0, bench_dir, flatten_order=order, output_index=None, fold_flatten=False
        ).model
        assert all(type(m) in (nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear) for m in folded)
        outs[order] = folded(x).detach()
        assert outs[order].shape == (6, 10)
        torch.testing.assert_close(explicit(x).detach(), outs[order], rtol=1e-12, atol=1e-12)
    for a, b in (("chw", "hwc"), ("chw", "whc"), ("hwc", "whc")):
        assert not torch.allclose(outs[a], outs[b])


@pytest.mark.parametrize("arch", ["fnn2", "cnn2", "cnn3"])
def test_glipsdp_networks_classify_digits(bench_dir: Path, arch: str) -> None:
    """The networks as trained (PyTorch "chw" order, all 10 logits) classify scikit-learn's
    digits well, which checks weight orientation and conv layout end to end."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    net = load_glipsdp(arch, 0, bench_dir, output_index=None, flatten_order="chw")
    x = (digits.data - net.meta["input_mean"]) / net.meta["input_scale"]
    inputs = torch.from_numpy(x).reshape(-1, *net.meta["input_shape"])
    accuracy = (net.model(inputs).argmax(1).numpy() == digits.target).mean()
    assert accuracy > 0.95


def test_a_missing_optional_dependency_says_what_needs_it_and_how_to_install_it():
    from lipreg.models.optional import import_optional

    assert import_optional("math", "a test", "`pip install nothing`").sqrt(4.0) == 2.0
    with pytest.raises(ImportError, match=r"a feature needs no_such_pkg_h8.*`pip install x`"):
        import_optional("no_such_pkg_h8.sub", "a feature", "`pip install x`")
