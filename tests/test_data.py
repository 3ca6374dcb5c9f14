"""dbp.data: Fashion-MNIST from IDX files, CIFAR-10/100 from their pickle folders, and clear errors on bad files."""
from __future__ import annotations

import gzip
import importlib.metadata
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dbp.data import (DatasetError, FASHION_CLASSES, FASHION_ENV, ImageSet, load_cifar, load_dataset,
                      load_fashion_mnist, read_idx)

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


# ---- Fashion-MNIST (the real files) -------------------------------------------------------------

@pytest.fixture(scope="module")
def fashion_train():
    return load_fashion_mnist("train")


def _check_fashion(s: ImageSet, n: int, raw_images: np.ndarray):
    assert s.images.dtype == torch.uint8 and tuple(s.images.shape) == (n, 1, 32, 32)
    assert s.labels.dtype == torch.int64 and tuple(s.labels.shape) == (n,)
    assert s.classes == FASHION_CLASSES
    assert sorted(s.labels.unique().tolist()) == list(range(10))
    # the 2-pixel border is padding, the interior is the raw 28x28 image untouched
    border = s.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert not border.any()
    assert np.array_equal(s.images[:, 0, 2:30, 2:30].numpy(), raw_images)
    assert s.images.float().mean() > 50  # real clothing, not an empty array


def test_fashion_mnist_test_split(fashion_test):
    raw = read_idx(Path("/usr/share/datasets/fashion-mnist") / "t10k-images-idx3-ubyte.gz")
    _check_fashion(fashion_test, 10000, raw)
    assert torch.bincount(fashion_test.labels).tolist() == [1000] * 10  # the test split is balanced


def test_fashion_mnist_train_split(fashion_train):
    raw = read_idx(Path("/usr/share/datasets/fashion-mnist") / "train-images-idx3-ubyte.gz")
    _check_fashion(fashion_train, 60000, raw)
    assert torch.bincount(fashion_train.labels).tolist() == [6000] * 10


def test_imageset_helpers(fashion_test):
    h = fashion_test.head(5)
    assert len(h) == 5 and torch.equal(h.labels, fashion_test.labels[:5])
    x = h.float01()
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert torch.equal((x * 255).round().to(torch.uint8), h.images)
    assert torch.equal(fashion_test.float01(slice(2, 4)), x[2:4])


# ---- IDX files written in tmp_path ------------------------------------------------------------------

def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()


def write_fashion(root: Path, n: int = 6, seed: int = 0, mutate=None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte.gz"
            if mutate is not None:
                data = mutate(name, data)
            (root / name).write_bytes(gzip.compress(data))
    return images, labels


def test_fashion_from_root_and_env(tmp_path, monkeypatch):
    images, labels = write_fashion(tmp_path / "fm")
    s = load_fashion_mnist("test", tmp_path / "fm")
    assert torch.equal(s.images[:, 0, 2:30, 2:30], torch.from_numpy(images))
    assert s.labels.tolist() == labels.tolist()
    monkeypatch.setenv(FASHION_ENV, str(tmp_path / "fm"))
    assert torch.equal(load_fashion_mnist("train").images, s.images)
    assert torch.equal(load_dataset("fashion_mnist", "test").labels, s.labels)


def test_read_idx_plain_and_gz(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(idx_bytes(arr))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(idx_bytes(arr)))
    assert np.array_equal(read_idx(tmp_path / "a.idx"), arr)
    assert np.array_equal(read_idx(tmp_path / "a.idx.gz"), arr)


def _truncate(name, data):
    return data[:-7] if name.startswith("t10k-images") else data


def _bad_magic(name, data):
    return b"\x08\x03\x00\x00" + data[4:] if name.startswith("t10k-images") else data


def _float_idx(name, data):  # magic 0x0D = float32: a real IDX type, but not images
    return data[:2] + b"\x0d" + data[3:] if name.startswith("t10k-images") else data


def _short_labels(name, data):
    if name.startswith("t10k-labels"):
        return idx_bytes(np.zeros(3, dtype=np.uint8))
    return data


@pytest.mark.parametrize("mutate,words", [
    (_truncate, ["t10k-images-idx3-ubyte.gz", "truncated"]),
    (_bad_magic, ["t10k-images-idx3-ubyte.gz", "magic"]),
    (_float_idx, ["t10k-images-idx3-ubyte.gz", "magic"]),
    (_short_labels, ["fm", "do not match"]),
    (lambda name, data: b"" if name.startswith("t10k-images") else data, ["t10k-images-idx3-ubyte.gz", "empty"]),
])
def test_broken_idx_files(tmp_path, mutate, words):
    write_fashion(tmp_path / "fm", mutate=mutate)
    with pytest.raises(DatasetError) as e:
        load_fashion_mnist("test", tmp_path / "fm")
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    load_fashion_mnist("train", tmp_path / "fm")  # the intact split still loads


def test_corrupt_gzip_and_missing_files(tmp_path, monkeypatch):
    write_fashion(tmp_path / "fm")
    gz = tmp_path / "fm" / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:40])  # a cut-off download
    with pytest.raises(DatasetError, match=re.escape(str(gz))):
        load_fashion_mnist("test", tmp_path / "fm")
    write_fashion(tmp_path / "fm")
    data = bytearray(gz.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # bit rot inside the deflate stream: CRC error
    gz.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=re.escape(str(gz))):
        load_fashion_mnist("test", tmp_path / "fm")
    data[10] = 0xFF  # first deflate block header after gzip's 10-byte header: reserved block type, a zlib.error
    gz.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=re.escape(str(gz))):
        load_fashion_mnist("test", tmp_path / "fm")
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "nowhere.idx"))):
        read_idx(tmp_path / "nowhere.idx")
    (tmp_path / "fm" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as e:
        load_fashion_mnist("train", tmp_path / "fm")
    assert str(tmp_path / "fm") in str(e.value) and FASHION_ENV in str(e.value) and "apt-get" in str(e.value)
    monkeypatch.setenv(FASHION_ENV, str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "empty"))):
        load_dataset("fashion_mnist", "test")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", tmp_path / "fm")


# ---- CIFAR in the exact pickle format -----------------------------------------------------------------

def cifar_rows(images_nchw: np.ndarray) -> np.ndarray:
    """CIFAR's row layout, built independently of the loader: 1024 R, then 1024 G, then 1024 B, each row-major."""
    n = len(images_nchw)
    rows = np.empty((n, 3072), dtype=np.uint8)
    for i in range(n):
        for c in range(3):
            for y in range(32):
                rows[i, c * 1024 + y * 32: c * 1024 + y * 32 + 32] = images_nchw[i, c, y]
    return rows


def dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # python2-era files as CIFAR ships them; loaded with encoding="bytes"


def write_cifar10(root: Path, per_batch: int = 3, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        dump(root / name, {b"batch_label": name.encode(), b"labels": labels, b"data": cifar_rows(imgs),
                           b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]})
        out[name] = (imgs, labels)
    dump(root / "batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": CIFAR10_NAMES, b"num_vis": 3072})
    return out


def write_cifar100(root: Path, n: int = 4, seed: int = 1) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    out = {}
    for split in ("train", "test"):
        imgs = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        fine, coarse = rng.integers(0, 100, n).tolist(), rng.integers(0, 20, n).tolist()
        dump(root / split, {b"filenames": [b"x"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
                            b"coarse_labels": coarse, b"data": cifar_rows(imgs)})
        out[split] = (imgs, fine)
    dump(root / "meta", {b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                         b"coarse_label_names": [f"super{i}".encode() for i in range(20)]})
    return out


def test_cifar10_pickle_layout_round_trips(tmp_path, monkeypatch):
    written = write_cifar10(tmp_path / "cifar-10-batches-py")
    test = load_cifar(tmp_path / "cifar-10-batches-py", "test")
    imgs, labels = written["test_batch"]
    assert test.images.dtype == torch.uint8 and tuple(test.images.shape) == (3, 3, 32, 32)
    assert np.array_equal(test.images.numpy(), imgs) and test.labels.tolist() == labels
    assert test.labels.dtype == torch.int64 and test.images.is_contiguous()
    assert test.classes == tuple(n.decode() for n in CIFAR10_NAMES)
    train = load_cifar(tmp_path / "cifar-10-batches-py", "train")
    assert len(train) == 15  # the five data batches, in order
    assert np.array_equal(train.images.numpy(), np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)]))
    assert train.labels.tolist() == sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    monkeypatch.setenv("DBP_CIFAR10_DIR", str(tmp_path / "cifar-10-batches-py"))
    assert torch.equal(load_dataset("cifar10", "test").images, test.images)


def test_cifar100_fine_labels(tmp_path, monkeypatch):
    written = write_cifar100(tmp_path / "cifar-100-python")
    for split in ("train", "test"):
        s = load_cifar(tmp_path / "cifar-100-python", split, "cifar100")
        assert np.array_equal(s.images.numpy(), written[split][0]) and s.labels.tolist() == written[split][1]
        assert len(s.classes) == 100 and s.classes[7] == "class7"
    monkeypatch.setenv("DBP_CIFAR100_DIR", str(tmp_path / "cifar-100-python"))
    assert load_dataset("cifar100", "test").labels.tolist() == written["test"][1]


def test_cifar_without_meta_uses_numeric_names(tmp_path):
    write_cifar10(tmp_path / "c10")
    (tmp_path / "c10" / "batches.meta").unlink()
    assert load_cifar(tmp_path / "c10", "test").classes == tuple(str(i) for i in range(10))


# ---- the 20 real CIFAR-10 test images carried by foolbox's wheel ----------------------------------------

def foolbox_pngs(prefix: str) -> list[tuple[Path, int]]:
    """The PNGs named <prefix>_<index>_<label>.png, found as files: foolbox itself is never imported."""
    try:
        dist = importlib.metadata.distribution("foolbox")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("foolbox's wheel (data files only) is missing: `make test` installs it")
    folder = Path(dist.locate_file("foolbox/data"))
    files = sorted(folder.glob(f"{prefix}_*_*.png"))
    return [(f, int(f.stem.split("_")[2])) for f in files]


def _real_set(prefix: str):
    from PIL import Image
    pngs = foolbox_pngs(prefix)
    assert len(pngs) == 20
    hwc = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in pngs])
    assert hwc.shape == (20, 32, 32, 3) and hwc.dtype == np.uint8
    return hwc, [label for _, label in pngs]


def test_real_cifar10_images_from_foolbox(tmp_path):
    hwc, labels = _real_set("cifar10")
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    dump(root / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": labels,
                               b"data": cifar_rows(hwc.transpose(0, 3, 1, 2)), b"filenames": [b"f"] * 20})
    dump(root / "batches.meta", {b"label_names": CIFAR10_NAMES})
    s = load_cifar(root, "test")
    assert np.array_equal(s.images.permute(0, 2, 3, 1).numpy(), hwc)
    assert s.labels.tolist() == labels
    assert [s.classes[i] for i in labels[:3]] == ["cat", "ship", "ship"]  # the first CIFAR-10 test images
    # real photos: colour channels differ and the images are not constant
    assert (s.images[:, 0].float() - s.images[:, 2].float()).abs().mean() > 5 and s.images.float().std() > 30


def test_real_cifar100_images_from_foolbox(tmp_path):
    hwc, labels = _real_set("cifar100")
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    dump(root / "test", {b"fine_labels": labels, b"coarse_labels": [0] * 20,
                         b"data": cifar_rows(hwc.transpose(0, 3, 1, 2))})
    s = load_cifar(root, "test", "cifar100")
    assert np.array_equal(s.images.permute(0, 2, 3, 1).numpy(), hwc) and s.labels.tolist() == labels


# ---- CIFAR errors ---------------------------------------------------------------------------------------

def _corrupt_pickle(root):
    (root / "test_batch").write_bytes(b"\x80\x02}q\x00(X\x04\x00\x00\x00dat")  # cut short


def _garbage(root):
    (root / "test_batch").write_bytes(np.random.default_rng(0).bytes(4096))


def _not_a_dict(root):
    dump(root / "test_batch", [1, 2, 3])


def _no_labels(root):
    dump(root / "test_batch", {b"data": np.zeros((2, 3072), np.uint8)})


def _wrong_width(root):
    dump(root / "test_batch", {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]})


def _wrong_dtype(root):
    dump(root / "test_batch", {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]})


def _label_count(root):
    dump(root / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]})


def _label_range(root):
    dump(root / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})


def _label_type(root):
    dump(root / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"cat", b"dog"]})


def _missing_batch(root):
    (root / "test_batch").unlink()


@pytest.mark.parametrize("breaker,fname", [
    (_corrupt_pickle, "test_batch"), (_garbage, "test_batch"), (_not_a_dict, "test_batch"), (_no_labels, "test_batch"),
    (_wrong_width, "test_batch"), (_wrong_dtype, "test_batch"), (_label_count, "test_batch"),
    (_label_range, ""), (_label_type, "test_batch"), (_missing_batch, "test_batch"),
])
def test_broken_cifar_names_the_path(tmp_path, breaker, fname):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar10(root)
    breaker(root)
    with pytest.raises(DatasetError) as e:
        load_cifar(root, "test")
    assert str(root / fname).rstrip("/") in str(e.value), str(e.value)
    load_cifar(root, "train")  # the other files are unaffected


def test_missing_cifar_folder_and_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "absent"))):
        load_cifar(tmp_path / "absent", "test")
    monkeypatch.delenv("DBP_CIFAR10_DIR", raising=False)
    with pytest.raises(DatasetError, match="DBP_CIFAR10_DIR"):
        load_dataset("cifar10", "test")
    write_cifar10(tmp_path / "c10")
    with pytest.raises(ValueError, match="split"):
        load_cifar(tmp_path / "c10", "val")
    with pytest.raises(ValueError, match="variant"):
        load_cifar(tmp_path / "c10", "test", "cifar20")
    with pytest.raises(ValueError, match="mnist"):
        load_dataset("mnist", "test")
