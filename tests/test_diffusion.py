"""dbp.diffusion against diffusers' schedulers, method.md's timestep table, and the purifier's noise contract."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from dbp.diffusion import Diffusion, PurifyNoise, to_image_range, to_model_range
from dbp.nets import EpsNet, build_unet

SHAPE = (2, 1, 32, 32)
# method.md §2.1: N -> (stride, model calls) from t* = 100
TABLE = {1000: (1, 101), 500: (2, 51), 200: (5, 21), 100: (10, 11), 50: (20, 6)}


@pytest.fixture(scope="module")
def diff():
    return Diffusion()


class TinyEps(nn.Module):
    """A small real network with a timestep dependence; records the timesteps it is called at."""

    def __init__(self, channels: int = 1, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Conv2d(channels, 8, 3, padding=1)
        self.b = nn.Conv2d(8, channels, 3, padding=1)
        self.calls: list[int] = []

    def forward(self, x, t):
        self.calls.append(int(t[0]))
        scale = 1 + t.float().view(-1, 1, 1, 1) / 1000
        return self.b(torch.tanh(self.a(x))) * scale


def rand01(shape=SHAPE, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def ddpm_scheduler(n: int) -> DDPMScheduler:
    s = DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large", clip_sample=True)
    s.set_timesteps(n)
    return s


def ddim_scheduler(n: int) -> DDIMScheduler:
    s = DDIMScheduler(num_train_timesteps=1000)  # defaults: clip_sample, set_alpha_to_one, leading spacing
    s.set_timesteps(n)
    return s


# ---- schedule ------------------------------------------------------------------------------------

def test_schedule_matches_diffusers_and_method_md(diff):
    ref = DDPMScheduler(num_train_timesteps=1000)
    assert torch.equal(diff.betas, ref.betas) and torch.equal(diff.alphas_cumprod, ref.alphas_cumprod)
    a = float(diff.alphas_cumprod[100])
    assert abs(a - 0.89514) < 5e-5
    assert (round(a ** 0.5, 4), round((1 - a) ** 0.5, 4)) == (0.9461, 0.3238)
    assert float(diff.abar(-1)) == 1.0 and float(diff.abar(torch.tensor(0))) == pytest.approx(1 - 1e-4)
    assert torch.equal(diff.abar(torch.tensor([5, -3])), torch.stack([diff.alphas_cumprod[5], torch.tensor(1.0)]))
    assert "alphas_cumprod" not in diff.state_dict()  # derived, not weights


def test_q_sample_and_predict_x0(diff):
    x0 = to_model_range(rand01())
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 731])
    ref = DDPMScheduler(num_train_timesteps=1000).add_noise(x0, noise, t)
    xt = diff.q_sample(x0, t, noise)
    torch.testing.assert_close(xt, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(diff.predict_x0(xt, t, noise), x0, atol=1e-5, rtol=0)


def test_image_range_helpers():
    x = rand01()
    torch.testing.assert_close(to_image_range(to_model_range(x)), x, atol=1e-7, rtol=0)
    assert to_image_range(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]


# ---- one step against diffusers ------------------------------------------------------------------

def step_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    # a wide x_t so the x0 estimate leaves [-1, 1] and clipping matters
    return torch.randn(SHAPE, generator=g) * 1.5, torch.randn(SHAPE, generator=g)


def probe_timesteps(sched) -> list[int]:
    ts = [int(t) for t in sched.timesteps]
    picks = {ts[0], ts[1], ts[len(ts) // 2], ts[-2], ts[-1]} | ({100} if 100 in ts else set())
    return sorted(picks, reverse=True)


@pytest.mark.parametrize("n", [1000, 100, 50])
def test_ddpm_step_equals_diffusers(diff, n):
    sched, stride = ddpm_scheduler(n), 1000 // n
    clipped = 0
    for t in probe_timesteps(sched):
        x, eps = step_inputs(t)
        ref = sched.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))  # the draw diffusers made
        ours = diff.ddpm_step(eps, t, t - stride, x, z if t > 0 else None)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        if t > 0:  # the noise term is really there
            assert not torch.allclose(diff.ddpm_step(eps, t, t - stride, x, torch.zeros_like(z)), ref, atol=1e-5)
        clipped += int(diff.predict_x0(x, torch.tensor(t), eps).abs().max() > 1)
    assert 0 in probe_timesteps(sched) and clipped > 0


@pytest.mark.parametrize("n", [1000, 100, 50])
def test_ddim_step_equals_diffusers(diff, n):
    sched, stride = ddim_scheduler(n), 1000 // n
    for t in probe_timesteps(sched):
        x, eps = step_inputs(t + 7)
        ref = sched.step(eps, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(diff.ddim_step(eps, t, t - stride, x), ref, atol=1e-5, rtol=0)
    # the last step (t = 0 -> alpha-bar 1) returns the clipped x0 estimate
    x, eps = step_inputs(0)
    torch.testing.assert_close(diff.ddim_step(eps, 0, -stride, x), diff.predict_x0(x, torch.tensor(0), eps).clamp(-1, 1))


def test_ddpm_step_without_noise_at_t_positive_is_an_error(diff):
    x, eps = step_inputs(0)
    with pytest.raises(ValueError, match="noise"):
        diff.ddpm_step(eps, 5, 4, x, None)


# ---- visited timesteps ---------------------------------------------------------------------------

@pytest.mark.parametrize("n", sorted(TABLE))
def test_visited_timesteps_match_method_md(diff, n):
    stride, calls = TABLE[n]
    steps = diff.reverse_timesteps(100, n)
    assert steps == list(range(100, -1, -stride)) and len(steps) == calls and steps[0] == 100 and steps[-1] == 0
    # the same steps diffusers' "leading" schedule visits below t* (both schedulers)
    for sched in (ddim_scheduler(n), ddpm_scheduler(n)):
        assert [int(t) for t in sched.timesteps if t <= 100] == steps
    # and the timesteps the UNet is really called at
    for sampler in ("ddim", "ddpm"):
        model = TinyEps()
        with torch.no_grad():
            diff.purify(model, rand01((1, 1, 32, 32)), sampler=sampler, num_inference_steps=n,
                        generator=torch.Generator().manual_seed(0))
        assert model.calls == steps
    assert diff.num_reverse_noises("ddpm", 100, n) == calls - 1 and diff.num_reverse_noises("ddim", 100, n) == 0


def test_default_inference_steps(diff):
    for sampler, calls in (("ddpm", 101), ("ddim", 11)):
        model = TinyEps()
        with torch.no_grad():
            diff.purify(model, rand01((1, 1, 32, 32)), sampler=sampler)
        assert len(model.calls) == calls


@pytest.mark.parametrize("t_star,n,match", [
    (105, 100, "grid"), (110, 50, "grid"), (100, 3, "grid"), (1000, 100, "t_star"), (-1, 100, "t_star"),
    (100, 0, "num_inference_steps"), (100, 1001, "num_inference_steps"),
])
def test_bad_schedule_settings(diff, t_star, n, match):
    with pytest.raises(ValueError, match=match):
        diff.reverse_timesteps(t_star, n)
    with pytest.raises(ValueError, match=match):
        diff.purify(TinyEps(), rand01(), t_star=t_star, sampler="ddim", num_inference_steps=n)


def test_other_t_star_on_the_grid(diff):
    assert diff.reverse_timesteps(200, 50) == list(range(200, -1, -20))
    assert diff.reverse_timesteps(0, 1000) == [0]
    with pytest.raises(ValueError, match="sampler"):
        diff.purify(TinyEps(), rand01(), sampler="euler")


# ---- the whole chain against a diffusers loop -----------------------------------------------------

def diffusers_purify(sched, model, x01, forward_noise, generator):
    x = sched.add_noise(to_model_range(x01), forward_noise, torch.tensor([100]))
    for t in [int(t) for t in sched.timesteps if t <= 100]:
        eps = model(x, torch.full((x.shape[0],), t))
        if isinstance(sched, DDPMScheduler):
            x = sched.step(eps, t, x, generator=generator).prev_sample
        else:
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("sampler,n", [("ddpm", 1000), ("ddpm", 50), ("ddim", 100), ("ddim", 50)])
def test_purify_equals_diffusers_loop(diff, sampler, n):
    model, x = TinyEps(), rand01(seed=3)
    fwd = torch.randn(SHAPE, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(12)
    n_rev = diff.num_reverse_noises(sampler, 100, n)
    rev = torch.stack([torch.randn(SHAPE, generator=g) for _ in range(n_rev)]) if n_rev else None
    sched = ddpm_scheduler(n) if sampler == "ddpm" else ddim_scheduler(n)
    with torch.no_grad():
        ours = diff.purify(model, x, sampler=sampler, num_inference_steps=n, noise=PurifyNoise(fwd, rev))
        ref = diffusers_purify(sched, model, x, fwd, torch.Generator().manual_seed(12))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


# ---- noise contract ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,n", [("ddpm", 50), ("ddim", 100)])
def test_explicit_noise_and_seeds_are_deterministic(diff, sampler, n):
    model, x = TinyEps(), rand01()
    kw = dict(sampler=sampler, num_inference_steps=n)
    noise = diff.sample_noise(SHAPE, sampler, 100, n, torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = diff.purify(model, x, noise=noise, **kw)
        assert torch.equal(a, diff.purify(model, x, noise=noise, **kw))
        # a generator draws exactly sample_noise's tensors
        assert torch.equal(a, diff.purify(model, x, generator=torch.Generator().manual_seed(5), **kw))
        b = diff.purify(model, x, generator=torch.Generator().manual_seed(6), **kw)
        # both at once is ambiguous: refused (as diffusers refuses latents with a generator)
        with pytest.raises(ValueError, match="either `noise` or `generator`"):
            diff.purify(model, x, noise=noise, generator=torch.Generator().manual_seed(6), **kw)
    assert not torch.equal(a, b)  # the forward noise differs between seeds for both samplers
    assert a.shape == x.shape and a.dtype == x.dtype


def test_ddpm_uses_reverse_noise_and_ddim_does_not(diff):
    model, x = TinyEps(), rand01()
    n1 = diff.sample_noise(SHAPE, "ddpm", 100, 50, torch.Generator().manual_seed(0))
    n2 = PurifyNoise(n1.forward, torch.randn(n1.reverse.shape, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        assert not torch.equal(diff.purify(model, x, noise=n1, num_inference_steps=50),
                               diff.purify(model, x, noise=n2, num_inference_steps=50))
        # DDIM: same forward noise -> same output, whatever else is passed along
        d1 = diff.purify(model, x, sampler="ddim", noise=PurifyNoise(n1.forward))
        d2 = diff.purify(model, x, sampler="ddim", noise=n2)
    assert torch.equal(d1, d2)
    assert diff.sample_noise(SHAPE, "ddim", 100, 100).reverse is None
    assert tuple(diff.sample_noise(SHAPE, "ddpm", 100, 1000).reverse.shape) == (100, *SHAPE)


def test_output_is_an_image_in_range(diff):
    class Wild(nn.Module):
        def forward(self, x, t):
            return 10 * x + 3  # pushes the chain far outside [-1, 1]

    x = torch.cat([torch.zeros(1, 1, 32, 32), torch.ones(1, 1, 32, 32)])
    with torch.no_grad():
        for sampler in ("ddpm", "ddim"):
            y = diff.purify(Wild(), x, sampler=sampler, num_inference_steps=50, generator=torch.Generator().manual_seed(0))
            assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    big = rand01((3, 3, 16, 24))
    with torch.no_grad():
        y = diff.purify(TinyEps(channels=3), big, sampler="ddim", generator=torch.Generator().manual_seed(0))
    assert y.shape == big.shape and float(y.min()) >= 0 and float(y.max()) <= 1


# ---- gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,n", [("ddpm", 50), ("ddim", 100)])
def test_gradient_flows_with_and_without_checkpointing(diff, sampler, n):
    model = TinyEps()
    noise = diff.sample_noise(SHAPE, sampler, 100, n, torch.Generator().manual_seed(0))
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    grads, calls = [], []
    for ckpt in (True, False):
        x = rand01().requires_grad_(True)
        model.calls.clear()
        out = diff.purify(model, x, sampler=sampler, num_inference_steps=n, noise=noise, grad_checkpoint=ckpt)
        forward_calls = len(model.calls)
        (out * w).sum().backward()
        grads.append(x.grad.clone())
        calls.append((forward_calls, len(model.calls)))
    steps = len(diff.reverse_timesteps(100, n))
    # checkpointing reruns every UNet call in backward; without it, backward reuses the saved activations
    assert calls == [(steps, 2 * steps), (steps, steps)]
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    # the model's parameters receive gradients too (what ADDT fine-tuning needs)
    assert model.a.weight.grad is not None and model.a.weight.grad.abs().sum() > 0


def test_no_checkpointing_without_grad(diff):
    model = TinyEps()
    with torch.no_grad():
        out = diff.purify(model, rand01(), sampler="ddim", generator=torch.Generator().manual_seed(0))
    assert len(model.calls) == 11 and not out.requires_grad


# ---- batching --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_unet():
    torch.manual_seed(0)
    return EpsNet(build_unet("small")).eval()


@pytest.mark.parametrize("sampler,n", [("ddpm", 50), ("ddim", 100)])
def test_batched_equals_per_sample(diff, small_unet, sampler, n):
    x = rand01((3, 1, 32, 32), seed=4)
    noise = diff.sample_noise(tuple(x.shape), sampler, 100, n, torch.Generator().manual_seed(2))
    kw = dict(sampler=sampler, num_inference_steps=n)
    with torch.no_grad():
        batched = diff.purify(small_unet, x, noise=noise, **kw)
        for i in range(3):
            sl = noise[i:i + 1]
            torch.testing.assert_close(diff.purify(small_unet, x[i:i + 1], noise=sl, **kw), batched[i:i + 1],
                                       atol=1e-5, rtol=0)
        # repeat_interleave: k copies of every sample with its own noise reproduce the batch k times over
        rep = diff.purify(small_unet, x.repeat_interleave(2, 0), noise=noise.repeat_interleave(2), **kw)
    torch.testing.assert_close(rep, batched.repeat_interleave(2, 0), atol=1e-5, rtol=0)


def test_bad_noise_shapes(diff):
    model, x = TinyEps(), rand01()
    good = diff.sample_noise(SHAPE, "ddpm", 100, 50)
    bad = {
        "forward shape": PurifyNoise(torch.randn(1, 1, 32, 32), good.reverse),
        "reverse missing": PurifyNoise(good.forward, None),
        "reverse too short": PurifyNoise(good.forward, good.reverse[:3]),
        "reverse sample shape": PurifyNoise(good.forward, torch.randn(5, 2, 1, 16, 16)),
        "reverse batch": PurifyNoise(good.forward, torch.randn(5, 3, 1, 32, 32)),
    }
    for what, noise in bad.items():
        with pytest.raises(ValueError, match="noise") as e:
            diff.purify(model, x, num_inference_steps=50, noise=noise)
        assert "shape" in str(e.value) or "needs" in str(e.value), what
    with pytest.raises(ValueError, match="forward noise shape"):
        diff.purify(model, x, sampler="ddim", noise=PurifyNoise(torch.randn(2, 1, 28, 28)))
    assert model.calls == []  # rejected before any UNet call


def test_purify_noise_owns_its_layout(diff):
    """Indexing and concatenation slice the batch of both parts ([B, ...] forward, [S, B, ...] reverse)."""
    n = diff.sample_noise((6, 1, 4, 4), "ddpm", 100, 50, torch.Generator().manual_seed(0))
    head, tail = n[:2], n[2:]
    assert len(n) == 6 and len(head) == 2 and head.reverse.shape == (n.reverse.shape[0], 2, 1, 4, 4)
    assert torch.equal(head.reverse, n.reverse[:, :2]) and torch.equal(tail.forward, n.forward[2:])
    back = PurifyNoise.cat([head, tail])
    assert torch.equal(back.forward, n.forward) and torch.equal(back.reverse, n.reverse)
    # draw j of a repeat_interleave(k) layout (what batched EoT lays out) is every k-th row from j
    rep = n[:3].repeat_interleave(2)
    assert torch.equal(rep[1::2].forward, n.forward[:3]) and torch.equal(rep[1::2].reverse, n.reverse[:, :3])
    assert torch.equal(n[3].forward, n.forward[3:4]) and torch.equal(n[-1].reverse, n.reverse[:, -1:])
    ddim = PurifyNoise(torch.randn(2, 1, 4, 4))
    assert ddim[:1].reverse is None and PurifyNoise.cat([ddim, ddim]).forward.shape[0] == 4
    with pytest.raises(ValueError, match="mix"):
        PurifyNoise.cat([ddim, n[:2]])
    with pytest.raises(ValueError, match="at least one"):
        PurifyNoise.cat([])
