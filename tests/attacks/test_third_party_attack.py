"""Independent cross-check: the project's PGD/APGD against the Adversarial Robustness Toolbox (ART, a
maintained third-party implementation; a test dependency only) on the same tiny defended model with the
same FIXED purifier noise, i.e. the DW-box defence as a deterministic nn.Module."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dbp.attacks import AttackConfig, build_attack, frozen_eval
from dbp.models import Defense, Purifier
from dbp.robustness import mean_interval, single_shot

pytest.importorskip("art")  # a test dependency (requirements.lock), not a runtime one
from art.attacks.evasion import AutoProjectedGradientDescent, ProjectedGradientDescentPyTorch  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402

N = 8


class FixedNoiseDefense(nn.Module):
    """classifier(purify(x; fixed noise)): deterministic, so any library can attack it.

    Every row gets the SAME noise draw, so the function does not depend on how a library batches or
    subsets the images (ART's APGD attacks only the samples still classified correctly)."""

    def __init__(self, defense, one_draw):
        super().__init__()
        self.defense, self.one_draw = defense, one_draw

    def noise_for(self, n):
        return self.one_draw[[0] * n]

    def forward(self, x):
        return self.defense(x, noise=self.noise_for(len(x)))


@pytest.fixture(scope="module")
def setup(tiny_models, fashion_test):
    eps_net, classifier = tiny_models
    defense = Defense(Purifier(eps_net, t_star=100, sampler="ddpm", num_inference_steps=10), classifier)
    x, y = fashion_test.float01(slice(0, N)), fashion_test.labels[:N]
    wrapped = FixedNoiseDefense(defense, defense.purifier.sample_noise(x[:1], torch.Generator().manual_seed(0)))
    noise = wrapped.noise_for(N)
    est = PyTorchClassifier(wrapped, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=10,
                            clip_values=(0.0, 1.0), device_type="cpu")
    return defense, wrapped, est, x, y, noise


def _acc(defense, x_adv, y, noise):
    return single_shot(defense, x_adv, y, noise=noise).float()


def _ours_after(defense, norm, eps, step, steps, x, y, noise):
    """Our PGD's iterate after `steps` steps (the last iterate, nothing scored)."""
    cfg = AttackConfig(norm=norm, eps=eps, step=step, steps=steps, mode="dwbox", keep="last")
    return build_attack(defense, cfg)(x, y, noise=noise).x_last


def _art_one_step(theirs, est, x_k, x, y, eps, step):
    """ART's own PGD iteration (gradient, step, box clip, projection around x) from the point x_k.

    `_compute_pytorch` is ART's per-iteration unit (the loop body of its `_generate_batch`); ART is pinned in
    requirements.lock, so calling it is stable."""
    targets = torch.nn.functional.one_hot(y, 10).float()
    with torch.enable_grad():
        return theirs._compute_pytorch(x_k.clone(), x, targets, None, eps, step, False,
                                       torch.zeros_like(x)).detach()


@pytest.mark.parametrize("norm,eps,step", [("linf", 0.1, 0.025), ("l2", 1.5, 0.4)])
def test_pgd_matches_art(setup, norm, eps, step):
    """Step by step, from the same iterate, our PGD step equals ART's wherever the step is decided.

    A whole-trajectory comparison is machine-dependent: the tiny models are trained per machine, and a
    gradient component near zero flips its sign with the last bits of the weights, which sends the two
    trajectories apart (CI once failed on 99.0% vs a 99% threshold). So each step starts both libraries from
    OUR previous iterate and compares where the gradient's sign is not in doubt (both libraries' gradients
    agree in sign and are not tiny); a sign flip there can only come from a different algorithm.
    l_inf: every step (box and ball clamps commute). l_2: the steps where the ball does not bind (ART clips to
    the box before projecting onto the ball, we after, which differ where both bind); the end result is
    compared for both norms by accuracy.

    Checked by mutation of dbp/attacks/ (2026-12-06): a step of 1.1 * step fails the first step; the l_inf
    ball clamped at 2 * eps fails step 5 (the first iterate that reaches eps); removing the box clamp in
    `project` fails the first step (Fashion-MNIST's black background sits at 0).
    """
    defense, wrapped, est, x, y, noise = setup
    steps = 6
    with frozen_eval(defense):
        theirs = ProjectedGradientDescentPyTorch(est, norm=np.inf if norm == "linf" else 2, eps=eps, eps_step=step,
                                                 max_iter=1, num_random_init=0, batch_size=N, verbose=False)
        compared = 0
        x_k = x.clone()
        for k in range(1, steps + 1):
            ours_next = _ours_after(defense, norm, eps, step, k, x, y, noise)
            art_next = _art_one_step(theirs, est, x_k, x, y, eps, step)
            g_art = torch.from_numpy(est.loss_gradient(x_k.numpy(), torch.nn.functional.one_hot(y, 10).float().numpy()))
            x_in = x_k.clone().requires_grad_(True)
            g_ours = torch.autograd.grad(torch.nn.functional.cross_entropy(wrapped(x_in), y, reduction="sum"),
                                         x_in)[0]
            scale = g_ours.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
            decided = (g_ours.sign() == g_art.sign()) & (g_ours.abs() > 1e-4 * scale)
            if norm == "l2":
                # the step is the whole normalised gradient, continuous in every component: no sign to doubt
                decided = torch.ones_like(decided)
                unit = g_ours / g_ours.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                if bool(((x_k - x + step * unit).flatten(1).norm(dim=1) > eps).any()):
                    break  # the ball binds from here on
            assert decided.float().mean() > 0.9, f"step {k}: only {decided.float().mean():.1%} of pixels decided"
            diff = (ours_next - art_next).abs()[decided]
            assert diff.max() <= 1e-5, (f"step {k}: {int((diff > 1e-5).sum())} decided pixels differ from ART's "
                                        f"step (max {float(diff.max()):.3g})")
            compared += 1
            x_k = ours_next
        assert compared >= (steps if norm == "linf" else 2)
        full = ProjectedGradientDescentPyTorch(est, norm=np.inf if norm == "linf" else 2, eps=eps, eps_step=step,
                                               max_iter=steps, num_random_init=0, batch_size=N, verbose=False)
        x_art = torch.from_numpy(full.generate(x=x.numpy(), y=y.numpy()))
    ours = build_attack(defense, AttackConfig(norm=norm, eps=eps, step=step, steps=steps, mode="dwbox"))(
        x, y, noise=noise)
    acc_last, acc_best, acc_art = (_acc(defense, xa, y, noise) for xa in (ours.x_last, ours.x_adv, x_art))
    clean = _acc(defense, x, y, noise)
    assert acc_art.mean() < clean.mean()  # ART's attack works on this model, so the comparison means something
    lo, hi = mean_interval(acc_art)
    assert lo <= acc_last.mean() <= hi, (acc_last.mean(), acc_art.mean())  # same algorithm, same result
    assert acc_best.mean() <= hi and acc_best.mean() <= acc_last.mean()


def test_apgd_matches_art(setup):
    defense, wrapped, est, x, y, noise = setup
    eps, steps = 0.1, 8
    ours = build_attack(defense, AttackConfig(norm="linf", eps=eps, steps=steps, mode="dwbox", algorithm="apgd"))(
        x, y, noise=noise)
    with frozen_eval(defense):
        theirs = AutoProjectedGradientDescent(est, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=steps,
                                              nb_random_init=1, batch_size=N, loss_type="cross_entropy",
                                              verbose=False)
        x_art = torch.from_numpy(theirs.generate(x=x.numpy(), y=y.numpy()))
    assert (x_art - x).abs().max() <= eps + 1e-5
    acc_ours, acc_art = _acc(defense, ours.x_adv, y, noise), _acc(defense, x_art, y, noise)
    lo, hi = mean_interval(acc_art)
    assert acc_ours.mean() <= hi, (acc_ours.mean(), acc_art.mean())
    lo, hi = mean_interval(acc_ours)
    assert acc_art.mean() >= lo, (acc_ours.mean(), acc_art.mean())
