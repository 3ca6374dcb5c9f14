"""Robustness protocols, intervals, the gate CLI (cards, the pinned policy, signing, resume, torchrun shards) and
card_passes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dbp.card import SCHEMA, card_bound_to, card_passes, load_card
from dbp.checkpoint import load_meta, load_weights, save_checkpoint
from dbp.models import Defense, Purifier
from dbp.robustness import (expected_correct, is_randomized, mean_interval, sanity_flags, single_shot, wilson)
from training import gate

ROOT = Path(__file__).resolve().parents[2]

# 8 images in 2 batches, l_inf, both settings, DDPM with 2 UNet calls: seconds per run, every code path
EVAL_ARGS = ["--n_images", "8", "--batch_size", "4", "--norms", "linf", "--modes", "dwbox,eot", "--sampler", "ddpm", "--t_star", "100",
             "--num_inference_steps", "10", "--steps", "2", "--eot", "2", "--k", "2", "--bare_steps", "5",
             "--grid_n", "4", "--threads", "1", "--threat_models", "paper", "--sanity_n", "2"]


def ckpt_args(cls_ckpt, diff_ckpt):
    return ["--purifier", str(diff_ckpt), "--classifier", str(cls_ckpt)]


def per_sample(state: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(state.glob("batch_*.safetensors")):
        for k, v in load_file(f).items():
            if k != "time_s":
                out[f"{f.stem}/{k}"] = v
    return out


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_classifier_ckpt, tiny_diffusion_ckpt):
    out = tmp_path_factory.mktemp("gate") / "full"
    rc = gate.main(ckpt_args(tiny_classifier_ckpt, tiny_diffusion_ckpt) + EVAL_ARGS
                   + ["--out_dir", str(out), "--gate", "false"])
    assert rc == 0
    return out


# ---- protocols and intervals ------------------------------------------------------------------------

def test_wilson_matches_known_values():
    lo, hi = wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and abs(hi - 0.1611) < 1e-3
    assert mean_interval([1, 0, 1, 1]) == wilson(3, 4)
    lo, hi = mean_interval([0.5, 0.75, 1.0, 0.25, 0.5])
    assert lo < 0.6 < hi and hi - lo < wilson(3, 5)[1] - wilson(3, 5)[0]


def test_protocols_and_randomness_check(tiny_models, fashion_test):
    eps_net, classifier = tiny_models
    defense = Defense(Purifier(eps_net, sampler="ddim", num_inference_steps=10), classifier)
    x, y = fashion_test.float01(slice(0, 4)), fashion_test.labels[:4]
    score = expected_correct(defense, x, y, k=5, generator=torch.Generator().manual_seed(0), max_rows=8)
    assert score.shape == (4,) and ((score * 5).round() == score * 5).all()
    assert ((score >= 0) & (score <= 1)).all()
    noise = defense.purifier.sample_noise(x, torch.Generator().manual_seed(1))
    assert torch.equal(single_shot(defense, x, y, noise=noise), single_shot(defense, x, y, noise=noise))
    assert is_randomized(defense, x) and not is_randomized(classifier, x)


def test_sanity_flags_fire_on_their_conditions():
    ok = sanity_flags(clean_acc=0.8, robust_acc=0.4, zero_grad_frac=0.0, randomized=True, mode="eot", eot=10,
                      bare_robust_acc=0.0)
    assert not any(f["raised"] for f in ok.values())
    bad = sanity_flags(clean_acc=0.4, robust_acc=0.5, zero_grad_frac=0.25, randomized=True, mode="eot", eot=1,
                       bare_robust_acc=0.3)
    assert all(f["raised"] for f in bad.values())
    dw = sanity_flags(clean_acc=0.8, robust_acc=0.4, zero_grad_frac=0.0, randomized=True, mode="dwbox", eot=1,
                      bare_robust_acc=0.0)
    assert not dw["randomness_without_eot"]["raised"]  # DW-box fixes the noise: EoT=1 is the definition


# ---- the gate CLI ----------------------------------------------------------------------------------------

def test_card_contents_and_plots(full_run, tiny_classifier_ckpt, tiny_diffusion_ckpt):
    card = load_card(full_run / "card.json")
    assert card["schema"] == SCHEMA and card["data"]["n"] == 8
    assert {s["name"] for s in card["settings"]} == {"linf-dwbox", "linf-eot"}
    for s in card["settings"]:
        lo, hi = s["robust"]["ci95"]
        assert 0 <= lo <= s["robust"]["acc"] <= hi <= 1
        assert len(s["loss_trajectory"]) == 2 and s["forward_passes_per_sample"]["unet_calls_per_pass"] == 2
        assert set(s["flags"]) == {"robust_above_clean", "zero_gradients", "randomness_without_eot",
                                   "bare_not_collapsed", "attack_ineffective"}
        assert s["worst_case"]["acc"] <= s["robust"]["acc"] and len(s["outcomes"]["outcomes"]) == s["n"]
        assert not any(str(v).startswith("/") for v in (card["model"]["purifier"], card["model"]["classifier"]))
    dw = next(s for s in card["settings"] if s["mode"] == "dwbox")
    eot = next(s for s in card["settings"] if s["mode"] == "eot")
    assert dw["robust"]["acc"] <= dw["clean"]["acc"]  # same fixed noise for both: robust <= clean
    assert eot["attack"]["eot"] == 2 and eot["robust_expected"]["k"] == 2 and dw["robust_expected"] is None
    hits = eot["expected_per_image"]  # per image, bound to the outcomes: the mean is the card's expected accuracy
    assert hits["k"] == 2 and len(hits["hits"]) == eot["n"] and hits["outcomes_sha256"] == eot["outcomes"]["sha256"]
    assert sum(hits["hits"]) / (2 * eot["n"]) == pytest.approx(eot["robust_expected"]["acc"])
    assert dw["expected_per_image"] is None
    assert dw["fresh_noise"]["n"] == 8 and dw["last_iterate"]["acc"] >= dw["robust"]["acc"]  # best <= last
    assert set(card["sanity_checks"]) >= {"large_budget_not_collapsed", "eot_gradient_inconsistent",
                                          "transfer_beats_white_box"}
    assert card["randomized"] is True and card["git_commit"] and card["binding"]
    assert card["gate"]["passed"] is False  # --gate false never produces a passing card
    # the verdict's evidence: per image, on the card's images, the bare classifier and the clean defence too
    assert card["data"]["indices"] == list(range(8)) and len(card["data"]["images_sha256"]) == 64
    assert len(card["clean"]["evidence"]["purified"]) == 8
    assert all(len(s["bare_outcomes"]) == len(s["clean_outcomes"]) == s["n"] for s in card["settings"])
    assert len(card["sanity_checks"]["large_budget_not_collapsed"]["outcomes"]) == 2
    assert len(card["sanity_checks"]["transfer_beats_white_box"]["white_box"]) == 2
    for png in ("accuracy.png", "grid.png", "loss.png"):
        assert (full_run / png).stat().st_size > 1000
    ok, why = card_passes(card, tiny_diffusion_ckpt, tiny_classifier_ckpt)
    assert not ok and "not signed" in why


def test_the_gate_signs_and_judges_under_the_pinned_policy(full_run, tiny_classifier_ckpt, tiny_diffusion_ckpt,
                                                            tmp_path, capsys, monkeypatch):
    from dbp.gate import signing
    from helpers import TEST_SIGNING_KEY
    monkeypatch.setenv(signing.SIGNING_KEY_ENV, str(TEST_SIGNING_KEY))
    before = {f: f.stat().st_mtime_ns for f in (full_run / "state").glob("batch_*")}
    args = ckpt_args(tiny_classifier_ckpt, tiny_diffusion_ckpt) + EVAL_ARGS + ["--out_dir", str(full_run)]
    assert gate.main(args) == 1  # a smoke-strength run never passes
    card = load_card(full_run / "card.json")
    assert signing.verify(card) and card["policy"]["sha256"]
    reasons = " ".join(card["gate"]["reasons"])
    assert "PGD-2 < 20 steps" in reasons and "EoT-2 < 10" in reasons and "n=8 < 256" in reasons
    assert "strength (paper l2 eps=0.5 dwbox): setting missing" in reasons  # --norms linf: l_2 unmeasured
    assert "FAIL  strength" in capsys.readouterr().out  # the rule table is printed
    assert {f: f.stat().st_mtime_ns for f in (full_run / "state").glob("batch_*")} == before  # nothing re-run
    ok, why = card_passes(card, tiny_diffusion_ckpt, tiny_classifier_ckpt)  # signed, and still refused
    assert not ok and "PGD-2 < 20 steps" in why

    # the baseline's per-image evidence travels in the card; another noise draw is not comparable
    assert gate.main(args + ["--baseline_card", str(full_run / "card.json")]) == 1
    card = load_card(full_run / "card.json")
    assert card["baseline"]["purifier_sha256"] == card["model"]["purifier_sha256"]
    assert not any("not comparable" in r for r in card["gate"]["reasons"])
    base = json.loads((full_run / "card.json").read_text())
    for st in base["settings"]:
        st["outcomes"]["seeds"] = 999
    baseline = write_json(tmp_path / "baseline.json", base)
    assert gate.main(args + ["--baseline_card", str(baseline)]) == 1
    assert "not comparable with the baseline" in capsys.readouterr().err


def test_card_passes_rejects_other_weights(full_run, tiny_classifier_ckpt, tiny_diffusion_ckpt, tmp_path):
    card = json.loads((full_run / "card.json").read_text())
    card["gate"] = {"passed": True, "reasons": [], "thresholds": {}}
    ok, why = card_bound_to(card, {"purifier": tiny_diffusion_ckpt, "classifier": tiny_classifier_ckpt})
    assert ok, why
    ok, why = card_passes(card, tiny_diffusion_ckpt, tiny_classifier_ckpt)
    assert not ok and "signature" in why  # unsigned, or signed before `passed` was set by hand
    other = tmp_path / "cls2"
    weights = {k: v + 1e-3 if v.is_floating_point() else v for k, v in load_weights(tiny_classifier_ckpt).items()}
    save_checkpoint(other, load_meta(tiny_classifier_ckpt), weights)
    ok, why = card_bound_to(card, {"purifier": tiny_diffusion_ckpt, "classifier": other})
    assert not ok and "classifier weights" in why and "not the weights the card was computed on" in why
    ok, why = card_passes(card, tiny_diffusion_ckpt, tmp_path / "missing")
    assert not ok and "cannot hash" in why
    ok, why = card_passes({**card, "schema": "other/1"}, tiny_diffusion_ckpt, tiny_classifier_ckpt)
    assert not ok and "schema" in why
    edited = json.loads(json.dumps(card))
    edited["model"]["purification"]["t_star"] = 50
    ok, why = card_bound_to(edited, {"purifier": tiny_diffusion_ckpt})
    assert not ok and "binding hash" in why


def test_resume_continues_from_saved_batches(full_run, tiny_classifier_ckpt, tiny_diffusion_ckpt, tmp_path, capsys):
    out = tmp_path / "resumed"
    args = ckpt_args(tiny_classifier_ckpt, tiny_diffusion_ckpt) + EVAL_ARGS + ["--out_dir", str(out), "--gate", "false"]
    assert gate.main(args + ["--max_batches", "1"]) == 3  # interrupted: one of two batches saved, no card
    assert "Rerun the same command" in capsys.readouterr().err
    assert len(list((out / "state").glob("batch_*"))) == 1 and not (out / "card.json").exists()
    first = (out / "state" / "batch_00000.safetensors").stat().st_mtime_ns
    assert gate.main(args) == 0
    assert (out / "state" / "batch_00000.safetensors").stat().st_mtime_ns == first  # not recomputed
    got, want = per_sample(out / "state"), per_sample(full_run / "state")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
    # a changed evaluation must not mix with the saved results
    with pytest.raises(SystemExit) as e:
        gate.main(args[:-2] + ["--steps", "3", "--gate", "false"])
    assert e.value.code == 2 and "steps" in capsys.readouterr().err


def test_a_gate_json_next_to_the_model_changes_nothing(full_run, tiny_classifier_ckpt, tiny_diffusion_ckpt,
                                                       tmp_path):
    """Thresholds found beside a checkpoint used to replace the rules; the policy is pinned now."""
    repo = tmp_path / "model_repository"
    shutil.copytree(tiny_diffusion_ckpt, repo / "purifier" / "1" / "weights")
    shutil.copytree(tiny_classifier_ckpt, repo / "classifier" / "1" / "weights")
    write_json(repo / "purifier" / "1" / "gate.json", {"min_n": {"dwbox": 1}, "vs_bare": {"alpha": 1.0}})
    out = tmp_path / "repo-gate"
    shutil.copytree(full_run / "state", out / "state")  # same weights and settings: the saved results apply
    assert gate.main(["--repository", str(repo), "--version", "1", "--out_dir", str(out)] + EVAL_ARGS) == 1
    card = load_card(out / "card.json")
    from dbp.gate.policy import load_policy
    assert card["model"]["version"] == 1 and card["policy"]["sha256"] == load_policy()["sha256"]
    assert "n=8 < 256" in " ".join(card["gate"]["reasons"])


def test_torchrun_shards_match_single_process(full_run, tiny_classifier_ckpt, tiny_diffusion_ckpt, tmp_path):
    out = tmp_path / "sharded"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
           "-m", "training.gate"] + ckpt_args(tiny_classifier_ckpt, tiny_diffusion_ckpt) + EVAL_ARGS \
        + ["--out_dir", str(out), "--gate", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_card(out / "card.json")["world_size"] == 2
    got, want = per_sample(out / "state"), per_sample(full_run / "state")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


@pytest.mark.parametrize("argv, message", [
    (["--purifier", "x"], "--classifier"),
    (["--repository", "r"], "--version"),
    (["--purifier", "p", "--classifier", "c", "--norms", "linf,l1"], "--norms"),
    (["--purifier", "p", "--classifier", "c", "--eot", "0"], "--eot"),
    (["--purifier", "p", "--classifier", "c", "--sampler", "euler"], "--sampler"),
    (["--purifier", "p", "--classifier", "c", "--bogus", "1"], "bogus"),
    (["--purifier", "/nonexistent/p", "--classifier", "/nonexistent/c"], "cannot load"),
])
def test_bad_input_exits_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gate.main(argv + ["--threads", "1"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_thresholds_cannot_be_passed_on_the_command_line(full_run, tiny_classifier_ckpt, tiny_diffusion_ckpt,
                                                          tmp_path):
    bad = write_json(tmp_path / "lenient.json", {"min_n": {"dwbox": 1}})
    r = subprocess.run([sys.executable, "-m", "training.gate"]
                       + ckpt_args(tiny_classifier_ckpt, tiny_diffusion_ckpt) + EVAL_ARGS
                       + ["--out_dir", str(full_run), "--thresholds", str(bad)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "thresholds" in r.stderr
