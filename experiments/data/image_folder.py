"""ImageNet-style class folders read with :class:`torchvision.datasets.ImageFolder`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Unpack

import torchvision
from torch.utils.data import Dataset, Subset

from experiments.data.base import (
    SALT_FOLDER_LIMIT,
    SALT_LIMIT,
    SALT_SPLIT,
    ImageDataModule,
    ImageOptions,
    check_fraction,
    limit_indices,
    split_indices,
)

__all__ = ["FixedClassImageFolder", "ImageFolderDataModule"]


class FixedClassImageFolder(torchvision.datasets.ImageFolder):
    """ImageFolder whose class -> index map is fixed (the train folder's), for val/test.

    A val/test folder may hold a subset of the training classes (indices still follow
    ``train/``); a class folder absent from ``train/`` raises ValueError.
    """

    def __init__(self, root: str, class_to_idx: dict[str, int], **kwargs: Any) -> None:
        self._fixed = dict(class_to_idx)
        super().__init__(root, allow_empty=True, **kwargs)

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        """The fixed classes; ValueError if ``directory`` has a class folder not in them."""
        present = {e.name for e in os.scandir(directory) if e.is_dir()}
        unknown = sorted(present - set(self._fixed))
        if unknown:
            raise ValueError(f"{directory} has class folders absent from train/: {unknown}")
        return sorted(self._fixed, key=self._fixed.__getitem__), self._fixed


def _train_classes(root: Path) -> list[str]:
    """Sorted class folders of ``root/train``, or FileNotFoundError describing the layout."""
    train_dir = root / "train"
    classes = (
        sorted(e.name for e in os.scandir(train_dir) if e.is_dir()) if train_dir.is_dir() else []
    )
    if classes:
        return classes
    problem = (
        f"{root} does not exist"
        if not root.is_dir()
        else f"{train_dir} does not exist"
        if not train_dir.is_dir()
        else f"{train_dir} has no class folders"
    )
    raise FileNotFoundError(
        f"image folder data not found ({problem}). Expected the layout "
        f"{root}/train/<class_name>/<image>.jpg|png (one folder per class), "
        f"optionally {root}/val/<class_name>/... and {root}/test/<class_name>/..."
    )


class ImageFolderDataModule(ImageDataModule):
    """ImageNet-style class folders read with :class:`torchvision.datasets.ImageFolder`.

    Layout: ``root/train/<class>/*.jpg|png`` (required), ``root/val/<class>/...`` and
    ``root/test/<class>/...`` (optional). Class indices come from the sorted ``train`` class
    folders. Validation: ``root/val`` if present, else a ``val_fraction`` split of train. Test:
    ``root/test`` if present, else ``root/val`` (the ImageNet convention: its val set is the
    public test set), else a ``test_fraction`` split of train. Images are decoded per item
    (ImageFolder loads them as RGB) and go through
    :class:`~experiments.data.base.ImageTransform`; ``limit`` caps the train pool and each of
    the val/test folders. Defaults: ``image_size=(224, 224)``, ``channels=3``; other options:
    :class:`~experiments.data.base.ImageDataModule`.
    """

    native_channels = 3

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        test_fraction: float = 0.1,
        **options: Unpack[ImageOptions],
    ) -> None:
        options.setdefault("image_size", (224, 224))
        options.setdefault("channels", 3)
        super().__init__(**options)
        self.root = Path(root)
        self.test_fraction = check_fraction("test_fraction", test_fraction)
        self.classes = _train_classes(self.root)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        self._sources: dict[str, str] = {}

    def base_description(self) -> str:
        """``image folders at <root> (<n> classes[, val from ..., test from ...])``."""
        src = ""
        if self._sources:
            src = f", val from {self._sources['val']}, test from {self._sources['test']}"
        return f"image folders at {self.root} ({self.num_classes} classes{src})"

    def _folder(self, split: str) -> Dataset | None:
        path = self.root / split
        if not path.is_dir():
            return None
        ds = FixedClassImageFolder(str(path), self.class_to_idx, transform=self.transform())
        return Subset(ds, limit_indices(len(ds), self.limit, self.seed, SALT_FOLDER_LIMIT))

    def setup(self, stage: str | None = None) -> None:
        """Index the folders (images are decoded lazily, per item); idempotent."""
        if self.train_dataset is not None:
            return
        train_full = torchvision.datasets.ImageFolder(
            str(self.root / "train"), transform=self.transform()
        )
        if train_full.class_to_idx != self.class_to_idx:
            raise RuntimeError(f"{self.root}/train changed since this module was built")
        val_ds, test_ds = self._folder("val"), self._folder("test")
        if test_ds is None and val_ds is not None:
            test_ds, self._sources["test"] = val_ds, "val/ folder"
        pool = limit_indices(len(train_full), self.limit, self.seed, SALT_LIMIT)
        fractions = [0.0 if val_ds is not None else self.val_fraction]
        fractions.append(0.0 if test_ds is not None else self.test_fraction)
        train_idx, val_idx, test_idx = split_indices(pool, fractions, self.seed, SALT_SPLIT)
        self.train_dataset = Subset(train_full, train_idx)
        self._sources.setdefault("val", "val/ folder" if val_ds is not None else "train split")
        self._sources.setdefault("test", "test/ folder" if test_ds is not None else "train split")
        self.val_dataset = val_ds if val_ds is not None else Subset(train_full, val_idx)
        self.test_dataset = test_ds if test_ds is not None else Subset(train_full, test_idx)
