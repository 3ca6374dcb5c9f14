"""Realistic request bodies: Fashion-MNIST test images as the 28x28 greyscale PNG files a user would upload.

Rendered once per run into a folder (the locust workers and the drills only read PNG bytes), so neither
needs torch or the IDX files at request time.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

ENV_DIR = "DBP_LOADTEST_IMAGES"
UPLOAD_FIELD = "images"  # the multipart field of /classify and /purify (service/app/api/uploads.py)


def render_pngs(out_dir: str | Path, n: int = 64, seed: int = 0) -> list[Path]:
    """Write n test-split images (a seeded random choice, all classes) as 28x28 PNGs; returns the paths."""
    from dbp.data import load_fashion_mnist  # imports torch: only in the process that prepares the run
    test = load_fashion_mnist("test")
    idx = np.random.default_rng(seed).choice(len(test.labels), size=n, replace=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in idx:
        # the dataset is padded to 32x32 for the models; users have the original 28x28 files
        img = test.images[int(i), 0, 2:30, 2:30].numpy().astype(np.uint8)
        p = out / f"fashion_{int(i):05d}_label{int(test.labels[int(i)])}.png"
        Image.fromarray(img, mode="L").save(p, format="PNG")
        paths.append(p)
    return paths


def load_pngs(folder: str | Path | None = None) -> list[tuple[str, bytes]]:
    """(file name, PNG bytes) of every PNG in folder (default: $DBP_LOADTEST_IMAGES)."""
    folder = Path(folder or os.environ.get(ENV_DIR, ""))
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder {str(folder)!r}: set {ENV_DIR} or call render_pngs() first")
    files = sorted(folder.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .png files")
    return [(p.name, p.read_bytes()) for p in files]


def is_png(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format == "PNG"
    except Exception:  # noqa: BLE001 - anything unreadable is simply not a PNG
        return False
