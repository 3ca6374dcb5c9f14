"""dbp.gate.verdict and dbp.gate.policy: the verdict recomputed from a card's per-image evidence under the pinned
policy. Pure functions on synthetic cards (helpers.synthetic_card: a card that passes, bent one way per test).

Each test guards one rule; checked by mutation on 2026-12-06: deleting the `vs_bare` rule in `_Judge.setting`
makes the identity and random-weights tests fail; making `loss_rise` always pass fails the flat-loss test;
dropping the non-inferiority rule fails the baseline test; treating `attack_ineffective` as a rule fails the
diagnostic test; lowering FLOOR["min_n"]["dwbox"] to 64 fails the floor test.
"""
from __future__ import annotations

import copy
import json
import sys
import subprocess

import pytest

from dbp.gate import policy as P
from dbp.gate.verdict import evaluate, find_setting
from dbp.paired import OutcomeRecord
from helpers import synthetic_card


@pytest.fixture(scope="module")
def good(tiny_diffusion_ckpt, tiny_classifier_ckpt):
    return synthetic_card(tiny_diffusion_ckpt, tiny_classifier_ckpt, sign=False)


@pytest.fixture(scope="module")
def make(tiny_diffusion_ckpt, tiny_classifier_ckpt):
    return lambda **kw: synthetic_card(tiny_diffusion_ckpt, tiny_classifier_ckpt, sign=False, **kw)


def failed(v: dict) -> set[str]:
    return {r["rule"] for r in v["rules"] if not r["passed"]}


def set_outcomes(s: dict, bits: list[int]) -> None:
    """Replace a setting's outcomes consistently (record, figures, expected hits)."""
    rec = OutcomeRecord.build(bits, indices=range(len(bits)), seeds=7, dataset="fashion_mnist", split="test",
                              setting=s["name"])
    s["outcomes"] = rec.to_dict()
    s["robust"]["acc"] = s["worst_case"]["acc"] = rec.accuracy
    if s.get("expected_per_image"):
        s["expected_per_image"] = {"k": 10, "hits": [10 * b for b in bits], "outcomes_sha256": rec.sha256}
        s["robust_expected"]["acc"] = rec.accuracy


def test_the_verdict_module_is_torch_free():
    code = "import sys, dbp.gate.verdict, dbp.gate.signing; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_purifier_well_above_the_bare_classifier_passes(good):
    v = evaluate(good)
    assert v["passed"], v["reasons"]
    assert {r["rule"] for r in v["rules"]} >= {"strength", "evidence", "clean", "vs_bare", "loss_rise", "collapse",
                                               "transfer", "baseline"}


def test_an_identity_purifier_is_rejected(make):
    """The bare classifier behind an identity 'purifier': robust = bare on every image."""
    v = evaluate(make(robust=0.05, bare=0.05))
    assert failed(v) == {"vs_bare", "served_votes"}  # the voted defence is as weak
    assert sum(not r["passed"] for r in v["rules"] if r["rule"] == "vs_bare") == 4  # both norms, both modes


def test_a_small_gain_over_the_bare_classifier_is_not_enough(make):
    """Significant (McNemar p < 0.01) but not by +10 points at the paired lower bound."""
    v = evaluate(make(robust=0.15, bare=0.05))
    bad = [r for r in v["rules"] if r["rule"] == "vs_bare" and not r["passed"]]
    assert bad and all("lower bound >= +10%" in r["detail"] for r in bad)


def test_random_weights_and_a_blur_fail_on_clean_accuracy(make):
    """Random weights classify ~10% of clean images right; a Gaussian blur strong enough to wash out
    perturbations costs the classifier its clean accuracy (both fall below the policy's floor)."""
    v = evaluate(make(clean=0.10, robust=0.06, bare=0.05))
    assert {"clean", "vs_bare"} <= failed(v)
    v = evaluate(make(clean=0.70))
    assert failed(v) == {"clean"}


def test_jpeg_style_gradient_masking_fails_the_collapse_and_transfer_checks(good):
    """A non-differentiable preprocessor (JPEG re-encoding) resists white-box gradients, not attacks: the
    l_inf 0.3 attack no longer collapses it, and images attacked on the bare classifier do better."""
    card = copy.deepcopy(good)
    card["sanity_checks"]["large_budget_not_collapsed"]["outcomes"] = [1] * 6 + [0] * 2
    card["sanity_checks"]["transfer_beats_white_box"]["outcomes"] = [0] * 8
    assert failed(evaluate(card)) == {"collapse", "transfer"}


def test_a_flat_attack_loss_fails(good):
    card = copy.deepcopy(good)
    card["settings"][0]["loss_trajectory"] = [0.7] * 20
    assert failed(evaluate(card)) == {"loss_rise"}


def test_attack_ineffective_is_a_diagnostic_not_a_reason(make):
    """Robust inside the clean interval (the old unpaired check that fired at n = 16 for real 15-20 point drops)
    is printed, and the card still passes on its paired rules."""
    v = evaluate(make(robust=0.85, clean=0.9))
    assert v["passed"], v["reasons"]
    assert any(d["diagnostic"] == "attack_ineffective" and d["raised"] for d in v["diagnostics"])


def test_strength_and_sizes_come_from_the_policy(make):
    assert "n=64 < 256" in " ".join(evaluate(make(n={"dwbox": 64}))["reasons"])
    assert "n=16 < 64" in " ".join(evaluate(make(n={"eot": 16}))["reasons"])
    assert "EoT-2 < 10" in " ".join(evaluate(make(eot=2))["reasons"])
    v = evaluate(make(threat_models=("paper",)))  # the reported Fashion-MNIST budget must be measured too
    assert "strength (fashion linf eps=0.1 dwbox): setting missing" in v["reasons"]


def test_figures_must_be_the_evidence(good):
    card = copy.deepcopy(good)
    card["settings"][1]["worst_case"]["acc"] = 0.99
    assert "shown robust accuracy 0.99 is not its outcomes'" in " ".join(evaluate(card)["reasons"])
    card = copy.deepcopy(good)
    card["clean"]["purified"]["acc"] = 0.99
    assert failed(evaluate(card)) == {"evidence"}
    card = copy.deepcopy(good)
    card["settings"][0]["outcomes"]["outcomes"] = "1" * card["settings"][0]["n"]  # digest no longer matches
    assert "fails its sha256 check" in " ".join(evaluate(card)["reasons"])
    card = copy.deepcopy(good)
    card["data"]["indices"] = list(range(1000, 1000 + card["data"]["n"]))  # outcomes of other images
    assert "not on the card's images" in " ".join(evaluate(card)["reasons"])


def test_a_card_from_a_dirty_tree_fails(good):
    assert failed(evaluate({**copy.deepcopy(good), "git_commit": "abc123-dirty"})) == {"provenance"}


def test_the_card_must_be_measured_under_the_pinned_policy(good):
    card = copy.deepcopy(good)
    card["policy"]["sha256"] = "f" * 64
    assert failed(evaluate(card)) == {"policy"}
    card = {**copy.deepcopy(good), "schema": "dbp.robustness_card/2"}
    assert "schema" in failed(evaluate(card))


def test_baseline_non_inferiority_and_superiority(good):
    """Against the deployed version on the same images: a 5-point loss on one setting fails non-inferiority even
    when another setting is better; an equal model fails superiority."""
    card = copy.deepcopy(good)
    s = find_setting(card, "paper", "l2", "dwbox")
    n = s["n"]
    set_outcomes(s, [1] * round(0.55 * n) + [0] * (n - round(0.55 * n)))  # baseline has 60% there
    v = evaluate(card)
    assert failed(v) == {"baseline"} and "non-inferiority" in " ".join(v["reasons"])
    card = copy.deepcopy(good)
    for name, b in card["baseline"]["settings"].items():
        s = next(x for x in card["settings"] if x["name"] == name)
        b["outcomes"], b["expected_per_image"] = s["outcomes"], s["expected_per_image"]
    v = evaluate(card)
    assert failed(v) == {"baseline"} and "superiority (Holm" in " ".join(v["reasons"])


def test_eot_settings_are_compared_on_expected_accuracy(good):
    """Same single-shot outcomes as the baseline, but fewer purifications right per image: the sign-flip test on
    per-image hits sees it (McNemar on the booleans could not)."""
    card = copy.deepcopy(good)
    s = find_setting(card, "paper", "linf", "eot")
    b = card["baseline"]["settings"][s["name"]]
    b["outcomes"] = s["outcomes"]
    b["expected_per_image"] = copy.deepcopy(s["expected_per_image"])
    s["expected_per_image"]["hits"] = [max(0, h - 3) if h else 0 for h in s["expected_per_image"]["hits"]]
    s["robust_expected"]["acc"] = sum(s["expected_per_image"]["hits"]) / (10 * s["n"])
    v = evaluate(card)
    assert "expected accuracy over k=10" in " ".join(v["reasons"])


def test_the_shipped_policy_meets_the_floor_and_a_weaker_one_does_not():
    pol = P.load_policy()
    assert pol["min_n"] == {"dwbox": 256, "eot": 64} and pol["vs_bare"]["alpha"] <= 0.01
    raw = json.loads(P.POLICY_FILE.read_text())
    for edit, words in [(("min_n", "dwbox", 64), "min_n.dwbox 64 is below the floor"),
                        (("vs_bare", "alpha", 0.05), "vs_bare.alpha 0.05 is above"),
                        (("vs_bare", "min_lower_bound", 0.0), "vs_bare.min_lower_bound 0.0 is below"),
                        (("declared", "modes", ["dwbox"]), "declared.modes must be"),
                        (("baseline", "non_inferiority_margin", 0.1), "non_inferiority_margin 0.1 is above"),
                        (("attack", "min_steps", 5), "attack.min_steps 5 is below")]:
        weaker = copy.deepcopy(raw)
        weaker[edit[0]][edit[1]] = edit[2]
        assert any(words in p for p in P.floor_problems(weaker)), (edit, P.floor_problems(weaker))
    assert not P.floor_problems(raw)


def test_the_served_maximum_votes_must_be_attacked(make):
    """Issue 20: the server lets a client ask for up to max_votes purifications per image, so the card must hold
    that defence attacked (on the declared threat models, >= 10 purifications per step). Mutation-checked
    (2026-12-06): without `_Judge.served_votes` each of these cards passes."""
    assert evaluate(make(votes=16))["passed"]
    assert evaluate(make(votes=1))["passed"]  # one vote served: the EoT rows are the served setting
    card = make(votes=16)
    del card["served_votes"]
    assert failed(evaluate(card)) == {"served_votes"}
    card = make(votes=16)
    card["served_votes"]["rows"] = card["served_votes"]["rows"][:1]  # l_2 not attacked with votes
    assert "the served maximum VOTES was not attacked" in " ".join(evaluate(card)["reasons"])
    v = evaluate(make(votes=16, voted_robust=0.05))  # the voted defence is no better than the bare classifier
    assert failed(v) == {"served_votes"} and "does not beat the bare classifier" in " ".join(v["reasons"])
    card = make(votes=4)
    for r in card["served_votes"]["rows"]:
        r["attack"]["eot"] = 1  # 4 purifications per gradient step: weaker than the EoT rows' 10
    assert "4 purifications per step < 10" in " ".join(evaluate(card)["reasons"])
    card = make(votes=16)
    card["served_votes"]["rows"][0]["robust"]["acc"] = 0.99
    assert "shown robust accuracy is not its outcomes'" in " ".join(evaluate(card)["reasons"])


def test_the_server_serves_only_the_maximum_votes_the_card_attacked(tiny_diffusion_ckpt, tiny_classifier_ckpt):
    from dbp.card import card_passes_for
    from helpers import DEFAULT_PURIFICATION

    weights = {"purifier": tiny_diffusion_ckpt, "classifier": tiny_classifier_ckpt}
    card = synthetic_card(tiny_diffusion_ckpt, tiny_classifier_ckpt, votes=4)
    served = {**DEFAULT_PURIFICATION, "max_votes": "16"}
    ok, why = card_passes_for(card, weights, served)
    assert not ok and "allows up to 16 VOTES but the card attacked 4 as the maximum" in why
    assert card_passes_for(card, weights, {**served, "max_votes": "4"})[0]
    assert not card_passes_for(card, weights, {**served, "max_votes": "2"})[0]  # 2 votes were never attacked
    assert card_passes_for(card, weights, {**served, "max_votes": "1"})[0]  # one vote: the EoT rows


def test_expected_accuracy_is_computed_from_the_integer_hits():
    """The card's shown expected accuracy must be sum(hits) / (k n), which the verdict recomputes with a 1e-9
    tolerance. Averaging the float32 fractions instead drifted by 2.7e-9 on a real card (hits below; 0.4 in
    float32 is 0.40000000596) and the signed card failed its own evidence check."""
    import torch

    from dbp.gate.report import expected_summary
    from dbp.gate.verdict import FIGURE_TOL

    hits = [10, 10, 10, 10, 0, 10, 4, 6, 5, 10, 3, 10, 10, 10, 1, 10]
    fractions = torch.tensor(hits, dtype=torch.float32) / 10
    assert abs(float(fractions.double().mean()) - sum(hits) / 160) > FIGURE_TOL  # the drift the fix removes
    summary, got = expected_summary(fractions, 10)
    assert got == hits and summary["k"] == 10 and summary["n"] == 16
    assert abs(summary["acc"] - sum(hits) / 160) <= 1e-15
