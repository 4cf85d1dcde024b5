"""LightningDataModules for the lipreg experiments (paper §3.2–3.4), one file per data set.

Every image module yields batches ``(x, y)``: ``x`` float32 of shape ``(B, C, H, W)``, already
resized to the model's input (``image_size``, ``channels``) and normalised with mean 0.5 and
std 0.5, so pixels lie in ``[-1, 1]`` as in the paper's MNIST code; ``y`` int64 class labels.
Grey images are repeated to 3 channels when ``channels=3``; RGB images are averaged to one
channel when ``channels=1`` (:class:`ImageTransform`). Images are stored at their native size
and resized per item, so a 3x224x224 AlexNet view of a data set costs memory only for the
batches in flight.

Modules (and their :func:`build_datamodule` names):

- ``"digits"``: :class:`DigitsDataModule` (``digits.py``), scikit-learn's bundled 8x8
  handwritten digits (real, 1,797 images, no download). The default stand-in for MNIST.
- ``"fashion_mnist_local"``: :class:`FashionMNISTDataModule` (``fashion_mnist.py``), real
  Fashion-MNIST from gzipped or plain IDX files (Debian's ``dataset-fashion-mnist`` puts them in
  ``/usr/share/datasets/fashion-mnist``), read by torchvision.
- ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``: :class:`TorchvisionDataModule`
  (``torchvision_sets.py``).
- ``"imagefolder"``: :class:`ImageFolderDataModule` (``image_folder.py``).
- ``"gp"``: :class:`GPRegressionDataModule` (``gp.py``), the paper's synthetic 2-D regression set.

Shared options, seeded splits and loaders live in ``base.py``. Splits are deterministic: every
random choice uses a private :class:`torch.Generator` seeded from ``seed``. ``description`` is
a short human-readable string that the experiment tables print; pass
``substitute_for="MNIST"`` (for instance) when the data stands in for the paper's.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from experiments.data.base import (
    NORM_MEAN,
    NORM_STD,
    ImageDataModule,
    ImageTensorDataset,
    ImageTransform,
    SeededDataModule,
    limit_indices,
    split_indices,
)
from experiments.data.digits import DigitsDataModule
from experiments.data.fashion_mnist import (
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_FILES,
    FashionMNISTDataModule,
    fashion_mnist_available,
    find_fashion_mnist_files,
    load_fashion_mnist,
)
from experiments.data.gp import GPRegressionDataModule, rbf_kernel, sample_gp
from experiments.data.image_folder import ImageFolderDataModule
from experiments.data.torchvision_sets import TORCHVISION_NAMES, TorchvisionDataModule

__all__ = [
    "DATAMODULE_NAMES",
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_FILES",
    "NORM_MEAN",
    "NORM_STD",
    "TORCHVISION_NAMES",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "GPRegressionDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageTensorDataset",
    "ImageTransform",
    "SeededDataModule",
    "TorchvisionDataModule",
    "build_datamodule",
    "fashion_mnist_available",
    "find_fashion_mnist_files",
    "limit_indices",
    "load_fashion_mnist",
    "rbf_kernel",
    "sample_gp",
    "split_indices",
]

DATAMODULE_NAMES = (
    "digits",
    "fashion_mnist_local",
    *TORCHVISION_NAMES,
    "imagefolder",
    "gp",
)
"""Names accepted by :func:`build_datamodule`."""


def build_datamodule(name: str, **kwargs: Any) -> pl.LightningDataModule:
    """Build a data module by name (see :data:`DATAMODULE_NAMES`); ``kwargs`` go to its class.

    ``"mnist"``, ``"fashion_mnist"`` and ``"cifar10"`` are :class:`TorchvisionDataModule`
    (``root=`` required); ``"fashion_mnist_local"`` reads a folder of IDX files (default root is
    Debian's); ``"imagefolder"`` needs ``root=``; ``"gp"`` is the synthetic regression set.
    """
    key = name.lower().replace("-", "_")
    simple = {
        "digits": DigitsDataModule,
        "fashion_mnist_local": FashionMNISTDataModule,
        "imagefolder": ImageFolderDataModule,
        "gp": GPRegressionDataModule,
    }
    if key in simple:
        return simple[key](**kwargs)
    if key in TORCHVISION_NAMES:
        return TorchvisionDataModule(key, **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATAMODULE_NAMES)}")
