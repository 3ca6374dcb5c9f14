"""Sanity checks (dbp.sanity_checks) fire on masked or noisy gradients and stay quiet on honest models;
the per-image helpers of dbp.robustness (fresh-noise evaluation, worst case over attacks)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dbp.attacks import AttackConfig, build_attack
from dbp.bpda import SurrogateGradient
from dbp.diffusion import PurifyNoise
from dbp.models import Defense, Purifier
from dbp.robustness import fresh_noise_correct, single_shot, worst_case
from dbp.sanity_checks import (IdentityPurifier, attack_ineffective, eot_gradient_consistency, large_budget_check,
                               transfer_check)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class Quantize(IdentityPurifier):
    """A shattered-gradient 'purifier': 5 grey levels; its input gradient is exactly zero."""

    def forward(self, x01, noise=None, generator=None):
        return (x01 * 4).round() / 4


class GaussianBlur(nn.Module):
    """A randomized 'purifier' whose gradient is dominated by its noise: x + sigma * n."""

    def __init__(self, sigma):
        super().__init__()
        self.sigma = sigma

    def sample_noise(self, x01, generator=None):
        return PurifyNoise(torch.randn(x01.shape, generator=generator))

    def forward(self, x01, noise=None, generator=None):
        noise = noise if noise is not None else self.sample_noise(x01, generator)
        return (x01 + self.sigma * noise.forward).clamp(0, 1)


@pytest.fixture(scope="module")
def data(fashion_test):
    return fashion_test.float01(slice(0, 32)), fashion_test.labels[:32]


@pytest.fixture(scope="module")
def ddpm(tiny_models):
    eps_net, classifier = tiny_models
    return Defense(Purifier(eps_net, t_star=100, sampler="ddpm", num_inference_steps=10), classifier)


def test_large_budget_collapses_honest_models_and_flags_masking(tiny_models, ddpm, data):
    _, classifier = tiny_models
    x, y = data
    for model in (classifier, Defense(IdentityPurifier(), classifier)):
        flag = large_budget_check(model, x, y, steps=10)
        assert not flag.raised and flag.value["acc"] <= 0.05, flag.value
    # the tiny DDPM defence, DW-box: l_inf 0.3 drives it to (near) 0 too
    flag = large_budget_check(ddpm, x[:6], y[:6], steps=8, generator=gen(1))
    assert not flag.raised and flag.value["acc"] <= 0.2, flag.value
    assert len(flag.to_dict()["per_image"]["correct"]) == 6
    # zero gradients: PGD cannot move, accuracy stays up, the flag fires
    masked = large_budget_check(Defense(Quantize(), classifier), x, y, steps=10)
    assert masked.raised and masked.value["acc"] > 0.5, masked.value
    assert "robustness-flags.md" in masked.detail


def test_eot_gradient_consistency(tiny_models, ddpm, data):
    _, classifier = tiny_models
    x, y = data
    ident = eot_gradient_consistency(Defense(IdentityPurifier(), classifier), x, y, k=2, generator=gen(0))
    assert not ident.raised and ident.value["mean_cos"] == pytest.approx(1.0, abs=1e-5)
    noisy = Defense(GaussianBlur(1.0), classifier)
    one = eot_gradient_consistency(noisy, x, y, k=1, generator=gen(0))
    many = eot_gradient_consistency(noisy, x, y, k=8, generator=gen(0))
    assert one.raised and one.value["mean_cos"] < 0.2  # one draw: the gradient is mostly noise
    assert many.value["mean_cos"] > one.value["mean_cos"]  # averaging helps, as EoT should
    real = eot_gradient_consistency(ddpm, x[:4], y[:4], k=2, generator=gen(0))
    assert 0 < real.value["mean_cos"] < 1 and real.value["randomized"]


def test_transfer_check_flags_a_defence_that_only_resists_its_own_gradient(tiny_models, data):
    _, classifier = tiny_models
    x, y = data
    cfg = AttackConfig(norm="linf", eps=0.1, step=0.025, steps=10, mode="dwbox")
    masked = Defense(Quantize(), classifier)
    white = single_shot(masked, build_attack(masked, cfg)(x, y).x_adv, y)
    flag = transfer_check(masked, classifier, x, y, white, cfg, source_name="bare classifier")
    assert flag.raised and flag.value["broken_only_by_transfer"] > 0, flag.value
    # the identity 'purifier' is the bare classifier: transfer and white-box are the same attack
    ident = Defense(IdentityPurifier(), classifier)
    white = single_shot(ident, build_attack(ident, cfg)(x, y).x_adv, y)
    flag = transfer_check(ident, classifier, x, y, white, cfg)
    assert not flag.raised and flag.value["transfer"] == flag.value["white_box"]


def test_bpda_surrogate_gives_real_output_and_surrogate_gradient(tiny_models, ddpm, data):
    eps_net, classifier = tiny_models
    x, y = data[0][:4], data[1][:4]
    ddim = Purifier(eps_net, t_star=100, sampler="ddim", num_inference_steps=10)
    bpda = SurrogateGradient(ddpm.purifier, ddim)
    noise = ddpm.purifier.sample_noise(x, gen(2))
    xi = x.clone().requires_grad_(True)
    out = bpda(xi, noise=noise)
    (g,) = torch.autograd.grad(out.sum(), xi)
    xj = x.clone().requires_grad_(True)
    (g_ddim,) = torch.autograd.grad(ddim(xj, noise=noise).sum(), xj)
    with torch.no_grad():
        assert torch.equal(out, ddpm.purifier(x, noise=noise))
    assert torch.allclose(g, g_ddim)
    ident = SurrogateGradient(ddpm.purifier)  # classic BPDA: identity backward
    xk = x.clone().requires_grad_(True)
    (g_id,) = torch.autograd.grad(ident(xk, noise=noise).sum(), xk)
    assert torch.equal(g_id, torch.ones_like(x))
    # used as a transfer source against the real DDPM chain, DW-box with the defender's noise
    cfg = AttackConfig(norm="linf", eps=0.1, step=0.05, steps=2, mode="dwbox")
    white = single_shot(ddpm, build_attack(ddpm, cfg)(x, y, noise=noise).x_adv, y, noise=noise)
    flag = transfer_check(ddpm, Defense(bpda, classifier), x, y, white, cfg, noise=noise, source_name="ddim-bpda")
    assert flag.value["source"] == "ddim-bpda" and len(flag.outcomes["correct"]) == 4


def test_attack_ineffective(tiny_models, data):
    _, classifier = tiny_models
    x, y = data
    clean = single_shot(classifier, x, y)
    null = build_attack(classifier, AttackConfig(eps=0.0, steps=3))(x, y)  # eps 0: nothing can change
    flag = attack_ineffective(clean, single_shot(classifier, null.x_adv, y), null.loss)
    assert flag.raised and flag.value["robust_within_clean_interval"] and flag.value["loss_flat"]
    res = build_attack(classifier, AttackConfig(eps=0.1, step=0.025, steps=10))(x, y)
    flag = attack_ineffective(clean, single_shot(classifier, res.x_adv, y), res.loss)
    assert not flag.raised, flag.value


def test_fresh_noise_and_worst_case(ddpm, data):
    x, y = data[0][:4], data[1][:4]
    cfg = AttackConfig(norm="linf", eps=0.1, step=0.05, steps=2, mode="dwbox")
    res = build_attack(ddpm, cfg)(x, y, generator=gen(3))
    fixed = single_shot(ddpm, res.x_adv, y, noise=res.noise)
    fresh = fresh_noise_correct(ddpm, res.x_adv, y, generator=gen(4))
    expected = fresh_noise_correct(ddpm, res.x_adv, y, k=3, generator=gen(4))
    assert fresh.dtype == torch.bool and fresh.shape == (4,)
    assert expected.shape == (4,) and set((expected * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    wc = worst_case({"dwbox": fixed, "dwbox@fresh": fresh, "dwbox@expected": expected})
    assert torch.equal(wc.correct, torch.stack([fixed.float(), fresh.float(), expected]).min(0).values)
    d = wc.to_dict()
    assert len(d["per_image"]) == 4 and set(d["per_image_attack"]) <= {"dwbox", "dwbox@fresh", "dwbox@expected"}
    hand = worst_case({"a": torch.tensor([1.0, 0.5, 1.0]), "b": torch.tensor([True, False, True])})
    assert hand.correct.tolist() == [1.0, 0.0, 1.0] and hand.by == ["a", "b", "a"]
    with pytest.raises(ValueError, match="different numbers"):
        worst_case({"a": torch.ones(3), "b": torch.ones(2)})
    with pytest.raises(ValueError, match="at least one"):
        worst_case({})
