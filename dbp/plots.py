"""PNG outputs people look at: image grids and simple line/bar charts (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def image_grid(rows: Sequence[torch.Tensor], path: str | Path, scale: int = 3, pad: int = 2) -> Path:
    """Each row: [N, C, H, W] in [0,1]; rows stacked top to bottom. Grey or RGB."""
    rows = [r.detach().cpu().float().clamp(0, 1) for r in rows]
    n = max(len(r) for r in rows)
    c, h, w = rows[0].shape[1:]
    canvas = np.ones((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), dtype=np.float32)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            arr = img.permute(1, 2, 0).numpy()
            arr = np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = arr
    im = Image.fromarray((canvas * 255).round().astype(np.uint8))
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return Path(path)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write (PNG, 110 dpi for the project's figures) and close a matplotlib figure; returns the path."""
    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _plt().close(fig)
    return path


def line_plot(series: dict[str, Sequence[float]], path: str | Path, xlabel: str, ylabel: str, title: str = "") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        ax.plot(range(len(ys)), ys, label=name, marker="o" if len(ys) < 40 else None)
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.set_title(title), ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return save_figure(fig, path)
