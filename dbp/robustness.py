"""Evaluation protocols, confidence intervals and sanity flags for robustness cards.

Protocols (method.md §3.4, §6):
  - single-shot: one fresh purification of the (adversarial) input, one prediction per sample, as the
    paper's code does. DW-box evaluates with the attack's fixed noise instead of a fresh draw.
  - expected accuracy (Fixed-AutoAttack, paper Appendix L): k purifications per sample, the sample's score
    is the fraction classified correctly, the accuracy is the mean score (no majority vote).
  - bare classifier: clean accuracy, and robust accuracy under PGD without the purifier, which must
    collapse at the paper's eps or the attack (not the defence) is broken.
  - DW-box images under fresh noise (`fresh_noise_correct`): the served setting, where the attacker does
    not get the defender's noise.
  - worst case over attacks (`worst_case`): per image the minimum over every attack that ran, as
    Fixed-AutoAttack keeps the per-sample minimum.

Flags follow AutoAttack's checks.py; docs/robustness-flags.md says what each means and what to do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from .attacks import PGD, AttackConfig, AttackResult
from .threat_models import PAPER_BUDGET
from .diffusion import PurifyNoise
from .models import Defense
from .stats import Z95, wilson  # noqa: F401 - re-exported: callers import them from here



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


@torch.inference_mode()
def fresh_noise_correct(defense: Defense, x_adv: torch.Tensor, y: torch.Tensor, *, k: int = 0,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Adversarial images (e.g. DW-box ones) under fresh purifier noise, the setting a server runs:
    [B] bool single-shot (k = 0) or [B] float expected accuracy over k purifications."""
    if k > 0:
        return expected_correct(defense, x_adv, y, k, generator=generator)
    return single_shot(defense, x_adv, y, generator=generator)


def adversarial_correct(model: nn.Module, res: AttackResult, y: torch.Tensor, *, k: int = 0,
                        generator: Optional[torch.Generator] = None,
                        noise: Optional[PurifyNoise] = None) -> torch.Tensor:
    """Per-image outcome of an attack in its own setting: DW-box (`noise`, else the attack's fixed noise)
    single-shot with that noise; a randomized defence under fresh noise (k > 0: expected accuracy); a
    bare classifier single-shot."""
    noise = noise if noise is not None else res.noise
    if not isinstance(model, Defense):
        return single_shot(model, res.x_adv, y)
    if noise is not None:
        return single_shot(model, res.x_adv, y, noise=noise)
    return fresh_noise_correct(model, res.x_adv, y, k=k, generator=generator)


@dataclass
class WorstCase:
    """Per image the minimum over attacks: `correct` [B] float (1/0, or a fraction for expected accuracy)
    and the name of the attack that reached it (the first listed on ties)."""

    correct: torch.Tensor
    by: list[str]
    names: list[str]

    @property
    def acc(self) -> float:
        return float(self.correct.float().mean())

    def to_dict(self) -> dict:
        return {**summarize(self.correct, "per-image minimum over attacks: " + ", ".join(self.names)),
                "per_image": [float(v) for v in self.correct], "per_image_attack": self.by}


def worst_case(outcomes: Mapping[str, torch.Tensor]) -> WorstCase:
    """Combine per-image outcomes ([B] bool or float each, same images in the same order) of several
    attacks into the per-image worst case."""
    if not outcomes:
        raise ValueError("worst_case needs at least one attack's outcomes")
    names = list(outcomes)
    flat = {n: torch.as_tensor(outcomes[n]).float().flatten().cpu() for n in names}
    if len({len(v) for v in flat.values()}) != 1:
        raise ValueError(f"outcomes cover different numbers of images: { {n: len(v) for n, v in flat.items()} }")
    stack = torch.stack([flat[n] for n in names])
    low, idx = stack.min(0)  # min returns the first index on ties
    return WorstCase(low, [names[i] for i in idx.tolist()], names)


def bare_attack_config(norm: str, steps: int = 20) -> AttackConfig:
    """PGD on the classifier alone at the paper's budget: the 'does the attack work at all' check."""
    eps, step = PAPER_BUDGET[norm]
    return AttackConfig(norm=norm, eps=eps, step=step, steps=steps, eot=1, mode="dwbox")


def bare_robust_correct(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str,
                        steps: int = 20) -> torch.Tensor:
    res = PGD(classifier, bare_attack_config(norm, steps))(x, y)
    return single_shot(classifier, res.x_adv, y)


# ---- intervals ------------------------------------------------------------------------------------------

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
    outcomes: Optional[dict] = None  # per-image tensors ([B]) a card may keep, e.g. {"correct": ...}

    def to_dict(self) -> dict:
        d = {"raised": self.raised, "value": self.value, "detail": self.detail}
        if self.outcomes:
            d["per_image"] = {k: torch.as_tensor(t).flatten().cpu().tolist() for k, t in self.outcomes.items()}
        return d


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
