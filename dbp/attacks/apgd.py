"""APGD (Croce & Hein, ICML 2020) through the project's attack objective: EoT, fixed DW-box noise, CE or DLR.

AutoAttack's `rand` version for randomized defences is APGD-CE and APGD-DLR with the gradient averaged
over EoT draws at every step; here the draws are the batched B*K rows of `dbp.attacks.base.Objective`, and
DW-box fixes the noise exactly as for PGD. Per sample:
  - step size eta starts at 2*eps (l_inf and l_2); the first step is a plain projected gradient step,
    later ones add momentum: x_{k+1} = P(x_k + a (z_{k+1} - x_k) + (1 - a)(x_k - x_{k-1})), a = 0.75;
  - at the checkpoints w_j (p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) eta is
    halved and the iterate restarts from the highest-loss point so far if the loss rose in fewer than
    rho = 75% of the steps since the last checkpoint, or if neither eta nor the best loss changed since;
    a restart also clears the momentum.
Candidates for the returned point are offered to the driver's best-iterate tracker like PGD's.
"""
from __future__ import annotations

import math

import torch

from .base import Attack, AttackConfig, RunOutput, direction, project

MOMENTUM = 0.75
RHO = 0.75


def checkpoints(n_iter: int) -> list[int]:
    """The iterations w_j = ceil(p_j * n_iter) at which APGD may halve its step (w_0 = 0 excluded)."""
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1:
            break
        p.append(nxt)
    ws = sorted({math.ceil(round(q * n_iter, 9)) for q in p[1:]})
    return [w for w in ws if 0 < w <= n_iter]


class APGD(Attack):
    def run(self, x, y, delta0, noise, generator, offer) -> RunOutput:
        cfg, b = self.cfg, len(x)
        n = cfg.steps
        shape1 = (-1,) + (1,) * (x.dim() - 1)
        eta = torch.full((b,), 2.0 * cfg.eps, device=x.device)
        x_cur = (x + delta0).detach()
        x_prev = x_cur.clone()
        losses = []
        if n == 0:
            probe = self.final_probe(x_cur, y, noise, generator)
            if probe is not None:
                offer(x_cur, probe, 0, final=True)
            return RunOutput(x_cur, x.new_zeros(b, 0), torch.zeros(b, dtype=torch.bool, device=x.device))

        probe = self.objective(x_cur, y, noise, generator)
        zero_grad = probe.grad.flatten(1).abs().amax(1) == 0
        losses.append(probe.loss)
        offer(x_cur, probe, 0)
        f_cur, g = probe.loss, probe.grad
        f_max, x_max, g_max = f_cur.clone(), x_cur.clone(), g.clone()
        # state at the previous checkpoint, for the two step-size conditions
        rises = torch.zeros(b, device=x.device)
        last_w, eta_last, fmax_last = 0, eta.clone(), f_max.clone()
        marks = set(checkpoints(n))

        for k in range(n):
            a = 1.0 if k == 0 else MOMENTUM
            z = x + project(x, x_cur + eta.view(shape1) * direction(g, cfg.norm) - x, cfg.norm, cfg.eps)
            step = a * (z - x_cur) + (1 - a) * (x_cur - x_prev)
            x_prev, x_cur = x_cur, (x + project(x, x_cur + step - x, cfg.norm, cfg.eps)).detach()
            last = k == n - 1
            probe = self.final_probe(x_cur, y, noise, generator) if last else \
                self.objective(x_cur, y, noise, generator)
            if probe is None:  # last iterate, nothing scores it: the loss-based bookkeeping is finished
                break
            if not last:
                losses.append(probe.loss)
            offer(x_cur, probe, k + 1, final=last)
            rises += (probe.loss > f_cur).float()
            f_cur = probe.loss
            if last:
                break
            g = probe.grad
            up = f_cur > f_max
            f_max = torch.where(up, f_cur, f_max)
            x_max[up], g_max[up] = x_cur[up], g[up]

            if k + 1 in marks:
                w = k + 1
                stalled = rises < RHO * (w - last_w)
                unchanged = (eta == eta_last) & (f_max <= fmax_last)
                cut = stalled | unchanged
                eta_last, fmax_last = eta.clone(), f_max.clone()  # before halving: "eta unchanged" next time
                eta = torch.where(cut, eta / 2, eta)
                # restart the flagged samples from their best point, without momentum
                x_cur[cut], x_prev[cut], g[cut] = x_max[cut], x_max[cut], g_max[cut]
                f_cur = torch.where(cut, f_max, f_cur)
                rises.zero_()
                last_w = w
        loss = torch.stack(losses, 1)
        return RunOutput(x_cur.detach(), loss, zero_grad)


def rand_version(norm: str, *, eps: float | None = None, steps: int = 100, eot: int = 20,
                 mode: str = "eot") -> list[AttackConfig]:
    """AutoAttack's `rand` version for randomized defences: APGD-CE then APGD-DLR, EoT per step, one run
    each (AutoAttack's defaults: 100 steps, EoT 20). Report the per-image minimum over both
    (`dbp.robustness.worst_case`)."""
    return [AttackConfig(norm=norm, eps=eps, steps=steps, eot=eot, mode=mode, algorithm="apgd", loss=loss)
            for loss in ("ce", "dlr")]
