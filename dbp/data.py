"""Datasets as uint8 tensors [N, C, 32, 32] + int64 labels; no downloads, clear errors on bad files.

Fashion-MNIST is read from the IDX files of Debian's `dataset-fashion-mnist` (its recompressed gz files
fail torchvision's md5 check) and zero-padded 28 -> 32 so every model shares the 32x32 code path.
CIFAR-10/100 come from the standard python-pickle folders given by path.
"""
from __future__ import annotations

import gzip
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_ENV = "DBP_FASHION_MNIST_DIR"
FASHION_DEFAULT = "/usr/share/datasets/fashion-mnist"
CIFAR10_ENV, CIFAR100_ENV = "DBP_CIFAR10_DIR", "DBP_CIFAR100_DIR"
DATASETS = ("fashion_mnist", "cifar10", "cifar100")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


class DatasetError(RuntimeError):
    """A dataset is missing or unreadable; the message names the path and how to fix it."""


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "ImageSet":
        return ImageSet(self.images[:n], self.labels[:n], self.classes)

    def float01(self, idx=slice(None)) -> torch.Tensor:
        return self.images[idx].float().div_(255.0)


def read_idx(path: str | Path) -> np.ndarray:
    """Parse a (gzipped) IDX file, validating magic, shape and size."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"missing IDX file {path}")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 8 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise DatasetError(f"{path} is not a uint8 IDX file (bad magic {data[:4].hex() if data else 'empty'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if len(data) != header + int(np.prod(shape)):
        raise DatasetError(f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes) but file holds "
                           f"{len(data) - header} bytes (truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get(FASHION_ENV, FASHION_DEFAULT))


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> ImageSet:
    root = Path(root) if root is not None else fashion_mnist_dir()
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    img_path, lab_path = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.exists() or not lab_path.exists():
        raise DatasetError(
            f"Fashion-MNIST not found in {root}: expected {img_path.name} and {lab_path.name}. "
            f"Install it with `apt-get install dataset-fashion-mnist` (as root), or put the four IDX .gz files "
            f"in a folder and point {FASHION_ENV} at it.")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    padded = np.zeros((len(images), 1, 32, 32), dtype=np.uint8)
    padded[:, 0, 2:30, 2:30] = images
    return ImageSet(torch.from_numpy(padded), torch.from_numpy(labels.astype(np.int64)), FASHION_CLASSES)


def _unpickle(path: Path) -> dict:
    if not path.exists():
        raise DatasetError(f"missing CIFAR file {path}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise DatasetError(f"cannot unpickle CIFAR file {path}: {type(e).__name__}: {e}") from e


def _cifar_arrays(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        raise DatasetError(f"{path} is not a CIFAR batch: needs keys b'data' and {label_key!r}")
    try:
        data, labels = np.asarray(d[b"data"]), np.asarray(d[label_key], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable data or labels ({e})") from e
    if labels.ndim != 1:
        raise DatasetError(f"{path}: labels have shape {labels.shape}, expected [N]")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DatasetError(f"{path}: data {data.shape} {data.dtype} / {len(labels)} labels is not "
                           f"CIFAR's [N, 3072] uint8 layout")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(root: str | Path, split: str = "test", variant: str = "cifar10") -> ImageSet:
    """Read `cifar-10-batches-py` (variant cifar10) or `cifar-100-python` (variant cifar100, fine labels)."""
    root = Path(root)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not root.is_dir():
        raise DatasetError(f"CIFAR folder {root} does not exist (expected the extracted "
                           f"{'cifar-10-batches-py' if variant == 'cifar10' else 'cifar-100-python'} folder)")
    if variant == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, meta, names_key = b"labels", "batches.meta", b"label_names"
    elif variant == "cifar100":
        files, label_key, meta, names_key = [split], b"fine_labels", "meta", b"fine_label_names"
    else:
        raise ValueError(f"variant must be 'cifar10' or 'cifar100', got {variant!r}")
    parts = [_cifar_arrays(root / f, label_key) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    n_classes = 10 if variant == "cifar10" else 100
    if labels.min() < 0 or labels.max() >= n_classes:
        raise DatasetError(f"{root}: labels outside [0, {n_classes})")
    classes = tuple(str(i) for i in range(n_classes))
    if (root / meta).exists():
        m = _unpickle(root / meta)
        if isinstance(m, dict) and names_key in m:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in m[names_key])
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), classes)


def load_dataset(name: str, split: str, root: str | Path | None = None) -> ImageSet:
    """One entry point for the CLIs: name in DATASETS; CIFAR roots come from `root` or their env var."""
    if name == "fashion_mnist":
        return load_fashion_mnist(split, root)
    if name in ("cifar10", "cifar100"):
        env = CIFAR10_ENV if name == "cifar10" else CIFAR100_ENV
        root = root or os.environ.get(env)
        if not root:
            raise DatasetError(f"{name} needs its folder: pass --data_root or set {env}")
        return load_cifar(root, split, name)
    raise ValueError(f"unknown dataset {name!r}; known: {DATASETS}")
