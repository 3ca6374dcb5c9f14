"""Process-level set-up shared by the CLIs: threads, seeds, git revision (dbp.revision, torch-free)."""
from __future__ import annotations

import os

import torch

from .revision import git_commit  # noqa: F401 - the CLIs' one import for set-up and provenance


def set_threads(n: int) -> None:
    """n <= 0: leave torch's default (all cores); under torchrun on CPU split the cores between ranks."""
    if n > 0:
        torch.set_num_threads(n)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
