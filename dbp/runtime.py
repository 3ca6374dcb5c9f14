"""Process-level set-up shared by the CLIs: threads, seeds, git revision."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch


def set_threads(n: int) -> None:
    """n <= 0: leave torch's default (all cores); under torchrun on CPU split the cores between ranks."""
    if n > 0:
        torch.set_num_threads(n)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        rev = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
