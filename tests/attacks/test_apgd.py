"""APGD (Croce & Hein 2020) through the project's EoT / DW-box objective, on the tiny real models."""
from __future__ import annotations

import pytest
import torch

from dbp.attacks.apgd import APGD, checkpoints, rand_version
from dbp.attacks import PGD, AttackConfig, build_attack
from dbp.models import Defense, Purifier
from dbp.robustness import mean_interval, single_shot


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def defense(tiny_models):
    eps_net, classifier = tiny_models
    return Defense(Purifier(eps_net, t_star=100, sampler="ddpm", num_inference_steps=10), classifier)


def test_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 -> ceil(p * 100)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]
    assert isinstance(build_attack(torch.nn.Identity(), AttackConfig(algorithm="apgd")), APGD)
    with pytest.raises(ValueError, match="algorithm"):
        AttackConfig(algorithm="fab")


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_apgd_stays_in_ball_and_box_and_beats_its_start(tiny_models, fashion_test, norm, eps):
    _, classifier = tiny_models
    x, y = fashion_test.float01(slice(0, 32)), fashion_test.labels[:32]
    for loss in ("ce", "dlr"):
        res = APGD(classifier, AttackConfig(norm=norm, eps=eps, steps=10, loss=loss))(x, y)
        for xa in (res.x_adv, res.x_last):
            d = (xa - x).flatten(1)
            size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
            assert (size <= eps + 1e-5).all() and xa.min() >= 0 and xa.max() <= 1
        assert res.loss.shape == (32, 10)
        assert res.loss.max(1).values.mean() > res.loss[:, 0].mean()  # the loss rose
        with torch.no_grad():
            assert torch.equal((classifier(res.x_adv).argmax(1) == y).float(), res.score)
            clean = (classifier(x).argmax(1) == y).float().mean()
        assert res.score.mean() < clean


def test_apgd_no_weaker_than_pgd_at_the_same_budget(defense, fashion_test):
    """DW-box, same images, same fixed noise, same budget and steps: APGD's robust accuracy is within
    PGD's 95% interval or below it (issue 9)."""
    n = 8
    x, y = fashion_test.float01(slice(0, n)), fashion_test.labels[:n]
    noise = defense.purifier.sample_noise(x, gen(0))
    cfg = dict(norm="linf", eps=0.1, step=0.025, steps=6, mode="dwbox")
    pgd = PGD(defense, AttackConfig(**cfg))(x, y, noise=noise)
    apgd = APGD(defense, AttackConfig(**cfg))(x, y, noise=noise)
    with torch.no_grad():
        clean = single_shot(defense, x, y, noise=noise).float()
        acc_pgd = single_shot(defense, pgd.x_adv, y, noise=noise).float()
        acc_apgd = single_shot(defense, apgd.x_adv, y, noise=noise).float()
    assert acc_apgd.mean() <= mean_interval(acc_pgd)[1], (acc_apgd.mean(), acc_pgd.mean())
    assert acc_apgd.mean() < clean.mean()  # and the attack does something on this defence


def test_apgd_eot_is_reproducible_and_uses_the_batched_draws(defense, fashion_test):
    x, y = fashion_test.float01(slice(0, 3)), fashion_test.labels[:3]
    cfg = AttackConfig(norm="l2", steps=3, eot=2, algorithm="apgd", loss="dlr")
    a = build_attack(defense, cfg)(x, y, generator=gen(1))
    b = build_attack(defense, cfg)(x, y, generator=gen(1))
    c = build_attack(defense, cfg)(x, y, generator=gen(2))
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.score, b.score)
    assert not torch.equal(a.x_last, c.x_last)  # the noise matters: the check can fail
    assert a.forward_passes == 4 * 2 and a.noise is None
    assert set(a.score.tolist()) <= {0.0, 0.5, 1.0}  # fractions of the K = 2 draws


def test_dwbox_restarts_keep_each_image_with_its_own_noise(defense, fashion_test):
    """Later runs attack a subset of the images: each must keep its own rows of the fixed noise, so the
    attack's scores agree with an evaluation of the whole batch under the full noise."""
    x, y = fashion_test.float01(slice(0, 6)), fashion_test.labels[:6]
    noise = defense.purifier.sample_noise(x, gen(3))
    res = APGD(defense, AttackConfig(norm="linf", eps=4 / 255, steps=2, mode="dwbox", restarts=2))(
        x, y, noise=noise, generator=gen(4))
    with torch.no_grad():
        assert torch.equal(single_shot(defense, res.x_adv, y, noise=noise).float(), res.score)
    assert res.score.sum() > 0  # some images survive the first run, so the second run had work to do
    assert (res.x_adv - x).abs().max() <= 4 / 255 + 1e-6


def test_rand_version_is_apgd_ce_and_dlr_with_eot():
    cfgs = rand_version("l2")
    assert [(c.algorithm, c.loss, c.eot, c.steps, c.mode, c.eps) for c in cfgs] == [
        ("apgd", "ce", 20, 100, "eot", 0.5), ("apgd", "dlr", 20, 100, "eot", 0.5)]
    assert [c.attack_name for c in cfgs] == ["apgd-ce", "apgd-dlr"]
