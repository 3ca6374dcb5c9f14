"""Checkpoints: safetensors weights + JSON metadata, written atomically; never pickle.

Layout of a checkpoint directory:
  model.safetensors      raw (training) weights
  ema.safetensors        EMA weights (what purification and export use), if any
  optimizer.safetensors  optimizer tensors, with its non-tensor state in meta.json
  meta.json              {"kind", "arch", "config", "step", "epoch", ...}
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


# meta.json "kind" of each checkpoint; a purifier may be a base diffusion model or its ADDT fine-tune
PURIFIER_KINDS = ("diffusion", "addt")
CLASSIFIER_KINDS = ("classifier",)


class CheckpointError(RuntimeError):
    pass


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def optimizer_to_flat(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, st in opt_state["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{name}"] = v
            else:
                scalars[f"{pid}.{name}"] = v
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | Path, meta: dict[str, Any], model: dict[str, torch.Tensor],
                    ema: dict[str, torch.Tensor] | None = None, optimizer: dict | None = None) -> Path:
    """Write into a temp dir beside `path`, then swap it in, so a kill never leaves a half checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a kill mid-write; one writer per path
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    meta = dict(meta)
    save_file(_contiguous(model), tmp / "model.safetensors")
    if ema is not None:
        save_file(_contiguous(ema), tmp / "ema.safetensors")
    if optimizer is not None:
        tensors, opt_meta = optimizer_to_flat(optimizer)
        save_file(_contiguous(tensors), tmp / "optimizer.safetensors")
        meta["optimizer"] = opt_meta
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        os.chmod(f, 0o644)  # safetensors writes 0600: a server running as another user must read the weights
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def recover(path: str | Path) -> None:
    """If a kill hit between the two renames of save_checkpoint, the previous checkpoint sits in .old."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.exists():
        os.rename(old, path)


def load_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    recover(path)
    f = path / "meta.json"
    if not f.exists():
        raise CheckpointError(f"{path} is not a checkpoint (no meta.json)")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is corrupt: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f} is corrupt: expected a JSON object, got {type(meta).__name__}")
    return meta


def _load_file(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(f)
    except Exception as e:  # safetensors reports a truncated or garbled file with its own error types
        raise CheckpointError(f"{f} is corrupt: {type(e).__name__}: {e}") from e


def weights_file(path: str | Path, which: str = "ema") -> Path:
    """The file of `which` = "ema" (falls back to the model weights when the checkpoint has no EMA) or "model"."""
    path = Path(path)
    f = path / f"{which}.safetensors"
    if which == "ema" and not f.exists():
        f = path / "model.safetensors"
    if not f.exists():
        raise CheckpointError(f"{path}: missing {f.name}")
    return f


def load_weights(path: str | Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """`which` = "ema" (falls back to model weights when the checkpoint has no EMA) or "model"."""
    return _load_file(weights_file(path, which))


def load_optimizer(path: str | Path) -> dict | None:
    path = Path(path)
    f = path / "optimizer.safetensors"
    if not f.exists():
        return None
    meta = load_meta(path)
    if "optimizer" not in meta:
        raise CheckpointError(f"{path}: meta.json lacks the optimizer state that {f.name} belongs to")
    return optimizer_from_flat(_load_file(f), meta["optimizer"])


def weights_sha256(path: str | Path, which: str = "ema") -> str:
    """Hash of the weights file a checkpoint serves with: binds a robustness card to exact weights."""
    import hashlib
    f = weights_file(path, which)
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
