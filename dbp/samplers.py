"""The continuous-time purifiers on the same eps-network as DDPM/DDIM: VP-SDE (DiffPure) and EDM (Karras et al. 2022).

Both are reached through `Diffusion.purify(sampler="vpsde" | "edm")`; this module holds their formulas once
(docs/samplers.md). The continuous VP schedule is the limit of Diffusion's own linear-beta schedule:
beta(t) = beta_min + t (beta_max - beta_min) with beta_min = T beta_start = 0.1 and beta_max = T beta_end = 20,
alpha_bar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2)), and the eps-network is called at the
continuous time t as timestep t (T - 1) = 999 t (a float), as DiffPure and EDM's VP preconditioning do.

VP-SDE: diffuse to t* = t_star / T in one shot, then integrate the reverse-time SDE
    dx = [-1/2 beta(t) x - beta(t) score(x, t)] dt + sqrt(beta(t)) dW,   score = -eps(x, 999 t) / sqrt(1 - alpha_bar(t))
from t* to 0 with torchsde's Euler-Maruyama at the fixed step 1/N (N = num_inference_steps, t_star N / T steps).
The Brownian increments are the explicit reverse noise (dW_k = sqrt(1/N) z_k, z = PurifyNoise.reverse), so
DW-box fixes them and EoT redraws them as for DDPM. Gradients: exact backpropagation through the solver (the
default, for attacks) or torchsde's stochastic adjoint (`sde_gradient="adjoint"`: no activation graph kept).

EDM: Heun's second-order method (Karras et al. 2022, Algorithm 2) on the rho = 7 sigma schedule from
sigma(t*) = sqrt((1 - alpha_bar(t*)) / alpha_bar(t*)) down to 0, in the VE scale x / sqrt(alpha_bar), with the
VP preconditioning D(x; sigma) = x - sigma eps(x sqrt(alpha_bar(sigma)), 999 t(sigma)). S_churn = 0 makes the
reverse chain deterministic (the forward noise is then the only randomness, as for DDIM); S_churn > 0 adds one
explicit noise per step (S_min = 0, S_max = inf, S_noise = 1: every step churns).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:  # only for annotations: diffusion.py imports this module lazily, never the other way at import
    from .diffusion import Diffusion, EpsModel, PurifyNoise

EDM_SIGMA_MIN, EDM_RHO = 0.002, 7.0  # Karras et al. 2022 Table 1 (the VP and VE columns' sampler)
SDE_GRADIENTS = ("backprop", "adjoint")


@dataclass(frozen=True)
class VPSchedule:
    """The continuous VP-SDE schedule of a discrete linear-beta Diffusion (its T -> infinity limit)."""

    beta_min: float
    beta_max: float
    num_train_timesteps: int

    @classmethod
    def of(cls, diffusion: "Diffusion") -> "VPSchedule":
        T = diffusion.num_train_timesteps
        return cls(diffusion.beta_start * T, diffusion.beta_end * T, T)

    def beta(self, t: float) -> float:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_abar(self, t: float) -> float:
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def abar(self, t: float) -> float:
        return math.exp(self.log_abar(t))

    def std(self, t: float) -> float:
        """sqrt(1 - alpha_bar(t)), the marginal std of the VP-SDE at t."""
        return math.sqrt(-math.expm1(self.log_abar(t)))

    def sigma(self, t: float) -> float:
        """sqrt((1 - alpha_bar) / alpha_bar): the VE noise level of x_t / sqrt(alpha_bar(t))."""
        return math.sqrt(math.expm1(-self.log_abar(t)))

    def t_of_sigma(self, sigma: float) -> float:
        """The inverse of sigma(t) (EDM's VPPrecond.sigma_inv)."""
        d = self.beta_max - self.beta_min
        return (math.sqrt(self.beta_min ** 2 + 2 * d * math.log1p(sigma * sigma)) - self.beta_min) / d

    def net_time(self, t: float) -> float:
        """The timestep the eps-network sees at continuous time t: t (T - 1), a float (DiffPure, EDM's c_noise)."""
        return t * (self.num_train_timesteps - 1)


def _eps_caller(eps_model: "EpsModel", use_ckpt: bool) -> Callable[[torch.Tensor, float], torch.Tensor]:
    def call(x: torch.Tensor, net_t: float) -> torch.Tensor:
        t = torch.full((x.shape[0],), net_t, device=x.device, dtype=x.dtype)
        return checkpoint(eps_model, x, t, use_reentrant=False) if use_ckpt else eps_model(x, t)
    return call


# ---- VP-SDE -------------------------------------------------------------------------------------

def vpsde_times(diffusion: "Diffusion", t_star: int, num_inference_steps: int) -> list[float]:
    """The continuous times t_0 = t* > t_1 > ... > t_n = 0 of the Euler-Maruyama grid (step 1/N)."""
    steps = diffusion.reverse_timesteps(t_star, num_inference_steps)  # the same grid rule as DDPM's N
    return [s / diffusion.num_train_timesteps for s in steps[:-1]] + [0.0]


class _GridBrownian:
    """A Brownian motion on the solver's fixed grid u_k = k h, given by its increments dW [n, B, D].

    torchsde asks for W(u_b) - W(u_a) (the adjoint asks for the same intervals, reversed); both ends are snapped
    to the grid, which they lie on up to float rounding."""

    def __init__(self, increments: torch.Tensor, h: float):
        self.h = h
        self.W = torch.cat([increments.new_zeros((1, *increments.shape[1:])), increments.cumsum(0)])

    def _k(self, u) -> int:
        k = float(u) / self.h
        if abs(k - round(k)) > 1e-3 or not 0 <= round(k) < len(self.W):
            raise RuntimeError(f"the solver asked the Brownian motion at u={float(u)}, off the grid of step {self.h}")
        return round(k)

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if tb is None or return_U or return_A:
            raise RuntimeError("only increments W(tb) - W(ta) of the Euler-Maruyama grid are available")
        return self.W[self._k(tb)] - self.W[self._k(ta)]

    def __repr__(self):
        return f"_GridBrownian(steps={len(self.W) - 1}, h={self.h})"

    dtype = property(lambda self: self.W.dtype)
    device = property(lambda self: self.W.device)
    shape = property(lambda self: tuple(self.W.shape[1:]))
    levy_area_approximation = property(lambda self: "none")

    def size(self):
        return self.shape


def _grid_brownian(increments: torch.Tensor, h: float):
    import torchsde  # lazy: only the VP-SDE needs it (the served DDIM/DDPM path does not)

    class GridBrownian(_GridBrownian, torchsde.BaseBrownian):
        pass
    return GridBrownian(increments, h)


class _ReverseVPSDE(nn.Module):
    """The reverse-time VP-SDE in the solver's time u = t* - u_t (torchsde integrates forward in u):
    dx = [1/2 beta x - beta eps / std] du + sqrt(beta) dW, evaluated at the grid time t_k of the step."""

    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, eps_call, sched: VPSchedule, times: list[float], h: float, shape: tuple[int, ...]):
        super().__init__()
        self.eps_call, self.sched, self.times, self.h, self.shape = eps_call, sched, times, h, shape
        self._first: tuple | None = None  # (y0, f(0, y0)): see f

    def _t(self, u) -> float:
        # the grid time of the step starting at u; the stochastic adjoint also evaluates at the last u (t = 0, where
        # the score is singular): there the drift is held at the last positive grid time, which the forward never
        # leaves (its last step starts there)
        k = min(round(float(u) / self.h), len(self.times) - 2)
        return self.times[k]

    def f(self, u, y: torch.Tensor) -> torch.Tensor:
        # torchsde evaluates f(ts[0], y0) once to check shapes, then again in the first step: the second call
        # reuses the first's value (and graph), so the network runs once per step, not once more per purification
        if self._first is not None and self._first[0] is y:
            out, self._first = self._first[1], None
            return out
        t = self._t(u)
        x = y.view(self.shape)
        eps = self.eps_call(x, self.sched.net_time(t))
        beta = self.sched.beta(t)
        out = (0.5 * beta * x - (beta / self.sched.std(t)) * eps).flatten(1)
        if float(u) == 0 and self._first is None:
            self._first = (y, out)
        return out

    def g(self, u, y: torch.Tensor) -> torch.Tensor:
        return torch.full_like(y, math.sqrt(self.sched.beta(self._t(u))))


def purify_vpsde(diffusion: "Diffusion", eps_model: "EpsModel", xm: torch.Tensor, noise: "PurifyNoise", *,
                 t_star: int, num_inference_steps: int, use_ckpt: bool = False,
                 sde_gradient: str = "backprop") -> torch.Tensor:
    """xm in model range [-1, 1] -> the reverse VP-SDE's x at t = 0 (model range, unclamped)."""
    import torchsde

    if sde_gradient not in SDE_GRADIENTS:
        raise ValueError(f"sde_gradient must be one of {SDE_GRADIENTS}, got {sde_gradient!r}")
    sched = VPSchedule.of(diffusion)
    times = vpsde_times(diffusion, t_star, num_inference_steps)
    n, h = len(times) - 1, 1.0 / num_inference_steps
    a = torch.tensor(sched.abar(times[0]), dtype=torch.float64, device=xm.device)
    x = diffusion.q_sample_abar(xm, a, noise.forward)  # one-shot forward diffusion to t*
    shape = tuple(x.shape)
    bm = _grid_brownian(math.sqrt(h) * noise.reverse[:n].flatten(2), h)
    # ts on the grid (the adjoint restarts from the stored state at each); dt a hair above h so that float
    # rounding never adds a sliver step (the last step is clamped to ts[-1] exactly)
    ts = torch.tensor([k * h for k in range(n + 1)], dtype=torch.float64, device=x.device)
    dt = h * (1 + 1e-9)
    if sde_gradient == "adjoint":
        sde = _ReverseVPSDE(_eps_caller(eps_model, False), sched, times, h, shape)
        params = tuple(eps_model.parameters()) if isinstance(eps_model, nn.Module) else ()
        ys = torchsde.sdeint_adjoint(sde, x.flatten(1), ts, bm=bm, method="euler", adjoint_method="euler", dt=dt,
                                     adjoint_params=params)
    else:
        sde = _ReverseVPSDE(_eps_caller(eps_model, use_ckpt), sched, times, h, shape)
        ys = torchsde.sdeint(sde, x.flatten(1), ts, bm=bm, method="euler", dt=dt)
    return ys[-1].view(shape)


# ---- EDM ----------------------------------------------------------------------------------------

def edm_sigmas(sigma_max: float, num_steps: int, sigma_min: float = EDM_SIGMA_MIN, rho: float = EDM_RHO) -> list[float]:
    """Karras et al.'s schedule sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i < n,
    then sigma_n = 0 (n = 1: [sigma_max, 0])."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"EDM needs 0 < sigma_min={sigma_min} < sigma_max={sigma_max}")
    if num_steps < 1:
        raise ValueError(f"EDM needs num_inference_steps >= 1, got {num_steps}")
    if num_steps == 1:
        return [sigma_max, 0.0]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (num_steps - 1) * (b - a)) ** rho for i in range(num_steps)] + [0.0]


def edm_gamma(s_churn: float, num_steps: int) -> float:
    return min(s_churn / num_steps, math.sqrt(2) - 1) if s_churn > 0 else 0.0


def edm_denoiser(eps_call, sched: VPSchedule, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """D(x; sigma) = x - sigma eps(x sqrt(alpha_bar), 999 t(sigma)), alpha_bar = 1 / (1 + sigma^2) (VP precond)."""
    eps = eps_call(x / math.sqrt(1 + sigma * sigma), sched.net_time(sched.t_of_sigma(sigma)))
    return x - sigma * eps


def purify_edm(diffusion: "Diffusion", eps_model: "EpsModel", xm: torch.Tensor, noise: "PurifyNoise", *,
               t_star: int, num_inference_steps: int, s_churn: float = 0.0, use_ckpt: bool = False) -> torch.Tensor:
    """xm in model range -> EDM's Heun sampler from sigma(t*) to 0 (model range, unclamped); 2N - 1 eps calls."""
    sched = VPSchedule.of(diffusion)
    sigmas = edm_sigmas(sched.sigma(t_star / diffusion.num_train_timesteps), num_inference_steps)
    gamma = edm_gamma(s_churn, num_inference_steps)
    eps_call = _eps_caller(eps_model, use_ckpt)
    x = xm + sigmas[0] * noise.forward  # VE scale: the VP forward diffusion to t*, divided by sqrt(alpha_bar(t*))
    for i, (s_cur, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        s_hat = s_cur * (1 + gamma)
        x_hat = x + math.sqrt(s_hat ** 2 - s_cur ** 2) * noise.reverse[i] if gamma > 0 else x
        d = (x_hat - edm_denoiser(eps_call, sched, x_hat, s_hat)) / s_hat
        x = x_hat + (s_next - s_hat) * d
        if s_next > 0:  # Heun's correction (none on the last step to sigma = 0)
            d2 = (x - edm_denoiser(eps_call, sched, x, s_next)) / s_next
            x = x_hat + (s_next - s_hat) * (0.5 * d + 0.5 * d2)
    return x
