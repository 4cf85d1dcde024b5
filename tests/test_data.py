"""Tests for experiments/data/: the real loading code on tiny files written here.

No network and no dependency on /usr/share: IDX files, CIFAR-10 pickles and PNG folders are
written to tmp_path; downloads are simulated failing by monkeypatching urllib / torchvision.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.gaussian_process.kernels import RBF

from experiments import data as D

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# helpers that write real file formats
# --------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """Write ``array`` (uint8) as an IDX file: magic 0x0800|ndim, sizes, data (big-endian)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def mnist_like(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose every pixel equals ``5 * (i + offset)`` and labels ``(i + offset) % 10``."""
    values = (5 * (np.arange(n) + offset)) % 256
    images = np.broadcast_to(values[:, None, None], (n, 28, 28)).astype(np.uint8)
    return images, ((np.arange(n) + offset) % 10).astype(np.uint8)


def write_mnist_dir(folder: Path, n_train: int, n_test: int, compress_train: bool = False) -> None:
    """The four IDX files (train optionally gzipped, t10k plain)."""
    xtr, ytr = mnist_like(n_train)
    xte, yte = mnist_like(n_test, offset=1000)
    write_idx(folder / "train-images-idx3-ubyte", xtr, compress_train)
    write_idx(folder / "train-labels-idx1-ubyte", ytr, compress_train)
    write_idx(folder / "t10k-images-idx3-ubyte", xte, False)
    write_idx(folder / "t10k-labels-idx1-ubyte", yte, False)


def expected_pixel(value: float, pixel_max: float = 255.0) -> float:
    return (value / pixel_max - 0.5) / 0.5


def write_cifar(root: Path, per_batch: int = 4, n_test: int = 6) -> Path:
    """cifar-10-batches-py with data_batch_1..5, test_batch, batches.meta (R=0, G=102, B=255)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    one = np.concatenate([np.full(1024, 0), np.full(1024, 102), np.full(1024, 255)])

    def batch(n: int, first_label: int) -> dict:
        return {
            "data": np.tile(one, (n, 1)).astype(np.uint8),
            "labels": [(first_label + i) % 10 for i in range(n)],
        }

    for b in range(1, 6):
        with open(folder / f"data_batch_{b}", "wb") as fh:
            pickle.dump(batch(per_batch, b), fh)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump(batch(n_test, 0), fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, fh)
    return folder


class NoMD5CIFAR10(torchvision.datasets.CIFAR10):
    """CIFAR10 with the md5 entries set to None, so synthetic files pass the integrity check."""

    train_list: ClassVar = [[name, None] for name, _ in torchvision.datasets.CIFAR10.train_list]
    test_list: ClassVar = [[name, None] for name, _ in torchvision.datasets.CIFAR10.test_list]
    meta: ClassVar = {**torchvision.datasets.CIFAR10.meta, "md5": None}


class SyntheticCIFARModule(D.TorchvisionDataModule):
    def dataset_class(self) -> type:
        return NoMD5CIFAR10 if self.name == "cifar10" else super().dataset_class()


def write_png_tree(root: Path, split: str, spec: dict[str, int], mode: str = "RGB") -> None:
    """``root/split/<class>/<i>.png`` with ``spec[class]`` images of varying size."""
    for c, n in spec.items():
        folder = root / split / c
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            size = (20 + 3 * i, 12 + i)
            color = (200, 100, 0) if mode == "RGB" else 128
            Image.new(mode, size, color).save(folder / f"{i}.png")


def first_batch(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader))


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------


def test_preprocess_range_resize_and_channels():
    x = torch.tensor([[[[0, 255], [255, 0]]]], dtype=torch.uint8)  # (1, 1, 2, 2)
    y = D.ImageTransform(image_size=(2, 2), channels=1, pixel_max=255)(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, torch.tensor([[[[-1.0, 1.0], [1.0, -1.0]]]]))
    big = D.ImageTransform(image_size=(9, 7), channels=3, pixel_max=255)(x)
    assert big.shape == (1, 3, 9, 7)
    assert torch.equal(big[:, 0], big[:, 1]) and torch.equal(big[:, 0], big[:, 2])
    assert big.min() >= -1 and big.max() <= 1
    rgb = torch.zeros(2, 3, 40, 40, dtype=torch.uint8)
    rgb[:, 1] = 102
    rgb[:, 2] = 255
    grey = D.ImageTransform(image_size=(8, 8), channels=1, pixel_max=255)(rgb)  # shrinks
    assert grey.shape == (2, 1, 8, 8)
    torch.testing.assert_close(grey, torch.full_like(grey, expected_pixel(357 / 3)))
    with pytest.raises(ValueError, match="channels"):
        D.ImageTransform(image_size=2, channels=2)


# --------------------------------------------------------------------------------------------
# 1. digits (real data)
# --------------------------------------------------------------------------------------------


def test_digits_real_data_and_splits():
    dm = D.DigitsDataModule(seed=3)
    dm.setup("fit")
    sizes = [len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)]
    assert sum(sizes) == 1797 and sizes == [1258, 180, 359]
    assert dm.num_classes == 10 and dm.input_shape == (1, 28, 28) and dm.task == "classification"
    assert "1,797" in dm.description and "digits" in dm.description
    idx = [set(ds.indices) for ds in (dm.train_dataset, dm.val_dataset, dm.test_dataset)]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    labels = torch.cat([y for _, y in dm.train_dataloader()])
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    x, y = first_batch(dm.val_dataloader())
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == -1.0 and x.max() == 1.0  # digits use the full 0..16 range

    same = D.DigitsDataModule(seed=3)
    same.setup()
    assert same.test_dataset.indices == dm.test_dataset.indices
    assert torch.equal(
        first_batch(same.train_dataloader())[1], first_batch(dm.train_dataloader())[1]
    )
    other = D.DigitsDataModule(seed=4)
    other.setup()
    assert other.test_dataset.indices != dm.test_dataset.indices


def test_digits_alexnet_size_is_lazy_and_limit():
    dm = D.DigitsDataModule(image_size=(224, 224), channels=3, batch_size=4, limit=50)
    dm.setup()
    assert dm.input_shape == (3, 224, 224)
    assert len(dm.train_dataset) + len(dm.val_dataset) + len(dm.test_dataset) == 50
    # storage stays native uint8 (1,797 x 1 x 8 x 8 = 115 kB), not 1 GB of float32
    assert dm.train_dataset.dataset.images.dtype == torch.uint8
    assert dm.train_dataset.dataset.images.shape == (1797, 1, 8, 8)
    x, _ = first_batch(dm.train_dataloader())
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 2]) and x.min() >= -1 and x.max() <= 1
    assert "50 of 1,797" in dm.description and "3 channels" in dm.description
    sub = D.DigitsDataModule(substitute_for="MNIST")
    assert "SUBSTITUTE for MNIST" in sub.description


def test_bad_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        D.DigitsDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match="limit"):
        D.DigitsDataModule(limit=0)
    with pytest.raises(ValueError, match="image_size"):
        D.DigitsDataModule(image_size=(1, 2, 3))
    with pytest.raises(ValueError, match="cannot split"):
        D.DigitsDataModule(limit=2, val_fraction=0.5, test_fraction=0.5).setup()


# --------------------------------------------------------------------------------------------
# 2. Fashion-MNIST from IDX files (own reader)
# --------------------------------------------------------------------------------------------


def test_idx_files_gzip_plain_and_corrupt(tmp_path):
    """torchvision reads the IDX files, gzipped (staged in a temporary folder) or plain."""
    loaded = []
    for compress in (True, False):
        folder = tmp_path / f"gz{compress}"
        write_mnist_dir(folder, n_train=6, n_test=3, compress_train=compress)
        files = D.find_fashion_mnist_files(folder)
        assert files["train_images"].name.endswith(".gz") == compress
        (xtr, ytr), (xte, yte) = D.load_fashion_mnist(files)
        np.testing.assert_array_equal(xtr[:, 0].numpy(), mnist_like(6)[0])
        np.testing.assert_array_equal(ytr.numpy(), mnist_like(6)[1])
        np.testing.assert_array_equal(xte[:, 0].numpy(), mnist_like(3, offset=1000)[0])
        assert xtr.dtype == torch.uint8 and ytr.dtype == torch.int64 and xtr.shape == (6, 1, 28, 28)
        assert sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in files.values())
        loaded.append((xtr, yte))
    assert torch.equal(loaded[0][0], loaded[1][0]) and torch.equal(loaded[0][1], loaded[1][1])

    folder = tmp_path / "gzTrue"
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(struct.pack(">IIII", 0x0D03, 1, 2, 2) + b"\0" * 16))
    with pytest.raises(ValueError, match="unsigned-byte") as err:  # a float32 IDX file
        D.load_fashion_mnist(D.find_fashion_mnist_files(folder))
    assert str(images) in str(err.value)
    write_mnist_dir(folder, n_train=6, n_test=3, compress_train=True)
    labels = folder / "t10k-labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">II", 0x0801, 10) + b"\0" * 3)
    with pytest.raises(ValueError, match="truncated"):
        D.load_fashion_mnist(D.find_fashion_mnist_files(folder))
    write_idx(labels, np.zeros(4, dtype=np.uint8), False)  # 4 labels for 3 images
    with pytest.raises(ValueError, match="expected images"):
        D.load_fashion_mnist(D.find_fashion_mnist_files(folder))
    write_idx(labels, np.full(3, 10, dtype=np.uint8), False)
    with pytest.raises(ValueError, match=r"labels must be 0\.\.9"):
        D.load_fashion_mnist(D.find_fashion_mnist_files(folder))


def test_fashion_mnist_local(tmp_path):
    write_mnist_dir(tmp_path, n_train=40, n_test=12, compress_train=True)
    assert D.fashion_mnist_available(tmp_path)
    assert D.FashionMNISTDataModule.available(tmp_path)
    dm = D.build_datamodule("fashion_mnist_local", root=tmp_path, batch_size=64, val_fraction=0.25)
    assert isinstance(dm, D.FashionMNISTDataModule)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (30, 10, 12)
    x, y = first_batch(dm.test_dataloader())
    assert x.shape == (12, 1, 28, 28) and y.dtype == torch.int64
    # test set = the t10k files: image i has pixels 5 * (1000 + i) % 256, label (1000 + i) % 10
    expect = torch.tensor([expected_pixel((5 * (1000 + i)) % 256) for i in range(12)])
    torch.testing.assert_close(x.amax(dim=(1, 2, 3)), expect)
    torch.testing.assert_close(x.amin(dim=(1, 2, 3)), expect)
    assert y.tolist() == [(1000 + i) % 10 for i in range(12)]
    x, y = first_batch(dm.train_dataloader())
    # pixel value identifies the image, whose label must match
    idx = torch.round((x[:, 0, 0, 0] * 0.5 + 0.5) * 255 / 5).long()
    assert torch.equal(y, idx % 10)
    assert "40 train + 12 test" in dm.description

    small = D.FashionMNISTDataModule(tmp_path, image_size=(32, 32), channels=3, limit=8)
    small.setup()
    assert (len(small.train_dataset) + len(small.val_dataset), len(small.test_dataset)) == (8, 8)
    x, _ = first_batch(small.train_dataloader())
    assert x.shape[1:] == (3, 32, 32) and small.input_shape == (3, 32, 32)


def test_fashion_mnist_missing_root_and_file(tmp_path):
    missing = tmp_path / "nowhere"
    assert not D.fashion_mnist_available(missing)
    with pytest.raises(FileNotFoundError) as err:
        D.FashionMNISTDataModule(root=missing)
    msg = str(err.value)
    assert str(missing) in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "root=" in msg and "data=digits" in msg
    write_mnist_dir(tmp_path, 4, 4)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    assert not D.fashion_mnist_available(tmp_path)
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as err:
        D.FashionMNISTDataModule(root=tmp_path)
    assert str(tmp_path / "t10k-labels-idx1-ubyte.gz") in str(err.value)


# --------------------------------------------------------------------------------------------
# 3. torchvision datasets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_torchvision_mnist_layout(tmp_path, name, folder):
    write_mnist_dir(tmp_path / folder / "raw", n_train=30, n_test=7)  # uncompressed IDX
    dm = D.build_datamodule(name, root=str(tmp_path), val_fraction=0.2, seed=1)
    assert isinstance(dm, D.TorchvisionDataModule) and dm.input_shape == (1, 28, 28)
    dm.prepare_data()  # download=False: nothing to do
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (24, 6, 7)
    x, y = first_batch(dm.test_dataloader())
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [(1000 + i) % 10 for i in range(7)]
    torch.testing.assert_close(
        x[:, 0, 5, 5], torch.tensor([expected_pixel((5 * (1000 + i)) % 256) for i in range(7)])
    )
    assert f"torchvision {'MNIST' if name == 'mnist' else 'Fashion-MNIST'}" in dm.description


def test_torchvision_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        D.TorchvisionDataModule("mnist", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "download=True" in msg
    assert "train-images-idx3-ubyte" in msg and "network" in msg
    # gzipped files only: torchvision needs them decompressed -> the hint says so
    write_mnist_dir(tmp_path / "MNIST" / "raw", 3, 3, compress_train=True)
    with pytest.raises(FileNotFoundError, match="gunzip") as err:
        D.TorchvisionDataModule("mnist", root=tmp_path)
    assert "train-labels-idx1-ubyte" in str(err.value)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        D.TorchvisionDataModule("cifar10", root=tmp_path)
    with pytest.raises(ValueError, match="unknown torchvision"):
        D.TorchvisionDataModule("svhn", root=tmp_path)  # type: ignore[arg-type]


def test_torchvision_cifar10_synthetic(tmp_path):
    write_cifar(tmp_path, per_batch=4, n_test=6)
    dm = SyntheticCIFARModule("cifar10", root=tmp_path, val_fraction=0.25, batch_size=32)
    assert dm.input_shape == (3, 32, 32)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (15, 5, 6)
    x, y = first_batch(dm.test_dataloader())
    assert x.shape == (6, 3, 32, 32) and y.tolist() == list(range(6))
    # HWC -> CHW is right: channel c holds the value written for it
    for c, v in enumerate((0, 102, 255)):
        torch.testing.assert_close(x[:, c], torch.full_like(x[:, c], expected_pixel(v)))
    grey = SyntheticCIFARModule("cifar10", root=tmp_path, channels=1, image_size=(28, 28))
    xg, _ = first_batch(grey.train_dataloader())
    assert xg.shape[1:] == (1, 28, 28)
    torch.testing.assert_close(xg, torch.full_like(xg, expected_pixel(357 / 3)))
    assert "RGB averaged" in grey.description
    # the unpatched class md5-checks the files: synthetic ones fail with a clear error
    real = D.TorchvisionDataModule("cifar10", root=tmp_path)
    with pytest.raises(RuntimeError, match="md5"):
        real.setup()


def test_download_without_network_mnist(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    (tmp_path / "keep.txt").write_text("unrelated")
    dm = D.TorchvisionDataModule("mnist", root=tmp_path, download=True)
    with pytest.raises(
        RuntimeError, match="could not download MNIST from the internet: no network"
    ):
        dm.prepare_data()
    assert not (tmp_path / "MNIST").exists()  # the raw/ folder torchvision created is gone
    assert (tmp_path / "keep.txt").read_text() == "unrelated"


def test_download_without_network_cifar_removes_partial_file(tmp_path, monkeypatch):
    written = []

    def partial_download(url, filename, chunk_size=1024):
        Path(filename).write_bytes(b"\x1f\x8b half an archive")
        written.append(Path(filename))
        raise urllib.error.URLError("connection reset")

    utils = torchvision.datasets.utils
    monkeypatch.setattr(utils, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(utils, "_urlretrieve", partial_download)
    root = tmp_path / "new_root"
    dm = D.TorchvisionDataModule("cifar10", root=root, download=True)
    with pytest.raises(RuntimeError, match="could not download CIFAR-10") as err:
        dm.prepare_data()
    assert isinstance(err.value.__cause__, urllib.error.URLError)
    assert written and written[0].name == "cifar-10-python.tar.gz"
    assert not root.exists()  # created by the failed download, so removed entirely

    root.mkdir()
    (root / "cifar-10-batches-py").mkdir()
    (root / "cifar-10-batches-py" / "mine.txt").write_text("x")
    with pytest.raises(RuntimeError, match="no network"):
        D.TorchvisionDataModule("cifar10", root=root, download=True).prepare_data()
    assert sorted(p.name for p in root.rglob("*")) == ["cifar-10-batches-py", "mine.txt"]


def test_download_true_with_files_present_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    write_mnist_dir(tmp_path / "MNIST" / "raw", 5, 5)
    dm = D.TorchvisionDataModule("mnist", root=tmp_path, download=True, val_fraction=0.2)
    dm.prepare_data()
    dm.setup()
    assert len(dm.test_dataset) == 5


# --------------------------------------------------------------------------------------------
# 4. image folders
# --------------------------------------------------------------------------------------------


def test_imagefolder_with_val_folder(tmp_path):
    write_png_tree(tmp_path, "train", {"cat": 3, "dog": 4})
    write_png_tree(tmp_path, "train", {"eel": 2}, mode="L")
    write_png_tree(tmp_path, "val", {"dog": 2})  # a class subset: indices must follow train/
    dm = D.build_datamodule("imagefolder", root=tmp_path, image_size=(16, 12), batch_size=16)
    assert isinstance(dm, D.ImageFolderDataModule)
    assert dm.num_classes == 3 and dm.input_shape == (3, 16, 12)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (9, 2, 2)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (9, 3, 16, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sorted(y.tolist()) == [0] * 3 + [1] * 4 + [2] * 2
    assert x.min() >= -1 and x.max() <= 1
    eel = x[y == 2]
    torch.testing.assert_close(eel, torch.full_like(eel, expected_pixel(128)), atol=0.01, rtol=0)
    cat = x[y == 0]
    torch.testing.assert_close(
        cat[:, 0], torch.full_like(cat[:, 0], expected_pixel(200)), atol=0.01, rtol=0
    )
    xv, yv = first_batch(dm.val_dataloader())
    assert yv.tolist() == [1, 1] and xv.shape == (2, 3, 16, 12)
    assert "test from val/ folder" in dm.description

    grey = D.ImageFolderDataModule(tmp_path, image_size=8, channels=1)
    xg, _ = first_batch(grey.val_dataloader())
    assert xg.shape == (2, 1, 8, 8)
    torch.testing.assert_close(xg, torch.full_like(xg, expected_pixel(100)), atol=0.01, rtol=0)


def test_imagefolder_split_train_and_errors(tmp_path):
    write_png_tree(tmp_path, "train", {"a": 10, "b": 10})
    dm = D.ImageFolderDataModule(tmp_path, image_size=8, val_fraction=0.2, test_fraction=0.1)
    dm.setup()
    sizes = (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset))
    assert sizes == (14, 4, 2)
    all_idx = dm.train_dataset.indices + dm.val_dataset.indices + dm.test_dataset.indices
    assert sorted(all_idx) == list(range(20))
    again = D.ImageFolderDataModule(tmp_path, image_size=8, val_fraction=0.2, test_fraction=0.1)
    again.setup()
    assert again.val_dataset.indices == dm.val_dataset.indices
    limited = D.ImageFolderDataModule(tmp_path, image_size=8, limit=10)
    limited.setup()
    assert len(limited.train_dataset) + len(limited.val_dataset) + len(limited.test_dataset) == 10

    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        D.ImageFolderDataModule(tmp_path / "missing")
    assert "train/<class_name>/<image>" in str(err.value)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no class folders"):
        D.ImageFolderDataModule(tmp_path / "empty")
    write_png_tree(tmp_path, "val", {"zebra": 1})
    with pytest.raises(ValueError, match="zebra"):
        D.ImageFolderDataModule(tmp_path, image_size=8).setup()


# --------------------------------------------------------------------------------------------
# 5. GP regression
# --------------------------------------------------------------------------------------------


def test_gp_shapes_and_determinism():
    dm = D.build_datamodule("gp", n_train=300, n_test=50, batch_size=64, seed=5)
    assert isinstance(dm, D.GPRegressionDataModule)
    assert dm.input_shape == (2,) and dm.num_classes is None and dm.task == "regression"
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (270, 30, 50)
    x, y = first_batch(dm.train_dataloader())
    assert x.shape == (64, 2) and y.shape == (64, 1)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    same = D.GPRegressionDataModule(n_train=300, n_test=50, seed=5)
    same.setup()
    assert torch.equal(same.x, dm.x) and torch.equal(same.y, dm.y)
    other = D.GPRegressionDataModule(n_train=300, n_test=50, seed=6)
    other.setup()
    assert not torch.equal(other.y, dm.y)
    assert 2.5 < dm.x.std() < 5.5  # inputs 4 * N(0, I)
    assert "GP" in dm.description and "270 train" in dm.description


@pytest.mark.parametrize("seed", [0, 1])
def test_gp_covariance_matches_rbf(seed):
    """Variogram check: 1 - E[(y_i - y_j)^2] / 2 ~= exp(-d^2 / 2) for pairs at distance d."""
    dm = D.GPRegressionDataModule(n_train=1500, n_test=1, seed=seed)
    dm.setup()
    x, y = dm.x.double(), dm.y.double()[:, 0]
    i, j = torch.triu_indices(len(x), len(x), 1)
    dist = (x[i] - x[j]).norm(dim=1)
    sq = (y[i] - y[j]) ** 2
    corr = {}
    for d, tol in [(0.125, 0.05), (0.5, 0.1), (1.0, 0.15), (2.0, None)]:
        mask = (dist > d - 0.1) & (dist < d + 0.1) if d > 0.2 else dist < 0.25
        corr[d] = 1 - sq[mask].mean().item() / 2
        if tol is not None:
            assert abs(corr[d] - np.exp(-(d**2) / 2)) < tol, (d, corr[d])
    assert corr[0.125] > corr[0.5] > corr[1.0] > corr[2.0]


def test_gp_sampler_matches_kernel_in_distribution():
    """Over many independent samples at 3 fixed points the covariance is the RBF kernel."""
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([D.sample_gp(pts, generator=gen) for _ in range(4000)])
    cov = torch.cov(draws.T)
    # ground truth: scikit-learn's RBF kernel, exp(-|a - b|^2 / 2)
    expect = torch.from_numpy(RBF(length_scale=1.0)(pts.double().numpy()))
    torch.testing.assert_close(cov, expect, atol=0.06, rtol=0)


def test_rbf_kernel_is_sklearns():
    """The sampler's kernel is scikit-learn's ``variance * RBF(length_scale)``."""
    gen = torch.Generator().manual_seed(0)
    a = 3 * torch.randn(40, 2, dtype=torch.float64, generator=gen)
    b = 3 * torch.randn(30, 2, dtype=torch.float64, generator=gen)
    for length, variance in [(1.0, 1.0), (0.5, 2.0)]:
        expect = variance * RBF(length_scale=length)(a.numpy(), b.numpy())
        got = D.rbf_kernel(a, b, length_scale=length, variance=variance)
        np.testing.assert_allclose(got.numpy(), expect, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# 6. factory + Lightning integration
# --------------------------------------------------------------------------------------------


def test_factory_unknown_name():
    with pytest.raises(ValueError, match="unknown data set 'imagenet'") as err:
        D.build_datamodule("imagenet")
    for name in D.DATAMODULE_NAMES:
        assert name in str(err.value)
    assert isinstance(D.build_datamodule("digits", limit=30), D.DigitsDataModule)


class _TinyClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_runs_with_digits(tmp_path):
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_TinyClassifier(), datamodule=D.DigitsDataModule(batch_size=32))
    assert "val_loss" in trainer.callback_metrics


# --------------------------------------------------------------------------------------------
# 7. shared pieces: seeded splits, the transform
# --------------------------------------------------------------------------------------------


def test_split_and_limit_are_the_seeded_permutation():
    """Pieces are consecutive runs of ``randperm(n)`` from the generator seeded with
    ``seed * 1_000_003 + salt`` (the samples the committed results were trained on)."""
    indices = list(range(100, 150))
    rest, val, test = D.split_indices(indices, [0.1, 0.2], seed=7, salt=2)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(7 * 1_000_003 + 2))
    expect = [indices[i] for i in perm.tolist()]
    assert val == expect[:5] and test == expect[5:15] and rest == expect[15:]
    assert D.split_indices(indices, [0.1, 0.2], seed=7, salt=2) == [rest, val, test]
    assert D.split_indices(indices, [0.1, 0.2], seed=8, salt=2)[1] != val
    rest, tiny, none = D.split_indices(indices, [0.001, 0.0], seed=0, salt=2)
    assert (len(rest), len(tiny), len(none)) == (49, 1, 0)  # a non-zero fraction gets >= 1
    with pytest.raises(ValueError, match="cannot split"):
        D.split_indices([1, 2], [0.5, 0.5], seed=0, salt=2)

    kept = D.limit_indices(30, 8, seed=3, salt=1)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(3 * 1_000_003 + 1))
    assert kept == sorted(perm[:8].tolist())
    assert D.limit_indices(30, None, seed=3, salt=1) == list(range(30))
    assert D.limit_indices(30, 40, seed=3, salt=1) == list(range(30))


def test_transform_is_picklable_and_checks_shapes():
    t = D.ImageTransform(image_size=5, channels=3)
    assert t.image_size == (5, 5)
    clone = pickle.loads(pickle.dumps(t))
    x = torch.randint(0, 256, (1, 7, 7), dtype=torch.uint8)
    assert torch.equal(clone(x), t(x)) and t(x).shape == (3, 5, 5)
    with pytest.raises(ValueError, match="1 or 3"):
        t(torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="images but"):
        D.ImageTensorDataset(torch.zeros(3, 1, 2, 2), torch.zeros(2), t)


def test_gp_without_validation_split():
    dm = D.GPRegressionDataModule(n_train=20, n_test=5, val_fraction=0.0, seed=1)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (20, 0, 5)
    assert torch.equal(dm.train_dataset.tensors[0], dm.x[:20])  # sorted: the sampled order
