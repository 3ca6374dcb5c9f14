"""Evaluation protocols, confidence intervals and sanity flags for robustness cards.

Protocols (method.md §3.4, §6):
  - single-shot: one fresh purification of the (adversarial) input, one prediction per sample, as the
    paper's code does. DW-box evaluates with the attack's fixed noise instead of a fresh draw.
  - expected accuracy (Fixed-AutoAttack, paper Appendix L): k purifications per sample, the sample's score
    is the fraction classified correctly, the accuracy is the mean score (no majority vote).
  - bare classifier: clean accuracy, and robust accuracy under PGD without the purifier, which must
    collapse at the paper's eps or the attack (not the defence) is broken.

Flags follow AutoAttack's checks.py; docs/robustness-flags.md says what each means and what to do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .attacks import PAPER_BUDGET, PGD, AttackConfig
from .diffusion import PurifyNoise
from .models import Defense

Z95 = 1.959963984540054


# ---- protocols ---------------------------------------------------------------------------------------

@torch.inference_mode()
def single_shot(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, noise: Optional[PurifyNoise] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[B] bool: one prediction per sample (one purification if `model` is a Defense)."""
    model.eval()
    logits = model(x, noise=noise, generator=generator) if isinstance(model, Defense) else model(x)
    return logits.argmax(1) == y


@torch.inference_mode()
def expected_correct(defense: Defense, x: torch.Tensor, y: torch.Tensor, k: int = 20, *,
                     generator: Optional[torch.Generator] = None, max_rows: int = 256) -> torch.Tensor:
    """[B] float: fraction of k fresh purifications classified correctly, runs batched as B*r rows."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    defense.eval()
    runs_per_chunk = max(1, min(k, max_rows // max(1, len(x))))
    hits = torch.zeros(len(x), device=x.device)
    done = 0
    while done < k:
        r = min(runs_per_chunk, k - done)
        logits = defense(x.repeat_interleave(r, 0), generator=generator)
        hits += (logits.argmax(1) == y.repeat_interleave(r)).view(-1, r).float().sum(1)
        done += r
    return hits / k


@torch.inference_mode()
def is_randomized(defense: nn.Module, x: torch.Tensor, runs: int = 3, tol: float = 1e-6,
                  generator: Optional[torch.Generator] = None) -> bool:
    """AutoAttack's check_randomized: do repeated forward passes on the same input disagree?"""
    defense.eval()
    kw = {"generator": generator} if isinstance(defense, Defense) else {}
    first = defense(x, **kw)
    return any((defense(x, **kw) - first).abs().max().item() > tol for _ in range(runs - 1))


def bare_attack_config(norm: str, steps: int = 20) -> AttackConfig:
    """PGD on the classifier alone at the paper's budget: the 'does the attack work at all' check."""
    eps, step = PAPER_BUDGET[norm]
    return AttackConfig(norm=norm, eps=eps, step=step, steps=steps, eot=1, mode="dwbox")


def bare_robust_correct(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str,
                        steps: int = 20) -> torch.Tensor:
    res = PGD(classifier, bare_attack_config(norm, steps))(x, y)
    return single_shot(classifier, res.x_adv, y)


# ---- intervals ------------------------------------------------------------------------------------------

def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; sane at 0, 1 and small n."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(scores: Sequence[float] | torch.Tensor, z: float = Z95) -> tuple[float, float]:
    """95% interval of a mean of per-sample scores in [0, 1].

    0/1 scores are a proportion: Wilson. Fractional scores (expected accuracy over k runs): normal
    interval mean +- z*s/sqrt(n) over the per-sample scores; when they show no spread at all (s = 0) the
    normal interval would claim certainty, so Wilson on the same mean is used instead.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    n = s.numel()
    if n == 0:
        return (0.0, 1.0)
    m = float(s.mean())
    sd = float(s.std(unbiased=True)) if n > 1 else 0.0
    if bool(((s == 0) | (s == 1)).all()) or sd == 0.0:
        return wilson(m * n, n, z)
    half = z * sd / math.sqrt(n)
    return (max(0.0, m - half), min(1.0, m + half))


def summarize(scores: Sequence[float] | torch.Tensor, protocol: str, **extra) -> dict:
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    lo, hi = mean_interval(s)
    return {"acc": float(s.mean()) if s.numel() else float("nan"), "ci95": [lo, hi], "n": int(s.numel()),
            "protocol": protocol, **extra}


# ---- sanity flags --------------------------------------------------------------------------------------

@dataclass
class Flag:
    name: str
    raised: bool
    value: object
    detail: str

    def to_dict(self) -> dict:
        return {"raised": self.raised, "value": self.value, "detail": self.detail}


FLAG_NAMES = ("robust_above_clean", "zero_gradients", "randomness_without_eot", "bare_not_collapsed")


def sanity_flags(*, clean_acc: float, robust_acc: float, zero_grad_frac: float, randomized: bool,
                 mode: str, eot: int, bare_robust_acc: Optional[float], bare_max: float = 0.1) -> dict[str, dict]:
    """The four checks of one setting; docs/robustness-flags.md explains each."""
    flags = [
        Flag("robust_above_clean", robust_acc > clean_acc, {"robust": robust_acc, "clean": clean_acc},
             "robust accuracy exceeds clean accuracy: the attack made the model better, so it is not working"),
        Flag("zero_gradients", zero_grad_frac > 0, zero_grad_frac,
             "fraction of samples whose input gradient is exactly zero at the first PGD step (masked or "
             "saturated gradients: PGD cannot move them)"),
        Flag("randomness_without_eot", randomized and mode == "eot" and eot == 1, {"randomized": randomized,
                                                                                  "eot": eot},
             "the defence is randomized but the stochastic white-box attack uses EoT=1 (one noisy gradient "
             "per step understates the attack)"),
        Flag("bare_not_collapsed", bare_robust_acc is not None and bare_robust_acc > bare_max,
             {"bare_robust": bare_robust_acc, "max": bare_max},
             "PGD at the paper's eps leaves the bare classifier above the threshold: the attack itself is weak"),
    ]
    return {f.name: f.to_dict() for f in flags}
