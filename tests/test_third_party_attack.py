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


@pytest.mark.parametrize("norm,eps,step", [("linf", 0.1, 0.025), ("l2", 1.5, 0.4)])
def test_pgd_matches_art(setup, norm, eps, step):
    defense, wrapped, est, x, y, noise = setup
    steps = 6
    ours = build_attack(defense, AttackConfig(norm=norm, eps=eps, step=step, steps=steps, mode="dwbox"))(
        x, y, noise=noise)
    with frozen_eval(defense):
        theirs = ProjectedGradientDescentPyTorch(est, norm=np.inf if norm == "linf" else 2, eps=eps, eps_step=step,
                                                 max_iter=steps, num_random_init=0, batch_size=N, verbose=False)
        x_art = torch.from_numpy(theirs.generate(x=x.numpy(), y=y.numpy()))
    acc_last, acc_best, acc_art = (_acc(defense, xa, y, noise) for xa in (ours.x_last, ours.x_adv, x_art))
    clean = _acc(defense, x, y, noise)
    assert acc_art.mean() < clean.mean()  # ART's attack works on this model, so the comparison means something
    lo, hi = mean_interval(acc_art)
    assert lo <= acc_last.mean() <= hi, (acc_last.mean(), acc_art.mean())  # same algorithm, same result
    assert acc_best.mean() <= hi and acc_best.mean() <= acc_last.mean()
    if norm == "linf":  # same iterates: box and ball clamps commute for l_inf, so the images agree
        assert (ours.x_last - x_art).abs().le(1e-4).float().mean() > 0.99


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
