"""Loaders of public benchmark networks whose Lipschitz bounds other projects have published.

The networks are MATLAB ``.mat`` files kept outside the repository, in the folder described
by ``benchmarks/nets/README.md`` (see :func:`default_benchmark_dir`). Each loader returns a
:class:`LoadedNet`: a plain ``nn.Sequential`` (``Linear`` / ``Conv2d`` / ``ReLU`` /
``Flatten``, float64 by default) and a metadata dict holding, among others, the published
numbers of :data:`PUBLISHED`.

Two families are supported.

* **LipSDP** (``arobey1/LipSDP``): :func:`load_lipsdp`. Key ``weights``, a ``1 x K`` cell of
  ``out x in`` matrices, no biases.
* **GLipSDP** (``ppauli/GLipSDP``, networks trained on scikit-learn's 8x8 digits, 10 seeds):
  :func:`load_glipsdp` and :func:`load_glipsdp_summary`.

Facts established on these files (they correct two statements of the folder's README):

1. **Output index.** The published GLipSDP numbers bound the map to the logit of zero-based
   index **7**, not 8. The authors' MATLAB scripts select ``W_all{end}(8,:)``, and MATLAB indexes
   from 1. With zero-based row 7 the product of layer norms reproduces the published per-seed
   values of all four architectures to ~1e-15 relative (means 7.228 / 14.936 / 11.475 / 30.792);
   with row 8 it is off by up to 30 %. :data:`GLIPSDP_OUTPUT_INDEX` is therefore 7.
2. **Flatten order of the CNNs.** The authors turn each convolution into a matrix acting on
   MATLAB column-major vectors of ``(c, h, w)`` arrays, i.e. on C-order flattenings of
   ``(w, h, c)``, and apply the PyTorch-exported FC rows to those vectors unchanged. The
   published CNN numbers therefore bound the network whose features are flattened in
   ``"whc"`` order (our name). This is checked: the LipLT bound, which depends on the flatten
   order, reproduces the published per-seed LipLT values of CNN-2 and CNN-3 only with
   ``"whc"`` (to ~1e-15 relative); ``"chw"`` (PyTorch's, the order the networks were trained
   with) is ~30 % off and ``"hwc"`` (Keras style) a few % off. The product of layer norms
   cannot tell the orders apart (a permutation is an isometry). Moreover a sampled gradient
   norm of the ``"chw"`` CNN-2 of seed 1 (about 5.18) exceeds its published LipSDP value
   (4.24), so the published bounds are not bounds of the networks as trained.

Sources of the two facts: ``Comparison/evaluate_single_model_lipschitz.m`` (row selection) and
``utils/conv_layer_to_fc.m`` (column-major ``sub2ind`` over ``[c, h, w]``) in ppauli/GLipSDP.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import nn

from lipreg.models.optional import import_optional

__all__ = [
    "BENCHMARK_DIR_ENV",
    "GLIPSDP_ARCHS",
    "GLIPSDP_FLATTEN_ORDER",
    "GLIPSDP_METHOD_NAMES",
    "GLIPSDP_OUTPUT_INDEX",
    "GLIPSDP_SEEDS",
    "LIPSDP_FILES",
    "PUBLISHED",
    "FeaturePermute",
    "FlattenOrder",
    "LoadedNet",
    "default_benchmark_dir",
    "load_glipsdp",
    "load_glipsdp_summary",
    "load_lipsdp",
]

#: Environment variable that, when set, overrides :func:`default_benchmark_dir`.
BENCHMARK_DIR_ENV = "LIPREG_BENCHMARK_NETS"

#: Short names of the two LipSDP networks and their file names.
LIPSDP_FILES: dict[str, str] = {
    "random": "lipsdp_random_2-10-30-20-2.mat",
    "mnist": "lipsdp_mnist_784-50-10.mat",
}

#: The four GLipSDP architectures: number of convolutions and of fully connected layers.
GLIPSDP_ARCHS: dict[str, tuple[int, int]] = {
    "fnn2": (0, 2),
    "fnn3": (0, 3),
    "cnn2": (1, 1),
    "cnn3": (2, 1),
}

#: Seeds of the GLipSDP networks.
GLIPSDP_SEEDS: tuple[int, ...] = tuple(range(10))

#: Zero-based index of the logit bounded by the published GLipSDP numbers (MATLAB row 8).
GLIPSDP_OUTPUT_INDEX = 7

FlattenOrder = Literal["chw", "hwc", "whc"]

#: Flatten order assumed by the published GLipSDP CNN numbers (see the module docstring).
GLIPSDP_FLATTEN_ORDER: FlattenOrder = "whc"

#: Axis permutation applied to a ``(C, H, W)`` feature map before flattening, per order.
_FLATTEN_PERMS: dict[str, tuple[int, int, int]] = {
    "chw": (0, 1, 2),
    "hwc": (1, 2, 0),
    "whc": (2, 1, 0),
}

#: Field names of the GLipSDP summary file -> our method names.
GLIPSDP_METHOD_NAMES: dict[str, str] = {
    "Lip_MP": "product_of_norms",
    "Lip_LT": "liplt",
    "Lip_LipSDP": "lipsdp",
    "Lip_SepLip": "seqlip_theirs",
    "Lip_lb": "lower_bound_sampled",
    "Lip_GLipSDP": "glipsdp",
    "Lip_GLipSDP_c": "glipsdp_conv",
    "Lip_LiPopt": "lipopt",
}

#: Published numbers, copied from ``benchmarks/nets/README.md``. All are global
#: l2 -> l2 Lipschitz values. GLipSDP values are means over the 10 seeds and refer to logit
#: :data:`GLIPSDP_OUTPUT_INDEX` (zero-based 7) and, for the CNNs, to flatten order
#: :data:`GLIPSDP_FLATTEN_ORDER`.
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "lipsdp": {
        "random": {
            "product_of_norms": 43.306,
            "lipsdp_layer": 39.839,
            "lipsdp_neuron": 36.482,
            "exact": 36.48223,
        },
        "mnist": {
            "product_of_norms": 31.504,
            "lipsdp_layer": 26.256,
            "lipsdp_neuron": 24.367,
            "lipsdp_network": 24.32,
            "lower_bound": 24.299,
        },
    },
    "glipsdp": {
        "fnn2": {
            "product_of_norms": 7.228,
            "liplt": 6.190,
            "lipsdp": 5.275,
            "seqlip_theirs": 5.153,
            "lower_bound_sampled": 3.990,
        },
        "fnn3": {
            "product_of_norms": 14.936,
            "liplt": 11.434,
            "lipsdp": 8.550,
            "seqlip_theirs": 10.676,
            "lower_bound_sampled": 5.954,
        },
        "cnn2": {
            "product_of_norms": 11.475,
            "liplt": 7.095,
            "lipsdp": 4.938,
            "seqlip_theirs": 2.714,
            "lower_bound_sampled": 2.710,
        },
        "cnn3": {
            "product_of_norms": 30.792,
            "liplt": 17.802,
            "lipsdp": 10.776,
            "seqlip_theirs": 11.728,
            "lower_bound_sampled": 3.475,
        },
    },
}

_GLIPSDP_SUMMARY_FILE = "glipsdp_digits_summary.mat"
_GLIPSDP_IMAGE_SHAPE = (8, 8)


class LoadedNet(NamedTuple):
    """A loaded benchmark network: the model and its metadata."""

    model: nn.Sequential
    meta: dict[str, Any]


class FeaturePermute(nn.Module):
    """Permute the non-batch axes of a tensor, e.g. ``(B, C, H, W) -> (B, H, W, C)``.

    Args:
        dims: Permutation of the non-batch axes, e.g. ``(1, 2, 0)`` for ``(C, H, W) ->
            (H, W, C)``.
    """

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = tuple(int(d) for d in dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x.permute(0, *(d + 1 for d in dims))``."""
        return x.permute(0, *(d + 1 for d in self.dims))

    def extra_repr(self) -> str:
        """Show the permutation in ``repr``."""
        return f"dims={self.dims}"


def default_benchmark_dir() -> Path:
    """Return the folder holding the benchmark networks.

    The environment variable ``LIPREG_BENCHMARK_NETS`` wins if set; otherwise the folder is
    ``benchmarks/nets`` of the repository, where the public networks (1.4 MB of .mat files and
    their README) are committed so that a fresh clone runs every test. The folder is not
    required to exist (an installed, non-editable lipreg has no repository).
    """
    env = os.environ.get(BENCHMARK_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "benchmarks" / "nets"


def _resolve_dir(directory: str | os.PathLike[str] | None) -> Path:
    path = default_benchmark_dir() if directory is None else Path(directory).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"benchmark-network folder {str(path)!r} does not exist; pass `directory=` or set "
            f"the environment variable {BENCHMARK_DIR_ENV}."
        )
    return path


def _loadmat(path: Path, **kwargs: Any) -> dict[str, Any]:
    """``scipy.io.loadmat`` with a lazy import and a clear error if scipy is missing."""
    sio = import_optional("scipy.io", "Loading the benchmark networks", "`pip install scipy`")
    if not path.is_file():
        raise FileNotFoundError(f"benchmark-network file {str(path)!r} not found")
    return sio.loadmat(str(path), **kwargs)


def _tensor(array: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float64)).to(dtype)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """``nn.Linear`` holding copies of ``weight`` (``out x in``) and ``bias``."""
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias.reshape(out_f))
    return layer


def _lipsdp_path(name: str, directory: Path) -> tuple[str, Path]:
    stem = name.removesuffix(".mat")
    if stem in LIPSDP_FILES:
        stem = LIPSDP_FILES[stem].removesuffix(".mat")
    files = {f.removesuffix(".mat") for f in LIPSDP_FILES.values()}
    if stem not in files:
        raise ValueError(
            f"unknown LipSDP network {name!r}; expected one of {sorted(LIPSDP_FILES)} "
            f"or {sorted(files)}"
        )
    return stem, directory / f"{stem}.mat"


def load_lipsdp(
    name: str,
    directory: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> LoadedNet:
    """Load one of the LipSDP example networks (``arobey1/LipSDP``).

    The file's key ``weights`` is a ``1 x K`` cell of ``out x in`` matrices without biases. The
    returned network is ``Linear(bias=False), ReLU, ..., Linear(bias=False)``.

    Args:
        name: ``"random"`` (2-10-30-20-2, random weights) or ``"mnist"`` (784-50-10, trained),
            or the file name with or without ``.mat``.
        directory: Folder of the ``.mat`` files; :func:`default_benchmark_dir` if ``None``.
        dtype: Floating dtype of the weights.

    Returns:
        ``LoadedNet(model, meta)`` with ``meta`` keys ``name``, ``path``, ``input_shape``,
        ``layer_sizes`` and ``published`` (the README numbers of :data:`PUBLISHED`).
    """
    stem, path = _lipsdp_path(name, _resolve_dir(directory))
    data = _loadmat(path)
    cell = data["weights"]
    weights = [_tensor(w, dtype) for w in np.asarray(cell, dtype=object).ravel()]
    for prev, nxt in itertools.pairwise(weights):
        if prev.shape[0] != nxt.shape[1]:
            raise ValueError(
                f"{path}: inconsistent layer shapes {[tuple(w.shape) for w in weights]}"
            )
    layers: list[nn.Module] = []
    for i, w in enumerate(weights):
        if i > 0:
            layers.append(nn.ReLU())
        layers.append(_linear(w, None))
    short = next(k for k, v in LIPSDP_FILES.items() if v == f"{stem}.mat")
    meta: dict[str, Any] = {
        "name": stem,
        "path": str(path),
        "input_shape": (int(weights[0].shape[1]),),
        "layer_sizes": [int(weights[0].shape[1])] + [int(w.shape[0]) for w in weights],
        "published": dict(PUBLISHED["lipsdp"][short]),
    }
    return LoadedNet(nn.Sequential(*layers), meta)


def _glipsdp_layer_keys(data: Mapping[str, Any], kind: str) -> list[str]:
    pattern = re.compile(rf"^{kind}(\d+)_weight$")
    found = [(int(m.group(1)), key) for key in data if (m := pattern.match(key))]
    return [key for _, key in sorted(found)]


def _fold_flatten_order(
    weight: torch.Tensor, feature_shape: tuple[int, int, int], order: str
) -> torch.Tensor:
    """Reorder the columns of an FC weight defined on ``order``-flattened ``(C, H, W)`` features
    so that it acts on PyTorch's ``chw``-flattened features instead."""
    perm = _FLATTEN_PERMS[order]
    stored_shape = tuple(feature_shape[p] for p in perm)
    inverse = tuple(int(i) for i in np.argsort(perm))
    out_f = weight.shape[0]
    w = weight.reshape(out_f, *stored_shape).permute(0, *(i + 1 for i in inverse))
    return w.reshape(out_f, -1).contiguous()


def load_glipsdp(
    arch: str,
    seed: int,
    directory: str | os.PathLike[str] | None = None,
    *,
    output_index: int | None = GLIPSDP_OUTPUT_INDEX,
    flatten_order: FlattenOrder = GLIPSDP_FLATTEN_ORDER,
    fold_flatten: bool = True,
    bias: bool = True,
    dtype: torch.dtype = torch.float64,
) -> LoadedNet:
    """Load one GLipSDP digits network (``glipsdp_digits_{arch}_seed{seed}.mat``).

    File layout: ``fc*_weight`` stored ``in x out``, ``conv*_weight`` stored
    ``kh x kw x in x out`` (3x3, padding 1, stride 1), biases ``1 x out``, and ``input_mean`` /
    ``input_scale`` (``1 x 64``, scikit-learn ``StandardScaler``). The returned network maps the
    **standardised** input ``(x - input_mean) / input_scale`` to the logits; the
    standardisation is *not* part of the model (it is in ``meta``). Input shape ``(64,)`` for
    the FNNs and ``(1, 8, 8)`` (the 64-vector reshaped row-major) for the CNNs.

    Args:
        arch: ``"fnn2"``, ``"fnn3"``, ``"cnn2"`` or ``"cnn3"``.
        seed: Seed 0..9.
        directory: Folder of the ``.mat`` files; :func:`default_benchmark_dir` if ``None``.
        output_index: Keep only this zero-based logit: the last ``Linear`` is sliced to that
            row (a 1-output ``Linear``, so its norm is the row's norm). ``None`` keeps all 10
            logits. The default 7 is the logit the published numbers bound (the authors select
            MATLAB's 1-based row 8; the README's "index 8, zero-based" is wrong).
        flatten_order: CNNs only. Order in which the FC layer's input features are assumed to
            be flattened from the ``(C, 8, 8)`` feature map: ``"chw"`` (PyTorch's; the order
            the networks were trained with), ``"hwc"`` (permute to ``(h, w, c)`` then flatten,
            Keras style) or ``"whc"`` (permute to ``(w, h, c)``: MATLAB's column-major
            flattening of ``(c, h, w)``). The default ``"whc"`` is the order the published CNN
            numbers assume (checked through their per-seed LipLT values; see the module
            docstring).
        fold_flatten: If ``True`` the permutation is folded into the FC weight's columns and
            the model is ``..., nn.Flatten(), nn.Linear`` (same function, plain layers). If
            ``False`` an explicit :class:`FeaturePermute` precedes the ``nn.Flatten``.
        bias: Include the trained biases (they do not change any global Lipschitz constant).
        dtype: Floating dtype of the parameters.

    Returns:
        ``LoadedNet(model, meta)``; ``meta`` keys: ``name``, ``path``, ``arch``, ``seed``,
        ``input_shape``, ``output_index``, ``flatten_order`` (``None`` for FNNs),
        ``input_mean`` and ``input_scale`` (float64 arrays of shape ``(64,)``), and
        ``published`` (README means over the seeds, valid for ``output_index=7`` and, for CNNs,
        ``flatten_order="whc"``).
    """
    if arch not in GLIPSDP_ARCHS:
        raise ValueError(f"unknown GLipSDP architecture {arch!r}; expected {list(GLIPSDP_ARCHS)}")
    if flatten_order not in _FLATTEN_PERMS:
        raise ValueError(
            f"flatten_order must be one of {list(_FLATTEN_PERMS)}, got {flatten_order!r}"
        )
    name = f"glipsdp_digits_{arch}_seed{int(seed)}"
    path = _resolve_dir(directory) / f"{name}.mat"
    data = _loadmat(path)

    conv_keys = _glipsdp_layer_keys(data, "conv")
    fc_keys = _glipsdp_layer_keys(data, "fc")
    n_conv, n_fc = GLIPSDP_ARCHS[arch]
    if (len(conv_keys), len(fc_keys)) != (n_conv, n_fc):
        raise ValueError(
            f"{path}: expected {n_conv} conv and {n_fc} fc layers, found {conv_keys + fc_keys}"
        )

    def _bias(key: str) -> torch.Tensor | None:
        return _tensor(data[key.replace("_weight", "_bias")], dtype).reshape(-1) if bias else None

    layers: list[nn.Module] = []
    height, width = _GLIPSDP_IMAGE_SHAPE
    channels = 1
    for key in conv_keys:
        # stored kh x kw x in x out -> PyTorch out x in x kh x kw
        kernel = _tensor(data[key], dtype).permute(3, 2, 0, 1).contiguous()
        c_out, c_in, kh, kw = kernel.shape
        if c_in != channels:
            raise ValueError(f"{path}: {key} expects {c_in} input channels, got {channels}")
        conv = nn.Conv2d(c_in, c_out, (kh, kw), padding=(kh // 2, kw // 2), bias=bias, dtype=dtype)
        with torch.no_grad():
            conv.weight.copy_(kernel)
            b = _bias(key)
            if b is not None:
                conv.bias.copy_(b)
        layers += [conv, nn.ReLU()]
        channels = c_out

    is_cnn = n_conv > 0
    if is_cnn:
        if fold_flatten or flatten_order == "chw":
            layers.append(nn.Flatten())
        else:
            layers += [FeaturePermute(_FLATTEN_PERMS[flatten_order]), nn.Flatten()]

    for i, key in enumerate(fc_keys):
        weight = _tensor(data[key], dtype).T.contiguous()  # stored in x out
        b = _bias(key)
        last = i == len(fc_keys) - 1
        if last and output_index is not None:
            if not 0 <= output_index < weight.shape[0]:
                raise ValueError(
                    f"output_index {output_index} out of range for {weight.shape[0]} logits"
                )
            weight = weight[output_index : output_index + 1]
            b = None if b is None else b[output_index : output_index + 1]
        if i == 0 and is_cnn and fold_flatten:
            weight = _fold_flatten_order(weight, (channels, height, width), flatten_order)
        if i > 0:
            layers.append(nn.ReLU())
        layers.append(_linear(weight, b))

    meta: dict[str, Any] = {
        "name": name,
        "path": str(path),
        "arch": arch,
        "seed": int(seed),
        "input_shape": (1, height, width) if is_cnn else (height * width,),
        "output_index": output_index,
        "flatten_order": flatten_order if is_cnn else None,
        "input_mean": np.asarray(data["input_mean"], dtype=np.float64).reshape(-1),
        "input_scale": np.asarray(data["input_scale"], dtype=np.float64).reshape(-1),
        "published": dict(PUBLISHED["glipsdp"][arch]),
    }
    return LoadedNet(nn.Sequential(*layers), meta)


def load_glipsdp_summary(
    directory: str | os.PathLike[str] | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Read the published GLipSDP results (``glipsdp_digits_summary.mat``).

    The file holds a struct ``all_results`` with one field per architecture (``fnn2``,
    ``fnn3``, ``cnn2``, ``cnn3``), each with ``individual`` (per-seed ``10 x 1`` arrays) and
    ``summary`` (per method: ``values``, ``mean``, ``std``). Method fields are renamed with
    :data:`GLIPSDP_METHOD_NAMES` (``Lip_MP`` -> ``product_of_norms``, ``Lip_LT`` -> ``liplt``,
    ``Lip_LipSDP`` -> ``lipsdp``, ``Lip_SepLip`` -> ``seqlip_theirs``, ``Lip_lb`` ->
    ``lower_bound_sampled``, ``Lip_GLipSDP`` -> ``glipsdp`` (FNNs), ``Lip_GLipSDP_c`` ->
    ``glipsdp_conv`` (CNNs, their convolutional formulation), ``Lip_LiPopt`` -> ``lipopt``);
    unknown fields keep their name. The README's rounded means are also in :data:`PUBLISHED`
    for when the file is unavailable.

    Args:
        directory: Folder of the ``.mat`` files; :func:`default_benchmark_dir` if ``None``.

    Returns:
        ``{arch: {method: {"mean": float, "std": float, "values": np.ndarray (10,)}}}``. The
        values refer to logit 7 (zero-based) and, for the CNNs, to flatten order ``"whc"``
        (verified for ``product_of_norms`` and ``liplt``; ``glipsdp_conv`` was not checked and
        may assume another order).
    """
    path = _resolve_dir(directory) / _GLIPSDP_SUMMARY_FILE
    data = _loadmat(path, squeeze_me=True, struct_as_record=False)
    results = data["all_results"]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for arch in results._fieldnames:
        summary = getattr(results, arch).summary
        methods: dict[str, dict[str, Any]] = {}
        for field in summary._fieldnames:
            entry = getattr(summary, field)
            methods[GLIPSDP_METHOD_NAMES.get(field, field)] = {
                "mean": float(np.asarray(entry.mean, dtype=np.float64).reshape(-1)[0]),
                "std": float(np.asarray(entry.std, dtype=np.float64).reshape(-1)[0]),
                "values": np.asarray(entry.values, dtype=np.float64).reshape(-1),
            }
        out[arch] = methods
    return out
