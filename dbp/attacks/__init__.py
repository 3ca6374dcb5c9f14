"""PGD under l_inf / l_2 on classifier(purify(x)), with the true gradient through every purification step.

Settings (method.md §3, §4):
  - stochastic white-box ("eot"): every step averages the gradient over K purifications, each with fresh
    forward and reverse noise. The K draws run as ONE batch of B*K rows (repeat_interleave of the input),
    and the per-sample gradients are summed by autograd through the repeat.
  - DW-box ("dwbox"): all purifier noise is drawn once per batch and reused at every step (and, by
    `dbp.robustness`, in the final evaluation); no EoT, the defence is a deterministic function.
  - a bare classifier (any nn.Module that is not a `Defense`) is attacked like DW-box.

Stronger attacks at the same budget (issue 9):
  - best iterate (`keep="best"`, the default): every iterate is a candidate, scored by the fraction of its
    purifications classified correctly. DW-box: the exact 0/1 outcome under the fixed noise, so a sample
    counts as broken if ANY step fooled it. EoT: the K fresh purifications of its gradient step (or
    `score_k` extra ones). Per sample the candidate with the lowest score wins, ties to the higher loss,
    as Fixed-AutoAttack keeps the per-sample minimum. `keep="last"` is the paper's last iterate.
  - `loss="dlr"`: the margin loss of Croce & Hein (2020), scale-free where CE saturates.
  - `restarts` > 1: later runs start uniformly in the l_inf ball / uniformly in the l_2 ball and only
    attack the samples not yet broken; `random_start` also randomises the first run (else delta = 0).
  - `algorithm="apgd"`: APGD (dbp/attacks/apgd.py) through the same objective and noise machinery.

Gradients are taken with `torch.autograd.grad` w.r.t. the input only and the model's parameters are
frozen for the duration of the call, so no parameter gradient is ever computed or stored. Memory through
the reverse chain is bounded by the per-UNet-call checkpointing in `Diffusion.purify`.

  atk = build_attack(Defense(purifier, classifier), AttackConfig(norm="linf", mode="eot", eot=10))
  res = atk(x01, labels, generator=torch.Generator().manual_seed(0))
  res.x_adv, res.loss, res.score   # adversarial images, per-sample loss per step, attack's own accuracy estimate
"""
from __future__ import annotations

from torch import nn

from ..threat_models import MODES, NORMS, PAPER_BUDGET
from .apgd import APGD
from .base import (ALGORITHMS, KEEP, LOSSES, Attack, AttackConfig, AttackResult, BestTracker, Objective, Probe,
                   RunOutput, attack_loss, direction, dlr_loss, frozen_eval, project, random_start)
from .pgd import PGD

__all__ = ["ALGORITHMS", "APGD", "KEEP", "LOSSES", "MODES", "NORMS", "PAPER_BUDGET", "PGD", "Attack", "AttackConfig",
           "AttackResult", "BestTracker", "Objective", "Probe", "RunOutput", "attack_loss", "build_attack",
           "direction", "dlr_loss", "frozen_eval", "project", "random_start"]


def build_attack(model: nn.Module, cfg: AttackConfig) -> Attack:
    """The attack object for cfg.algorithm: PGD or APGD."""
    return APGD(model, cfg) if cfg.algorithm == "apgd" else PGD(model, cfg)
