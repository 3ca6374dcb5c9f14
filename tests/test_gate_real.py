"""The gate on real (tiny) models: an identity purifier is rejected by the margin over the bare classifier,
and a purifier with random weights is rejected by the paired comparison against a trained one."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dbp import config as C
from dbp import gate as G
from dbp.checkpoint import load_meta, load_weights, save_checkpoint
from dbp.models import Defense, load_classifier
from dbp.sanity_checks import IdentityPurifier
from training import gate

ARGS = ["--n_images", "32", "--batch_size", "16", "--norms", "linf", "--modes", "dwbox", "--threat_models", "paper",
        "--sampler", "ddpm", "--num_inference_steps", "10", "--steps", "3", "--k", "0", "--bare_steps", "5",
        "--grid_n", "0", "--threads", "1", "--sanity_n", "0"]


class Identity(IdentityPurifier):
    """The identity with the attributes a card records."""
    t_star, sampler, num_inference_steps, n_unet_calls = 0, "identity", 0, 0


def test_identity_purifier_is_rejected_by_the_gate(tmp_path, tiny_classifier_ckpt, tiny_diffusion_ckpt):
    cfg = G.GateConfig(purifier=str(tiny_diffusion_ckpt), classifier=str(tiny_classifier_ckpt), n_images=16,
                       batch_size=16, threat_models=("paper", "fashion"), norms=("linf",), modes=("dwbox",),
                       steps=20, bare_steps=20, k=0, grid_n=0, sanity_n=0, out_dir=str(tmp_path))
    clf = load_classifier(tiny_classifier_ckpt)
    ctx = G.ctx_for(cfg, tiny_diffusion_ckpt, tiny_classifier_ckpt, Defense(Identity(), clf), load_meta(
        tiny_classifier_ckpt), {"purifier": "x", "classifier": "y"}, torch.device("cpu"))
    m = G.eval_batch(ctx, 0, 0, 16)
    m["time_s"] = m["time_s"].sum()
    card = G.build_card(ctx, m, False, None, {}, 0.0, 1)
    th = {"margin": {"*": 0.0}, "fail_on_flags": [], "modes": ["dwbox"]}
    v = G.verdict(card, th)
    margin = [r for r in v["reasons"] if "does not show added robustness" in r]
    assert len(margin) == 2, v["reasons"]  # both threat models: the defence is the bare classifier
    # the same card under the old absolute rule (robust >= 10%) would not have said so
    old = G.verdict(card, {"min_robust": {"*": 0.0}, "fail_on_flags": []})
    assert not any("added robustness" in r for r in old["reasons"])


def test_random_weight_purifier_is_rejected_by_the_paired_comparison(tmp_path, tiny_classifier_ckpt,
                                                                     tiny_diffusion_ckpt):
    broken = tmp_path / "broken"
    gen = torch.Generator().manual_seed(0)
    weights = {k: (torch.randn(v.shape, generator=gen) * 5.0 if v.is_floating_point() else v)
               for k, v in load_weights(tiny_diffusion_ckpt).items()}
    save_checkpoint(broken, load_meta(tiny_diffusion_ckpt), weights)
    th = tmp_path / "th.json"
    th.write_text(json.dumps({"fail_on_flags": [], "alpha": 0.05}))
    base = ["--classifier", str(tiny_classifier_ckpt), "--thresholds", str(th)] + ARGS
    gate.main(base + ["--purifier", str(tiny_diffusion_ckpt), "--out_dir", str(tmp_path / "base")])
    baseline = tmp_path / "base" / "card.json"
    assert gate.main(base + ["--purifier", str(broken), "--out_dir", str(tmp_path / "cand"),
                             "--baseline_card", str(baseline)]) == 1
    card = json.loads((tmp_path / "cand" / "card.json").read_text())
    res = card["comparison"]["settings"]["linf-dwbox"]
    assert res["verdict"] == "significantly_worse" and not res["promotable"], res
    assert res["ci95"][1] < 0 and res["table"]["only_baseline_right"] > res["table"]["only_candidate_right"]
    assert any("significantly worse than the baseline" in r for r in card["gate"]["reasons"])
    # outcomes are bound to the images and seeds: a run with another seed is not comparable
    assert gate.main(base + ["--purifier", str(tiny_diffusion_ckpt), "--out_dir", str(tmp_path / "seed1"),
                             "--seed", "1", "--baseline_card", str(baseline)]) == 1
    card = json.loads((tmp_path / "seed1" / "card.json").read_text())
    assert any("not comparable" in r for r in card["comparison"]["reasons"])


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
    with pytest.raises(repository.RepositoryError, match="no paper linf eps=0.03137 eot setting"):
        load_services(repo)


def test_convergence_report_plots_accuracy_against_steps_and_eot(tmp_path, tiny_classifier_ckpt,
                                                                 tiny_diffusion_ckpt):
    from dbp import distributed
    cfg = G.GateConfig(purifier=str(tiny_diffusion_ckpt), classifier=str(tiny_classifier_ckpt), n_images=4,
                       threat_models=("paper",), norms=("linf",), sampler="ddpm", num_inference_steps=10, steps=2,
                       k=2, out_dir=str(tmp_path))
    ctx = G.build(cfg, distributed.Dist(0, 1, 0, torch.device("cpu")))
    res = G.convergence_report(ctx, steps=(1, 3), eots=(1, 2))
    assert len(res["points"]) == 4 and (tmp_path / "convergence.png").stat().st_size > 1000
    pts = res["points"]
    # best-iterate tracking: more DW-box steps never leave more images correct (same start, same noise)
    assert pts["paper:linf:dwbox:steps=3:eot=1"]["acc"] <= pts["paper:linf:dwbox:steps=1:eot=1"]["acc"]
    again = G.convergence_report(ctx, steps=(1, 3), eots=(1, 2))  # resumable: nothing recomputed
    assert again == res
    # another seed would draw other noise: its points must not be mixed with these
    other = G.build(dataclasses.replace(cfg, seed=1), distributed.Dist(0, 1, 0, torch.device("cpu")))
    with pytest.raises(C.ConfigError, match="different evaluation.*seed: saved 0 vs now 1"):
        G.convergence_report(other, steps=(1, 3), eots=(1, 2))
