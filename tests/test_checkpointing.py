"""Per-call gradient checkpointing: "auto" picks by memory, and the choice never changes gradients or attacks."""
import copy

import pytest
import torch
from torch import nn

from dbp import grad_checkpointing
from dbp.attacks import PGD, AttackConfig
from dbp.grad_checkpointing import autograd_bytes_per_row, parse_grad_checkpoint, plan_grad_checkpoint
from dbp.models import Defense, Purifier, freeze
from dbp.nets import EpsNet, build_classifier, build_unet


class Counting(nn.Module):
    """The real small UNet, counting its calls (a checkpointed chain calls it twice per step)."""

    def __init__(self, eps_net):
        super().__init__()
        self.eps_net, self.calls = eps_net, 0

    def forward(self, x, t):
        self.calls += 1
        return self.eps_net(x, t)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return freeze(EpsNet(build_unet("small")).eval())


def grads(purifier: Purifier, x, noise):
    x = x.clone().requires_grad_(True)
    out = purifier(x, noise=noise)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return x.grad


def test_same_gradients_and_adversarial_examples_with_and_without_checkpointing(small):
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 7])
    pur = {c: Purifier(Counting(small), 100, "ddim", 100, grad_checkpoint=c) for c in (True, False, "auto")}
    noise = pur[True].sample_noise(x, torch.Generator().manual_seed(2))
    g = {}
    for c, p in pur.items():
        g[c] = grads(p, x, noise)
        # auto: one probe call on one row (once per model), then 2 rows x 11 calls fit: no recompute
        assert p.eps_net.calls == {True: 22, False: 11, "auto": 12}[c], c
    pur["auto"].eps_net.calls = 0
    assert torch.equal(grads(pur["auto"], x, noise), g[False]) and pur["auto"].eps_net.calls == 11  # probe cached
    assert g[True].abs().sum() > 0
    assert torch.equal(g[True], g[False]) and torch.equal(g[False], g["auto"])
    torch.manual_seed(0)
    clf = freeze(build_classifier("small_cnn", "fashion_mnist").eval())
    cfg = AttackConfig(norm="linf", steps=2, mode="dwbox", eot=1)
    res = {c: PGD(Defense(p, clf), cfg)(x, y, noise=noise) for c, p in pur.items()}
    adv = {c: r.x_adv for c, r in res.items()}
    assert torch.equal(adv[True], adv[False]) and torch.equal(adv[False], adv["auto"])
    assert (adv[True] - x).abs().max() > 0
    # channels_last (the gate's default): the same function up to float rounding
    nhwc = Purifier(copy.deepcopy(small), 100, "ddim", 100, channels_last=True)
    torch.testing.assert_close(grads(nhwc, x, noise), g[False], rtol=1e-4, atol=1e-6)
    assert_same_pgd_steps(PGD(Defense(pur[False], clf), cfg), PGD(Defense(nhwc, clf), cfg), x, y, noise,
                          res[False].x_last)


def assert_same_pgd_steps(ref: PGD, alt: PGD, x, y, noise, ref_last):
    """`alt` takes `ref`'s l_inf PGD step, from each iterate of `ref`'s run, wherever the step is decided.

    The two differ by float rounding only, and l_inf PGD steps by sign(grad): a gradient component at
    rounding level may flip its sign with the CPU's kernels and send whole trajectories apart, so comparing
    two end points (once: "< 1% of pixels differ") is a verdict on the machine's last bits. Here both start
    each step from the same iterate and are compared where |grad| > 1e-4 of the image's largest component
    (NHWC and NCHW gradients differ by < 1e-6 of it with AVX-512, AVX2 and scalar kernels, 1 or 2 threads); a
    sign that differs there is a different function.

    Checked by mutation of dbp/models.py (2026-12-06): the channels_last input flipped left-right fails at the
    first step, 1055 decided pixels (with the gradient check above disabled, which fails first)."""
    cfg = ref.cfg
    delta = torch.zeros_like(x)
    for k in range(cfg.steps):
        (_, g_ref), (_, g_alt) = ref.gradient(x + delta, y, noise, None), alt.gradient(x + delta, y, noise, None)
        decided = g_ref.abs() > 1e-4 * g_ref.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
        assert decided.float().mean() > 0.99, f"step {k}: only {decided.float().mean():.2%} of pixels decided"
        step_ref = ref.project(x, delta + cfg.step * ref.direction(g_ref))
        step_alt = alt.project(x, delta + cfg.step * alt.direction(g_alt))
        differ = (step_alt != step_ref) & decided
        assert not differ.any(), f"step {k}: {int(differ.sum())} decided pixels step differently"
        delta = step_ref
    assert torch.equal(x + delta, ref_last)  # the loop above is ref's own run, step for step


def test_auto_follows_the_budget_and_reaches_purify(small):
    x = torch.rand(2, 1, 32, 32)
    need = plan_grad_checkpoint("auto", small, x, 11).need_bytes
    assert need == autograd_bytes_per_row(small, x) * 2 * 11 > 0
    assert plan_grad_checkpoint("auto", small, x, 11, budget_bytes=need).use is False
    assert plan_grad_checkpoint("auto", small, x, 11, budget_bytes=need - 1).use is True
    assert plan_grad_checkpoint(False, small, x, 11, budget_bytes=0).use is False  # explicit wins
    assert plan_grad_checkpoint(True, small, x, 11, budget_bytes=10 ** 15).use is True
    for budget_mb, calls in ((need / 2 ** 20 / 2, 1 + 22), (need / 2 ** 20 * 2, 1 + 11)):  # 1: the probe
        p = Purifier(Counting(small), 100, "ddim", 100, grad_checkpoint="auto", checkpoint_budget_mb=budget_mb)
        grads(p, x, p.sample_noise(x, torch.Generator().manual_seed(0)))
        assert p.eps_net.calls == calls, budget_mb
    with torch.no_grad():  # no graph, no probe, no recompute
        p = Purifier(Counting(small), 100, "ddim", 100, grad_checkpoint="auto", checkpoint_budget_mb=0)
        p(x, generator=torch.Generator().manual_seed(0))
        assert p.eps_net.calls == 11


def test_auto_picks_off_for_the_small_model_and_on_for_the_cifar10_unet(small, monkeypatch):
    """On a machine with 8 GiB available. The budget is a quarter of what is available right now, so with
    the real figure the verdict on the small model (~1.1 GiB) would flip below 4.5 GiB available: a small CI
    machine, or a busy one.

    Checked by mutation of dbp/grad_checkpointing.py (2026-12-06): `use = need < budget` fails, and so does a
    budget of the whole available memory instead of BUDGET_FRACTION of it."""
    assert grad_checkpointing.free_memory_bytes(torch.device("cpu")) > 0
    monkeypatch.setattr(grad_checkpointing, "free_memory_bytes", lambda device: 8 * 2 ** 30)
    # the gate's Fashion-MNIST setting: 16 rows x 11 DDIM calls of the 1.1M UNet, a few hundred MB to ~1 GB
    gate = Purifier(small, 100, "ddim", 100).checkpoint_plan(torch.rand(16, 1, 32, 32))
    assert not gate.use and gate.need_bytes < 2 * 2 ** 30 and gate.budget_bytes == 2 * 2 ** 30
    # the paper's setting: the 35.7M CIFAR-10 UNet, batch 32 x 101 DDPM calls: ~100+ GB of activations
    big = freeze(EpsNet(build_unet("ddpm-cifar10")).eval())
    plan = Purifier(big, 100, "ddpm", 1000).checkpoint_plan(torch.rand(32, 3, 32, 32))
    assert plan.use and plan.need_bytes > 50 * 2 ** 30, plan.reason
    assert "auto" in plan.reason and "MiB" in plan.reason


def test_the_probe_leaves_the_random_stream_alone():
    class Dropping(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.drop = nn.Conv2d(1, 1, 3, padding=1), nn.Dropout(0.5)

        def forward(self, x, t):
            return self.drop(self.conv(x))

    m, x = Dropping().train(), torch.rand(4, 1, 8, 8)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    n = autograd_bytes_per_row(m, x)
    assert n > 0 and torch.equal(torch.get_rng_state(), state)


def test_bad_settings_are_refused():
    assert parse_grad_checkpoint("AUTO") == "auto" and parse_grad_checkpoint("off") is False
    assert parse_grad_checkpoint("true") is True and parse_grad_checkpoint(False) is False
    with pytest.raises(ValueError, match="grad_checkpoint must be true, false or 'auto'"):
        parse_grad_checkpoint("sometimes")
    with pytest.raises(ValueError, match="grad_checkpoint"):
        Purifier(nn.Identity(), 100, "ddim", 100, grad_checkpoint="maybe")
