"""What the Triton python models do, kept free of Triton so it can be tested in-process.

A model.py in model_repository/ only converts pb_utils tensors to numpy and back; everything else is
here: loading a version directory, reading the config `parameters`, validating each request, gathering
the valid requests of a dynamic batch into one torch call and splitting the result back.

Tensor contract (batch dim B first, as Triton's max_batch_size implies):
  purifier    IMAGES  FP32 [B, C, H, W] in [0, 1]
              SEED    INT64 [B, 1] optional: the seed of each image's noise (exactly reproducible rows)
              VOTES   INT32 [B, 1] optional: k purifications per image, the same k for the whole request
           -> PURIFIED FP32 [B, k*C, H, W]: the k purifications of image b stacked along channels
              (reshape to [B, k, C, H, W]); k = 1 gives the plain [B, C, H, W]
  classifier  IMAGES  FP32 [B, k*C, H, W] (a purifier output), VOTES as above
           -> LOGITS [B, n] (mean over votes), PROBS [B, n] (mean softmax over votes),
              LABEL INT64 [B, 1] (majority of the k votes), AGREEMENT FP32 [B, 1] (share of votes for LABEL)
Votes travel in the channel dimension, not the batch one, so every step of the ensemble keeps the
client's batch size B (Triton rejects inputs whose batch sizes differ) and max_batch_size counts images.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

WEIGHTS_DIR = "weights"
CARD_FILE = "robustness_card.json"


class RequestError(ValueError):
    """A bad request: the message goes back to that client only; the batch and the instance carry on."""


# ---- settings from config.pbtxt `parameters` ------------------------------------------------------

@dataclass
class PurifierSettings:
    t_star: int = 100
    sampler: str = "ddim"
    num_inference_steps: int = 100  # DDIM steps (or respaced DDPM steps) over the full T=1000 grid
    threads: int = 1
    max_votes: int = 16
    max_rows: int = 256  # images per torch call; a batch with votes can be 64*16 purifications
    range_tolerance: float = 1e-3  # pixels this far outside [0, 1] are clipped, further is an error


@dataclass
class ClassifierSettings:
    threads: int = 1
    max_votes: int = 16
    max_rows: int = 512
    range_tolerance: float = 1e-3


def parse_parameters(cls: type, model_config: Mapping[str, Any] | str):
    """Settings from Triton's model_config JSON; unknown keys and bad values fail the load with a message."""
    if isinstance(model_config, str):
        model_config = json.loads(model_config)
    params = model_config.get("parameters") or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, v in params.items():
        if key not in fields:
            raise ValueError(f"unknown parameter {key!r} in config.pbtxt; known: {sorted(fields)}")
        raw = v.get("string_value") if isinstance(v, Mapping) else v
        typ = type(fields[key].default)
        try:
            values[key] = typ(raw)
        except (TypeError, ValueError):
            raise ValueError(f"parameter {key!r} must be {typ.__name__}, got {raw!r}") from None
    s = cls(**values)
    if getattr(s, "sampler", "ddpm") not in ("ddpm", "ddim"):
        raise ValueError(f"parameter 'sampler' must be 'ddpm' or 'ddim', got {s.sampler!r}")
    if s.max_votes < 1 or s.max_rows < 1 or s.threads < 0:
        raise ValueError("max_votes and max_rows must be >= 1, threads >= 0")
    return s


# ---- version directories --------------------------------------------------------------------------

def ensure_bytecode(model_py: str | Path) -> bool:
    """Write a valid __pycache__/*.pyc beside a version's model.py unless one exists; True if written.

    The python backend stub imports model.py without honouring PYTHONDONTWRITEBYTECODE, and the .pyc it
    writes changes the version dir; a polling tritonserver takes that for a new version and reloads the
    model (a second torch start-up) on its first poll. With a valid .pyc present the stub writes nothing.
    Must run with the Python the stub embeds (the venv's), as the .pyc name and magic are per version.
    """
    import importlib.util
    import py_compile
    import struct

    src = Path(model_py)
    pyc = Path(importlib.util.cache_from_source(str(src)))
    st = src.stat()
    try:
        head = pyc.read_bytes()[:16]
        magic, flags, mtime, size = head[:4], *struct.unpack("<3I", head[4:16])
        if (magic == importlib.util.MAGIC_NUMBER and flags == 0 and mtime == int(st.st_mtime) & 0xFFFFFFFF
                and size == st.st_size & 0xFFFFFFFF):
            return False
    except (OSError, struct.error, ValueError):
        pass
    py_compile.compile(str(src), cfile=str(pyc), doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    return True


@dataclass
class Version:
    dir: Path
    weights: Path
    meta: dict
    card: Optional[dict]


def load_version(version_dir: str | Path, role: str, require_card: bool = True) -> Version:
    """Read <version>/weights (a dbp checkpoint dir) and the card beside it.

    The server refuses a version whose card did not pass the gate or was computed on other weights,
    so a directory copied in by hand cannot bypass export's check.
    """
    from . import checkpoint as ckpt

    version_dir = Path(version_dir)
    weights = version_dir / WEIGHTS_DIR
    meta = ckpt.load_meta(weights)
    card = None
    card_path = version_dir / CARD_FILE
    if card_path.exists():
        card = json.loads(card_path.read_text())
    if require_card:
        if card is None:
            raise ValueError(f"{version_dir} has no {CARD_FILE}; publish versions with training/export.py")
        ok, reason = card_matches(card, role, weights)
        if not ok:
            raise ValueError(f"{version_dir}: {reason}")
    return Version(version_dir, weights, meta, card)


def card_matches(card: Mapping[str, Any], role: str, weights_dir: Path) -> tuple[bool, str]:
    """One model's half of dbp.card.card_passes (each version dir holds only its own weights)."""
    from .checkpoint import weights_sha256

    gate = card.get("gate") if isinstance(card, Mapping) else None
    if not isinstance(gate, Mapping) or gate.get("passed") is not True:
        return False, "robustness card: the gate did not pass"
    expected = (card.get("model") or {}).get(f"{role}_sha256")
    actual = weights_sha256(weights_dir)
    if expected != actual:
        return False, (f"robustness card was computed on other {role} weights "
                       f"(sha256 {str(expected)[:12]} != {actual[:12]})")
    return True, "ok"


# ---- request validation ---------------------------------------------------------------------------

def _shape(a: np.ndarray) -> str:
    return "[" + ", ".join(str(d) for d in a.shape) + "]"


def check_votes(v: Optional[np.ndarray], batch: int, max_votes: int) -> int:
    if v is None:
        return 1
    v = np.asarray(v)
    if not np.issubdtype(v.dtype, np.integer):
        raise RequestError(f"VOTES must be an integer tensor, got {v.dtype}")
    if v.shape not in ((batch, 1), (batch,)):
        raise RequestError(f"VOTES must be [B, 1] = [{batch}, 1], got {_shape(v)}")
    k = int(v.reshape(-1)[0])
    if not np.all(v == k):
        raise RequestError("VOTES must be the same for every image of a request")
    if not 1 <= k <= max_votes:
        raise RequestError(f"VOTES must be in [1, {max_votes}], got {k}")
    return k


def check_seeds(s: Optional[np.ndarray], batch: int) -> Optional[list[int]]:
    if s is None:
        return None
    s = np.asarray(s)
    if not np.issubdtype(s.dtype, np.integer):
        raise RequestError(f"SEED must be an integer tensor, got {s.dtype}")
    if s.shape not in ((batch, 1), (batch,)):
        raise RequestError(f"SEED must be [B, 1] = [{batch}, 1], got {_shape(s)}")
    return [int(v) for v in s.reshape(-1)]


def check_images(x: Optional[np.ndarray], chw: tuple[int, int, int], votes: int = 1,
                 tolerance: float = 1e-3) -> np.ndarray:
    """FP32 [B, votes*C, H, W], finite, in [0, 1] up to `tolerance` (then clipped); returns a float32 copy."""
    if x is None:
        raise RequestError("missing input IMAGES")
    x = np.asarray(x)
    c, h, w = chw
    want = f"[B, {c}, {h}, {w}]" if votes == 1 else f"[B, {votes}*{c}, {h}, {w}] (VOTES={votes})"
    if x.dtype != np.float32:
        raise RequestError(f"IMAGES must be FP32, got {x.dtype}")
    if x.ndim != 4 or x.shape[1:] != (votes * c, h, w):
        raise RequestError(f"IMAGES must be {want} for this model, got {_shape(x)}")
    if x.shape[0] < 1:
        raise RequestError("IMAGES holds no image")
    if not np.isfinite(x).all():
        raise RequestError("IMAGES contains NaN or Inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < -tolerance or hi > 1 + tolerance:
        raise RequestError(f"IMAGES values must lie in [0, 1] (got min {lo:.4g}, max {hi:.4g})")
    return np.clip(x, 0.0, 1.0)


# ---- vote aggregation -----------------------------------------------------------------------------

def aggregate_votes(logits: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """[B*k, n] logits of k votes per image (image-major) -> LOGITS, PROBS, LABEL, AGREEMENT per image.

    LABEL is the most frequent per-vote argmax; a tie goes to the label with the larger mean probability.
    """
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[0] % k:
        raise ValueError(f"logits {logits.shape} do not split into groups of k={k}")
    n = logits.shape[1]
    per = logits.reshape(-1, k, n)
    z = per - per.max(axis=2, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=2, keepdims=True)
    mean_probs = probs.mean(axis=1)
    votes = per.argmax(axis=2)  # [B, k]
    counts = np.stack([(votes == c).sum(axis=1) for c in range(n)], axis=1)  # [B, n]
    label = np.argmax(counts + 0.5 * mean_probs, axis=1)  # the probability term is < 1 vote: ties only
    agreement = counts[np.arange(len(label)), label] / k
    return {"LOGITS": per.mean(axis=1).astype(np.float32), "PROBS": mean_probs.astype(np.float32),
            "LABEL": label.astype(np.int64)[:, None], "AGREEMENT": agreement.astype(np.float32)[:, None]}


# ---- dynamic batches ------------------------------------------------------------------------------

Inputs = Mapping[str, Optional[np.ndarray]]


def serve_batch(prepare: Callable[[Inputs], Any], run: Callable[[list], list],
                requests: Sequence[Inputs]) -> list[dict[str, np.ndarray] | Exception]:
    """One result per request: its outputs, or the exception to answer it with. Never raises.

    A bad request gets a RequestError of its own while the others run; if the torch call itself fails,
    every request it carried gets a RuntimeError, and the instance stays up for the next batch.
    """
    results: list[Any] = [None] * len(requests)
    items, idx = [], []
    for i, r in enumerate(requests):
        try:
            items.append(prepare(r))
            idx.append(i)
        except RequestError as e:
            results[i] = e
        except Exception as e:  # noqa: BLE001 - a malformed tensor must not take the batch down
            results[i] = RequestError(f"invalid request: {type(e).__name__}: {e}")
    if items:
        try:
            outs = run(items)
        except Exception as e:  # noqa: BLE001
            outs = [RuntimeError(f"inference failed: {type(e).__name__}: {e}")] * len(items)
        for i, o in zip(idx, outs):
            results[i] = o
    return results


def _images_and_batch(r: Inputs) -> tuple[np.ndarray, int]:
    x = r.get("IMAGES")
    if x is None:
        raise RequestError("missing input IMAGES")
    x = np.asarray(x)
    if x.ndim != 4:
        raise RequestError(f"IMAGES must be a 4-d batch [B, C, H, W], got {_shape(x)}")
    return x, int(x.shape[0])


def _chunked(fn: Callable, x, max_rows: int):
    import torch
    if x.shape[0] <= max_rows:
        return fn(x)
    return torch.cat([fn(x[i:i + max_rows]) for i in range(0, x.shape[0], max_rows)])


def _set_threads(n: int) -> None:
    import torch
    if n > 0:
        torch.set_num_threads(n)


@dataclass
class PurifyItem:
    x: Any  # torch [B, C, H, W]
    k: int
    seeds: Optional[list[int]]


class PurifierService:
    """Loads a purifier version and runs dynamic batches of purification requests."""

    def __init__(self, version_dir: str | Path, settings: PurifierSettings = PurifierSettings(),
                 require_card: bool = True):
        import torch
        from .models import Purifier, load_unet

        _set_threads(settings.threads)
        self.settings = settings
        self.version = load_version(version_dir, "purifier", require_card)
        eps = load_unet(self.version.weights)
        self.purifier = Purifier(eps, t_star=settings.t_star, sampler=settings.sampler,
                                 num_inference_steps=settings.num_inference_steps).eval()
        cfg = eps.unet.config
        self.chw = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))
        # unseeded rows draw from one instance generator, seeded from the OS
        self.generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)

    def prepare(self, r: Inputs) -> PurifyItem:
        import torch
        x, batch = _images_and_batch(r)
        k = check_votes(r.get("VOTES"), batch, self.settings.max_votes)
        x = check_images(x, self.chw, 1, self.settings.range_tolerance)
        return PurifyItem(torch.from_numpy(x), k, check_seeds(r.get("SEED"), batch))

    def noise_for(self, item: PurifyItem):
        """Each image's k purifications draw from its own generator when seeded, so a row's noise does not
        depend on the other images in the request or the dynamic batch."""
        import torch
        from .diffusion import PurifyNoise
        parts = []
        for b in range(item.x.shape[0]):
            gen = self.generator if item.seeds is None else torch.Generator().manual_seed(item.seeds[b])
            parts.append(self.purifier.sample_noise(item.x[b:b + 1].expand(item.k, -1, -1, -1), gen))
        fwd = torch.cat([p.forward for p in parts])
        rev = None if parts[0].reverse is None else torch.cat([p.reverse for p in parts], dim=1)
        return PurifyNoise(fwd, rev)

    def run(self, items: list[PurifyItem]) -> list[dict[str, np.ndarray]]:
        import torch
        from .diffusion import PurifyNoise
        with torch.inference_mode():
            noises = [self.noise_for(it) for it in items]
            x = torch.cat([it.x.repeat_interleave(it.k, dim=0) for it in items])
            fwd = torch.cat([n.forward for n in noises])
            rev = None if noises[0].reverse is None else torch.cat([n.reverse for n in noises], dim=1)
            rows = self.settings.max_rows
            outs = [self.purifier(x[i:i + rows], noise=PurifyNoise(fwd[i:i + rows],
                                                                    None if rev is None else rev[:, i:i + rows]))
                    for i in range(0, x.shape[0], rows)]
            y = torch.cat(outs).numpy()
        res, off = [], 0
        for it in items:
            b, n = it.x.shape[0], it.x.shape[0] * it.k
            res.append({"PURIFIED": np.ascontiguousarray(y[off:off + n].reshape(b, -1, *y.shape[2:]))})
            off += n
        return res

    def __call__(self, requests: Sequence[Inputs]) -> list[dict[str, np.ndarray] | Exception]:
        return serve_batch(self.prepare, self.run, requests)


@dataclass
class ClassifyItem:
    x: Any  # torch [B*k, C, H, W]
    k: int


class ClassifierService:
    def __init__(self, version_dir: str | Path, settings: ClassifierSettings = ClassifierSettings(),
                 require_card: bool = True):
        from .models import load_classifier

        _set_threads(settings.threads)
        self.settings = settings
        self.version = load_version(version_dir, "classifier", require_card)
        self.model = load_classifier(self.version.weights)
        arch = self.version.meta.get("arch", {})
        channels = len(self.model.normalize.mean.reshape(-1))
        size = int(arch.get("image_size", 32))  # dbp.data pads every dataset to 32x32
        self.chw = (channels, size, size)

    def prepare(self, r: Inputs) -> ClassifyItem:
        import torch
        x, batch = _images_and_batch(r)
        k = check_votes(r.get("VOTES"), batch, self.settings.max_votes)
        x = check_images(x, self.chw, k, self.settings.range_tolerance)
        return ClassifyItem(torch.from_numpy(x).reshape(-1, *self.chw), k)

    def run(self, items: list[ClassifyItem]) -> list[dict[str, np.ndarray]]:
        import torch
        with torch.inference_mode():
            logits = _chunked(self.model, torch.cat([it.x for it in items]), self.settings.max_rows).float().numpy()
        res, off = [], 0
        for it in items:
            n = it.x.shape[0]
            res.append(aggregate_votes(logits[off:off + n], it.k))
            off += n
        return res

    def __call__(self, requests: Sequence[Inputs]) -> list[dict[str, np.ndarray] | Exception]:
        return serve_batch(self.prepare, self.run, requests)


__all__ = ["RequestError", "PurifierSettings", "ClassifierSettings", "parse_parameters", "Version", "load_version",
           "card_matches", "check_images", "check_votes", "check_seeds", "aggregate_votes", "serve_batch",
           "PurifierService", "ClassifierService", "WEIGHTS_DIR", "CARD_FILE", "ensure_bytecode"]


# ---- the python-backend side of every model.py ------------------------------------------------------

def triton_execute(pb_utils, service: Callable, requests: Sequence, input_names: Sequence[str]) -> list:
    """pb_utils requests -> service -> one InferenceResponse per request, in order.

    `pb_utils` is passed in because it only exists inside the Triton stub. A RequestError becomes that
    request's INVALID_ARG error, any other exception an INTERNAL one; the instance keeps serving.
    """
    def as_numpy(request, name):
        t = pb_utils.get_input_tensor_by_name(request, name)
        return None if t is None else t.as_numpy()

    def response(result):
        if isinstance(result, Exception):
            code = (pb_utils.TritonError.INVALID_ARG if isinstance(result, RequestError)
                    else pb_utils.TritonError.INTERNAL)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result), code))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in result.items()])

    return [response(r) for r in service([{n: as_numpy(q, n) for n in input_names} for q in requests])]
