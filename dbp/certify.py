"""Randomized smoothing with a one-shot diffusion denoiser: a certified l_2 radius with every answer.

The smoothed classifier (Cohen, Rosenfeld & Kolter 2019) is g(x) = argmax_c P(h(x + sigma delta) = c), delta ~ N(0, I),
for a base classifier h; here h(z) = classifier(denoise(z)) with the diffusion model as a one-shot denoiser
(Carlini et al. 2023): in the model range [-1, 1] the noisy image is y = x + 2 sigma delta, x_t = sqrt(abar_t) y
is distributed as the forward process at the t where sqrt((1 - abar_t) / abar_t) = 2 sigma, and one eps call gives
x_hat = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t) (dbp.diffusion.Diffusion.denoise_one_shot).

If the lower confidence bound p_A of P(h(x + sigma delta) = c_A) exceeds 1/2, then g(x + d) = c_A for every
||d||_2 < sigma Phi^-1(p_A) (pixel units, images in [0, 1]), with probability >= 1 - alpha over the noise drawn
here. The guarantee is for l_2 perturbations of the input to g at that radius and for no other threat: not l_inf
beyond what the l_2 ball contains, not the noise seed (a client who can choose it can choose the answer), not g's
answer at a different n/alpha.

  model = smoothed_base(load_classifier(c), sigma=0.25, eps_net=load_unet(u))
  cert = certify(model, x, SmoothingConfig(sigma=0.25, n0=100, n=10_000, alpha=0.001))
  cert.label, cert.radius        # ABSTAIN (-1) and 0.0 when p_A <= 1/2

PREDICT and CERTIFY are Cohen et al.'s Algorithm "PREDICT" / "CERTIFY"; every noise draw comes from an explicit
torch.Generator (certify_batch: one seed per image), the noisy samples run in batches of at most max_rows.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from scipy.stats import binomtest, norm
from torch import nn

from .attacks import frozen_eval
from .diffusion import Diffusion, PurifyNoise, to_image_range, to_model_range
from .models import Defense

ABSTAIN = -1


@dataclass(frozen=True)
class SmoothingConfig:
    """sigma: noise std in [0, 1] pixel units; n0 selection and n estimation samples; alpha: the probability
    that a returned certificate is wrong; max_rows: noisy images per forward batch; seed: the noise seed."""

    sigma: float = 0.25
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    max_rows: int = 1000
    seed: int = 0

    def __post_init__(self):
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.n0 < 1 or self.n < 1 or self.max_rows < 1:
            raise ValueError(f"need n0, n, max_rows >= 1, got {self.n0}, {self.n}, {self.max_rows}")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}")

    @property
    def max_radius(self) -> float:
        """The largest radius n and alpha allow: every estimation sample in one class, p_A = alpha^(1/n)."""
        return certified_radius(lower_confidence_bound(self.n, self.n, self.alpha), self.sigma)


@dataclass
class Prediction:
    """PREDICT: the smoothed class, or ABSTAIN when the two-sided binomial test of the top two counts has
    p-value > alpha (then the answer would not be g's with probability >= 1 - alpha)."""

    label: int
    count_a: int  # samples of the top class
    count_b: int  # samples of the runner-up
    p_value: float
    n: int
    alpha: float
    sigma: float
    seed: Optional[int] = None
    seconds: float = 0.0

    @property
    def abstained(self) -> bool:
        return self.label == ABSTAIN


@dataclass
class Certificate:
    """CERTIFY: the class c_A chosen with n0 samples, its count among n fresh ones, the one-sided Clopper-Pearson
    lower bound p_A (level 1 - alpha) and the l_2 radius sigma * Phi^-1(p_A); label ABSTAIN and radius 0 when
    p_A <= 1/2."""

    label: int
    radius: float
    p_a_lower: float
    count_a: int
    n: int
    n0: int
    selected: int  # c_A from the selection samples (also when the estimation abstains)
    counts: list[int] = field(default_factory=list)  # estimation counts per class
    sigma: float = 0.0
    alpha: float = 0.0
    seed: Optional[int] = None
    seconds: float = 0.0

    @property
    def abstained(self) -> bool:
        return self.label == ABSTAIN

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the statistics -------------------------------------------------------------------------------------------

def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion from k of n (scipy's exact
    interval at confidence 1 - 2 alpha, whose lower end is the one-sided bound; alpha^(1/n) when k = n)."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if k == 0:
        return 0.0
    return float(binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low)


def certified_radius(p_a_lower: float, sigma: float) -> float:
    """sigma * Phi^-1(p_A): the l_2 radius (pixel units) of Cohen et al.'s Theorem 1 with p_B = 1 - p_A;
    0 when p_A <= 1/2 (nothing is certified)."""
    return float(sigma * norm.ppf(p_a_lower)) if p_a_lower > 0.5 else 0.0


# ---- the base classifier: noise, one-shot denoising, classifier ---------------------------------------------------

class SmoothingNoise(nn.Module):
    """The 'purifier' of the smoothed base classifier: z = x + sigma delta (pixel units, not clipped), then the
    one-shot diffusion denoiser at the matching t (or, without eps_net, z itself: Cohen's plain smoothing).

    It takes the same explicit noise as dbp's purifiers (PurifyNoise.forward = delta), so Defense(SmoothingNoise,
    classifier) is an ordinary dbp Defense: dbp.attacks' EoT attacks it as they attack a purifier.
    """

    def __init__(self, sigma: float, eps_net: Optional[nn.Module] = None, diffusion: Optional[Diffusion] = None):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)
        self.eps_net = eps_net
        self.diffusion = diffusion if diffusion is not None else Diffusion()
        # [0, 1] pixels -> [-1, 1] doubles the noise std
        self.t = None if eps_net is None else self.diffusion.timestep_for_noise_ratio(2 * self.sigma)

    def sample_noise(self, x01: torch.Tensor, generator: Optional[torch.Generator] = None) -> PurifyNoise:
        dev = generator.device if generator is not None else x01.device
        return PurifyNoise(torch.randn(tuple(x01.shape), generator=generator, device=dev).to(x01.device))

    def sample_rows(self, x01: torch.Tensor, rows: int, generator: Optional[torch.Generator] = None) -> PurifyNoise:
        """The noise of `rows` copies of one image [1,C,H,W], drawn one copy at a time (on the generator's device,
        moved once): row j is the generator's j-th draw whatever the batching (torch's batched randn orders
        its draws differently from single draws)."""
        dev = generator.device if generator is not None else x01.device
        draws = [torch.randn(tuple(x01.shape[1:]), generator=generator, device=dev) for _ in range(rows)]
        return PurifyNoise(torch.stack(draws).to(x01.device))

    def forward(self, x01: torch.Tensor, noise: Optional[PurifyNoise] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if noise is None:
            noise = self.sample_noise(x01, generator)
        if noise.forward.shape != x01.shape:
            raise ValueError(f"noise shape {tuple(noise.forward.shape)} != input shape {tuple(x01.shape)}")
        z = x01 + self.sigma * noise.forward
        if self.eps_net is None:
            return z
        return to_image_range(self.diffusion.denoise_one_shot(self.eps_net, to_model_range(z), self.t))


def smoothed_base(classifier: nn.Module, sigma: float, eps_net: Optional[nn.Module] = None) -> Defense:
    """h(x + sigma delta) = classifier(denoise(x + sigma delta)) as a Defense whose noise is explicit."""
    return Defense(SmoothingNoise(sigma, eps_net), classifier)


# ---- sampling, PREDICT, CERTIFY -----------------------------------------------------------------------------------

def _one_image(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image [C,H,W] or [1,C,H,W], got {tuple(x.shape)}")
    return x


def sample_counts(model: Defense, x: torch.Tensor, num: int, max_rows: int,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Class counts of the base classifier over `num` noise draws of one image, max_rows rows per batch.

    The draws come from `generator` one image at a time (SmoothingNoise.sample_rows), so the counts depend only
    on its state and `num`, not on max_rows."""
    x = _one_image(x).detach()
    counts: Optional[torch.Tensor] = None
    with frozen_eval(model), torch.inference_mode():
        left = num
        while left > 0:
            b = min(left, max_rows)
            logits = model(x.expand(b, *x.shape[1:]), noise=model.purifier.sample_rows(x, b, generator))
            c = torch.bincount(logits.argmax(1), minlength=logits.shape[1]).cpu()
            counts = c if counts is None else counts + c
            left -= b
    return counts if counts is not None else torch.zeros(0, dtype=torch.long)


def _generator(cfg: SmoothingConfig, generator: Optional[torch.Generator]) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(cfg.seed)


def predict(model: Defense, x: torch.Tensor, cfg: SmoothingConfig,
            generator: Optional[torch.Generator] = None) -> Prediction:
    """Cohen et al.'s PREDICT with cfg.n samples: the top class unless the binomial test of the top two counts
    (H0: p = 1/2, two-sided) has p-value > alpha. Ties always abstain (p-value 1)."""
    t0 = time.perf_counter()
    counts = sample_counts(model, x, cfg.n, cfg.max_rows, _generator(cfg, generator))
    top2 = torch.cat([counts, counts.new_zeros(max(0, 2 - len(counts)))]).topk(2)
    (n_a, n_b), (c_a, _) = top2.values.tolist(), top2.indices.tolist()
    p = float(binomtest(n_a, n_a + n_b, 0.5).pvalue) if n_a + n_b > 0 else 1.0
    label = c_a if p <= cfg.alpha else ABSTAIN
    return Prediction(label, n_a, n_b, p, cfg.n, cfg.alpha, cfg.sigma,
                      seed=cfg.seed if generator is None else None, seconds=time.perf_counter() - t0)


def certify(model: Defense, x: torch.Tensor, cfg: SmoothingConfig,
            generator: Optional[torch.Generator] = None) -> Certificate:
    """Cohen et al.'s CERTIFY: c_A = argmax of n0 selection counts; p_A = the lower bound from c_A's count among
    n fresh samples; (c_A, sigma Phi^-1(p_A)) if p_A > 1/2, else ABSTAIN. Selection and estimation use
    successive, hence independent, draws of the one generator (default: seeded with cfg.seed)."""
    t0 = time.perf_counter()
    g = _generator(cfg, generator)
    counts0 = sample_counts(model, x, cfg.n0, cfg.max_rows, g)
    c_a = int(counts0.argmax())
    counts = sample_counts(model, x, cfg.n, cfg.max_rows, g)
    n_a = int(counts[c_a])
    p_a = lower_confidence_bound(n_a, cfg.n, cfg.alpha)
    label = c_a if p_a > 0.5 else ABSTAIN
    return Certificate(label, certified_radius(p_a, cfg.sigma), p_a, n_a, cfg.n, cfg.n0, c_a, counts.tolist(),
                       cfg.sigma, cfg.alpha, seed=cfg.seed if generator is None else None,
                       seconds=time.perf_counter() - t0)


def image_seeds(cfg: SmoothingConfig, count: int) -> list[int]:
    """One noise seed per image, derived from cfg.seed: image i's certificate does not depend on the others."""
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(0, 2**62, (count,), generator=g).tolist()


def certify_batch(model: Defense, xs: torch.Tensor, cfg: SmoothingConfig,
                  seeds: Optional[Sequence[int]] = None) -> list[Certificate]:
    """CERTIFY for each image of xs [B,C,H,W], image i with its own generator seeded by seeds[i]
    (default image_seeds(cfg, B)); each certificate records its seed."""
    seeds = image_seeds(cfg, len(xs)) if seeds is None else list(seeds)
    if len(seeds) != len(xs):
        raise ValueError(f"{len(seeds)} seeds for {len(xs)} images")
    out = []
    for x, s in zip(xs, seeds):
        cert = certify(model, x, cfg, torch.Generator().manual_seed(int(s)))
        cert.seed = int(s)
        out.append(cert)
    return out


def certified_accuracy(certs: Sequence[Certificate], labels: Sequence[int], radius: float) -> float:
    """The fraction of images whose certificate is the true label with radius >= `radius` (abstentions are
    wrong; at radius 0 a correct non-abstained answer counts)."""
    if len(certs) != len(labels):
        raise ValueError(f"{len(certs)} certificates for {len(labels)} labels")
    if not certs:
        return math.nan
    hits = [c.label == int(y) and c.label != ABSTAIN and c.radius >= radius for c, y in zip(certs, labels)]
    return sum(hits) / len(hits)
