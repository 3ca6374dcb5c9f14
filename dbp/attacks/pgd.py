"""PGD: projected gradient ascent with a fixed step (the paper's attack with keep="last")."""
from __future__ import annotations

from typing import Optional

import torch

from ..diffusion import PurifyNoise
from .base import Attack, RunOutput, direction, project


class PGD(Attack):
    """Projected gradient ascent with a fixed step, box [0, 1] (the paper's attack with keep="last")."""

    def run(self, x, y, delta0, noise, generator, offer) -> RunOutput:
        cfg = self.cfg
        delta = delta0
        losses, zero_grad = [], torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for i in range(cfg.steps):
            probe = self.objective(x + delta, y, noise, generator)
            losses.append(probe.loss)
            offer(x + delta, probe, i)
            if i == 0:
                zero_grad = probe.grad.flatten(1).abs().amax(1) == 0
            delta = project(x, delta + cfg.step * direction(probe.grad, cfg.norm), cfg.norm, cfg.eps)
        x_last = (x + delta).detach()
        probe = self.final_probe(x_last, y, noise, generator)
        if probe is not None:
            offer(x_last, probe, cfg.steps, final=True)
        loss = torch.stack(losses, 1) if losses else x.new_zeros(len(x), 0)
        return RunOutput(x_last, loss, zero_grad)

    # kept for callers and tests that take one EoT gradient directly
    def gradient(self, x_in: torch.Tensor, y: torch.Tensor, noise: Optional[PurifyNoise],
                 generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample loss averaged over the draws [B], summed input gradient [B,C,H,W])."""
        probe = self.objective(x_in, y, noise, generator)
        return probe.loss, probe.grad

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        return direction(g, self.cfg.norm)

    def project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return project(x, delta, self.cfg.norm, self.cfg.eps)
