"""BPDA-style surrogate gradients (Athalye et al. 2018): the defence's exact output, another function's
gradient.

`SurrogateGradient(purifier, surrogate)` is a drop-in purifier for `Defense`: its forward value is the
real purifier's output, its input gradient is the surrogate's (the identity when `surrogate` is None, the
classic BPDA; or e.g. the DDIM chain of the same UNet standing in for the DDPM chain). Both see the same
forward noise, so DW-box and EoT work unchanged through `dbp.attacks`.

  bpda = Defense(SurrogateGradient(ddpm_purifier, ddim_purifier), classifier)
  res = build_attack(bpda, AttackConfig(mode="dwbox"))(x, y, noise=noise)   # then evaluate on the real defence
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .diffusion import PurifyNoise


class SurrogateGradient(nn.Module):
    def __init__(self, purifier: nn.Module, surrogate: Optional[nn.Module] = None):
        super().__init__()
        self.purifier, self.surrogate = purifier, surrogate

    def sample_noise(self, x01: torch.Tensor, generator: Optional[torch.Generator] = None) -> PurifyNoise:
        return self.purifier.sample_noise(x01, generator)

    def forward(self, x01: torch.Tensor, noise: Optional[PurifyNoise] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if noise is None:  # one draw shared by both chains, so the surrogate follows the same trajectory start
            noise = self.sample_noise(x01, generator)
        with torch.no_grad():
            real = self.purifier(x01, noise=noise)
        # a DDIM surrogate ignores the DDPM chain's reverse noise; the forward noise is common
        approx = x01 if self.surrogate is None else self.surrogate(x01, noise=noise)
        # real + (approx - approx) is exactly `real` in floating point (a - a == 0 for finite a), whereas
        # approx + (real - approx) rounds differently from machine to machine
        return real + (approx - approx.detach())
