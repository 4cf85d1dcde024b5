"""What every data module shares: options, seeded splits, the image pipeline, the loaders.

- :class:`SeededDataModule`: batch size, validation fraction, seed, workers, the
  ``substitute_for`` label and the three DataLoaders (training batches shuffled by a generator
  seeded from ``seed``, so a run is reproducible).
- :class:`ImageDataModule`: adds ``image_size``, ``channels`` and ``limit``, the description
  the experiment tables print, and the "official train/test files" split.
- :func:`limit_indices` / :func:`split_indices`: deterministic subsets and splits with
  :func:`torch.utils.data.random_split` and a seeded :class:`torch.Generator`.
- :class:`ImageTransform`: raw image -> the model's normalised input, with
  :mod:`torchvision.transforms.v2.functional`.
- :class:`ImageTensorDataset`: native-size images kept in memory, transformed per item.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, TypedDict, Unpack

import lightning.pytorch as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, random_split
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "NORM_MEAN",
    "NORM_STD",
    "ImageDataModule",
    "ImageOptions",
    "ImageTensorDataset",
    "ImageTransform",
    "LoaderOptions",
    "SeededDataModule",
    "SizeLike",
    "as_size",
    "check_fraction",
    "limit_indices",
    "seeded_generator",
    "split_indices",
]

NORM_MEAN = 0.5
"""Normalisation mean applied to pixels in [0, 1] (paper's MNIST code: Normalize(0.5, 0.5))."""
NORM_STD = 0.5
"""Normalisation std; pixels therefore end up in [-1, 1]."""

SizeLike = int | Sequence[int]

# Salts of the seeded generators: each random choice gets its own stream, so changing one
# (say the limit) leaves the others' draws alone. Kept from the single-file module: the same
# seed gives exactly the same samples as before (the committed results/ were trained on them).
SALT_LIMIT, SALT_SPLIT, SALT_TEST_LIMIT, SALT_FOLDER_LIMIT, SALT_SHUFFLE = 1, 2, 3, 10, 99


class LoaderOptions(TypedDict, total=False):
    """Options every data module accepts (see :class:`SeededDataModule`)."""

    batch_size: int
    val_fraction: float
    seed: int
    num_workers: int
    substitute_for: str | None


class ImageOptions(LoaderOptions, total=False):
    """Options every image data module accepts (see :class:`ImageDataModule`)."""

    image_size: SizeLike | None
    channels: int | None
    limit: int | None


def as_size(image_size: SizeLike) -> tuple[int, int]:
    """Return ``image_size`` as ``(H, W)``; an int means a square image."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(int(s) for s in size) < 1:
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return int(size[0]), int(size[1])


def check_channels(channels: int) -> int:
    """``channels`` if it is 1 or 3, else ValueError."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    return int(channels)


def check_fraction(name: str, value: float) -> float:
    """``value`` if it lies in [0, 1), else ValueError naming the option."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def seeded_generator(seed: int, salt: int) -> torch.Generator:
    """A private generator seeded with ``seed * 1_000_003 + salt`` (one stream per salt)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + salt)


def limit_indices(n: int, limit: int | None, seed: int, salt: int) -> list[int]:
    """``0..n-1``, or a seeded random subset of ``limit`` of them, in increasing order.

    The subset is the first piece of ``random_split(range(n), [limit, n - limit])``; sorting
    keeps the stored order of the samples.
    """
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    kept, _ = random_split(range(n), [limit, n - limit], generator=seeded_generator(seed, salt))
    return sorted(kept.indices)


def split_indices(
    indices: Sequence[int], fractions: Sequence[float], seed: int, salt: int
) -> list[list[int]]:
    """Split ``indices`` at random into ``[rest, piece_1, piece_2, ...]``.

    Piece ``k`` gets ``max(1, round(fractions[k] * n))`` elements (none when the fraction is
    0), ``rest`` the remainder, which must keep at least one element. The pieces come from
    :func:`torch.utils.data.random_split` with lengths ``[piece_1, ..., rest]`` and a seeded
    generator: the same seed always gives the same split.
    """
    n = len(indices)
    sizes = [max(1, round(f * n)) if f > 0 else 0 for f in fractions]
    if sum(sizes) >= n:
        raise ValueError(
            f"cannot split {n} samples into fractions {list(fractions)} and keep training data"
        )
    parts = random_split(range(n), [*sizes, n - sum(sizes)], generator=seeded_generator(seed, salt))
    *pieces, rest = ([indices[i] for i in part.indices] for part in parts)
    return [rest, *pieces]


@dataclass(frozen=True)
class ImageTransform:
    """Raw image -> the model's normalised input ``(channels, *image_size)``, float32 in [-1, 1].

    Accepts a PIL image, or an integer or float tensor ``(C0, H0, W0)`` / ``(B, C0, H0, W0)``
    with ``C0`` = 1 or 3. Steps, all with :mod:`torchvision.transforms.v2.functional`:

    1. a PIL image is resized first (PIL's antialiased bilinear, as ``transforms.Resize`` on
       PIL images does) and turned into a uint8 tensor;
    2. scale to [0, 1] by ``pixel_max`` (16 for scikit-learn's digits, 255 otherwise);
    3. RGB to one channel by the unweighted mean when ``channels == 1``
       (``rgb_to_grayscale`` would weight the channels by ITU-R 601 luma 0.299/0.587/0.114;
       the documented contract here is the mean, and the tests hold it);
    4. bilinear resize to ``image_size``, antialiased only when shrinking (upsampling stays
       plain bilinear: antialias=True there changes pixels by up to 5e-7), then clamp to
       [0, 1] (the weights sum to 1 only up to rounding);
    5. grey repeated to 3 channels (``grayscale_to_rgb``) when ``channels == 3``;
    6. ``normalize`` with mean ``NORM_MEAN`` and std ``NORM_STD``: ``(x - 0.5) / 0.5``.

    Picklable (a frozen dataclass), so it works in DataLoader worker processes.
    """

    image_size: tuple[int, int]
    channels: int
    pixel_max: float = 255.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", as_size(self.image_size))
        object.__setattr__(self, "channels", check_channels(self.channels))

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        size = list(self.image_size)
        if isinstance(image, Image.Image):
            image = TF.pil_to_tensor(TF.resize(image, size, antialias=True))
        if image.ndim not in (3, 4) or image.shape[-3] not in (1, 3):
            raise ValueError(
                f"expected images of shape ([B,] 1 or 3, H, W), got {tuple(image.shape)}"
            )
        x = image.to(torch.float32) / float(self.pixel_max)
        if x.shape[-3] == 3 and self.channels == 1:
            x = x.mean(dim=-3, keepdim=True)
        if tuple(x.shape[-2:]) != self.image_size:
            shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
            x = TF.resize(x, size, antialias=shrink).clamp_(0.0, 1.0)
        if x.shape[-3] == 1 and self.channels == 3:
            x = TF.grayscale_to_rgb(x)
        return TF.normalize(x, [NORM_MEAN] * self.channels, [NORM_STD] * self.channels)


class ImageTensorDataset(Dataset):
    """Native-size images ``(N, C0, H0, W0)`` and labels ``(N,)`` in memory, transformed per item.

    The train/val/test views are :class:`torch.utils.data.Subset` s of one such dataset, so a
    split costs only an index list, and the resized float32 copy of an image exists only while
    its batch is in flight (1,797 digits at 3x224x224 float32 would be 1 GB).
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: ImageTransform
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.labels[i]


class SeededDataModule(pl.LightningDataModule):
    """Shared options and loaders of every data module.

    ``batch_size``; ``val_fraction`` of the training pool held out for validation;
    ``seed`` for every random choice (limits, splits, the training shuffle); ``num_workers``
    of the DataLoaders; ``substitute_for`` (say ``"MNIST"``) marks the description when the
    data stands in for the paper's. Subclasses set ``train/val/test_dataset`` in ``setup``.
    """

    task: ClassVar[str] = "classification"

    def __init__(
        self,
        *,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        substitute_for: str | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.substitute_for = substitute_for
        self.num_classes: int | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    def substitute_note(self) -> str:
        """``"; SUBSTITUTE for X (not the paper's data)"`` when ``substitute_for`` is set."""
        if not self.substitute_for:
            return ""
        return f"; SUBSTITUTE for {self.substitute_for} (not the paper's data)"

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() did not create this split")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=seeded_generator(self.seed, SALT_SHUFFLE) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Training batches, shuffled by a generator seeded from ``seed``."""
        self._ensure_setup()
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in a fixed order."""
        self._ensure_setup()
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in a fixed order."""
        self._ensure_setup()
        return self._loader(self.test_dataset, shuffle=False)

    def _ensure_setup(self) -> None:
        if self.train_dataset is None:
            self.setup("fit")


class ImageDataModule(SeededDataModule):
    """Shared plumbing of the image modules: options, description, the official split.

    Every image module yields batches ``(x, y)``: ``x`` float32 ``(B, channels, *image_size)``
    made by :class:`ImageTransform` (pixels in [-1, 1]); ``y`` int64 class labels. ``limit``
    caps the training pool and the test set separately (a seeded random subset of each).
    Options besides these are those of :class:`SeededDataModule`.
    """

    native_channels: int = 1
    """Channels of the stored images (for the description: "grey repeated", "RGB averaged")."""

    def __init__(
        self,
        *,
        image_size: SizeLike | None = (28, 28),
        channels: int | None = 1,
        limit: int | None = None,
        **options: Unpack[LoaderOptions],
    ) -> None:
        super().__init__(**options)
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        if image_size is None or channels is None:
            raise ValueError("image_size and channels must be given for this data module")
        self.image_size = as_size(image_size)
        self.channels = check_channels(channels)
        self.limit = limit
        self.official_counts: tuple[int, int] | None = None
        """``(train, test)`` sizes of the official files, set by :meth:`setup_official_split`."""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one model input."""
        return (self.channels, *self.image_size)

    def base_description(self) -> str:
        """What the data is and where it comes from (subclasses say it)."""
        raise NotImplementedError

    @property
    def description(self) -> str:
        """Short description of the data (printed by the experiment tables)."""
        parts = [self.base_description(), f"resized to {self.image_size[0]}x{self.image_size[1]}"]
        if self.channels == 3 and self.native_channels == 1:
            parts.append("grey repeated to 3 channels")
        elif self.channels == 1 and self.native_channels == 3:
            parts.append("RGB averaged to 1 channel")
        if self.train_dataset is not None:
            parts.append(
                f"split {len(self.train_dataset):,} train / {len(self.val_dataset):,} val / "
                f"{len(self.test_dataset):,} test"
            )
        return ", ".join(parts) + self.substitute_note()

    def source_note(self, root: object, before_setup: str) -> str:
        """``"<counts> from <root>[, limit L per split]"`` for official-split descriptions.

        ``before_setup`` stands in for the counts until :meth:`setup_official_split` ran.
        """
        counts = before_setup
        if self.official_counts is not None:
            n_train, n_test = self.official_counts
            counts = f"{n_train:,} train + {n_test:,} test images"
        lim = f", limit {self.limit:,} per split" if self.limit else ""
        return f"{counts} from {root}{lim}"

    def transform(self, pixel_max: float = 255.0) -> ImageTransform:
        """The per-item :class:`ImageTransform` to this module's ``image_size``/``channels``."""
        return ImageTransform(self.image_size, self.channels, pixel_max)

    def setup_official_split(
        self,
        train: tuple[torch.Tensor, torch.Tensor],
        test: tuple[torch.Tensor, torch.Tensor],
        pixel_max: float = 255.0,
    ) -> None:
        """Training pool -> train/val (``val_fraction``); the official test set -> test."""
        self.official_counts = (len(train[0]), len(test[0]))
        train_set = ImageTensorDataset(*train, self.transform(pixel_max))
        test_set = ImageTensorDataset(*test, self.transform(pixel_max))
        pool = limit_indices(len(train_set), self.limit, self.seed, SALT_LIMIT)
        train_idx, val_idx = split_indices(pool, [self.val_fraction], self.seed, SALT_SPLIT)
        test_idx = limit_indices(len(test_set), self.limit, self.seed, SALT_TEST_LIMIT)
        self.train_dataset = Subset(train_set, train_idx)
        self.val_dataset = Subset(train_set, val_idx)
        self.test_dataset = Subset(test_set, test_idx)
