"""Composed modules (purifier, defence) and loading them from checkpoints."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import checkpoint as ckpt
from .diffusion import Diffusion, PurifyNoise
from .grad_checkpointing import GradCheckpoint, parse_grad_checkpoint, plan_grad_checkpoint
from .nets import Classifier, EpsNet, build_classifier, build_unet_from_meta
from .samplers import SDE_GRADIENTS


class Purifier(nn.Module):
    """x in [0,1] -> purified x in [0,1]: forward-noise to t* and reverse with DDPM, DDIM, VP-SDE or EDM.

    s_churn: EDM's S_churn (0: deterministic reverse chain). sde_gradient: VP-SDE's gradient, "backprop" (exact,
    the default for attacks) or "adjoint" (torchsde's stochastic adjoint, O(1) activation memory); docs/samplers.md.
    """

    def __init__(self, eps_net: nn.Module, t_star: int = 100, sampler: str = "ddpm",
                 num_inference_steps: Optional[int] = None, grad_checkpoint: GradCheckpoint = "auto",
                 checkpoint_budget_mb: Optional[float] = None, channels_last: bool = False,
                 s_churn: float = 0.0, sde_gradient: str = "backprop"):
        super().__init__()
        self.eps_net = eps_net
        # channels_last: the UNet (converted in place) and the chain run in NHWC, which oneDNN's CPU convolutions
        # prefer (benchmarks/bench_attack.py); the same results up to float rounding
        self.channels_last = channels_last
        if channels_last:
            eps_net.to(memory_format=torch.channels_last)
        self.diffusion = Diffusion()
        self.t_star, self.sampler = t_star, sampler
        # True / False / "auto" (checkpoint only when the chain's activations exceed the budget; None: a quarter
        # of free memory). Either way the gradients are the same: see dbp.grad_checkpointing.
        self.grad_checkpoint = parse_grad_checkpoint(grad_checkpoint)
        self.checkpoint_budget_mb = checkpoint_budget_mb
        if num_inference_steps is None:
            num_inference_steps = self.diffusion.default_steps(sampler)
        self.num_inference_steps = num_inference_steps
        self.s_churn, self.sde_gradient = s_churn, sde_gradient
        self.diffusion.check_settings(sampler, t_star, self.num_inference_steps, s_churn)  # validate settings early
        if sde_gradient not in SDE_GRADIENTS:
            raise ValueError(f"sde_gradient must be one of {SDE_GRADIENTS}, got {sde_gradient!r}")

    @property
    def n_unet_calls(self) -> int:
        return self.diffusion.n_unet_calls(self.sampler, self.t_star, self.num_inference_steps)

    @property
    def checkpoint_budget_bytes(self) -> Optional[int]:
        return None if self.checkpoint_budget_mb is None else int(self.checkpoint_budget_mb * 2**20)

    def checkpoint_plan(self, x01: torch.Tensor):
        """What a differentiable call on a batch shaped like x01 would do (for logs, cards and benchmarks)."""
        return plan_grad_checkpoint(self.grad_checkpoint, self.eps_net, x01, self.n_unet_calls,
                                    self.checkpoint_budget_bytes)

    def sample_noise(self, x01: torch.Tensor, generator: Optional[torch.Generator] = None) -> PurifyNoise:
        return self.diffusion.sample_noise(tuple(x01.shape), self.sampler, self.t_star, self.num_inference_steps,
                                           generator, x01.device, self.s_churn)

    def forward(self, x01: torch.Tensor, noise: Optional[PurifyNoise] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.channels_last:
            x01 = x01.contiguous(memory_format=torch.channels_last)
        return self.diffusion.purify(self.eps_net, x01, t_star=self.t_star, sampler=self.sampler,
                                     num_inference_steps=self.num_inference_steps, noise=noise,
                                     generator=generator, grad_checkpoint=self.grad_checkpoint,
                                     checkpoint_budget_bytes=self.checkpoint_budget_bytes, s_churn=self.s_churn,
                                     sde_gradient=self.sde_gradient)


class Defense(nn.Module):
    """classifier(purifier(x)): the composed function every attack differentiates through."""

    def __init__(self, purifier: Purifier, classifier: nn.Module):
        super().__init__()
        self.purifier, self.classifier = purifier, classifier

    def forward(self, x01: torch.Tensor, noise: Optional[PurifyNoise] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.classifier(self.purifier(x01, noise=noise, generator=generator))


class _Votes(nn.Module):
    """A purifier that purifies each image `votes` times (image-major rows, as the served VOTES input)."""

    def __init__(self, purifier: Purifier, votes: int):
        super().__init__()
        self.base, self.votes = purifier, votes

    def sample_noise(self, x01: torch.Tensor, generator: Optional[torch.Generator] = None) -> PurifyNoise:
        return self.base.sample_noise(x01.repeat_interleave(self.votes, 0), generator)

    def forward(self, x01: torch.Tensor, noise: Optional[PurifyNoise] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.base(x01.repeat_interleave(self.votes, 0), noise=noise, generator=generator)


class VotedDefense(Defense):
    """The served defence at `votes` > 1: k purifications per image, the class probabilities averaged.

    forward returns log of the mean softmax over the k votes, so an attack's cross-entropy differentiates the
    averaged probabilities the server returns (PROBS). The served decision is the majority of the k labels
    (`vote_logits` + dbp.serving.contract.aggregate_votes); the attack's objective is the averaged one.
    """

    def __init__(self, defense: Defense, votes: int):
        if votes < 1:
            raise ValueError(f"votes must be >= 1, got {votes}")
        super().__init__(_Votes(defense.purifier, votes), defense.classifier)
        self.votes = votes

    def vote_logits(self, x01: torch.Tensor, noise: Optional[PurifyNoise] = None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[B*votes, n] logits, image-major (the layout aggregate_votes reads)."""
        return self.classifier(self.purifier(x01, noise=noise, generator=generator))

    def forward(self, x01: torch.Tensor, noise: Optional[PurifyNoise] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        logp = self.vote_logits(x01, noise, generator).log_softmax(1)
        return logp.view(len(x01), self.votes, -1).logsumexp(1) - math.log(self.votes)


def load_unet(path: str | Path, which: str = "ema", device="cpu") -> EpsNet:
    return EpsNet(load_raw_unet(path, which)).to(device).eval()


def load_raw_unet(path: str | Path, which: str = "ema"):
    """The diffusers UNet of a diffusion/ADDT checkpoint (train mode, CPU): what fine-tuning starts from."""
    meta = ckpt.load_meta(path)
    if meta.get("kind") not in ckpt.PURIFIER_KINDS:
        raise ckpt.CheckpointError(f"{path} holds a {meta.get('kind')!r} checkpoint, not a diffusion model")
    unet = build_unet_from_meta(meta["arch"])
    unet.load_state_dict(ckpt.load_weights(path, which))
    return unet


def load_classifier(path: str | Path, device="cpu") -> Classifier:
    meta = ckpt.load_meta(path)
    if meta.get("kind") not in ckpt.CLASSIFIER_KINDS:
        raise ckpt.CheckpointError(f"{path} holds a {meta.get('kind')!r} checkpoint, not a classifier")
    a = meta["arch"]
    model = build_classifier(a["classifier"], a["dataset"], a.get("num_classes", 10))
    model.load_state_dict(ckpt.load_weights(path, "ema"))
    return model.to(device).eval()


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module
