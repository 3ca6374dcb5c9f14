"""PGD / EoT / DW-box on the tiny real models: projections, determinism, and the gradient bookkeeping."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dbp.attacks import PGD, AttackConfig, frozen_eval
from dbp.models import Defense, Purifier

N_IMG = 3


@pytest.fixture(scope="module")
def batch(fashion_test):
    # images 0..2 have many exact-0 background pixels, so the [0, 1] box constraint is active
    return fashion_test.float01(slice(0, N_IMG)), fashion_test.labels[:N_IMG]


@pytest.fixture(scope="module")
def defense(tiny_models):
    """DDPM from t*=100 with N=10: 2 UNet calls, random forward AND reverse noise, seconds per attack."""
    eps_net, classifier = tiny_models
    return Defense(Purifier(eps_net, t_star=100, sampler="ddpm", num_inference_steps=10), classifier)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_config_defaults_follow_the_paper():
    linf, l2 = AttackConfig(norm="linf"), AttackConfig(norm="l2")
    assert (linf.eps, linf.step, linf.steps, linf.eot) == (8 / 255, 2 / 255, 20, 10)
    assert (l2.eps, l2.step) == (0.5, 0.1)
    with pytest.raises(ValueError, match="norm"):
        AttackConfig(norm="l1")
    with pytest.raises(ValueError, match="mode"):
        AttackConfig(mode="bpda")


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_keeps_norm_ball_and_pixel_box(defense, batch, norm):
    x, y = batch
    # step == eps pushes every iterate onto the boundary, so the projection is exercised, not idle
    eps = 8 / 255 if norm == "linf" else 0.5
    res = PGD(defense, AttackConfig(norm=norm, eps=eps, step=eps, steps=3, mode="dwbox"))(x, y, generator=gen())
    delta = (res.x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all(), size
    assert size.min() > 0.5 * eps  # the attack moved
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert res.loss.shape == (N_IMG, 3) and res.forward_passes == 3


def test_dwbox_is_deterministic(defense, batch):
    x, y = batch
    cfg = AttackConfig(norm="linf", steps=2, mode="dwbox")
    a = PGD(defense, cfg)(x, y, generator=gen(1))
    b = PGD(defense, cfg)(x, y, generator=gen(1))
    assert torch.equal(a.noise.forward, b.noise.forward) and torch.equal(a.noise.reverse, b.noise.reverse)
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.loss, b.loss)
    with torch.no_grad():  # the fixed noise makes the purifier itself a deterministic function
        assert torch.equal(defense(a.x_adv, noise=a.noise), defense(a.x_adv, noise=a.noise))
    c = PGD(defense, cfg)(x, y, generator=gen(2))  # other noise, other attack: the check can fail
    assert not torch.equal(a.x_adv, c.x_adv)


def test_eot_k1_equals_plain_pgd_reference_loop(defense, batch):
    x, y = batch
    steps, eps, step = 3, 8 / 255, 2 / 255
    res = PGD(defense, AttackConfig(norm="linf", steps=steps, eot=1, mode="eot"))(x, y, generator=gen(3))

    g = gen(3)  # the straightforward way: purify with fresh noise each step, CE, sign step, clip
    delta = torch.zeros_like(x)
    for _ in range(steps):
        xi = (x + delta).requires_grad_(True)
        loss = F.cross_entropy(defense(xi, generator=g), y)
        (grad,) = torch.autograd.grad(loss, xi)
        delta = (delta + step * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    assert torch.allclose(res.x_adv, x + delta, atol=1e-6)
    assert not torch.equal(res.x_adv, x)


def test_batched_eot_gradient_is_sum_of_per_sample_loop(defense, batch):
    x, y = batch
    k = 3
    atk = PGD(defense, AttackConfig(norm="linf", steps=1, eot=k, mode="eot"))
    with frozen_eval(defense):
        loss, g_batched = atk.gradient(x, y, None, gen(4))
        looped = PGD(defense, AttackConfig(norm="linf", steps=1, eot=k, mode="eot", eot_batched=False))
        loss_loop, g_loop = looped.gradient(x, y, None, gen(4))

    # reference: one sample and one draw at a time, with the rows of the same B*K noise draw
    noise = defense.purifier.sample_noise(x.repeat_interleave(k, 0), gen(4))
    ref, per_draw = torch.zeros_like(x), []
    for b in range(len(x)):
        for j in range(k):
            r = b * k + j
            nb = type(noise)(noise.forward[r:r + 1], noise.reverse[:, r:r + 1])
            xi = x[b:b + 1].clone().requires_grad_(True)
            ce = F.cross_entropy(defense(xi, noise=nb), y[b:b + 1])
            per_draw.append(torch.autograd.grad(ce, xi)[0][0])
            ref[b] += per_draw[-1]
    scale = ref.abs().max()
    assert scale > 0
    assert torch.allclose(g_batched, ref, atol=1e-4 * scale), (g_batched - ref).abs().max() / scale
    assert torch.allclose(g_loop, ref, atol=1e-4 * scale)
    assert torch.allclose(loss, loss_loop, atol=1e-5)
    # the K draws really differ, so a mix-up of rows or draws would show
    assert not torch.allclose(per_draw[0], per_draw[1], atol=1e-4 * scale)


def test_attack_leaves_model_untouched(defense, batch):
    x, y = batch
    defense.train()
    before = [p.requires_grad for p in defense.parameters()]
    PGD(defense, AttackConfig(steps=1, eot=2))(x, y, generator=gen())
    assert [p.requires_grad for p in defense.parameters()] == before
    assert defense.training and all(p.grad is None for p in defense.parameters())
    defense.eval()


def test_bare_classifier_collapses_at_paper_eps(tiny_models, fashion_test):
    _, classifier = tiny_models
    x, y = fashion_test.float01(slice(0, 64)), fashion_test.labels[:64]
    res = PGD(classifier, AttackConfig(norm="linf", steps=20))(x, y)
    with torch.no_grad():
        clean = (classifier(x).argmax(1) == y).float().mean().item()
        robust = (classifier(res.x_adv).argmax(1) == y).float().mean().item()
    assert robust <= clean - 0.15, (clean, robust)
    assert res.loss[:, -1].mean() > res.loss[:, 0].mean()  # PGD ascends the loss


def test_zero_gradients_are_reported(batch):
    x, y = batch

    class Saturated(nn.Module):  # logits that do not depend on the input: the gradient is exactly zero
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return self.w * torch.zeros(len(x), 10) + 0 * x.flatten(1).sum(1, keepdim=True)

    res = PGD(Saturated(), AttackConfig(steps=1))(x, y)
    assert res.zero_grad.all()
