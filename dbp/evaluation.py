"""Batched, no-grad accuracy of a classifier and of the purify -> classify pipeline."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import Purifier


@torch.inference_mode()
def predict(classifier: nn.Module, x01: torch.Tensor, batch_size: int = 256, device="cpu") -> torch.Tensor:
    classifier.eval()
    out = [classifier(x01[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x01), batch_size)]
    return torch.cat(out)


@torch.inference_mode()
def purify_batched(purifier: Purifier, x01: torch.Tensor, batch_size: int = 64, seed: int = 0, device="cpu",
                   progress: bool = False, desc: str = "purify") -> torch.Tensor:
    """Purify in batches with one generator per run, so a fixed seed gives a fixed result."""
    purifier.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    outs = []
    for i in tqdm(range(0, len(x01), batch_size), desc=desc, disable=not progress, leave=False):
        xb = x01[i:i + batch_size].to(device)
        outs.append(purifier(xb, generator=g).cpu())
    return torch.cat(outs)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean())
