"""Sanity checks that can fire: signs that an attack, not the defence, explains a robust accuracy.

In the spirit of AutoAttack's checks.py. Each check returns a `dbp.robustness.Flag` (raised = the
evaluation is suspect) whose `outcomes` carry the per-image results a card can store; the section of
docs/robustness-flags.md named after the flag says what it means and what to do.

  - large_budget_check:       an l_inf 0.3 attack must drive the defended accuracy to near 0
  - eot_gradient_consistency: two independent K-sample EoT gradients must point the same way
  - transfer_check:           adversarial images made on another model (the bare classifier, a surrogate
                              chain, BPDA) must not beat the white-box attack on the defence itself
  - attack_ineffective:       the robust accuracy must leave the clean interval and the loss must rise
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import AttackConfig, Objective, build_attack, frozen_eval
from .diffusion import PurifyNoise
from .models import Defense
from .paired import PairedTable, mcnemar_exact
from .robustness import Flag, adversarial_correct, mean_interval

DOC = "docs/robustness-flags.md"
LARGE_EPS = 0.3


def _doc(name: str) -> str:
    return f"see {DOC} § `{name}`"


def _acc(v: torch.Tensor) -> float:
    return float(v.float().mean()) if v.numel() else float("nan")


# ---- reference defences for the checks ---------------------------------------------------------------------

class IdentityPurifier(nn.Module):
    """A 'purifier' that returns its input: Defense(IdentityPurifier(), clf) is the bare classifier in a
    defence's clothes, the model a gate must reject and the checks must not flag."""

    def sample_noise(self, x01: torch.Tensor, generator: Optional[torch.Generator] = None) -> PurifyNoise:
        return PurifyNoise(torch.zeros_like(x01))

    def forward(self, x01: torch.Tensor, noise: Optional[PurifyNoise] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return x01


# ---- the checks -------------------------------------------------------------------------------------------------

def large_budget_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = LARGE_EPS,
                       steps: int = 20, mode: str = "dwbox", eot: int = 1, algorithm: str = "pgd",
                       max_acc: float = 0.1, k: int = 0, generator: Optional[torch.Generator] = None,
                       noise: Optional[PurifyNoise] = None) -> Flag:
    """l_inf `eps` (0.3: a third of the pixel range) with best-iterate tracking; raised when the
    accuracy stays above `max_acc`. Step 2.5*eps/steps (Madry et al.) so the iterates can cross the ball."""
    cfg = AttackConfig(norm="linf", eps=eps, step=2.5 * eps / max(steps, 1), steps=steps, eot=eot, mode=mode,
                       algorithm=algorithm)
    res = build_attack(model, cfg)(x, y, noise=noise, generator=generator)
    correct = adversarial_correct(model, res, y, k=k, generator=generator)
    acc = _acc(correct)
    return Flag("large_budget_not_collapsed", acc > max_acc,
                {"acc": acc, "ci95": list(mean_interval(correct)), "max": max_acc, "eps": eps, "steps": steps,
                 "mode": mode, "algorithm": cfg.attack_name},
                f"l_inf {eps} leaves {acc:.1%} accuracy (max {max_acc:.0%}): at this budget the image can be "
                f"turned into another class, so the gradient is masked or the attack is broken; "
                f"{_doc('large_budget_not_collapsed')}",
                outcomes={"correct": correct})


def eot_gradient_consistency(defense: nn.Module, x: torch.Tensor, y: torch.Tensor, *, k: int = 10,
                             loss: str = "ce", min_cos: float = 0.5,
                             generator: Optional[torch.Generator] = None) -> Flag:
    """Cosine between two independent K-sample EoT gradient averages at the clean images, per sample.

    A deterministic model gives 1. A low cosine means K purifications do not pin the expected gradient
    down: each PGD step is mostly noise, so raise K (or the attack's steps) before trusting the figure.
    """
    cfg = AttackConfig(mode="eot", eot=k, loss=loss, steps=1)
    obj = Objective(defense, cfg)
    x = x.detach().clone() if x.is_inference() else x.detach()
    with frozen_eval(defense), torch.enable_grad():
        g1 = obj(x, y, None, generator).grad.flatten(1)
        g2 = obj(x, y, None, generator).grad.flatten(1)
    cos = F.cosine_similarity(g1, g2, dim=1, eps=1e-30)
    zero = (g1.abs().amax(1) == 0) | (g2.abs().amax(1) == 0)
    cos = torch.where(zero, torch.zeros_like(cos), cos)  # no direction at all is no consistency
    mean = float(cos.mean())
    return Flag("eot_gradient_inconsistent", mean < min_cos,
                {"mean_cos": mean, "min_cos_seen": float(cos.min()), "threshold": min_cos, "k": k,
                 "randomized": obj.randomized},
                f"mean cosine {mean:.2f} between two EoT-{k} gradients (threshold {min_cos}); "
                f"{_doc('eot_gradient_inconsistent')}", outcomes={"cos": cos})


def transfer_check(target: nn.Module, source: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   white_box_correct: torch.Tensor, cfg: AttackConfig, *, noise: Optional[PurifyNoise] = None,
                   k: int = 0, margin: float = 0.0, generator: Optional[torch.Generator] = None,
                   source_name: str = "source") -> Flag:
    """Attack `source` (the bare classifier, a surrogate chain, a `SurrogateGradient` BPDA defence) with
    `cfg`, evaluate its adversarial images on `target` in the setting of `white_box_correct`: with the
    fixed DW-box `noise` if given, else under fresh noise (k > 0: expected accuracy over k purifications).

    Raised when the transferred images leave the target LESS accurate than its own white-box attack (by
    more than `margin`): a defence that resists white-box gradients better than borrowed ones masks them.
    """
    use_noise = noise if (isinstance(source, Defense) and cfg.mode == "dwbox") else None
    res = build_attack(source, cfg)(x, y, noise=use_noise, generator=generator)
    correct = adversarial_correct(target, res, y, k=k, generator=generator, noise=noise)
    t_acc, w_acc = _acc(correct), _acc(white_box_correct)
    t_bool, w_bool = correct >= 0.5, white_box_correct >= 0.5
    table = PairedTable.from_outcomes(t_bool.tolist(), w_bool.tolist())
    return Flag("transfer_beats_white_box", t_acc < w_acc - margin,
                {"transfer": t_acc, "white_box": w_acc, "transfer_ci95": list(mean_interval(correct)),
                 "white_box_ci95": list(mean_interval(white_box_correct)), "source": source_name,
                 "broken_only_by_transfer": table.c, "broken_only_by_white_box": table.b,
                 "mcnemar_p": mcnemar_exact(table.b, table.c), "attack": cfg.attack_name, "eps": cfg.eps,
                 "norm": cfg.norm},
                f"images attacked on {source_name} leave {t_acc:.1%} vs {w_acc:.1%} under the white-box attack; "
                f"{_doc('transfer_beats_white_box')}", outcomes={"correct": correct})


def attack_ineffective(clean_correct: torch.Tensor, robust_correct: torch.Tensor,
                       loss: Optional[torch.Tensor] = None, *, min_rise: float = 0.0) -> Flag:
    """Raised when the robust accuracy lies inside the clean accuracy's 95% interval, or when the attack
    loss ([B, steps] trajectory) does not rise: max over steps minus the start, averaged, <= `min_rise`."""
    lo, hi = mean_interval(clean_correct)
    r_acc = _acc(robust_correct)
    within = r_acc >= lo
    rise = float((loss.max(1).values - loss[:, 0]).mean()) if loss is not None and loss.shape[1] > 0 else None
    flat = rise is not None and rise <= min_rise
    return Flag("attack_ineffective", within or flat,
                {"robust": r_acc, "clean": _acc(clean_correct), "clean_ci95": [lo, hi], "loss_rise": rise,
                 "robust_within_clean_interval": within, "loss_flat": flat},
                f"robust {r_acc:.1%} vs clean interval [{lo:.1%}, {hi:.1%}], loss rise {rise}; "
                f"{_doc('attack_ineffective')}")
