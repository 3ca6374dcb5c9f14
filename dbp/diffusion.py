"""Discrete DDPM/DDIM diffusion math: the one place every formula of the purifier lives.

Conventions (method.md §2): the UNet works in [-1, 1]; the public purification API takes and
returns images in [0, 1]. Schedules are buffers so they follow `.to(device)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .grad_checkpointing import GradCheckpoint, plan_grad_checkpoint

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # eps_model(x_t in [-1, 1], t) -> eps

# every sampler purify accepts, with its default num_inference_steps (docs/samplers.md): ddpm/ddim/vpsde read N as
# the grid of stride T // N (vpsde: Euler-Maruyama step 1/N in continuous time), edm as its number of Heun steps
SAMPLERS = ("ddpm", "ddim", "vpsde", "edm")
# the samplers that call the eps-network at non-integer timesteps (999 t, dbp.samplers.VPSchedule.net_time): an
# evaluator that only takes integer t (an ONNX graph exported with int64 t) would truncate them
CONTINUOUS_TIME_SAMPLERS = ("vpsde", "edm")
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 100, "vpsde": 1000, "edm": 10}


def to_model_range(x01: torch.Tensor) -> torch.Tensor:
    return x01 * 2.0 - 1.0


def to_image_range(xm: torch.Tensor) -> torch.Tensor:
    return (xm / 2.0 + 0.5).clamp(0.0, 1.0)


@dataclass
class PurifyNoise:
    """Every random draw of one purification: what DW-box fixes and what EoT redraws.

    forward: [B, C, H, W] noise of the forward jump to t*.
    reverse: [S, B, C, H, W] per-step noise, standard normal: DDPM's ancestral noise (S = reverse steps that add
        noise), VP-SDE's Brownian increments divided by sqrt(step) (S = Euler-Maruyama steps), EDM's churn noise
        (S = Heun steps, only when S_churn > 0); None for DDIM and EDM without churn.
    """

    forward: torch.Tensor
    reverse: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.forward.shape[0]

    def __getitem__(self, rows) -> "PurifyNoise":
        """The noise of a subset of the batch (a slice, an index tensor or list): e.g. noise[:n], noise[j::k]."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        rev = None if self.reverse is None else self.reverse[:, rows]
        return PurifyNoise(self.forward[rows], rev)

    @staticmethod
    def cat(noises: "Sequence[PurifyNoise]") -> "PurifyNoise":
        """Concatenate along the batch: the noise of the concatenated images."""
        if not noises:
            raise ValueError("PurifyNoise.cat needs at least one noise")
        if len({n.reverse is None for n in noises}) != 1:
            raise ValueError("PurifyNoise.cat: cannot mix noises with and without reverse noise")
        rev = None if noises[0].reverse is None else torch.cat([n.reverse for n in noises], dim=1)
        return PurifyNoise(torch.cat([n.forward for n in noises]), rev)

    def repeat_interleave(self, k: int) -> "PurifyNoise":
        rev = None if self.reverse is None else self.reverse.repeat_interleave(k, dim=1)
        return PurifyNoise(self.forward.repeat_interleave(k, dim=0), rev)


class Diffusion(nn.Module):
    """Linear-beta DDPM schedule with forward noising, DDPM (fixed_large) and DDIM (eta=0) steps."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__()
        self.num_train_timesteps = num_train_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end  # the continuous VP-SDE's beta_min/T, beta_max/T
        # float32 linspace and cumprod, exactly as diffusers' DDPMScheduler builds it, so the two agree bit for bit
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)

    # ---- schedule helpers -------------------------------------------------------------------
    def abar(self, t: torch.Tensor | int) -> torch.Tensor:
        """alpha-bar at integer timesteps t; t < 0 means the clean end (alpha-bar = 1)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device)
        one = torch.ones((), device=t.device, dtype=self.alphas_cumprod.dtype)
        return torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], one)

    @staticmethod
    def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.reshape(v.shape + (1,) * (like.dim() - v.dim())) if v.dim() else v

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise  (model range)."""
        return self.q_sample_abar(x0, self._bcast(self.abar(t), x0), noise)

    @staticmethod
    def q_sample_abar(x0: torch.Tensor, a: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The forward jump given alpha-bar itself (a tensor broadcastable to x0; the VP-SDE's continuous one)."""
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        """Tweedie one-step estimate (x_t - sqrt(1-abar) eps) / sqrt(abar), unclipped."""
        a = self._bcast(self.abar(t), x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def noise_ratio(self, t: torch.Tensor | int) -> torch.Tensor:
        """sqrt((1 - abar_t) / abar_t): the std of the noise in x_t / sqrt(abar_t) = x0 + ratio * eps."""
        a = self.abar(t)
        return ((1 - a) / a).sqrt()

    def timestep_for_noise_ratio(self, ratio: float) -> int:
        """The t whose noise_ratio is closest to `ratio`. Gaussian noise of std sigma on [0, 1] pixels is ratio
        2 sigma in the model range (Carlini et al. 2023's t for randomized smoothing at sigma)."""
        r = self.noise_ratio(torch.arange(self.num_train_timesteps, device=self.alphas_cumprod.device))
        if not 0 < ratio <= float(r[-1]):
            raise ValueError(f"noise ratio must be in (0, {float(r[-1]):.4g}] (t <= {self.num_train_timesteps - 1}), "
                             f"got {ratio}")
        return int((r - ratio).abs().argmin())

    def denoise_one_shot(self, eps_model: EpsModel, y: torch.Tensor, t: int) -> torch.Tensor:
        """x0 estimate from y = x0 + noise_ratio(t) * delta (model range) with ONE eps call: x_t = sqrt(abar_t) y
        is distributed as the forward process at t, and predict_x0 gives the one-shot (Tweedie) denoising,
        unclipped."""
        x_t = self.abar(t).sqrt() * y
        eps = eps_model(x_t, torch.full((y.shape[0],), t, device=y.device, dtype=torch.long))
        return self.predict_x0(x_t, t, eps)

    def reverse_timesteps(self, t_star: int, num_inference_steps: int) -> list[int]:
        """Timesteps visited from t* with "leading" spacing of stride T // N (method.md §2.1 table)."""
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {self.num_train_timesteps}], got {num_inference_steps}")
        if not 0 <= t_star < self.num_train_timesteps:
            raise ValueError(f"t_star must be in [0, {self.num_train_timesteps - 1}], got {t_star}")
        stride = self.num_train_timesteps // num_inference_steps
        if t_star % stride:
            raise ValueError(f"t_star={t_star} is not on the grid of stride {stride} (num_inference_steps={num_inference_steps})")
        return list(range(t_star, -1, -stride))

    # ---- one reverse step each ----------------------------------------------------------------
    def ddpm_step(self, eps: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor,
                  z: Optional[torch.Tensor]) -> torch.Tensor:
        """Ancestral step t -> t_prev with clipped x0 and `fixed_large` variance; no noise when t == 0."""
        a_t, a_prev = self.abar(t), self.abar(t_prev)
        beta_t = 1 - a_t / a_prev
        x0 = self.predict_x0(x_t, t, eps).clamp(-1, 1)
        mean = (a_prev.sqrt() * beta_t / (1 - a_t)) * x0 + ((a_t / a_prev).sqrt() * (1 - a_prev) / (1 - a_t)) * x_t
        if t > 0:
            if z is None:
                raise ValueError("DDPM step with t > 0 needs reverse noise z")
            mean = mean + beta_t.sqrt() * z
        return mean

    def ddim_step(self, eps: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM (eta=0) step; the direction term uses the raw eps (diffusers default)."""
        a_t, a_prev = self.abar(t), self.abar(t_prev)
        x0 = self.predict_x0(x_t, t, eps).clamp(-1, 1)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

    # ---- purification -------------------------------------------------------------------------
    def default_steps(self, sampler: str) -> int:
        """num_inference_steps when none is given: DDPM's full grid of T, the others' DEFAULT_STEPS."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        return self.num_train_timesteps if sampler == "ddpm" else DEFAULT_STEPS[sampler]

    def check_settings(self, sampler: str, t_star: int, num_inference_steps: int, s_churn: float = 0.0) -> None:
        """Raise ValueError for settings purify would refuse (a config's validation calls this)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if sampler == "edm":
            if not 1 <= t_star < self.num_train_timesteps:
                raise ValueError(f"t_star must be in [1, {self.num_train_timesteps - 1}] for edm, got {t_star}")
            if num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be >= 1 for edm, got {num_inference_steps}")
        else:
            steps = self.reverse_timesteps(t_star, num_inference_steps)
            if sampler == "vpsde" and len(steps) < 2:
                raise ValueError("vpsde needs t_star > 0 (at least one Euler-Maruyama step)")
        if s_churn < 0 or (s_churn and sampler != "edm"):
            raise ValueError(f"s_churn must be >= 0 and is an edm setting, got {s_churn} for {sampler}")

    def n_unet_calls(self, sampler: str, t_star: int, num_inference_steps: int) -> int:
        """eps-network calls of one purification: DDPM/DDIM one per visited timestep, VP-SDE one per Euler-Maruyama
        step, EDM 2N - 1 (Heun: two per step, one on the last step to sigma = 0)."""
        if sampler == "edm":
            return 2 * num_inference_steps - 1
        n = len(self.reverse_timesteps(t_star, num_inference_steps))
        return n - 1 if sampler == "vpsde" else n

    def num_reverse_noises(self, sampler: str, t_star: int, num_inference_steps: int, s_churn: float = 0.0) -> int:
        if sampler == "edm":
            return num_inference_steps if s_churn > 0 else 0
        steps = self.reverse_timesteps(t_star, num_inference_steps)
        if sampler == "vpsde":
            return len(steps) - 1
        return sum(1 for t in steps if t > 0) if sampler == "ddpm" else 0

    def sample_noise(self, shape: tuple[int, ...], sampler: str, t_star: int, num_inference_steps: int,
                     generator: Optional[torch.Generator] = None, device=None, s_churn: float = 0.0) -> PurifyNoise:
        device = device if device is not None else self.alphas_cumprod.device
        fwd = torch.randn(shape, generator=generator, device=device)
        n = self.num_reverse_noises(sampler, t_star, num_inference_steps, s_churn)
        rev = torch.randn((n, *shape), generator=generator, device=device) if n else None
        return PurifyNoise(fwd, rev)

    def purify(self, eps_model: EpsModel, x01: torch.Tensor, *, t_star: int = 100, sampler: str = "ddpm",
               num_inference_steps: Optional[int] = None, noise: Optional[PurifyNoise] = None,
               generator: Optional[torch.Generator] = None, grad_checkpoint: GradCheckpoint = "auto",
               checkpoint_budget_bytes: Optional[int] = None, s_churn: float = 0.0,
               sde_gradient: str = "backprop") -> torch.Tensor:
        """Diffuse x01 ([0,1], [B,C,H,W]) to t* and run the reverse chain back to an image in [0,1].

        sampler: "ddpm" | "ddim" (this module), "vpsde" | "edm" (dbp.samplers, docs/samplers.md; t* = t_star / T
        in continuous time). s_churn: EDM's S_churn (0: a deterministic reverse chain). sde_gradient: VP-SDE's
        gradient, "backprop" (exact, through the solver) or "adjoint" (torchsde's stochastic adjoint).

        Randomness comes from `noise` (bit-for-bit repeatable) or from `generator`, never both: a caller
        passing both would believe the generator mattered (diffusers raises for latents + generator too).
        Differentiable in x01. With grad enabled, each UNet call is checkpointed (memory O(one call), one
        extra forward per call) when `grad_checkpoint` is True, or, for "auto", when the chain's estimated
        activations exceed `checkpoint_budget_bytes` (default: a quarter of free memory); see
        dbp.grad_checkpointing. The gradients are the same either way.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if noise is not None and generator is not None:
            raise ValueError("give purify either `noise` or `generator`, not both")
        if num_inference_steps is None:
            num_inference_steps = self.default_steps(sampler)
        n_inf = num_inference_steps  # 0 must reach reverse_timesteps' check, not fall back to the default
        if sampler in CONTINUOUS_TIME_SAMPLERS:
            return self._purify_continuous(eps_model, x01, sampler, t_star, n_inf, noise, generator, grad_checkpoint,
                                           checkpoint_budget_bytes, s_churn, sde_gradient)
        self.check_settings(sampler, t_star, n_inf, s_churn)
        steps = self.reverse_timesteps(t_star, n_inf)
        if noise is None:
            noise = self.sample_noise(tuple(x01.shape), sampler, t_star, n_inf, generator, x01.device)
        self._check_noise(noise, x01, sampler, t_star, n_inf)

        x = self.q_sample(to_model_range(x01), torch.tensor(t_star, device=x01.device), noise.forward)
        use_ckpt = torch.is_grad_enabled() and plan_grad_checkpoint(grad_checkpoint, eps_model, x, len(steps),
                                                                   checkpoint_budget_bytes).use
        stride = self.num_train_timesteps // n_inf
        for i, t in enumerate(steps):
            t_prev = t - stride  # negative at the last step: alpha-bar = 1, the output is x0
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            if use_ckpt:
                eps = checkpoint(eps_model, x, t_batch, use_reentrant=False)
            else:
                eps = eps_model(x, t_batch)
            if sampler == "ddpm":
                z = noise.reverse[i] if t > 0 else None
                x = self.ddpm_step(eps, t, t_prev, x, z)
            else:
                x = self.ddim_step(eps, t, t_prev, x)
        return to_image_range(x)

    def _purify_continuous(self, eps_model, x01, sampler, t_star, n_inf, noise, generator, grad_checkpoint,
                           checkpoint_budget_bytes, s_churn, sde_gradient) -> torch.Tensor:
        from . import samplers  # the continuous-time samplers' formulas (it imports torchsde lazily itself)

        self.check_settings(sampler, t_star, n_inf, s_churn)
        if noise is None:
            noise = self.sample_noise(tuple(x01.shape), sampler, t_star, n_inf, generator, x01.device, s_churn)
        self._check_noise(noise, x01, sampler, t_star, n_inf, s_churn)
        xm = to_model_range(x01)
        adjoint = sampler == "vpsde" and sde_gradient == "adjoint"  # the adjoint keeps no graph to checkpoint
        use_ckpt = (torch.is_grad_enabled() and not adjoint
                    and plan_grad_checkpoint(grad_checkpoint, eps_model, xm, self.n_unet_calls(sampler, t_star, n_inf),
                                             checkpoint_budget_bytes).use)
        if sampler == "vpsde":
            x = samplers.purify_vpsde(self, eps_model, xm, noise, t_star=t_star, num_inference_steps=n_inf,
                                      use_ckpt=use_ckpt, sde_gradient=sde_gradient)
        else:
            x = samplers.purify_edm(self, eps_model, xm, noise, t_star=t_star, num_inference_steps=n_inf,
                                    s_churn=s_churn, use_ckpt=use_ckpt)
        return to_image_range(x)

    def _check_noise(self, noise: PurifyNoise, x01: torch.Tensor, sampler: str, t_star: int, n_inf: int,
                     s_churn: float = 0.0) -> None:
        if noise.forward.shape != x01.shape:
            raise ValueError(f"forward noise shape {tuple(noise.forward.shape)} != input shape {tuple(x01.shape)}")
        need = self.num_reverse_noises(sampler, t_star, n_inf, s_churn)
        have = 0 if noise.reverse is None else noise.reverse.shape[0]
        if have < need or (need and noise.reverse.shape[1:] != x01.shape):
            raise ValueError(f"{sampler} from t*={t_star} with N={n_inf} needs reverse noise [{need}, *{tuple(x01.shape)}], "
                             f"got {None if noise.reverse is None else tuple(noise.reverse.shape)}")
