"""dbp.samplers (VP-SDE, EDM) against independent formulas, seeds, explicit noise, exact gradients and DDPM.

Mutation-checked by hand (2026-12-06): flipping the sign of the score term in `_ReverseVPSDE.f` makes
`test_vpsde_steps_by_hand` and `test_vpsde_agrees_with_the_ddpm_chain` fail; replacing EDM's Heun average
`0.5 * d + 0.5 * d2` by `d` (plain Euler) makes `test_edm_steps_by_hand` fail.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dbp.diffusion import Diffusion, PurifyNoise
from dbp.models import Purifier
from dbp.samplers import VPSchedule, edm_sigmas

F64 = torch.float64
SHAPE = (2, 1, 4, 4)


@pytest.fixture(scope="module")
def diff():
    return Diffusion()


class TinyEps(nn.Module):
    """A small real network with a (float) timestep dependence; records the timesteps it is called at."""

    def __init__(self, seed: int = 0, dtype=torch.float32, gain: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Conv2d(1, 3, 3, padding=1).to(dtype)
        self.b = nn.Conv2d(3, 1, 3, padding=1).to(dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=dtype))
        self.calls: list[float] = []
        self.gain = gain

    def forward(self, x, t):
        self.calls.append(float(t[0]))
        return self.gain * self.b(torch.tanh(self.a(x))) * (1 + t.to(x.dtype).view(-1, 1, 1, 1) / 1000)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mid01(shape=SHAPE, seed=0, dtype=torch.float32):
    """Images in [0.4, 0.6]: the purified output stays off the [0, 1] clamp for these small chains."""
    return 0.4 + 0.2 * torch.rand(shape, generator=gen(seed), dtype=dtype)


# ---- the continuous schedule -------------------------------------------------------------------------

def test_vp_schedule_is_the_limit_of_the_discrete_one(diff):
    s = VPSchedule.of(diff)
    assert (s.beta_min, s.beta_max) == pytest.approx((0.1, 20.0))
    # method.md §2.1: at t = 0.1 the mean coefficient is 0.9467, the std 0.3221, alpha-bar 0.8963
    assert math.sqrt(s.abar(0.1)) == pytest.approx(0.9467, abs=1e-4)
    assert s.std(0.1) == pytest.approx(0.3221, abs=1e-4) and s.abar(0.1) == pytest.approx(0.8963, abs=1e-4)
    assert s.sigma(0.1) == pytest.approx(0.3402, abs=1e-4)  # method.md §2.5: t* = 0.1 is sigma ~ 0.34
    for t in (1e-3, 0.1, 0.5, 1.0):
        assert s.t_of_sigma(s.sigma(t)) == pytest.approx(t, rel=1e-10)
    # alpha-bar of the discrete chain at index i is bracketed by the continuous one at i/T and (i+1)/T
    for i in (0, 99, 100):
        assert s.abar((i + 1) / 1000) <= float(diff.alphas_cumprod[i]) <= s.abar(i / 1000)


# ---- one step (and a few) by hand ----------------------------------------------------------------------

@pytest.fixture
def no_grad():
    """No graph: purify then makes no checkpoint-planning probe call, so net.calls are the sampler's own."""
    with torch.no_grad():
        yield


def test_vpsde_steps_by_hand(diff, no_grad):
    """Three Euler-Maruyama steps of h = 0.01 from t* = 0.03, written out from DiffPure's formulas."""
    net = TinyEps(1, F64, gain=0.1)
    x01 = mid01(dtype=F64)
    noise = PurifyNoise(torch.randn(SHAPE, generator=gen(1), dtype=F64),
                        torch.randn((3, *SHAPE), generator=gen(2), dtype=F64))
    out = diff.purify(net, x01, sampler="vpsde", t_star=30, num_inference_steps=100, noise=noise)

    bmin, bmax, h = 0.1, 20.0, 0.01
    abar = lambda t: math.exp(-(bmin * t + (bmax - bmin) * t * t / 2))  # noqa: E731
    x = math.sqrt(abar(0.03)) * (2 * x01 - 1) + math.sqrt(1 - abar(0.03)) * noise.forward
    for k, t in enumerate((0.03, 0.02, 0.01)):
        beta = bmin + t * (bmax - bmin)
        score = -net(x, torch.full((2,), t * 999, dtype=F64)) / math.sqrt(1 - abar(t))
        x = x + (0.5 * beta * x + beta * score) * h + math.sqrt(beta * h) * noise.reverse[k]
    ref = (x / 2 + 0.5).clamp(0, 1)
    assert 0 < float(ref.min()) and float(ref.max()) < 1  # the comparison is not hidden by the clamp
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    assert net.calls[:3] == pytest.approx([29.97, 19.98, 9.99])  # the network at t * 999, a float


@pytest.mark.parametrize("s_churn", [0.0, 0.5])
def test_edm_steps_by_hand(diff, s_churn, no_grad):
    """Two Heun steps of Karras et al.'s Algorithm 2 from sigma(t* = 0.1) (with and without churn)."""
    net = TinyEps(2, F64, gain=0.3)
    x01 = mid01(dtype=F64)
    n = 2
    rev = torch.randn((n, *SHAPE), generator=gen(4), dtype=F64) if s_churn else None
    noise = PurifyNoise(torch.randn(SHAPE, generator=gen(3), dtype=F64), rev)
    out = diff.purify(net, x01, sampler="edm", t_star=100, num_inference_steps=n, noise=noise, s_churn=s_churn)

    abar = lambda t: math.exp(-(0.1 * t + 19.9 * t * t / 2))  # noqa: E731
    t_of = lambda s: (math.sqrt(0.01 + 2 * 19.9 * math.log(1 + s * s)) - 0.1) / 19.9  # noqa: E731
    smax = math.sqrt((1 - abar(0.1)) / abar(0.1))
    sigmas = [smax, 0.002, 0.0]  # rho = 7 with two steps: the ends only

    def D(x, s):
        return x - s * net(x / math.sqrt(1 + s * s), torch.full((2,), 999 * t_of(s), dtype=F64))

    gamma = min(s_churn / n, math.sqrt(2) - 1)
    x = (2 * x01 - 1) + smax * noise.forward
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        s_hat = s * (1 + gamma)
        x_hat = x + math.sqrt(s_hat ** 2 - s ** 2) * rev[i] if s_churn else x
        d = (x_hat - D(x_hat, s_hat)) / s_hat
        x = x_hat + (s_next - s_hat) * d
        if s_next > 0:
            x = x_hat + (s_next - s_hat) * (d + (x - D(x, s_next)) / s_next) / 2
    ref = (x / 2 + 0.5).clamp(0, 1)
    assert 0 < float(ref.min()) and float(ref.max()) < 1
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    assert len(net.calls) == 2 * (2 * n - 1)  # purify's calls, then the reference's
    assert net.calls[0] == pytest.approx(999 * t_of(smax * (1 + gamma)))  # churn 0: 999 t* = 99.9


def test_edm_sigma_schedule():
    s = edm_sigmas(0.34, 5)
    assert s[0] == pytest.approx(0.34) and s[-2] == pytest.approx(0.002) and s[-1] == 0
    assert all(a > b for a, b in zip(s, s[1:]))
    # rho = 7 spacing: equal steps in sigma^(1/7)
    r = [v ** (1 / 7) for v in s[:-1]]
    assert max(r[i] - r[i + 1] for i in range(4)) == pytest.approx(min(r[i] - r[i + 1] for i in range(4)))
    assert edm_sigmas(0.34, 1) == [0.34, 0.0]


# ---- seeds, explicit noise, settings -----------------------------------------------------------------

CASES = [("vpsde", 100, 0.0), ("edm", 4, 0.0), ("edm", 4, 1.0)]


@pytest.mark.parametrize("sampler,n,churn", CASES)
def test_seeded_repeatability_and_explicit_noise(diff, sampler, n, churn):
    net, x = TinyEps(), mid01()
    run = lambda **kw: diff.purify(net, x, sampler=sampler, num_inference_steps=n, s_churn=churn, **kw)  # noqa: E731
    assert torch.equal(run(generator=gen(5)), run(generator=gen(5)))
    assert not torch.allclose(run(generator=gen(5)), run(generator=gen(6)))
    noise = diff.sample_noise(SHAPE, sampler, 100, n, gen(5), s_churn=churn)
    assert torch.equal(run(noise=noise), run(generator=gen(5)))  # the generator draws exactly sample_noise's noise
    need = {"vpsde": 10, "edm": n if churn else 0}[sampler]
    assert (0 if noise.reverse is None else noise.reverse.shape[0]) == need
    if need:  # the reverse noise is used: DW-box fixes it, EoT redraws it
        other = PurifyNoise(noise.forward, torch.randn(noise.reverse.shape, generator=gen(9)))
        assert not torch.allclose(run(noise=noise), run(noise=other))
        with pytest.raises(ValueError, match="reverse noise"):
            run(noise=PurifyNoise(noise.forward, noise.reverse[:-1]))
    else:  # EDM without churn: the reverse chain is deterministic, the forward noise the only randomness
        assert noise.reverse is None
    # batch rows are independent: a row's output depends on its own noise only
    torch.testing.assert_close(run(noise=noise)[1:], diff.purify(net, x[1:], sampler=sampler, num_inference_steps=n,
                                                                s_churn=churn, noise=noise[1:]), atol=1e-6, rtol=0)


def test_settings_and_unet_calls(diff):
    net = TinyEps()
    assert Purifier(net, sampler="vpsde").n_unet_calls == 100  # N = 1000: step 1e-3 from t* = 0.1 (DiffPure)
    assert Purifier(net, sampler="edm").n_unet_calls == 19  # N = 10 Heun steps: 2N - 1
    assert Purifier(net, sampler="edm", num_inference_steps=50).n_unet_calls == 99
    assert (Purifier(net, sampler="ddpm").n_unet_calls, Purifier(net, sampler="ddim").n_unet_calls) == (101, 11)
    with pytest.raises(ValueError, match="sampler"):
        Purifier(net, sampler="heun")
    with pytest.raises(ValueError, match="s_churn"):
        Purifier(net, sampler="ddpm", s_churn=1.0)
    with pytest.raises(ValueError, match="grid"):
        Purifier(net, sampler="vpsde", num_inference_steps=3)
    with pytest.raises(ValueError, match="sde_gradient"):
        Purifier(net, sampler="vpsde", sde_gradient="bptt")
    p = Purifier(net, sampler="edm", s_churn=2.0, num_inference_steps=3)
    assert p.sample_noise(mid01(), gen(0)).reverse.shape == (3, *SHAPE)


def test_gate_config_accepts_the_new_samplers():
    from dbp.gate import config as GC
    for s in ("vpsde", "edm"):
        GC.validate(GC.GateConfig(purifier="p", classifier="c", sampler=s))
    with pytest.raises(GC.GateError, match="sampler"):
        GC.validate(GC.GateConfig(purifier="p", classifier="c", sampler="heun"))


# ---- gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,n,churn", [("vpsde", 50, 0.0), ("edm", 2, 0.7)])
def test_gradients_are_exact(diff, sampler, n, churn):
    """torch.autograd.gradcheck (central finite differences, float64) through the whole sampler."""
    net = TinyEps(3, F64)
    shape = (1, 1, 2, 2)
    noise = diff.sample_noise(shape, sampler, 100, n, gen(7), s_churn=churn)
    noise = PurifyNoise(noise.forward.to(F64), None if noise.reverse is None else noise.reverse.to(F64))
    x = mid01(shape, dtype=F64).requires_grad_(True)
    f = lambda x: diff.purify(net, x, sampler=sampler, num_inference_steps=n, noise=noise, s_churn=churn)  # noqa: E731
    out = f(x).detach()
    assert 0 < float(out.min()) and float(out.max()) < 1  # off the clamp, where the map is smooth
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("ckpt", [True, False])
def test_vpsde_backprop_with_and_without_checkpointing(diff, ckpt):
    net = TinyEps(4)
    x = mid01().requires_grad_(True)
    noise = diff.sample_noise(SHAPE, "vpsde", 100, 100, gen(8))
    diff.purify(net, x, sampler="vpsde", num_inference_steps=100, noise=noise, grad_checkpoint=ckpt).sum().backward()
    ref = x.grad.clone()
    x.grad = None
    out = diff.purify(net, x, sampler="vpsde", num_inference_steps=100, noise=noise, grad_checkpoint=not ckpt)
    out.sum().backward()
    torch.testing.assert_close(x.grad, ref, atol=1e-6, rtol=1e-5)


def test_vpsde_adjoint_is_close_to_exact_backprop(diff):
    """torchsde's stochastic adjoint solves the adjoint SDE backwards with Euler steps: its gradient differs from
    the exact one by O(step) (Jacobians taken one grid point late). At N = 1000 (100 steps, the default) the
    relative error of the input gradient is 2.9e-3 here (asserted <= 1e-2), and 1.2e-2 at N = 100 (asserted larger)."""
    net = TinyEps(5, F64)
    x = mid01(dtype=F64).requires_grad_(True)
    w = torch.randn(SHAPE, generator=gen(11), dtype=F64)
    grads = {}
    for n in (1000, 100):
        noise = diff.sample_noise(SHAPE, "vpsde", 100, n, gen(10))
        noise = PurifyNoise(noise.forward.to(F64), noise.reverse.to(F64))
        for mode in ("backprop", "adjoint"):
            x.grad = None
            out = diff.purify(net, x, sampler="vpsde", num_inference_steps=n, noise=noise, sde_gradient=mode)
            (out * w).sum().backward()
            grads[n, mode] = x.grad.clone()
    rel = {n: float((grads[n, "adjoint"] - grads[n, "backprop"]).norm() / grads[n, "backprop"].norm())
           for n in (1000, 100)}
    assert rel[1000] <= 1e-2 and rel[1000] < rel[100]
    assert grads[1000, "backprop"].abs().sum() > 0


# ---- VP-SDE against the DDPM chain ---------------------------------------------------------------------

class GaussEps(nn.Module):
    """The exact eps of data x0 ~ N(0, s^2 I) for the discrete schedule (alpha-bar interpolated at float steps):
    a perfect denoiser for that data, so neither chain leaves [-1, 1] and DDPM's x0 clip stays inactive."""

    def __init__(self, diffusion: Diffusion, s: float = 0.3):
        super().__init__()
        self.abar, self.s = diffusion.alphas_cumprod.to(F64), s

    def forward(self, x, t):
        tau = float(t[0])
        i = min(int(tau), len(self.abar) - 2)
        a = (1 - (tau - i)) * self.abar[i] + (tau - i) * self.abar[i + 1]
        return (1 - a).sqrt() * x / (a * self.s ** 2 + 1 - a)


def test_vpsde_agrees_with_the_ddpm_chain(diff):
    """VP-SDE (t* = 0.1, N = 1000: 100 Euler-Maruyama steps of 1e-3) vs DDPM (t* = 100, N = 1000: ancestral steps
    100 -> 0 plus the final x0 step), given the SAME forward noise and the same z: DDPM's reverse noise z_k at
    timestep 100 - k is the VP-SDE's Brownian increment sqrt(1e-3) z_k on the step from t = (100 - k) / 1000.
    The EM step is DDPM's step to first order in beta; what remains is the continuous vs discrete alpha-bar at t*
    (0.8963 vs 0.8951), O(beta^2) per step and the network time 999 t vs t. Measured on 3 seeds: mean |diff|
    0.0019-0.0023, max 0.0065-0.0078 (model range). Tolerance: mean <= 0.004, max <= 0.015 (model range).
    The same check with DDPM fed a different z gives mean 0.008-0.010, with a different forward noise 0.2:
    both fail it, so the tolerance sees a wrong noise mapping."""
    net = GaussEps(diff)
    for seed in range(2):
        g = gen(seed)
        x01 = 0.3 + 0.4 * torch.rand((2, 1, 8, 8), generator=g, dtype=F64)
        fwd = torch.randn((2, 1, 8, 8), generator=g, dtype=F64)
        z = torch.randn((100, 2, 1, 8, 8), generator=g, dtype=F64)
        vp = diff.purify(net, x01, sampler="vpsde", num_inference_steps=1000, noise=PurifyNoise(fwd, z))
        ddpm = lambda noise: diff.purify(net, x01, sampler="ddpm", num_inference_steps=1000, noise=noise)  # noqa: E731
        gap = lambda a, b: (float((a - b).abs().mean()) * 2, float((a - b).abs().max()) * 2)  # noqa: E731
        mean, mx = gap(vp, ddpm(PurifyNoise(fwd, z)))
        assert mean <= 0.004 and mx <= 0.015, (seed, mean, mx)
        assert gap(vp, ddpm(PurifyNoise(fwd, z.roll(1, 0))))[0] > 0.006  # a wrong increment mapping is seen
        assert gap(vp, ddpm(PurifyNoise(-fwd, z)))[0] > 0.05
