"""scikit-learn's bundled handwritten digits: real data that needs no download."""

from __future__ import annotations

from typing import Unpack

import numpy as np
import torch
from torch.utils.data import Subset

from experiments.data.base import (
    SALT_LIMIT,
    SALT_SPLIT,
    ImageDataModule,
    ImageOptions,
    ImageTensorDataset,
    check_fraction,
    limit_indices,
    split_indices,
)

__all__ = ["DigitsDataModule"]

DIGITS_COUNT = 1797
"""Number of images in ``sklearn.datasets.load_digits()`` (shown before setup reads them)."""


class DigitsDataModule(ImageDataModule):
    """scikit-learn's ``load_digits()``: 1,797 real handwritten 8x8 digits, 10 classes.

    No download needed. Pixel values 0..16 are scaled to [0, 1], resized bilinearly to
    ``image_size`` per item and normalised to [-1, 1]
    (:class:`~experiments.data.base.ImageTransform`).
    There is no official test split: the (optionally ``limit``-ed) pool is split into
    train / val / test by ``val_fraction`` and ``test_fraction``. Default data for the
    MNIST-like models; with ``image_size=(224, 224)``, ``channels=3`` it feeds AlexNet
    (resized lazily, so memory stays small). Other options: :class:`ImageDataModule`.
    """

    def __init__(self, *, test_fraction: float = 0.2, **options: Unpack[ImageOptions]) -> None:
        super().__init__(**options)
        self.test_fraction = check_fraction("test_fraction", test_fraction)
        self.num_classes = 10
        self._n_total: int | None = None

    def base_description(self) -> str:
        """``scikit-learn digits 8x8 (real, [L of ]1,797 images)``."""
        n = self._n_total if self._n_total is not None else DIGITS_COUNT
        used = f"{min(self.limit, n):,} of " if self.limit else ""
        return f"scikit-learn digits 8x8 (real, {used}{n:,} images)"

    def setup(self, stage: str | None = None) -> None:
        """Load the digits (0.04 s) and split them; idempotent."""
        if self.train_dataset is not None:
            return
        from sklearn.datasets import load_digits  # imported here: sklearn takes ~1 s to import

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)  # (N, 1, 8, 8)
        labels = torch.from_numpy(digits.target.astype(np.int64))
        dataset = ImageTensorDataset(images, labels, self.transform(pixel_max=16.0))
        self._n_total = len(dataset)
        pool = limit_indices(len(dataset), self.limit, self.seed, SALT_LIMIT)
        train_idx, val_idx, test_idx = split_indices(
            pool, [self.val_fraction, self.test_fraction], self.seed, SALT_SPLIT
        )
        self.train_dataset = Subset(dataset, train_idx)
        self.val_dataset = Subset(dataset, val_idx)
        self.test_dataset = Subset(dataset, test_idx)
