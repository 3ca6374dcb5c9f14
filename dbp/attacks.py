"""PGD under l_inf / l_2 on classifier(purify(x)), with the true gradient through every purification step.

Settings (method.md §3, §4):
  - stochastic white-box ("eot"): every PGD step averages the gradient over K purifications, each with
    fresh forward and reverse noise. The K draws run as ONE batch of B*K rows (repeat_interleave of the
    input), and the per-sample gradients are summed by autograd through the repeat.
  - DW-box ("dwbox"): all purifier noise is drawn once per batch and reused at every step (and, by
    `dbp.robustness`, in the final evaluation); plain PGD, no EoT.
  - a bare classifier (any nn.Module that is not a `Defense`) is attacked with plain PGD.

Gradients are taken with `torch.autograd.grad` w.r.t. the input only and the model's parameters are
frozen for the duration of the call, so no parameter gradient is ever computed or stored. Memory through
the reverse chain is bounded by the per-UNet-call checkpointing in `Diffusion.purify`.

  atk = PGD(Defense(purifier, classifier), AttackConfig(norm="linf", mode="eot", eot=10))
  res = atk(x01, labels, generator=torch.Generator().manual_seed(0))
  res.x_adv, res.loss   # adversarial images, per-sample CE per PGD step
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion import PurifyNoise
from .models import Defense

NORMS = ("linf", "l2")
MODES = ("eot", "dwbox")
# The paper's budgets in [0, 1] pixel units (method.md §3.1): (eps, step)
PAPER_BUDGET = {"linf": (8 / 255, 2 / 255), "l2": (0.5, 0.1)}


@dataclass
class AttackConfig:
    """One PGD setting. eps/step default to the paper's budget for the norm."""

    norm: str = "linf"
    eps: Optional[float] = None
    step: Optional[float] = None
    steps: int = 20
    eot: int = 10  # purification samples per PGD step (mode "eot"); DW-box always uses 1
    mode: str = "eot"
    eot_batched: bool = True  # False: loop over the EoT samples one at a time (the reference code's way)

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        eps, step = PAPER_BUDGET[self.norm]
        self.eps = eps if self.eps is None else float(self.eps)
        self.step = step if self.step is None else float(self.step)
        if self.eps < 0 or self.step <= 0:
            raise ValueError(f"need eps >= 0 and step > 0, got eps={self.eps}, step={self.step}")
        if self.steps < 0 or self.eot < 1:
            raise ValueError(f"need steps >= 0 and eot >= 1, got steps={self.steps}, eot={self.eot}")

    @property
    def name(self) -> str:
        return f"{self.norm}-{self.mode}"


@dataclass
class AttackResult:
    x_adv: torch.Tensor  # [B, C, H, W] in [0, 1]
    loss: torch.Tensor  # [B, steps]: CE at each PGD iterate (mean over the EoT draws)
    zero_grad: torch.Tensor  # [B] bool: input gradient exactly zero at the first step
    noise: Optional[PurifyNoise]  # the fixed DW-box noise (reuse it for the final evaluation), else None
    forward_passes: int  # defence forward passes per sample spent by the attack


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """eval() and requires_grad=False for the call, restored afterwards (the model may be training)."""
    was_training = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, g in grads:
            p.requires_grad_(g)
        for m, t in was_training:
            m.train(t)


class PGD:
    """Projected gradient ascent on the cross-entropy, delta starting at 0, box [0, 1]."""

    def __init__(self, model: nn.Module, cfg: AttackConfig):
        self.model, self.cfg = model, cfg
        self.purifier = model.purifier if isinstance(model, Defense) else None
        self.classifier = model.classifier if isinstance(model, Defense) else model

    @property
    def eot_samples(self) -> int:
        """Purifications per step: K in the stochastic setting, 1 for DW-box and for a bare classifier."""
        return self.cfg.eot if (self.purifier is not None and self.cfg.mode == "eot") else 1

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, noise: Optional[PurifyNoise] = None,
                 generator: Optional[torch.Generator] = None) -> AttackResult:
        if x.dim() != 4 or y.shape != x.shape[:1]:
            raise ValueError(f"expected x [B,C,H,W] and y [B], got {tuple(x.shape)} and {tuple(y.shape)}")
        if self.purifier is not None and self.cfg.mode == "dwbox" and noise is None:
            noise = self.purifier.sample_noise(x, generator)
        x = x.detach().clone() if x.is_inference() else x.detach()  # inference tensors cannot enter autograd
        with frozen_eval(self.model), torch.enable_grad():
            return self.forward(x, y, noise, generator)

    # ---- the algorithm -------------------------------------------------------------------------------
    def forward(self, x, y, noise, generator) -> AttackResult:
        delta = torch.zeros_like(x)
        losses, zero_grad = [], torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for i in range(self.cfg.steps):
            loss, g = self.gradient(x + delta, y, noise, generator)
            losses.append(loss)
            if i == 0:
                zero_grad = g.flatten(1).abs().amax(1) == 0
            delta = self.project(x, delta + self.cfg.step * self.direction(g))
        loss = torch.stack(losses, 1) if losses else x.new_zeros(len(x), 0)
        return AttackResult((x + delta).detach(), loss, zero_grad,
                            noise if self.cfg.mode == "dwbox" else None, self.cfg.steps * self.eot_samples)

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        if self.cfg.norm == "linf":
            return g.sign()
        norms = g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
        return g / (norms + 1e-10)

    def project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Onto the eps-ball of the norm, then onto the box: x + delta in [0, 1]."""
        eps = self.cfg.eps
        if self.cfg.norm == "linf":
            delta = delta.clamp(-eps, eps)
        else:
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = delta * (eps / norms).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))
        # clamping x + delta only shrinks |delta_i|, so the norm bound still holds afterwards
        return (x + delta).clamp(0.0, 1.0) - x

    # ---- gradient of the (EoT) loss w.r.t. the input --------------------------------------------------
    def gradient(self, x_in: torch.Tensor, y: torch.Tensor, noise: Optional[PurifyNoise],
                 generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample CE averaged over the draws [B], summed input gradient [B,C,H,W])."""
        x_in = x_in.detach().requires_grad_(True)
        k = self.eot_samples
        if self.purifier is None:
            ce = F.cross_entropy(self.classifier(x_in), y, reduction="none")
            return ce.detach(), torch.autograd.grad(ce.sum(), x_in)[0]
        if self.cfg.mode == "dwbox":
            ce = F.cross_entropy(self.model(x_in, noise=noise), y, reduction="none")
            return ce.detach(), torch.autograd.grad(ce.sum(), x_in)[0]
        # one draw for all K samples: the batched and the looped variant consume identical noise
        eot_noise = self.purifier.sample_noise(x_in.detach().repeat_interleave(k, 0), generator)
        if self.cfg.eot_batched:
            # row b*K + j is draw j of sample b; the repeat's backward sums the K gradients per sample
            logits = self.model(x_in.repeat_interleave(k, 0), noise=eot_noise)
            ce = F.cross_entropy(logits, y.repeat_interleave(k), reduction="none")
            g = torch.autograd.grad(ce.sum(), x_in)[0]
            return ce.detach().view(-1, k).mean(1), g
        g, ce_sum = torch.zeros_like(x_in), torch.zeros(len(x_in), device=x_in.device)
        for j in range(k):
            # draw j of the repeat_interleave(k) layout: rows j, j+k, j+2k, ...
            ce = F.cross_entropy(self.model(x_in, noise=eot_noise[j::k]), y, reduction="none")
            g += torch.autograd.grad(ce.sum(), x_in)[0]
            ce_sum += ce.detach()
        return ce_sum / k, g
