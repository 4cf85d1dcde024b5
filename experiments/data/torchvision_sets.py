"""MNIST, Fashion-MNIST and CIFAR-10 through :mod:`torchvision.datasets`."""

from __future__ import annotations

import os
import shutil
import urllib.error
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Unpack

import numpy as np
import torch
import torchvision

from experiments.data.base import ImageDataModule, ImageOptions

__all__ = ["TORCHVISION_NAMES", "TorchvisionDataModule"]

_MNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]

_SPECS: dict[str, dict[str, Any]] = {
    "mnist": {
        "class": "MNIST",
        "label": "MNIST",
        "folder": "MNIST/raw",
        "files": _MNIST_FILES,
        "archives": "the .gz files decompressed with `gunzip -k`",
        "created": ["MNIST"],
        "shape": (1, 28, 28),
    },
    "fashion_mnist": {
        "class": "FashionMNIST",
        "label": "Fashion-MNIST",
        "folder": "FashionMNIST/raw",
        "files": _MNIST_FILES,
        "archives": "the .gz files decompressed with `gunzip -k` (or use "
        "data=fashion_mnist_local, which reads the .gz files directly)",
        "created": ["FashionMNIST"],
        "shape": (1, 28, 28),
    },
    "cifar10": {
        "class": "CIFAR10",
        "label": "CIFAR-10",
        "folder": "cifar-10-batches-py",
        "files": [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"],
        "archives": "cifar-10-python.tar.gz unpacked with `tar xzf` in root",
        "created": ["cifar-10-batches-py", "cifar-10-python.tar.gz"],
        "shape": (3, 32, 32),
    },
}

TORCHVISION_NAMES = tuple(_SPECS)
"""Data set names :class:`TorchvisionDataModule` accepts."""


def _snapshot(root: Path, subdirs: Sequence[str]) -> set[Path]:
    """Paths at the top of ``root`` and everywhere below the dataset's own folders."""
    if not root.is_dir():
        return set()
    paths = set(root.iterdir())
    for sub in subdirs:
        top = root / sub
        if top.is_dir():
            for dirpath, dirnames, filenames in os.walk(top):
                paths.update(Path(dirpath) / n for n in [*dirnames, *filenames])
    return paths


def _remove_new(root: Path, root_existed: bool, before: set[Path], subdirs: Sequence[str]) -> None:
    """Delete whatever a failed download created (and ``root`` itself if it created it)."""
    if not root_existed:
        shutil.rmtree(root, ignore_errors=True)
        return
    after = _snapshot(root, subdirs)
    for path in sorted(after - before, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class TorchvisionDataModule(ImageDataModule):
    """MNIST, Fashion-MNIST or CIFAR-10 through :mod:`torchvision.datasets`.

    torchvision reads the uncompressed IDX files in ``<root>/MNIST/raw/`` (or
    ``<root>/FashionMNIST/raw/``) and the pickled batches in ``<root>/cifar-10-batches-py/``
    (md5-checked). The official test split is the test set; the training split is divided into
    train/val by ``val_fraction``. With ``download=False`` (default) missing files raise
    :class:`FileNotFoundError` at construction with the exact path expected. With
    ``download=True`` the files are fetched in :meth:`prepare_data` (needs network); a failed
    download removes whatever it had created and raises a clear :class:`RuntimeError`.

    ``image_size`` / ``channels`` default to the data's native shape (28x28x1 or 32x32x3).
    Other options: :class:`~experiments.data.base.ImageDataModule`.
    """

    def __init__(
        self,
        name: Literal["mnist", "fashion_mnist", "cifar10"],
        root: str | os.PathLike[str],
        download: bool = False,
        **options: Unpack[ImageOptions],
    ) -> None:
        if name not in _SPECS:
            raise ValueError(
                f"unknown torchvision dataset {name!r}; choose from {sorted(TORCHVISION_NAMES)}"
            )
        self.name = name
        self.spec = _SPECS[name]
        native_c, native_h, native_w = self.spec["shape"]
        if options.get("image_size") is None:
            options["image_size"] = (native_h, native_w)
        if options.get("channels") is None:
            options["channels"] = native_c
        super().__init__(**options)
        self.native_channels = native_c
        self.root = Path(root)
        self.download = bool(download)
        self.num_classes = 10
        if not self.download:
            self._check_files()

    # -- files -------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        """The folder torchvision reads the files from."""
        return self.root / self.spec["folder"]

    def dataset_class(self) -> type:
        """The torchvision dataset class (a hook: tests substitute an md5-free CIFAR10)."""
        return getattr(torchvision.datasets, self.spec["class"])

    def _missing_files(self) -> list[str]:
        if self.name != "cifar10":
            processed = self.root / self.spec["class"] / "processed"
            if (processed / "training.pt").is_file() and (processed / "test.pt").is_file():
                return []  # torchvision's legacy pre-processed format
        return [f for f in self.spec["files"] if not (self.data_dir / f).is_file()]

    def _check_files(self) -> None:
        missing = self._missing_files()
        if not missing:
            return
        where = (
            f"directory {self.data_dir} does not exist"
            if not self.data_dir.is_dir()
            else f"missing in {self.data_dir}: {', '.join(missing)}"
        )
        raise FileNotFoundError(
            f"torchvision {self.spec['label']} not found under root={self.root}: expected "
            f"{', '.join(self.spec['files'])} in {self.data_dir} ({where}). Pass download=True "
            f"to fetch them from the internet (needs network), or copy the files there "
            f"({self.spec['archives']})."
        )

    def prepare_data(self) -> None:
        """Download the data if ``download=True`` (rank 0 only under Lightning)."""
        if not self.download or not self._missing_files():
            return
        root_existed = self.root.is_dir()
        before = _snapshot(self.root, self.spec["created"])
        try:
            self.dataset_class()(str(self.root), train=True, download=True)
        except BaseException as exc:
            _remove_new(self.root, root_existed, before, self.spec["created"])
            if isinstance(exc, urllib.error.URLError | OSError | RuntimeError):
                raise RuntimeError(
                    f"could not download {self.spec['label']} from the internet: no network? "
                    f"({type(exc).__name__}: {str(exc).strip()[:300]}). Removed the partial "
                    f"download under {self.root}. Copy the files ({', '.join(self.spec['files'])}) "
                    f"into {self.data_dir} and use download=False, or use data=digits."
                ) from exc
            raise

    # -- loading -----------------------------------------------------------------------------
    def base_description(self) -> str:
        """``torchvision <name> HxW (real, <counts> from <root>[, limit])``."""
        _, h, w = self.spec["shape"]
        source = self.source_note(self.root, "official train/test splits")
        return f"torchvision {self.spec['label']} {h}x{w} (real, {source})"

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            ds = self.dataset_class()(str(self.root), train=train, download=False)
        except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
            raise RuntimeError(
                f"torchvision could not load {self.spec['label']} from {self.data_dir}: {exc} "
                "(for CIFAR-10 this usually means a file's md5 does not match the original)"
            ) from exc
        data = torch.as_tensor(np.asarray(ds.data))
        images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # HWC -> CHW
        labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
        return images.to(torch.uint8).contiguous(), labels

    def setup(self, stage: str | None = None) -> None:
        """Load both splits through torchvision (as uint8, native size); idempotent."""
        if self.train_dataset is not None:
            return
        if self.download:
            self.prepare_data()  # no-op when the files exist (Lightning ran it on rank 0)
        self._check_files()
        self.setup_official_split(self._load(True), self._load(False))
