"""The gate on real (tiny) models and real stand-in defences, judged by the verdict recomputed from the card's
per-image evidence: an identity 'purifier', a Gaussian blur, JPEG re-encoding and a purifier with random weights
are each rejected, each by the rule that names what is wrong with it. Measured on 16 images (a policy object
with the pinned policy's rules at this test's size; such a card could never be exported: its policy sha256 is
not the pinned one's).

Checked by mutation (2026-12-06): without the `vs_bare` rule the identity and blur cases pass that rule's
assert; without `loss_rise` and `collapse` the JPEG case passes; without the `clean` rule the random-weights
case does.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dbp.checkpoint import load_meta, load_weights, save_checkpoint
from dbp.diffusion import PurifyNoise
from dbp.gate import config as GC, protocol as GP, report as GR, run as G
from dbp.gate.policy import load_policy
from dbp.gate.verdict import evaluate
from dbp.models import Defense, Purifier, load_classifier, load_unet

N = 16
WHERE = "paper linf eps=0.03137 dwbox"


class StandIn(nn.Module):
    """A deterministic preprocessor with the attributes a card records."""
    t_star, sampler, num_inference_steps, n_unet_calls = 0, "stand-in", 0, 0

    def sample_noise(self, x01, generator=None):
        return PurifyNoise(torch.zeros_like(x01))

    def forward(self, x01, noise=None, generator=None):
        return self.apply(x01)


class Identity(StandIn):
    def apply(self, x):
        return x


class Blur(StandIn):
    """Gaussian blur, sigma 1.5 px: differentiable, so white-box PGD goes straight through it."""
    def __init__(self, sigma: float = 1.5, size: int = 7):
        super().__init__()
        r = torch.arange(size, dtype=torch.float32) - size // 2
        g = torch.exp(-r ** 2 / (2 * sigma ** 2))
        self.register_buffer("kernel", (g[:, None] * g[None, :] / g.sum() ** 2)[None, None])

    def apply(self, x):
        k = self.kernel.repeat(x.shape[1], 1, 1, 1)
        return F.conv2d(F.pad(x, [3] * 4, mode="reflect"), k, groups=x.shape[1])


class Jpeg(StandIn):
    """JPEG re-encoding at quality 20 through PIL: no gradient flows (the classic masked defence)."""
    def apply(self, x):
        out = []
        for img in x.detach().clamp(0, 1):
            buf = io.BytesIO()
            Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=20)
            out.append(torch.from_numpy(np.asarray(Image.open(buf), dtype=np.float32) / 255.0)[None])
        return torch.stack(out) + 0.0 * x  # keeps x in the graph with an all-zero gradient


@pytest.fixture(scope="module")
def policy():
    p = load_policy()
    return {**p, "min_n": {"dwbox": N, "eot": N}}


def measure(tmp_path, defense, cls_ckpt, pur_ckpt, policy, name) -> dict:
    cfg = GC.GateConfig(purifier=str(pur_ckpt), classifier=str(cls_ckpt), n_images=N, batch_size=N,
                       threat_models=("paper",), norms=("linf",), modes=("dwbox",), steps=20, bare_steps=20, k=0,
                       grid_n=0, sanity_n=4, out_dir=str(tmp_path / name), sampler="ddpm", t_star=100,
                       num_inference_steps=10)
    ctx = GP.ctx_for(cfg, pur_ckpt, cls_ckpt, defense, load_meta(cls_ckpt), {"purifier": "x", "classifier": "y"},
                    torch.device("cpu"))
    ctx.state.mkdir(parents=True)
    m = GP.eval_batch(ctx, 0, 0, N)
    m["time_s"] = m["time_s"].sum()
    card = GR.build_card(ctx, m, False, GP.sanity(ctx, m), policy, 0.0, 1)
    return evaluate(card, policy)


def failed(v: dict, where: str = WHERE) -> set[str]:
    return {r["rule"] for r in v["rules"] if not r["passed"] and r["where"] in (where, "sanity check", "purified")}


def test_an_identity_purifier_is_rejected_as_the_bare_classifier(tmp_path, tiny_classifier_ckpt,
                                                                 tiny_diffusion_ckpt, policy):
    v = measure(tmp_path, Defense(Identity(), load_classifier(tiny_classifier_ckpt)), tiny_classifier_ckpt,
                tiny_diffusion_ckpt, policy, "identity")
    rule = next(r for r in v["rules"] if r["rule"] == "vs_bare" and r["where"] == WHERE)
    # the same attack on the same classifier: not a single image differs from the bare classifier's outcome
    assert not rule["passed"] and "discordant 0/0" in rule["detail"], rule


def test_a_blur_is_rejected(tmp_path, tiny_classifier_ckpt, tiny_diffusion_ckpt, policy):
    v = measure(tmp_path, Defense(Blur(), load_classifier(tiny_classifier_ckpt)), tiny_classifier_ckpt,
                tiny_diffusion_ckpt, policy, "blur")
    assert {"clean", "vs_bare"} & failed(v), v["reasons"]


def test_jpeg_re_encoding_is_rejected_as_masked_gradients(tmp_path, tiny_classifier_ckpt, tiny_diffusion_ckpt,
                                                          policy):
    v = measure(tmp_path, Defense(Jpeg(), load_classifier(tiny_classifier_ckpt)), tiny_classifier_ckpt,
                tiny_diffusion_ckpt, policy, "jpeg")
    assert {"loss_rise", "collapse"} <= failed(v), v["reasons"]  # PGD cannot move: the loss stays, 0.3 fails
    assert any(d["diagnostic"] == "zero_gradients" and d["raised"] for d in v["diagnostics"])


def test_a_purifier_with_random_weights_is_rejected(tmp_path, tiny_classifier_ckpt, tiny_diffusion_ckpt, policy):
    broken = tmp_path / "broken"
    gen = torch.Generator().manual_seed(0)
    weights = {k: (torch.randn(v.shape, generator=gen) * 5.0 if v.is_floating_point() else v)
               for k, v in load_weights(tiny_diffusion_ckpt).items()}
    save_checkpoint(broken, load_meta(tiny_diffusion_ckpt), weights)
    pur = Purifier(load_unet(broken), 100, "ddpm", 10)
    v = measure(tmp_path, Defense(pur, load_classifier(tiny_classifier_ckpt)), tiny_classifier_ckpt, broken, policy,
                "random")
    assert "clean" in failed(v), v["reasons"]  # noise in, noise out: the classifier sees no garments


def test_server_refuses_a_card_for_another_t_star(tmp_path, tiny_classifier_ckpt, tiny_diffusion_ckpt):
    """The Triton model's load path (PurifierService, settings from config.pbtxt) rejects a card measured
    with other purification settings, and a card without the EoT setting."""
    from dbp import repository
    from helpers import export_repo, load_services, write_card

    repo = export_repo(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt)
    load_services(repo)  # as exported: loads
    repository.set_parameter(repo / "purifier" / repository.CONFIG_FILE, "t_star", 50)
    with pytest.raises(repository.RepositoryError, match="t_star: served 50 vs card 100"):
        load_services(repo)
    repository.set_parameter(repo / "purifier" / repository.CONFIG_FILE, "t_star", 100)
    write_card(repo / "purifier" / "1" / repository.CARD_FILE, tiny_diffusion_ckpt, tiny_classifier_ckpt,
               modes=("dwbox",))
    with pytest.raises(repository.RepositoryError, match=r"strength \(paper linf eps=0.03137 eot\): setting missing"):
        load_services(repo)


def test_convergence_report_plots_accuracy_against_steps_and_eot(tmp_path, tiny_classifier_ckpt,
                                                                 tiny_diffusion_ckpt):
    from dbp import distributed
    cfg = GC.GateConfig(purifier=str(tiny_diffusion_ckpt), classifier=str(tiny_classifier_ckpt), n_images=4,
                       threat_models=("paper",), norms=("linf",), sampler="ddpm", num_inference_steps=10, t_star=100,
                       steps=2, k=2, out_dir=str(tmp_path))
    ctx = GP.build(cfg, distributed.Dist(0, 1, 0, torch.device("cpu")))
    res = G.convergence_report(ctx, steps=(1, 3), eots=(1, 2))
    assert len(res["points"]) == 4 and (tmp_path / "convergence.png").stat().st_size > 1000
    pts = res["points"]
    # best-iterate tracking: more DW-box steps never leave more images correct (same start, same noise)
    assert pts["paper:linf:dwbox:steps=3:eot=1"]["acc"] <= pts["paper:linf:dwbox:steps=1:eot=1"]["acc"]
    again = G.convergence_report(ctx, steps=(1, 3), eots=(1, 2))  # resumable: nothing recomputed
    assert again == res
    # another seed would draw other noise: its points must not be mixed with these
    other = GP.build(dataclasses.replace(cfg, seed=1), distributed.Dist(0, 1, 0, torch.device("cpu")))
    with pytest.raises(GC.GateError, match="different evaluation.*seed: saved 0 vs now 1"):
        G.convergence_report(other, steps=(1, 3), eots=(1, 2))
