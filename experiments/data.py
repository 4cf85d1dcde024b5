"""LightningDataModules for the lipreg experiments (paper §3.2–3.4).

Every image module yields batches ``(x, y)``: ``x`` float32 of shape ``(B, C, H, W)``, already
resized to the model's input (``image_size``, ``channels``) and normalised with mean 0.5 and
std 0.5, so pixels lie in ``[-1, 1]`` as in the paper's MNIST code; ``y`` int64 class labels.
Grey images are repeated to 3 channels when ``channels=3``; RGB images are averaged to one
channel when ``channels=1``.

Images are stored at their native size as uint8 (or read from disk per item for
:class:`ImageFolderDataModule`) and resized **per item** in ``__getitem__``, so a 3x224x224
AlexNet view of a data set costs memory only for the batches in flight, not for the whole set
(1,797 digits at 3x224x224 float32 would be 1 GB).

Modules (and their :func:`build_datamodule` names):

- ``"digits"``: :class:`DigitsDataModule`, scikit-learn's bundled 8x8 handwritten digits (real,
  1,797 images, no download). The default stand-in for MNIST when no MNIST files exist.
- ``"fashion_mnist_local"``: :class:`FashionMNISTDataModule`, real Fashion-MNIST read from gzipped
  or plain IDX files (Debian's ``dataset-fashion-mnist`` puts them in
  ``/usr/share/datasets/fashion-mnist``).
- ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``: :class:`TorchvisionDataModule`.
- ``"imagefolder"``: :class:`ImageFolderDataModule`, ImageNet-style class folders.
- ``"gp"``: :class:`GPRegressionDataModule`, the paper's synthetic 2-D regression set (§3.2).

Splits are deterministic: every random choice uses a private :class:`torch.Generator` seeded
from ``seed``. ``description`` is a short human-readable string that the experiment tables
print; pass ``substitute_for="MNIST"`` (for instance) when the data stands in for the paper's.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import struct
import urllib.error
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = [
    "DATAMODULE_NAMES",
    "DEFAULT_FASHION_MNIST_ROOT",
    "NORM_MEAN",
    "NORM_STD",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "GPRegressionDataModule",
    "ImageFolderDataModule",
    "TorchvisionDataModule",
    "build_datamodule",
    "fashion_mnist_available",
    "preprocess_images",
    "rbf_kernel",
    "read_idx",
    "sample_gp",
]

NORM_MEAN = 0.5
"""Normalisation mean applied to pixels in [0, 1] (paper's MNIST code: Normalize(0.5, 0.5))."""
NORM_STD = 0.5
"""Normalisation std; pixels therefore end up in [-1, 1]."""

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs the gzipped IDX files."""

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

SizeLike = int | Sequence[int]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _as_size(image_size: SizeLike) -> tuple[int, int]:
    """Return ``image_size`` as ``(H, W)``; an int means a square image."""
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return size  # type: ignore[return-value]


def _check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    return int(channels)


def _check_fraction(name: str, value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def _generator(seed: int, salt: int) -> torch.Generator:
    """A private generator; ``salt`` keeps independent random choices independent."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + salt)


def _limited(n: int, limit: int | None, seed: int, salt: int) -> torch.Tensor:
    """Indices ``0..n-1``, or a deterministic random subset of size ``limit`` (kept sorted)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    if limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    return torch.randperm(n, generator=_generator(seed, salt))[:limit].sort().values


def _split(
    indices: torch.Tensor, fractions: Sequence[float], seed: int, salt: int
) -> list[torch.Tensor]:
    """Shuffle ``indices`` deterministically and cut off pieces of the given fractions.

    Returns ``[rest, piece_1, piece_2, ...]``; every requested non-zero fraction gets at least
    one element as long as ``rest`` keeps at least one.
    """
    n = len(indices)
    perm = indices[torch.randperm(n, generator=_generator(seed, salt))]
    sizes = [max(1, round(f * n)) if f > 0 else 0 for f in fractions]
    if sum(sizes) >= n:
        raise ValueError(
            f"cannot split {n} samples into fractions {list(fractions)} and keep training data"
        )
    pieces, start = [], 0
    for size in sizes:
        pieces.append(perm[start : start + size])
        start += size
    return [perm[start:], *pieces]


def preprocess_images(
    images: torch.Tensor,
    *,
    pixel_max: float,
    image_size: SizeLike,
    channels: int,
) -> torch.Tensor:
    """Convert raw images ``(B, C0, H0, W0)`` (C0 = 1 or 3) to the model's normalised input.

    Steps: scale to [0, 1] by ``pixel_max``; average RGB to grey if ``channels == 1``; resize
    bilinearly with :func:`torch.nn.functional.interpolate` (antialiased when shrinking);
    repeat grey to 3 channels if ``channels == 3``; normalise with mean/std 0.5 to [-1, 1].
    Returns float32 ``(B, channels, H, W)``.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    size = _as_size(image_size)
    channels = _check_channels(channels)
    x = images.to(torch.float32) / float(pixel_max)
    if x.shape[1] == 3 and channels == 1:
        x = x.mean(dim=1, keepdim=True)
    if tuple(x.shape[-2:]) != size:
        shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
        x = x.clamp_(0.0, 1.0)
    if x.shape[1] == 1 and channels == 3:
        x = x.repeat(1, 3, 1, 1)
    return (x - NORM_MEAN) / NORM_STD


class _UInt8ImageDataset(Dataset):
    """A view (``indices``) of native-size uint8 images, resized and normalised per item.

    ``images`` is shared between the train/val/test views, so a split costs only an index
    tensor; the resized float32 copy of an image exists only while its batch is in flight.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        *,
        pixel_max: float,
        image_size: tuple[int, int],
        channels: int,
    ) -> None:
        self.images = images
        self.labels = labels
        self.indices = indices
        self.pixel_max = pixel_max
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = int(self.indices[i])
        x = preprocess_images(
            self.images[j : j + 1],
            pixel_max=self.pixel_max,
            image_size=self.image_size,
            channels=self.channels,
        )[0]
        return x, self.labels[j]


class _ToChannels:
    """Picklable transform: a (C0, H, W) tensor to ``channels`` channels (repeat or average)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.channels:
            return x
        if self.channels == 1:
            return x[:3].mean(dim=0, keepdim=True)
        return x[:1].repeat(3, 1, 1)


# --------------------------------------------------------------------------------------------
# Base class for image modules
# --------------------------------------------------------------------------------------------


class _ImageDataModule(pl.LightningDataModule):
    """Shared plumbing: arguments, split bookkeeping, DataLoaders, description."""

    task: ClassVar[str] = "classification"

    def __init__(
        self,
        *,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        image_size: SizeLike = (28, 28),
        channels: int = 1,
        limit: int | None = None,
        substitute_for: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        self.batch_size = int(batch_size)
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.image_size = _as_size(image_size)
        self.channels = _check_channels(channels)
        self.limit = limit
        self.substitute_for = substitute_for
        self.num_classes: int | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one model input."""
        return (self.channels, *self.image_size)

    # -- description ---------------------------------------------------------------------
    def _base_description(self) -> str:
        raise NotImplementedError

    @property
    def description(self) -> str:
        """Short description of the data (printed by the experiment tables)."""
        parts = [self._base_description(), f"resized to {self.image_size[0]}x{self.image_size[1]}"]
        if self.channels == 3 and self._native_channels() == 1:
            parts.append("grey repeated to 3 channels")
        elif self.channels == 1 and self._native_channels() == 3:
            parts.append("RGB averaged to 1 channel")
        if self.train_dataset is not None:
            parts.append(
                f"split {len(self.train_dataset):,} train / {len(self.val_dataset):,} val / "
                f"{len(self.test_dataset):,} test"
            )
        text = ", ".join(parts)
        if self.substitute_for:
            text += f"; SUBSTITUTE for {self.substitute_for} (not the paper's data)"
        return text

    def _native_channels(self) -> int:
        return 1

    # -- loaders ---------------------------------------------------------------------------
    def _ensure_setup(self) -> None:
        if self.train_dataset is None:
            self.setup("fit")

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=_generator(self.seed, 99) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (deterministically, from ``seed``) training batches."""
        self._ensure_setup()
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (in a fixed order)."""
        self._ensure_setup()
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches (in a fixed order)."""
        self._ensure_setup()
        return self._loader(self.test_dataset, shuffle=False)

    # -- helpers for in-memory uint8 data ------------------------------------------------------
    def _view(
        self, images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor, pixel_max: float
    ) -> _UInt8ImageDataset:
        return _UInt8ImageDataset(
            images,
            labels,
            idx,
            pixel_max=pixel_max,
            image_size=self.image_size,
            channels=self.channels,
        )

    def _setup_official_split(
        self,
        train: tuple[torch.Tensor, torch.Tensor],
        test: tuple[torch.Tensor, torch.Tensor],
        pixel_max: float,
    ) -> None:
        """Train pool -> train/val (``val_fraction``); official test set -> test. ``limit``
        caps the train pool and the test set separately."""
        (xtr, ytr), (xte, yte) = train, test
        pool = _limited(len(xtr), self.limit, self.seed, salt=1)
        train_idx, val_idx = _split(pool, [self.val_fraction], self.seed, salt=2)
        test_idx = _limited(len(xte), self.limit, self.seed, salt=3)
        self.train_dataset = self._view(xtr, ytr, train_idx, pixel_max)
        self.val_dataset = self._view(xtr, ytr, val_idx, pixel_max)
        self.test_dataset = self._view(xte, yte, test_idx, pixel_max)


# --------------------------------------------------------------------------------------------
# 1. scikit-learn digits
# --------------------------------------------------------------------------------------------


class DigitsDataModule(_ImageDataModule):
    """scikit-learn's bundled ``load_digits()``: 1,797 real handwritten 8x8 digits, 10 classes.

    No download needed. Pixel values 0..16 are scaled to [0, 1], resized bilinearly to
    ``image_size`` per item and normalised to [-1, 1]. There is no official test split: the
    (optionally ``limit``-ed) pool is split into train / val / test by ``val_fraction`` and
    ``test_fraction``. Default data for the MNIST-like models; with ``image_size=(224, 224)``,
    ``channels=3`` it feeds AlexNet (resized lazily, so memory stays small).
    """

    def __init__(
        self,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        image_size: SizeLike = (28, 28),
        channels: int = 1,
        limit: int | None = None,
        test_fraction: float = 0.2,
        substitute_for: str | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            image_size=image_size,
            channels=channels,
            limit=limit,
            substitute_for=substitute_for,
        )
        self.test_fraction = _check_fraction("test_fraction", test_fraction)
        self.num_classes = 10
        self._n_total: int | None = None

    def _base_description(self) -> str:
        n = self._n_total if self._n_total is not None else 1797
        used = f"{min(self.limit, n):,} of " if self.limit else ""
        return f"scikit-learn digits 8x8 (real, {used}{n:,} images)"

    def setup(self, stage: str | None = None) -> None:
        """Load the digits (0.04 s) and split them; idempotent."""
        if self.train_dataset is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)  # (N,1,8,8)
        labels = torch.from_numpy(digits.target.astype(np.int64))
        self._n_total = len(images)
        pool = _limited(len(images), self.limit, self.seed, salt=1)
        train_idx, val_idx, test_idx = _split(
            pool, [self.val_fraction, self.test_fraction], self.seed, salt=2
        )
        self.train_dataset = self._view(images, labels, train_idx, 16.0)
        self.val_dataset = self._view(images, labels, val_idx, 16.0)
        self.test_dataset = self._view(images, labels, test_idx, 16.0)


# --------------------------------------------------------------------------------------------
# 2. Fashion-MNIST from local IDX files
# --------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed or plain) into a uint8 array.

    Format: big-endian uint32 magic ``0x0800 | ndim`` (2051 for image files, 2049 for label
    files), then ``ndim`` big-endian uint32 sizes, then the uint8 data.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    (magic,) = struct.unpack(">I", data[:4])
    if magic >> 8 != 0x08:
        raise ValueError(
            f"{path}: not an unsigned-byte IDX file (magic {magic:#010x}, expected 0x0800|ndim)"
        )
    ndim = magic & 0xFF
    if not 1 <= ndim <= 4 or len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: bad IDX header (ndim={ndim})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    expected = math.prod(shape)
    payload = len(data) - 4 - 4 * ndim
    if payload != expected:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({expected} bytes) but the file holds "
            f"{payload} data bytes (truncated or corrupted?)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _fashion_hint(root: Path) -> str:
    return (
        "To get the real Fashion-MNIST without network: as root run "
        "`apt-get install dataset-fashion-mnist` (Debian puts the gzipped IDX files in "
        f"{DEFAULT_FASHION_MNIST_ROOT}), or pass root=<directory with the four IDX files "
        f"{', '.join(v + '[.gz]' for v in FASHION_MNIST_FILES.values())}>, "
        "or use data=digits (scikit-learn's bundled real digits, no download)."
    )


def _find_fashion_files(root: str | os.PathLike[str]) -> dict[str, Path]:
    """Locate the four Fashion-MNIST IDX files (``.gz`` or plain) or raise FileNotFoundError."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST directory {root} does not exist (expected the gzipped IDX files "
            f"{root / (FASHION_MNIST_FILES['train_images'] + '.gz')} etc.). {_fashion_hint(root)}"
        )
    found: dict[str, Path] = {}
    for key, name in FASHION_MNIST_FILES.items():
        candidates = [root / (name + ".gz"), root / name]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {name}.gz (or uncompressed {name}) not found: expected "
                f"{candidates[0]}. {_fashion_hint(root)}"
            )
        found[key] = hit
    return found


def fashion_mnist_available(root: str | os.PathLike[str] = DEFAULT_FASHION_MNIST_ROOT) -> bool:
    """True if the four Fashion-MNIST IDX files (gzipped or plain) are present in ``root``."""
    try:
        _find_fashion_files(root)
    except FileNotFoundError:
        return False
    return True


class FashionMNISTDataModule(_ImageDataModule):
    """Real Fashion-MNIST (60,000 train + 10,000 test, 28x28 grey, 10 classes) from IDX files.

    Reads ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-...`` (gzipped
    or plain) from ``root`` with :func:`read_idx`; no torchvision, no network. Default ``root``
    is where Debian's ``dataset-fashion-mnist`` installs them. Missing directory or files raise
    :class:`FileNotFoundError` at construction, saying what was expected where and what to do.
    The train pool is split into train/val; the t10k files are the test set.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] = DEFAULT_FASHION_MNIST_ROOT,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        image_size: SizeLike = (28, 28),
        channels: int = 1,
        limit: int | None = None,
        substitute_for: str | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            image_size=image_size,
            channels=channels,
            limit=limit,
            substitute_for=substitute_for,
        )
        self.root = Path(root)
        self.files = _find_fashion_files(self.root)
        self.num_classes = 10
        self._counts: tuple[int, int] | None = None

    @classmethod
    def available(cls, root: str | os.PathLike[str] = DEFAULT_FASHION_MNIST_ROOT) -> bool:
        """Same as :func:`fashion_mnist_available`."""
        return fashion_mnist_available(root)

    def _base_description(self) -> str:
        counts = (
            f"{self._counts[0]:,} train + {self._counts[1]:,} test images"
            if self._counts
            else "60,000 train + 10,000 test images"
        )
        lim = f", limit {self.limit:,} per split" if self.limit else ""
        return f"Fashion-MNIST 28x28 (real, {counts} from {self.root}{lim})"

    def _load_pair(self, images_key: str, labels_key: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = read_idx(self.files[images_key])
        labels = read_idx(self.files[labels_key])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{self.files[images_key]} / {self.files[labels_key]}: expected images "
                f"(N, H, W) and labels (N,), got {images.shape} and {labels.shape}"
            )
        if labels.size and labels.max() >= 10:
            raise ValueError(f"{self.files[labels_key]}: labels must be 0..9")
        x = torch.from_numpy(images).unsqueeze(1)
        y = torch.from_numpy(labels.astype(np.int64))
        return x, y

    def setup(self, stage: str | None = None) -> None:
        """Read the IDX files and split them; idempotent."""
        if self.train_dataset is not None:
            return
        train = self._load_pair("train_images", "train_labels")
        test = self._load_pair("test_images", "test_labels")
        self._counts = (len(train[0]), len(test[0]))
        self._setup_official_split(train, test, 255.0)


# --------------------------------------------------------------------------------------------
# 3. torchvision datasets
# --------------------------------------------------------------------------------------------

_TV_SPECS: dict[str, dict[str, Any]] = {
    "mnist": {
        "class": "MNIST",
        "label": "MNIST",
        "folder": "MNIST/raw",
        "files": [
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ],
        "archives": "the .gz files decompressed with `gunzip -k`",
        "created": ["MNIST"],
        "shape": (1, 28, 28),
    },
    "fashion_mnist": {
        "class": "FashionMNIST",
        "label": "Fashion-MNIST",
        "folder": "FashionMNIST/raw",
        "files": [
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ],
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


class TorchvisionDataModule(_ImageDataModule):
    """MNIST, Fashion-MNIST or CIFAR-10 through :mod:`torchvision.datasets`.

    torchvision reads the uncompressed IDX files in ``<root>/MNIST/raw/`` (or
    ``<root>/FashionMNIST/raw/``) and the pickled batches in ``<root>/cifar-10-batches-py/``
    (md5-checked). The official test split is the test set; the training split is divided into
    train/val by ``val_fraction``. With ``download=False`` (default) missing files raise
    :class:`FileNotFoundError` at construction with the exact path expected. With
    ``download=True`` the files are fetched in :meth:`prepare_data` (needs network); a failed
    download removes whatever it had created and raises a clear :class:`RuntimeError`.

    ``image_size`` / ``channels`` default to the data's native shape (28x28x1 or 32x32x3).
    """

    def __init__(
        self,
        name: Literal["mnist", "fashion_mnist", "cifar10"],
        root: str | os.PathLike[str],
        download: bool = False,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        image_size: SizeLike | None = None,
        channels: int | None = None,
        limit: int | None = None,
        substitute_for: str | None = None,
    ) -> None:
        if name not in _TV_SPECS:
            raise ValueError(
                f"unknown torchvision dataset {name!r}; choose from {sorted(_TV_SPECS)}"
            )
        self.name = name
        self.spec = _TV_SPECS[name]
        native_c, native_h, native_w = self.spec["shape"]
        super().__init__(
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            image_size=(native_h, native_w) if image_size is None else image_size,
            channels=native_c if channels is None else channels,
            limit=limit,
            substitute_for=substitute_for,
        )
        self.root = Path(root)
        self.download = bool(download)
        self.num_classes = 10
        self._counts: tuple[int, int] | None = None
        if not self.download:
            self._check_files()

    # -- files -------------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        """The folder torchvision reads the files from."""
        return self.root / self.spec["folder"]

    def _native_channels(self) -> int:
        return self.spec["shape"][0]

    def _dataset_class(self) -> type:
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
        cls = self._dataset_class()
        root_existed = self.root.is_dir()
        before = _snapshot(self.root, self.spec["created"])
        try:
            cls(str(self.root), train=True, download=True)
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
    def _base_description(self) -> str:
        _, h, w = self.spec["shape"]
        counts = (
            f"{self._counts[0]:,} train + {self._counts[1]:,} test images"
            if self._counts
            else "official train/test splits"
        )
        lim = f", limit {self.limit:,} per split" if self.limit else ""
        return f"torchvision {self.spec['label']} {h}x{w} (real, {counts} from {self.root}{lim})"

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            ds = self._dataset_class()(str(self.root), train=train, download=False)
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
        train, test = self._load(True), self._load(False)
        self._counts = (len(train[0]), len(test[0]))
        self._setup_official_split(train, test, 255.0)


# --------------------------------------------------------------------------------------------
# 4. ImageNet-style folders
# --------------------------------------------------------------------------------------------


class _FixedClassImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder whose class -> index map is fixed (the train folder's), for val/test."""

    def __init__(self, root: str, class_to_idx: dict[str, int], **kwargs: Any) -> None:
        self._fixed = dict(class_to_idx)
        super().__init__(root, allow_empty=True, **kwargs)

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        present = {e.name for e in os.scandir(directory) if e.is_dir()}
        unknown = sorted(present - set(self._fixed))
        if unknown:
            raise ValueError(f"{directory} has class folders absent from train/: {unknown}")
        return sorted(self._fixed, key=self._fixed.__getitem__), self._fixed


class ImageFolderDataModule(_ImageDataModule):
    """ImageNet-style class folders read with :class:`torchvision.datasets.ImageFolder`.

    Layout: ``root/train/<class>/*.jpg|png`` (required), ``root/val/<class>/...`` and
    ``root/test/<class>/...`` (optional). Class indices come from the sorted ``train`` class
    folders. Validation: ``root/val`` if present, else a ``val_fraction`` split of train. Test:
    ``root/test`` if present, else ``root/val`` (the ImageNet convention: its val set is the
    public test set), else a ``test_fraction`` split of train. Images are loaded per item
    (Resize to ``image_size`` + ToTensor + channel conversion + Normalize(0.5, 0.5)); ``limit``
    caps the train pool and each of the val/test folders.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        image_size: SizeLike = (224, 224),
        channels: int = 3,
        limit: int | None = None,
        test_fraction: float = 0.1,
        substitute_for: str | None = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            image_size=image_size,
            channels=channels,
            limit=limit,
            substitute_for=substitute_for,
        )
        self.root = Path(root)
        self.test_fraction = _check_fraction("test_fraction", test_fraction)
        train_dir = self.root / "train"
        classes = (
            sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
            if train_dir.is_dir()
            else []
        )
        if not classes:
            problem = (
                f"{self.root} does not exist"
                if not self.root.is_dir()
                else f"{train_dir} does not exist"
                if not train_dir.is_dir()
                else f"{train_dir} has no class folders"
            )
            raise FileNotFoundError(
                f"image folder data not found ({problem}). Expected the layout "
                f"{self.root}/train/<class_name>/<image>.jpg|png (one folder per class), "
                f"optionally {self.root}/val/<class_name>/... and {self.root}/test/<class_name>/..."
            )
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.num_classes = len(classes)
        self._sources: dict[str, str] = {}

    def _native_channels(self) -> int:
        return 3

    def _base_description(self) -> str:
        src = ""
        if self._sources:
            src = f", val from {self._sources['val']}, test from {self._sources['test']}"
        return f"image folders at {self.root} ({self.num_classes} classes{src})"

    def _transform(self) -> Any:
        t = torchvision.transforms
        return t.Compose(
            [
                t.Resize(self.image_size, antialias=True),
                t.ToTensor(),
                _ToChannels(self.channels),
                t.Normalize([NORM_MEAN] * self.channels, [NORM_STD] * self.channels),
            ]
        )

    def _folder(self, split: str) -> Dataset | None:
        path = self.root / split
        if not path.is_dir():
            return None
        ds = _FixedClassImageFolder(str(path), self.class_to_idx, transform=self._transform())
        return Subset(ds, _limited(len(ds), self.limit, self.seed, salt=10).tolist())

    def setup(self, stage: str | None = None) -> None:
        """Index the folders (images are decoded lazily, per item); idempotent."""
        if self.train_dataset is not None:
            return
        train_full = torchvision.datasets.ImageFolder(
            str(self.root / "train"), transform=self._transform()
        )
        assert train_full.class_to_idx == self.class_to_idx
        val_ds, test_ds = self._folder("val"), self._folder("test")
        if test_ds is None and val_ds is not None:
            test_ds, self._sources["test"] = val_ds, "val/ folder"
        pool = _limited(len(train_full), self.limit, self.seed, salt=1)
        fractions = [0.0 if val_ds is not None else self.val_fraction]
        fractions.append(0.0 if test_ds is not None else self.test_fraction)
        train_idx, val_idx, test_idx = _split(pool, fractions, self.seed, salt=2)
        self.train_dataset = Subset(train_full, train_idx.tolist())
        self._sources.setdefault("val", "val/ folder" if val_ds is not None else "train split")
        self._sources.setdefault("test", "test/ folder" if test_ds is not None else "train split")
        self.val_dataset = val_ds if val_ds is not None else Subset(train_full, val_idx.tolist())
        self.test_dataset = (
            test_ds if test_ds is not None else Subset(train_full, test_idx.tolist())
        )


# --------------------------------------------------------------------------------------------
# 5. The paper's synthetic GP regression set
# --------------------------------------------------------------------------------------------


def rbf_kernel(
    a: torch.Tensor, b: torch.Tensor, length_scale: float = 1.0, variance: float = 1.0
) -> torch.Tensor:
    """``variance * exp(-|a_i - b_j|^2 / (2 length_scale^2))`` (sklearn's ``1.0 * RBF(1.0)``)."""
    d2 = torch.cdist(a, b).square()
    return variance * torch.exp(-0.5 * d2 / length_scale**2)


def sample_gp(
    x: torch.Tensor,
    length_scale: float = 1.0,
    variance: float = 1.0,
    generator: torch.Generator | None = None,
    jitter: float = 1e-8,
) -> torch.Tensor:
    """One exact sample of a zero-mean GP with RBF kernel at the points ``x`` (N, D).

    Computes ``L = cholesky(K + jitter I)`` in float64 and returns ``L z`` with ``z ~ N(0, I)``
    (shape ``(N,)``, float64). If the Cholesky fails (near-duplicate points), the jitter is
    raised tenfold up to 1e-4 before giving up. O(N^3): fine for a few thousand points.
    """
    x64 = x.to(torch.float64)
    k = rbf_kernel(x64, x64, length_scale, variance)
    eye = torch.eye(len(x64), dtype=torch.float64)
    z = torch.randn(len(x64), dtype=torch.float64, generator=generator)
    eps = jitter
    while True:
        chol, info = torch.linalg.cholesky_ex(k + eps * eye)
        if int(info) == 0:
            return chol @ z
        if eps >= 1e-4:
            raise RuntimeError(f"GP kernel matrix not positive definite even with jitter {eps}")
        eps *= 10.0


class GPRegressionDataModule(pl.LightningDataModule):
    """The paper's synthetic 2-D regression set (paper.md §3.2).

    Inputs ``x ~ scale * N(0, I_2)`` (``n_train + n_test`` points); outputs one joint sample of
    a zero-mean Gaussian process with RBF kernel (``length_scale``, ``variance``), drawn exactly
    (Cholesky in float64, jitter 1e-8) -- the reference code's sklearn
    ``GaussianProcessRegressor`` prior. ``val_fraction`` of the training points form the
    validation set. Batches: ``x`` float32 ``(B, 2)``, ``y`` float32 ``(B, 1)``.
    """

    task: ClassVar[str] = "regression"

    def __init__(
        self,
        n_train: int = 2000,
        n_test: int = 500,
        scale: float = 4.0,
        length_scale: float = 1.0,
        seed: int = 0,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        variance: float = 1.0,
        substitute_for: str | None = None,
    ) -> None:
        super().__init__()
        if n_train < 2 or n_test < 1:
            raise ValueError(f"need n_train >= 2 and n_test >= 1, got {n_train}, {n_test}")
        self.n_train, self.n_test = int(n_train), int(n_test)
        self.scale, self.length_scale = float(scale), float(length_scale)
        self.variance = float(variance)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        self.num_workers = int(num_workers)
        self.substitute_for = substitute_for
        self.num_classes: int | None = None
        self.input_shape: tuple[int, ...] = (2,)
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    @property
    def description(self) -> str:
        """Short description of the data (printed by the experiment tables)."""
        n_val = max(1, round(self.val_fraction * self.n_train)) if self.val_fraction else 0
        text = (
            f"synthetic 2-D GP regression (paper §3.2): x ~ {self.scale:g}·N(0, I_2), y = one "
            f"GP(0, {self.variance:g}·RBF({self.length_scale:g})) sample; "
            f"{self.n_train - n_val:,} train / {n_val:,} val / {self.n_test:,} test, "
            f"seed {self.seed}"
        )
        if self.substitute_for:
            text += f"; SUBSTITUTE for {self.substitute_for} (not the paper's data)"
        return text

    def setup(self, stage: str | None = None) -> None:
        """Sample the inputs and the GP (about 0.2 s for 2,500 points); idempotent."""
        if self.train_dataset is not None:
            return
        gen = _generator(self.seed, 0)
        n = self.n_train + self.n_test
        x = self.scale * torch.randn(n, 2, dtype=torch.float64, generator=gen)
        y = sample_gp(x, self.length_scale, self.variance, generator=gen)
        self.x, self.y = x.to(torch.float32), y.to(torch.float32).unsqueeze(1)
        xtr, ytr = self.x[: self.n_train], self.y[: self.n_train]
        train_idx, val_idx = _split(
            torch.arange(self.n_train), [self.val_fraction], self.seed, salt=2
        )
        train_idx, val_idx = train_idx.sort().values, val_idx.sort().values
        self.train_dataset = TensorDataset(xtr[train_idx], ytr[train_idx])
        self.val_dataset = TensorDataset(xtr[val_idx], ytr[val_idx])
        self.test_dataset = TensorDataset(self.x[self.n_train :], self.y[self.n_train :])

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=_generator(self.seed, 99) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (deterministically) training batches."""
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.test_dataset, shuffle=False)


# --------------------------------------------------------------------------------------------
# 6. Factory
# --------------------------------------------------------------------------------------------

DATAMODULE_NAMES = (
    "digits",
    "fashion_mnist_local",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "imagefolder",
    "gp",
)
"""Names accepted by :func:`build_datamodule`."""


def build_datamodule(name: str, **kwargs: Any) -> pl.LightningDataModule:
    """Build a data module by name (see :data:`DATAMODULE_NAMES`); ``kwargs`` go to its class.

    ``"mnist"``, ``"fashion_mnist"`` and ``"cifar10"`` are :class:`TorchvisionDataModule`
    (``root=`` required); ``"fashion_mnist_local"`` reads IDX files itself (default root is
    Debian's); ``"imagefolder"`` needs ``root=``; ``"gp"`` is the synthetic regression set.
    """
    key = name.lower().replace("-", "_")
    if key == "digits":
        return DigitsDataModule(**kwargs)
    if key == "fashion_mnist_local":
        return FashionMNISTDataModule(**kwargs)
    if key in _TV_SPECS:
        return TorchvisionDataModule(key, **kwargs)  # type: ignore[arg-type]
    if key == "imagefolder":
        return ImageFolderDataModule(**kwargs)
    if key == "gp":
        return GPRegressionDataModule(**kwargs)
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATAMODULE_NAMES)}")
