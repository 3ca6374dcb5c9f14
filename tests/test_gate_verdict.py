"""dbp.gate.verdict on synthetic cards: the margin over the bare classifier on interval bounds, the served
setting always attacked, flags and sanity checks that fail a card, the attack-strength rules, and the paired
comparison (McNemar) against a baseline. Pure functions: milliseconds per test."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from dbp.card import THREAT_MODELS
from dbp.gate import ALL_FLAGS, CHECK_FLAGS, SETTING_FLAGS, check_thresholds, verdict
from dbp.paired import OutcomeRecord
from dbp.robustness import summarize

ROOT = Path(__file__).resolve().parent.parent
CPU = json.loads((ROOT / "configs" / "gate-fashion-cpu.json").read_text())


def stat(acc: float, n: int) -> dict:
    k = round(acc * n)
    return summarize([1.0] * k + [0.0] * (n - k), "synthetic")


def outcomes(acc: float, n: int, name: str, seed: int = 7) -> dict:
    k = round(acc * n)
    return OutcomeRecord.build([True] * k + [False] * (n - k), indices=range(n), seeds=seed, dataset="fashion_mnist",
                               split="test", setting=name).to_dict()


def card(robust: float = 0.6, bare: float = 0.1, clean: float = 0.85, n=None, modes=("dwbox", "eot"),
         raised=(), checks_raised=(), expected: bool = True) -> dict:
    n = {"dwbox": 64, "eot": 16, **(n or {})}
    settings = []
    for tm, norms in THREAT_MODELS.items():
        for norm, (eps, step) in norms.items():
            for md in modes:
                name = f"{norm}-{md}" + ("" if tm == "paper" else f"@{tm}")
                settings.append({
                    "name": name, "threat_model_name": tm, "threat_model": norm, "eps": eps, "step": step,
                    "mode": md, "n": n[md], "attack": {"algorithm": "PGD", "steps": 20, "eot": 10 if md == "eot" else 1},
                    "clean": stat(clean, n[md]), "robust": stat(robust, n[md]), "worst_case": stat(robust, n[md]),
                    "robust_expected": stat(robust, n[md]) if md == "eot" and expected else None,
                    "bare_robust": stat(bare, n["dwbox"]), "outcomes": outcomes(robust, n[md], name),
                    "flags": {f: {"raised": f in raised, "value": 0, "detail": ""} for f in SETTING_FLAGS}})
    return {"schema": "dbp.robustness_card/2", "randomized": True, "clean": {"bare": stat(0.9, 64)},
            "settings": settings, "requirements": {k: CPU[k] for k in ("threat_models", "modes", "min_n", "min_steps",
                                                                          "min_eot")},
            "sanity_checks": {f: {"raised": f in checks_raised, "detail": f"{f} detail"} for f in CHECK_FLAGS},
            "git_commit": "0" * 40}


def test_a_purifier_well_above_the_bare_classifier_passes():
    v = verdict(card(), CPU, "configs/gate-fashion-cpu.json")
    assert v["passed"], v["reasons"]


def test_an_identity_purifier_is_rejected_by_the_margin():
    """Robust accuracy = the bare classifier's (the old absolute 10% threshold let this through)."""
    v = verdict(card(robust=0.15, bare=0.15), CPU)
    assert not v["passed"]
    assert sum("does not show added robustness" in r for r in v["reasons"]) == 6  # every setting
    old_style = {"min_clean_bare": 0.88, "min_clean": 0.80, "min_robust": {"*": 0.10}, "bare_robust_max": 0.40}
    assert not any("added robustness" in r for r in verdict(card(robust=0.15, bare=0.15), old_style)["reasons"])


def test_the_margin_is_judged_on_interval_bounds():
    # 16 EoT images at 40% vs a bare 10% of 64: point estimates 30 points apart, but the lower bound of
    # 6/16 (~18%) is not above 10%'s upper bound (~19%) + 5 points
    v = verdict(card(robust=0.4, bare=0.1), CPU)
    eot = [r for r in v["reasons"] if "-eot" in r]
    dw = [r for r in v["reasons"] if "-dwbox" in r]
    assert eot and all("lower bound" in r for r in eot) and not dw


def test_the_served_setting_must_be_attacked():
    v = verdict(card(modes=("dwbox",)), CPU)
    assert not v["passed"] and any("eot setting" in r for r in v["reasons"])
    v = verdict(card(expected=False), CPU)
    assert any("no expected accuracy" in r for r in v["reasons"])


@pytest.mark.parametrize("flag", ["attack_ineffective", "bare_not_collapsed", "zero_gradients"])
def test_raised_setting_flags_fail_the_card(flag):
    v = verdict(card(raised=(flag,)), CPU)
    assert not v["passed"] and any(flag in r for r in v["reasons"])


@pytest.mark.parametrize("flag", CHECK_FLAGS)
def test_raised_sanity_checks_fail_the_card(flag):
    v = verdict(card(checks_raised=(flag,)), CPU)
    assert not v["passed"] and any(f"sanity check {flag}" in r for r in v["reasons"])
    c = card()
    c["sanity_checks"] = None
    assert any("no sanity checks ran" in r for r in verdict(c, CPU)["reasons"])


def test_too_few_images_fail_even_with_a_lenient_file():
    lenient = {**CPU, "min_n": {"dwbox": 1, "eot": 1}, "min_steps": 1, "min_eot": 1}
    c = card(n={"dwbox": 64, "eot": 8})
    c["requirements"] = {**c["requirements"], "min_n": {"dwbox": 64, "eot": 16}}
    assert any("n=8 < the minimum 16" in r for r in verdict(c, lenient)["reasons"])
    c = card()
    for s in c["settings"]:
        s["attack"]["steps"] = 5
    c["requirements"]["min_steps"] = 1  # below the code's floor of 20
    assert any("PGD-5 < the minimum 20" in r for r in verdict(c, lenient)["reasons"])


def test_no_thresholds_fail():
    assert any("no thresholds configured" in r for r in verdict(card(), None)["reasons"])


def test_thresholds_are_validated():
    check_thresholds(CPU)
    for bad, words in [({"margin": 2}, "margin"), ({"min_n": {"dwbox": 0}}, "min_n"), ({"bogus": 1}, "unknown"),
                       ({"threat_models": ["cifar"]}, "threat_models"), ({"fail_on_flags": ["nope"]}, "fail_on")]:
        with pytest.raises(ValueError, match=words):
            check_thresholds(bad)
    assert set(ALL_FLAGS) >= {"attack_ineffective", "large_budget_not_collapsed"}


# ---- paired comparison (issue 13) ----------------------------------------------------------------------

def test_a_model_compared_with_itself_is_never_significantly_different():
    c = card(robust=0.55)
    v = verdict(c, CPU, baseline=copy.deepcopy(c))
    assert v["passed"], v["reasons"]
    for res in c["comparison"]["settings"].values():
        assert res["verdict"] == "not_significantly_different" and res["p_value"] == 1.0
        assert res["promotable"] and not res["significantly_better"]


def test_a_significantly_worse_candidate_is_rejected_and_better_is_reported():
    base = card(robust=0.7)
    worse = card(robust=0.1, bare=0.0)
    v = verdict(worse, CPU, baseline=base)
    assert not v["passed"] and any("significantly worse than the baseline" in r for r in v["reasons"])
    better = card(robust=0.9)
    v = verdict(better, CPU, baseline=base)
    assert v["passed"], v["reasons"]
    assert better["comparison"]["settings"]["linf-dwbox"]["significantly_better"] is True


def test_outcomes_are_bound_to_images_and_seeds():
    base, cand = card(), card()
    for s in base["settings"]:
        s["outcomes"] = outcomes(0.6, s["n"], s["name"], seed=8)  # another noise draw
    v = verdict(cand, CPU, baseline=base)
    assert not v["passed"] and any("not comparable" in r and "seed" in r for r in v["reasons"])
    base = card()
    base["settings"][0]["outcomes"]["outcomes"] = "0" * 64  # edited outcomes: the digest no longer matches
    assert any("sha256" in r for r in verdict(card(), CPU, baseline=base)["reasons"])


def with_expected(c: dict, hits_of) -> dict:
    """Give every EoT setting per-image expected scores (hits out of k=10), bound to its outcomes."""
    for s in c["settings"]:
        if s["mode"] == "eot":
            s["expected_per_image"] = {"k": 10, "hits": [hits_of(i) for i in range(s["n"])],
                                       "outcomes_sha256": s["outcomes"]["sha256"]}
    return c


def test_expected_accuracy_is_paired_too_and_a_significant_drop_refuses_the_promotion():
    base = with_expected(card(), lambda i: 8)
    same = with_expected(card(), lambda i: 8)
    v = verdict(same, CPU, baseline=base)
    assert v["passed"], v["reasons"]
    e = same["comparison"]["settings"]["linf-eot"]["expected"]
    assert e["diff"] == 0 and e["p_value"] == 1.0 and e["verdict"] == "not_significantly_different"
    # same single-shot outcomes (McNemar sees nothing), but every image's expected accuracy drops 8/10 -> 5/10
    worse = with_expected(card(), lambda i: 5 + i % 2)
    v = verdict(worse, CPU, baseline=base)
    assert not v["passed"] and any("expected accuracy over k=10 significantly worse" in r for r in v["reasons"])
    res = worse["comparison"]["settings"]["linf-eot"]
    assert res["verdict"] == "not_significantly_different" and res["promotable"] is False
    assert res["expected"]["verdict"] == "significantly_worse" and res["expected"]["ci95"][1] < 0
    better = with_expected(card(), lambda i: 10)
    assert verdict(better, CPU, baseline=base)["passed"]
    assert better["comparison"]["settings"]["linf-eot"]["expected"]["verdict"] == "significantly_better"


def test_expected_scores_must_be_bound_and_comparable():
    base = with_expected(card(), lambda i: 8)
    other_k = with_expected(card(), lambda i: 8)
    for s in other_k["settings"]:
        if s.get("expected_per_image"):
            s["expected_per_image"]["k"] = 20
    assert any("not comparable" in r and "k=20" in r for r in verdict(other_k, CPU, baseline=base)["reasons"])
    unbound = with_expected(card(), lambda i: 8)
    unbound["settings"][1]["expected_per_image"]["outcomes_sha256"] = "0" * 64
    assert any("not bound" in r for r in verdict(unbound, CPU, baseline=base)["reasons"])
    broken = with_expected(card(), lambda i: 8)
    broken["settings"][1]["expected_per_image"]["hits"] = "lots"
    assert any("malformed per-image expected" in r for r in verdict(broken, CPU, baseline=base)["reasons"])
    # an older baseline card without per-image expected scores: compared on the outcomes alone, no refusal
    assert verdict(with_expected(card(), lambda i: 8), CPU, baseline=card())["passed"]
