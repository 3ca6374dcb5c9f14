"""dbp.certify: randomized smoothing's statistics against hand computations and binomial simulations, the one-shot
denoiser against an oracle, and "no certified point is broken" by an l_2 EoT-PGD attack on a real tiny model.

Each test names the mutation of dbp/certify.py or dbp/diffusion.py it was checked to catch.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from scipy.stats import binom, binomtest
from torch import nn

from dbp.attacks import AttackConfig, build_attack
from dbp.certify import (ABSTAIN, Certificate, SmoothingConfig, SmoothingNoise, certified_accuracy, certified_radius,
                         certify, certify_batch, image_seeds, lower_confidence_bound, predict, sample_counts,
                         smoothed_base)
from dbp.diffusion import Diffusion, to_model_range

PHI_INV = NormalDist().inv_cdf  # the standard library's, independent of scipy


def cp_lower_by_hand(k: int, n: int, alpha: float) -> float:
    """Clopper-Pearson one-sided lower bound from its definition: the p with P(Bin(n, p) >= k) = alpha
    (bisection on the exact binomial tail, math.comb only)."""
    if k == 0:
        return 0.0

    def tail(p):
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) < alpha else (lo, mid)
    return (lo + hi) / 2


# ---- hand-made base classifiers (parameter-free, so any batch size works) ------------------------------------------

class Threshold(nn.Module):
    """Class 0 when the first pixel of z is <= c, else class 1: on x = 0 with noise sigma, P(class 0) = Phi(c / sigma)
    exactly, a base classifier that is right with a known probability."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, z):
        d = z.flatten(1)[:, 0] - self.c
        return torch.stack([-d, d], 1)


class Constant(nn.Module):
    def __init__(self, k: int, classes: int = 10):
        super().__init__()
        self.k, self.classes = k, classes

    def forward(self, z):
        return nn.functional.one_hot(torch.full((len(z),), self.k), self.classes).float()


class Alternating(nn.Module):
    """Rows alternate between class 0 and class 1: any even batch is an exact tie."""

    def forward(self, z):
        return nn.functional.one_hot(torch.arange(len(z)) % 2, 2).float()


X0 = torch.zeros(1, 1, 2, 2)


# ---- the diffusion side: t for sigma and the one-shot denoiser ---------------------------------------------------

def test_timestep_for_sigma_and_noise_ratio_by_hand():
    """t where sqrt((1 - abar_t)/abar_t) = 2 sigma: 144 for sigma 0.25 and 258 for 0.5, abar recomputed here from the
    linear betas in float64. Mutation caught: noise_ratio without the square root (t would be ~60 / ~200)."""
    d = Diffusion()
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    abar, ratios = 1.0, []
    for b in betas:
        abar *= 1 - b
        ratios.append(math.sqrt((1 - abar) / abar))
    for sigma, t_expected in ((0.25, 144), (0.5, 258)):
        t_hand = min(range(1000), key=lambda t: abs(ratios[t] - 2 * sigma))
        assert d.timestep_for_noise_ratio(2 * sigma) == t_hand == t_expected
        assert float(d.noise_ratio(t_hand)) == pytest.approx(ratios[t_hand], rel=1e-4)
        assert SmoothingNoise(sigma, eps_net=nn.Identity()).t == t_expected
    with pytest.raises(ValueError):
        d.timestep_for_noise_ratio(1e4)
    with pytest.raises(ValueError):
        d.timestep_for_noise_ratio(0.0)


def test_one_shot_denoiser_with_the_oracle_eps_returns_x():
    """If eps_theta returned the true noise, x_hat would be x exactly: x_t = sqrt(abar) (x + r delta) IS the forward
    process at t. Mutation caught: x_t = abar * y instead of sqrt(abar) * y (x_hat off by O(1))."""
    d = Diffusion()
    x = to_model_range(torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    delta = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    t = d.timestep_for_noise_ratio(0.5)
    seen = []

    def oracle(x_t, tt):
        seen.append(tt.tolist())
        return delta

    x_hat = d.denoise_one_shot(oracle, x + d.noise_ratio(t) * delta, t)
    assert seen == [[t] * 3]
    torch.testing.assert_close(x_hat, x, atol=1e-5, rtol=0)


def test_seeded_noise_is_explicit_and_batching_free():
    """Counts are a function of the generator's seed and n only: the same with max_rows 7 or 64 and one image's
    certificate in certify_batch does not depend on its neighbours; another seed gives other counts. Mutation caught:
    one batched randn per max_rows batch in SmoothingNoise.sample_rows (counts change with max_rows)."""
    model = smoothed_base(Threshold(0.0), 1.0)
    a = sample_counts(model, X0, 100, 7, torch.Generator().manual_seed(3))
    b = sample_counts(model, X0, 100, 64, torch.Generator().manual_seed(3))
    c = sample_counts(model, X0, 100, 64, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c) and int(a.sum()) == 100
    cfg = SmoothingConfig(sigma=1.0, n0=5, n=50, alpha=0.05, max_rows=16, seed=9)
    xs = torch.stack([X0[0] - 0.3, X0[0], X0[0] + 0.3])
    seeds = image_seeds(cfg, 3)
    both = certify_batch(model, xs, cfg)
    alone = certify_batch(model, xs[2:], cfg, seeds=seeds[2:])
    assert [c.seed for c in both] == seeds and both[2].counts == alone[0].counts


# ---- the statistics ---------------------------------------------------------------------------------------------

def test_radius_grows_with_p_and_matches_a_hand_computation():
    """radius = sigma Phi^-1(p_A): 0.5 * 1.2815515655446004 at p_A = 0.9, strictly increasing in p_A, 0 at and below
    1/2; the lower bound is Clopper-Pearson by its definition; CERTIFY's radius is the formula at its own count.
    Mutation caught: confidence level 1 - alpha instead of 1 - 2 alpha (the bound moves by ~0.01)."""
    assert certified_radius(0.9, 0.5) == pytest.approx(0.5 * 1.2815515655446004, abs=1e-12)
    ps = [0.5001, 0.6, 0.75, 0.9, 0.99, 0.999999]
    radii = [certified_radius(p, 0.25) for p in ps]
    assert all(a < b for a, b in zip(radii, radii[1:]))
    assert radii == pytest.approx([0.25 * PHI_INV(p) for p in ps], abs=1e-9)
    assert certified_radius(0.5, 0.25) == 0.0 and certified_radius(0.3, 0.25) == 0.0
    for k, n, alpha in ((70, 100, 0.001), (57, 100, 0.05), (990, 1000, 0.001), (1, 10, 0.01)):
        assert lower_confidence_bound(k, n, alpha) == pytest.approx(cp_lower_by_hand(k, n, alpha), abs=1e-8)
    # CERTIFY end to end: Threshold on x=0 at sigma 1 with c=1.5 is right with p = Phi(1.5) = 0.933
    cfg = SmoothingConfig(sigma=1.0, n0=10, n=400, alpha=0.001, max_rows=128, seed=5)
    cert = certify(smoothed_base(Threshold(1.5), 1.0), X0, cfg)
    assert cert.label == 0 and cert.counts[0] == cert.count_a
    assert cert.p_a_lower == pytest.approx(cp_lower_by_hand(cert.count_a, 400, 0.001), abs=1e-8)
    assert cert.radius == pytest.approx(PHI_INV(cert.p_a_lower), abs=1e-9)


def test_ties_abstain():
    """An exact 50/50 base classifier: PREDICT's binomial test has p-value 1 and CERTIFY's p_A < 1/2, so both
    abstain with radius 0; certified accuracy counts the abstention as wrong at every radius. Mutation caught:
    CERTIFY returning c_A whenever its count is the largest (p_A > 0.5 check dropped)."""
    model = smoothed_base(Alternating(), 0.5)
    cfg = SmoothingConfig(sigma=0.5, n0=10, n=1000, alpha=0.001, max_rows=100)
    pred = predict(model, X0, cfg)
    assert pred.abstained and pred.label == ABSTAIN and (pred.count_a, pred.count_b) == (500, 500)
    assert pred.p_value == 1.0
    cert = certify(model, X0, cfg)
    assert cert.abstained and cert.radius == 0.0 and cert.counts == [500, 500] and cert.p_a_lower < 0.5
    assert certified_accuracy([cert], [cert.selected], 0.0) == 0.0


def test_constant_classifier_certifies_the_largest_radius_n_and_alpha_allow():
    """All n samples in one class: p_A = alpha^(1/n) and radius sigma Phi^-1(alpha^(1/n)) (0.25 * Phi^-1(0.001^(1/100))
    = 0.3751...), the most any image can get at that n; PREDICT's p-value is 2 * 0.5^n. Mutation caught: counting
    n0 + n samples (p_A uses the wrong n)."""
    for n, alpha, sigma in ((100, 0.001, 0.25), (1000, 0.01, 0.5)):
        cfg = SmoothingConfig(sigma=sigma, n0=10, n=n, alpha=alpha, max_rows=300)
        cert = certify(smoothed_base(Constant(3), sigma), X0, cfg)
        best = sigma * PHI_INV(alpha ** (1 / n))
        assert cert.label == 3 and cert.count_a == n and cert.p_a_lower == pytest.approx(alpha ** (1 / n), abs=1e-12)
        assert cert.radius == pytest.approx(best, abs=1e-9) and cfg.max_radius == pytest.approx(best, abs=1e-9)
        assert certified_accuracy([cert], [3], best - 1e-9) == 1.0 and certified_accuracy([cert], [3], best + 1e-6) == 0
    assert SmoothingConfig(sigma=0.25, n=100, alpha=0.001).max_radius == pytest.approx(0.37512, abs=1e-4)
    pred = predict(smoothed_base(Constant(3), 0.25), X0, SmoothingConfig(sigma=0.25, n=100, alpha=0.001))
    assert pred.label == 3 and pred.p_value == pytest.approx(2 * 0.5**100, rel=1e-9)


def test_abstain_rate_and_lower_bound_agree_with_a_binomial_simulation():
    """A base classifier right with probability p = 0.6 (Threshold at Phi^-1(0.6)), 600 independent CERTIFYs with
    n0 = 11, n = 100, alpha = 0.05. Exact expectations from the binomial distribution and the hand Clopper-Pearson
    bound: the certified rate P(select 0) P(Bin(n, p) >= k_min) + P(select 1) P(Bin(n, 1-p) >= k_min), the mean
    p_A bound given class 0 was selected, and p_A > p (a wrong bound) in at most ~alpha of the runs.
    Mutation caught: confidence level 1 - alpha (k_min 59 -> 61, the certified rate 0.47 -> ~0.35)."""
    p, n0, n, alpha, runs = 0.6, 11, 100, 0.05, 600
    model = smoothed_base(Threshold(PHI_INV(p)), 1.0)
    cfg = SmoothingConfig(sigma=1.0, n0=n0, n=n, alpha=alpha, max_rows=128)
    lb = [cp_lower_by_hand(k, n, alpha) for k in range(n + 1)]
    k_min = min(k for k in range(n + 1) if lb[k] > 0.5)
    p_sel0 = float(binom.sf(n0 // 2, n0, p))  # P(Bin(11, p) >= 6)
    rate = p_sel0 * float(binom.sf(k_min - 1, n, p)) + (1 - p_sel0) * float(binom.sf(k_min - 1, n, 1 - p))
    mean_lb = sum(float(binom.pmf(k, n, p)) * lb[k] for k in range(n + 1))
    sd_lb = math.sqrt(sum(float(binom.pmf(k, n, p)) * (lb[k] - mean_lb) ** 2 for k in range(n + 1)))

    certs = [certify(model, X0, cfg, torch.Generator().manual_seed(s)) for s in range(runs)]
    certified = sum(not c.abstained for c in certs)
    assert binomtest(certified, runs, rate).pvalue > 1e-3, (certified / runs, rate, k_min)
    assert all(c.abstained == (c.count_a < k_min) for c in certs)
    sel0 = [c.p_a_lower for c in certs if c.selected == 0]
    assert abs(sum(sel0) / len(sel0) - mean_lb) < 4 * sd_lb / math.sqrt(len(sel0))
    wrong = sum(b > p for b in sel0)
    assert wrong <= binom.ppf(1 - 1e-3, len(sel0), alpha), wrong


# ---- no certified point is broken ------------------------------------------------------------------------------

def _eot_pgd_l2(model, x, label, eps, seed):
    """l_2 PGD with EoT on the smoothed base classifier (dbp.attacks: the noise is the Defense's explicit noise,
    redrawn for each of the 4 EoT samples at every one of 5 steps of eps/4; the best iterate is kept)."""
    atk = build_attack(model, AttackConfig(norm="l2", eps=eps, step=eps / 4, steps=5, eot=4, mode="eot"))
    return atk(x, torch.tensor([label]), generator=torch.Generator().manual_seed(seed)).x_adv


def test_no_certified_point_is_broken(tiny_classifier_ckpt, fashion_test):
    """CERTIFY on 10 test images (the tiny real classifier under plain Gaussian smoothing, sigma 0.12, n = 64,
    alpha = 0.01: the UNet is too slow for an attack test on one core); each certified image attacked by EoT-PGD l_2
    at 0.9 x its radius; the smoothed prediction at the adversarial point re-estimated by PREDICT with fresh noise
    (n = 100, alpha = 0.01). A changed, non-abstained prediction needs a wrong certificate or a wrong PREDICT, each
    of probability <= alpha: more than the 99.9% quantile of Bin(certified, 2 alpha) is a bug. The same attack at 6x
    the radius must break more than that (it has teeth; at 4x this cheap attack breaks none, so the test catches
    gross radius errors, not 2x ones). Mutation caught: certified_radius without the factor sigma (radii x8.3)."""
    from dbp.models import load_classifier

    sigma, alpha = 0.12, 0.01
    model = smoothed_base(load_classifier(tiny_classifier_ckpt), sigma)
    x = fashion_test.float01(slice(0, 10))
    certs = certify_batch(model, x, SmoothingConfig(sigma=sigma, n0=10, n=64, alpha=alpha, max_rows=128, seed=0))
    certified = [i for i, c in enumerate(certs) if not c.abstained and c.radius > 0]
    assert len(certified) >= 6, [c.radius for c in certs]

    def broken(scale: float) -> int:
        hits = 0
        for i in certified:
            c = certs[i]
            x_adv = _eot_pgd_l2(model, x[i:i + 1], c.label, scale * c.radius, seed=100 + i)
            assert float((x_adv - x[i:i + 1]).norm()) <= scale * c.radius + 1e-5
            fresh = predict(model, x_adv, SmoothingConfig(sigma=sigma, n=100, alpha=alpha, seed=10_000 + i))
            hits += fresh.label not in (ABSTAIN, c.label)
        return hits

    allowed = int(binom.ppf(1 - 1e-3, len(certified), 2 * alpha))
    assert broken(0.9) <= allowed
    assert broken(6.0) > allowed, "the attack cannot break even 3x the certified radius: the test has no teeth"


def test_denoised_smoothing_on_tiny_real_models(tiny_models, fashion_test):
    """The one-shot denoiser path end to end on the tiny UNet + classifier: the UNet is called once per noisy image at
    t = 144 (sigma 0.25), certificates are consistent (label = selected or ABSTAIN, radius within the n/alpha maximum)
    and reproducible from their seed. Mutation caught: SmoothingNoise passing sigma (not 2 sigma) to
    timestep_for_noise_ratio (t = 73)."""
    eps_net, classifier = tiny_models
    ts = []
    hook = eps_net.register_forward_pre_hook(lambda m, args: ts.append(int(args[1][0])))
    try:
        model = smoothed_base(classifier, 0.25, eps_net)
        cfg = SmoothingConfig(sigma=0.25, n0=4, n=24, alpha=0.05, max_rows=16, seed=1)
        x = fashion_test.float01(slice(0, 2))
        certs = certify_batch(model, x, cfg)
    finally:
        hook.remove()
    assert model.purifier.t == 144 and set(ts) == {144} and len(ts) == 2 * 3  # per image: 4 rows, then 24 as 16 + 8
    for c in certs:
        assert isinstance(c, Certificate) and c.label in (c.selected, ABSTAIN) and sum(c.counts) == 24
        assert 0.0 <= c.radius <= cfg.max_radius + 1e-12 and (c.radius > 0) == (not c.abstained)
    again = certify(model, x[1], cfg, torch.Generator().manual_seed(certs[1].seed))
    assert again.counts == certs[1].counts and again.radius == certs[1].radius


@pytest.mark.parametrize("kwargs", [dict(sigma=0.0), dict(n=0), dict(n0=0), dict(max_rows=0), dict(alpha=0.0),
                                    dict(alpha=0.5)])
def test_bad_settings_are_refused_before_any_sampling(kwargs):
    """What a serving shell turns into a 4xx: bad sigma, n, n0, max_rows or alpha raise ValueError at construction,
    and so do a wrong number of seeds and a batch passed as one image. Mutation caught: the alpha range check dropped
    (alpha = 0.5 would make the 'one-sided' bound two-sided at level 0)."""
    with pytest.raises(ValueError):
        SmoothingConfig(**kwargs)
    model, cfg = smoothed_base(Constant(1), 0.25), SmoothingConfig(sigma=0.25, n0=2, n=4)
    with pytest.raises(ValueError, match="seeds"):
        certify_batch(model, torch.zeros(2, 1, 2, 2), cfg, seeds=[1])
    with pytest.raises(ValueError, match="one image"):
        certify(model, torch.zeros(2, 1, 2, 2), cfg)
