"""ADDT (Adversarial Denoising Diffusion Training): RBGM, the lambda schedule, CGPO and the training loss.

method.md §5. The classifier is only a loss provider: CGPO differentiates with torch.autograd.grad with
respect to the perturbation alone, so no gradient of the CGPO phase can reach any parameter's .grad (the
reference EDM code leaks it into the UNet update; §11.1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion import Diffusion, EpsModel


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, C, *spatial] -> [B*C, prod(spatial)]; a 2-D input is taken as rows already."""
    if x.dim() < 2:
        raise ValueError(f"RBGM needs at least [rows, values], got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0] * x.shape[1], -1) if x.dim() > 2 else x


def rbgm(delta: torch.Tensor, generator: Optional[torch.Generator] = None,
         z: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rank-Based Gaussian Mapping (§5.4): per (sample, channel) row, a fresh sorted N(0,1) draw placed in the
    rank order of `delta`. Scale-free; `z` (same shape) may supply the draw, which tests use."""
    rows = _rows(delta)
    if z is None:
        z = torch.randn(rows.shape, generator=generator, device=delta.device, dtype=delta.dtype)
    z_sorted = _rows(z).sort(dim=1).values
    out = torch.empty_like(rows)
    # the element with the k-th smallest delta receives the k-th smallest draw
    out.scatter_(1, rows.argsort(dim=1), z_sorted)
    return out.view_as(delta)


def normalize_rows(delta: torch.Tensor) -> torch.Tensor:
    """The `--no-rbgm` control: scale each row to norm sqrt(n), the norm of a standard Gaussian row."""
    rows = _rows(delta)
    scale = rows.shape[1] ** 0.5 / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (rows * scale).view_as(delta)


def lambda_t(abar: torch.Tensor, unit: float = 0.03, lam_min: float = 0.0, lam_max: float = 0.3) -> torch.Tensor:
    """lambda_t = clip(unit * sqrt(abar / (1 - abar)), lam_min, lam_max) (§5.2)."""
    return (unit * (abar / (1 - abar)).sqrt()).clamp(lam_min, lam_max)


def mix_noise(eps: torch.Tensor, eps_delta: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """eps' = sqrt(1 - lambda^2) eps + lambda eps_delta, lambda one scalar per sample."""
    lam = lam.reshape(-1, *([1] * (eps.dim() - 1)))
    return (1 - lam ** 2).sqrt() * eps + lam * eps_delta


@dataclass
class ADDTConfig:
    cgpo_steps: int = 5
    lambda_unit: float = 0.03
    lambda_min: float = 0.0
    lambda_max: float = 0.3
    rbgm: bool = True  # False: the "w/o RBGM" control (row-normalised accumulated gradient)


def cgpo(eps_model: EpsModel, classifier: nn.Module, diffusion: Diffusion, x0: torch.Tensor, y: torch.Tensor,
         t: torch.Tensor, lam: torch.Tensor, cfg: ADDTConfig,
         generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, float]:
    """Classifier-Guided Perturbation Optimization (§5.3). x0 in model range [-1,1].

    Gradient ascent on CE(classifier(x0_hat/2 + 0.5), y) w.r.t. eps_delta, a fresh eps every step, gradients
    accumulated and mapped through RBGM after each step. Returns (eps_delta*, CE of the last step).
    """
    randn = lambda: torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # noqa: E731
    delta_acc = torch.zeros_like(x0)
    eps_delta = randn()
    ce = float("nan")
    for _ in range(cfg.cgpo_steps):
        e_d = eps_delta.detach().requires_grad_(True)
        x_t = diffusion.q_sample(x0, t, mix_noise(randn(), e_d, lam))
        x0_hat = diffusion.predict_x0(x_t, t, eps_model(x_t, t))
        loss = F.cross_entropy(classifier(x0_hat / 2 + 0.5), y)
        (g,) = torch.autograd.grad(loss, e_d)
        delta_acc = delta_acc + g
        eps_delta = rbgm(delta_acc, generator) if cfg.rbgm else normalize_rows(delta_acc)
        ce = loss.item()
    return eps_delta.detach(), ce


def addt_loss(train_model: EpsModel, cgpo_model: Optional[EpsModel], classifier: Optional[nn.Module],
              diffusion: Diffusion, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, cfg: ADDTConfig,
              generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE(eps_theta(x_t, t), eps') with eps' built from CGPO's eps_delta (§5.5).

    `cgpo_model=None` is the clean fine-tuning control: eps' = eps, the standard loss with the same recipe.
    `train_model` may be a DDP wrapper; `cgpo_model` should be the bare module so CGPO never touches DDP's
    gradient reducer.
    """
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    logs: dict[str, float] = {}
    if cgpo_model is None:
        target = eps
    else:
        lam = lambda_t(diffusion.abar(t), cfg.lambda_unit, cfg.lambda_min, cfg.lambda_max)
        eps_delta, logs["ce"] = cgpo(cgpo_model, classifier, diffusion, x0, y, t, lam, cfg, generator)
        target = mix_noise(eps, eps_delta, lam)
    x_t = diffusion.q_sample(x0, t, target)
    return F.mse_loss(train_model(x_t, t), target), logs
