"""What the served-attack commands (and tests/service/test_gateway_seed_attack.py) share.

- held-out images: the LAST n of the Fashion-MNIST test set (the gate measures the first 256), on the 1/255
  grid, so a PNG carries them exactly and the gateway's tensor is the attacker's tensor;
- the served models in-process: `served_services` builds dbp.serving.services' PurifierService/ClassifierService
  from a repository exactly as Triton's model.py does (the same settings from config.pbtxt), so the noise a
  seed draws offline is the noise Triton draws for it, by the same code;
- the stack: Triton (the project's launcher) + the gateway (`python -m service`) on free loopback ports, the
  gateway keyed by a SEED_SECRET the attacker never sees;
- three ways to get labels for one batch: Triton's ensemble with raw SEEDs (a gateway without the HMAC
  derivation), the gateway with `seed=`, the gateway without a seed (fresh noise).
"""
from __future__ import annotations

import io
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from dbp import repository
from dbp.data import load_fashion_mnist
from dbp.stats import wilson

ROOT = Path(__file__).resolve().parents[2]
EPS_LINF = 8 / 255


def heldout(n: int, root: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(x01 [n,1,32,32] float on the 1/255 grid, labels [n], test-set indices): the last n test images."""
    ds = load_fashion_mnist("test", root)
    idx = list(range(len(ds) - n, len(ds)))
    return ds.float01(idx), ds.labels[idx].clone(), idx


def to_grid(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """x_adv rounded to the 8-bit grid (what a PNG can carry), kept inside the l_inf eps-ball of x and [0, 1].
    x is on the grid, so rounding moves each pixel by at most half a level and the ball still holds."""
    lo, hi = torch.round((x - eps).clamp(0, 1) * 255), torch.round((x + eps).clamp(0, 1) * 255)
    q = torch.round(x_adv.detach() * 255).clamp(0, 255)
    return torch.minimum(torch.maximum(q, lo), hi) / 255


def png(x01: torch.Tensor | np.ndarray) -> bytes:
    """One [1, H, W] image on the 1/255 grid as an 8-bit grayscale PNG (lossless)."""
    from PIL import Image
    a = np.asarray(x01, dtype=np.float64).reshape(x01.shape[-2], x01.shape[-1]) * 255
    u8 = np.rint(a)
    if np.abs(u8 - a).max() > 1e-3:
        raise ValueError("image is not on the 1/255 grid: a PNG would change it")
    buf = io.BytesIO()
    Image.fromarray(u8.astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def served_settings(repo: Path) -> dict:
    """The purification settings the repository's purifier/config.pbtxt serves (sampler, t_star, steps, max_votes)."""
    return repository.purification_settings(Path(repo))


def served_services(repo: Path, version: int):
    """(PurifierService, ClassifierService) of one version, built as Triton's model.py builds them."""
    from dbp.serving.contract import ClassifierSettings, PurifierSettings, parse_parameters
    from dbp.serving.services import ClassifierService, PurifierService

    def settings(role, cls):
        return parse_parameters(cls, repository.read_parameters(Path(repo) / role / repository.CONFIG_FILE))
    return (PurifierService(repository.version_dir(repo, "purifier", version), settings("purifier", PurifierSettings)),
            ClassifierService(repository.version_dir(repo, "classifier", version),
                              settings("classifier", ClassifierSettings)))


def newest_pair_repo(src: Path, dst: Path) -> int:
    """dst = src's configs (+ legacy.json) and only its newest purifier/N + classifier/N pair; returns N."""
    from benchmarks.bench_gateway import newest_pair_repo as copy
    return copy(Path(src), Path(dst))


# ---- asking for labels ------------------------------------------------------------------------------------

def triton_raw_seed(grpc_url: str, x01: torch.Tensor, seeds: Sequence[int], chunk: int = 16) -> np.ndarray:
    """Labels from Triton's purify_classify ensemble with SEED = the given seeds, unchanged: what a gateway that
    passes the client's seed through (no secret) would send."""
    from tritonclient.grpc import InferenceServerClient, InferInput, InferRequestedOutput
    client = InferenceServerClient(grpc_url)
    out = []
    try:
        for i in range(0, len(x01), chunk):
            xb = np.ascontiguousarray(x01[i:i + chunk].numpy(), dtype=np.float32)
            sb = np.asarray(seeds[i:i + chunk], dtype=np.int64).reshape(-1, 1)
            ins = [InferInput("IMAGES", list(xb.shape), "FP32"), InferInput("SEED", list(sb.shape), "INT64")]
            ins[0].set_data_from_numpy(xb)
            ins[1].set_data_from_numpy(sb)
            r = client.infer("purify_classify", ins, outputs=[InferRequestedOutput("LABEL")], client_timeout=600)
            out.append(r.as_numpy("LABEL").reshape(-1))
    finally:
        client.close()
    return np.concatenate(out).astype(np.int64)


class GatewayClassifier:
    """POST /classify (multipart PNGs, votes=1, convert=false so the tensor is exactly the PNG's) in chunks of
    `max_images`. `seed=s`: image i of the whole call is sent with client seed s + i (chunks continue the count)."""

    def __init__(self, url: str, max_images: int = 16, timeout: float = 600.0, api_key: Optional[str] = None):
        import httpx
        self.client = httpx.Client(base_url=url, timeout=timeout,
                                   headers={"X-API-Key": api_key} if api_key else None)
        self.max_images = max_images
        self.requests = 0
        self.images = 0

    def close(self) -> None:
        self.client.close()

    def __call__(self, x01: torch.Tensor, seed: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """(labels [B], probabilities [B, classes]) for a batch on the 1/255 grid."""
        labels, probs = [], []
        for i in range(0, len(x01), self.max_images):
            files = [("images", (f"{i + j}.png", png(row), "image/png"))
                     for j, row in enumerate(x01[i:i + self.max_images])]
            params = {"votes": 1, "convert": "false"}
            if seed is not None:
                params["seed"] = seed + i
            r = self.client.post("/classify", params=params, files=files)
            if r.status_code != 200:
                raise RuntimeError(f"/classify answered {r.status_code}: {r.text[:500]}")
            self.requests += 1
            self.images += len(files)
            for p in r.json()["predictions"]:
                labels.append(p["label"])
                probs.append(list(p["probabilities"].values()))  # in label order (the ensemble's class_names)
        return np.asarray(labels, np.int64), np.asarray(probs, np.float64)


# ---- reporting ------------------------------------------------------------------------------------------

def accuracy(correct: Sequence[bool] | np.ndarray) -> dict:
    c = [bool(v) for v in np.asarray(correct).reshape(-1)]
    k, n = sum(c), len(c)
    return {"acc": k / n if n else float("nan"), "ci95": list(wilson(k, n)), "n": n, "correct": k,
            "per_image": [int(v) for v in c]}


def fmt(row: dict) -> str:
    lo, hi = row["ci95"]
    return f"{100 * row['acc']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({row['correct']}/{row['n']})"


def provenance() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    try:
        load = list(__import__("os").getloadavg())
    except OSError:
        load = None
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--", ".")),
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
            "cpus": __import__("os").cpu_count(), "load_average_start": load, "torch": torch.__version__}


def write_outputs(result: dict, markdown: str, out_dir: Path, name: str, copy_dir: Optional[Path]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown)
    if copy_dir is not None:
        copy_dir.mkdir(parents=True, exist_ok=True)
        for p in list(paths):
            (copy_dir / p.name).write_text(p.read_text())
            paths.append(copy_dir / p.name)
    return paths
