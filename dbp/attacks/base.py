"""The attack machinery every algorithm shares: the config, the objective (EoT, fixed DW-box noise, the loss),
best-iterate tracking, restarts, projections. PGD (pgd.py) and APGD (apgd.py) implement `Attack.run`.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import PurifyNoise
from ..models import Defense
from ..threat_models import MODES, NORMS, PAPER_BUDGET

LOSSES = ("ce", "dlr")
ALGORITHMS = ("pgd", "apgd")
KEEP = ("best", "last")


@dataclass
class AttackConfig:
    """One attack setting. eps/step default to the paper's budget for the norm (APGD ignores `step`)."""

    norm: str = "linf"
    eps: Optional[float] = None
    step: Optional[float] = None
    steps: int = 20
    eot: int = 10  # purification samples per step (mode "eot"); DW-box always uses 1
    mode: str = "eot"
    eot_batched: bool = True  # False: loop over the EoT samples one at a time (the reference code's way)
    loss: str = "ce"
    algorithm: str = "pgd"
    keep: str = "best"  # "best": per-sample best iterate; "last": the final iterate (the paper's PGD)
    restarts: int = 1
    random_start: bool = False  # the first run starts at a random point too (later restarts always do)
    score_k: int = 0  # mode "eot": fresh purifications scoring each candidate; 0 = the K draws of its step

    def __post_init__(self):
        for field, allowed in (("norm", NORMS), ("mode", MODES), ("loss", LOSSES), ("algorithm", ALGORITHMS),
                               ("keep", KEEP)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        eps, step = PAPER_BUDGET[self.norm]
        self.eps = eps if self.eps is None else float(self.eps)
        self.step = step if self.step is None else float(self.step)
        if self.eps < 0 or self.step <= 0:
            raise ValueError(f"need eps >= 0 and step > 0, got eps={self.eps}, step={self.step}")
        if self.steps < 0 or self.eot < 1:
            raise ValueError(f"need steps >= 0 and eot >= 1, got steps={self.steps}, eot={self.eot}")
        if self.restarts < 1 or self.score_k < 0:
            raise ValueError(f"need restarts >= 1 and score_k >= 0, got {self.restarts}, {self.score_k}")

    @property
    def name(self) -> str:
        return f"{self.norm}-{self.mode}"

    @property
    def attack_name(self) -> str:
        """e.g. 'apgd-dlr' or 'pgd-ce': the algorithm and its loss."""
        return f"{self.algorithm}-{self.loss}"


@dataclass
class AttackResult:
    x_adv: torch.Tensor  # [B, C, H, W] in [0, 1]: per sample the kept candidate (see AttackConfig.keep)
    loss: torch.Tensor  # [B, steps]: the attack loss at each iterate of the first run (mean over EoT draws)
    zero_grad: torch.Tensor  # [B] bool: input gradient exactly zero at the first step
    noise: Optional[PurifyNoise]  # the fixed DW-box noise (reuse it for the final evaluation), else None
    forward_passes: int  # defence forward passes spent on a sample attacked in every run (an upper bound)
    # The attack's own estimate of the accuracy at x_adv: DW-box / bare the exact 0/1 outcome; EoT the
    # fraction of the scoring draws (biased low by the selection: report a fresh evaluation instead).
    # None when nothing was scored (keep="last" with one run).
    score: Optional[torch.Tensor] = None
    x_last: Optional[torch.Tensor] = None  # [B, C, H, W]: the final iterate of the first run
    best_step: Optional[torch.Tensor] = None  # [B] long: iterate index of x_adv (0 = the start point)
    best_restart: Optional[torch.Tensor] = None  # [B] long: the run x_adv came from


@dataclass
class Probe:
    """The attack objective at one point: what every algorithm needs from the defence."""

    loss: torch.Tensor  # [B] attack loss, mean over the draws
    grad: Optional[torch.Tensor]  # [B, C, H, W] input gradient summed over the draws (None if not asked)
    correct: torch.Tensor  # [B] float: fraction of the draws classified correctly


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


# ---- losses ----------------------------------------------------------------------------------------------

def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B] difference-of-logits-ratio (Croce & Hein 2020): -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3).

    Invariant to shifting and scaling the logits, so it keeps a gradient where softmax CE saturates.
    """
    if logits.shape[1] < 3:
        raise ValueError(f"DLR needs at least 3 classes, got {logits.shape[1]}")
    z_y = logits.gather(1, y[:, None])[:, 0]
    z_other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    top = logits.topk(3, dim=1).values
    return -(z_y - z_other) / (top[:, 0] - top[:, 2] + 1e-12)


def attack_loss(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B] per-sample loss the attack ascends."""
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if name == "dlr":
        return dlr_loss(logits, y)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")


# ---- geometry ----------------------------------------------------------------------------------------------

def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit size: sign(g) for l_inf, g/||g||_2 per sample for l_2."""
    if norm == "linf":
        return g.sign()
    return g / (_per_sample(g.flatten(1).norm(dim=1), g) + 1e-10)


def project(x: torch.Tensor, delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """delta onto the eps-ball of the norm, then onto the box: x + delta in [0, 1]."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        delta = delta * _per_sample((eps / norms).clamp(max=1.0), delta)
    # clamping x + delta only shrinks |delta_i|, so the norm bound still holds afterwards
    return (x + delta).clamp(0.0, 1.0) - x


def random_start(x: torch.Tensor, norm: str, eps: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """A start delta: uniform in the l_inf cube, or uniform in the l_2 ball (direction on the sphere,
    radius eps * u^(1/d)); then projected onto the box."""
    if norm == "linf":
        delta = (torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1) * eps
    else:
        d = torch.randn(x.shape, generator=generator, device=x.device)
        u = torch.rand(len(x), generator=generator, device=x.device)
        radius = eps * u.pow(1.0 / x[0].numel())
        delta = d * _per_sample(radius / d.flatten(1).norm(dim=1).clamp_min(1e-12), d)
    return project(x, delta, norm, eps)


# ---- the objective: one place for EoT, fixed noise and the loss -----------------------------------------------

class Objective:
    """Loss, summed input gradient and fraction correct of `model` at x, under the config's setting."""

    def __init__(self, model: nn.Module, cfg: AttackConfig):
        self.model, self.cfg = model, cfg
        self.purifier = model.purifier if isinstance(model, Defense) else None
        self.classifier = model.classifier if isinstance(model, Defense) else model
        self.passes = 0  # defence forward passes per sample so far (the driver resets it per attack)

    @property
    def randomized(self) -> bool:
        """True when every evaluation redraws the purifier noise (stochastic white-box)."""
        return self.purifier is not None and self.cfg.mode == "eot"

    @property
    def eot_samples(self) -> int:
        return self.cfg.eot if self.randomized else 1

    def __call__(self, x: torch.Tensor, y: torch.Tensor, noise: Optional[PurifyNoise],
                 generator: Optional[torch.Generator], *, grad: bool = True, k: Optional[int] = None) -> Probe:
        k = self.eot_samples if k is None else (k if self.randomized else 1)
        self.passes += k
        x_in = x.detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            if not self.randomized:
                logits = self.classifier(x_in) if self.purifier is None else self.model(x_in, noise=noise)
                loss = attack_loss(self.cfg.loss, logits, y)
                correct = (logits.argmax(1) == y).float()
                g = torch.autograd.grad(loss.sum(), x_in)[0] if grad else None
                return Probe(loss.detach(), g, correct)
            # one draw for all K samples: the batched and the looped variant consume identical noise
            eot_noise = self.purifier.sample_noise(x_in.detach().repeat_interleave(k, 0), generator)
            if self.cfg.eot_batched:
                # row b*K + j is draw j of sample b; the repeat's backward sums the K gradients per sample
                logits = self.model(x_in.repeat_interleave(k, 0), noise=eot_noise)
                loss = attack_loss(self.cfg.loss, logits, y.repeat_interleave(k))
                correct = (logits.argmax(1) == y.repeat_interleave(k)).float().view(-1, k).mean(1)
                g = torch.autograd.grad(loss.sum(), x_in)[0] if grad else None
                return Probe(loss.detach().view(-1, k).mean(1), g, correct)
            g = torch.zeros_like(x_in) if grad else None
            loss_sum, hits = torch.zeros(len(x_in), device=x.device), torch.zeros(len(x_in), device=x.device)
            for j in range(k):  # draw j of the repeat_interleave(k) layout: rows j, j+k, j+2k, ...
                logits = self.model(x_in, noise=eot_noise[j::k])
                loss = attack_loss(self.cfg.loss, logits, y)
                if grad:
                    g += torch.autograd.grad(loss.sum(), x_in)[0]
                loss_sum += loss.detach()
                hits += (logits.argmax(1) == y).float()
            return Probe(loss_sum / k, g, hits / k)


class BestTracker:
    """Per-sample best candidate: lowest score (fraction correct), ties broken by the higher loss."""

    def __init__(self, x: torch.Tensor):
        b = len(x)
        self.x = x.clone()
        self.score = torch.full((b,), float("inf"), device=x.device)
        self.loss = torch.full((b,), float("-inf"), device=x.device)
        self.step = torch.full((b,), -1, dtype=torch.long, device=x.device)
        self.restart = torch.full((b,), -1, dtype=torch.long, device=x.device)

    def update(self, rows: torch.Tensor, x: torch.Tensor, score: torch.Tensor, loss: torch.Tensor,
               step: int, restart: int) -> None:
        s, l_ = self.score[rows], self.loss[rows]
        better = (score < s) | ((score == s) & (loss > l_))
        r = rows[better]
        self.x[r] = x[better].detach()
        self.score[r], self.loss[r] = score[better], loss[better]
        self.step[r], self.restart[r] = step, restart


@dataclass
class RunOutput:
    x_last: torch.Tensor  # [b, ...] final iterate
    loss: torch.Tensor  # [b, steps] loss at iterates 0..steps-1
    zero_grad: torch.Tensor  # [b] bool


class Attack:
    """Shared driver: input checks, frozen model, DW-box noise, restarts and the per-sample best candidate.

    Subclasses implement `run`: one optimisation from a start point, offering each iterate to `offer`.
    """

    def __init__(self, model: nn.Module, cfg: AttackConfig):
        self.model, self.cfg = model, cfg
        self.objective = Objective(model, cfg)
        self.purifier, self.classifier = self.objective.purifier, self.objective.classifier

    @property
    def eot_samples(self) -> int:
        """Purifications per step: K in the stochastic setting, 1 for DW-box and for a bare classifier."""
        return self.objective.eot_samples

    @property
    def scores_candidates(self) -> bool:
        return self.cfg.keep == "best" or self.cfg.restarts > 1

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, noise: Optional[PurifyNoise] = None,
                 generator: Optional[torch.Generator] = None) -> AttackResult:
        if x.dim() != 4 or y.shape != x.shape[:1]:
            raise ValueError(f"expected x [B,C,H,W] and y [B], got {tuple(x.shape)} and {tuple(y.shape)}")
        if self.purifier is not None and self.cfg.mode == "dwbox" and noise is None:
            noise = self.purifier.sample_noise(x, generator)
        if noise is not None and len(noise) != len(x):
            raise ValueError(f"noise is for {len(noise)} images, x has {len(x)}")
        x = x.detach().clone() if x.is_inference() else x.detach()  # inference tensors cannot enter autograd
        with frozen_eval(self.model), torch.enable_grad():
            return self._restarts(x, y, noise if self.cfg.mode == "dwbox" else None, generator)

    def _restarts(self, x, y, noise, generator) -> AttackResult:
        cfg = self.cfg
        best = BestTracker(x)
        first: Optional[RunOutput] = None
        all_rows = torch.arange(len(x), device=x.device)
        self.objective.passes = 0
        for r in range(cfg.restarts):
            # later runs only attack what is not broken yet (a DW-box score of 0 is final)
            rows = all_rows if r == 0 else all_rows[best.score > 0]
            if len(rows) == 0:
                break
            xs, ys = x[rows], y[rows]
            ns = None if noise is None else noise[rows]
            start = random_start(xs, cfg.norm, cfg.eps, generator) if (r > 0 or cfg.random_start) \
                else torch.zeros_like(xs)
            offer = functools.partial(self._offer, best, rows, ys, ns, generator, r)
            out = self.run(xs, ys, start, ns, generator, offer)
            first = out if r == 0 else first
        passes = self.objective.passes
        if not self.scores_candidates:  # the paper's PGD: the last iterate, nothing scored
            return AttackResult(first.x_last, first.loss, first.zero_grad, noise, passes, x_last=first.x_last)
        return AttackResult(best.x, first.loss, first.zero_grad, noise, passes, score=best.score,
                            x_last=first.x_last, best_step=best.step, best_restart=best.restart)

    def _offer(self, best: BestTracker, rows, y, noise, generator, restart: int, x_cand: torch.Tensor,
               probe: Probe, step: int, final: bool = False) -> None:
        """Let one iterate compete for its samples' best candidate."""
        if self.cfg.keep == "last" and not final:
            return
        score = probe.correct
        if self.cfg.score_k and self.objective.randomized:
            score = self.objective(x_cand, y, noise, generator, grad=False, k=self.cfg.score_k).correct
        best.update(rows, x_cand, score, probe.loss, step, restart)

    def final_probe(self, x, y, noise, generator) -> Optional[Probe]:
        """The last iterate has no gradient step of its own: probe it (no grad) only if it is scored."""
        return self.objective(x, y, noise, generator, grad=False) if self.scores_candidates else None

    def run(self, x, y, delta0, noise, generator, offer) -> RunOutput:
        raise NotImplementedError
