"""The gate's verdict, recomputed from a card's per-image evidence under the pinned policy. Torch-free.

A card's `gate` block is a cache: export and the server call `verify`, which checks the signature and the
policy's sha256, then judges the evidence itself (per-image outcomes bound by sha256 to image indices, seeds
and the setting; per-image EoT hits out of k; the bare classifier's outcomes on the same images; the sanity
checks' outcomes; the deployed version's outcomes when it was the baseline). The figures a card displays must
agree with its evidence, so a signed card whose numbers were computed wrongly is refused too.

Rules (docs: README "Promotion policy"; thresholds from dbp/gate/promotion_policy.json):
  strength     every declared threat model in both modes and every reported one in the policy's modes, at the
               policy's budgets, PGD >= min_steps, EoT >= min_eot, expected accuracy over k >= min_k, n >= min_n
  evidence     outcome records intact (sha256), bound to the card's images, figures equal to the evidence
  clean        purified clean accuracy >= min_clean_purified; the bare classifier's >= min_clean_bare
  vs_bare      declared settings: the defence beats the bare classifier on the same images: one-sided exact
               McNemar p < vs_bare.alpha AND the paired (Newcombe) lower bound >= vs_bare.min_lower_bound
  loss_rise    the attack's loss rises over its steps (else the attack did nothing)
  collapse     l_inf large_budget.eps leaves <= max_acc (else gradients are masked)
  transfer     images attacked on the bare classifier do not beat the white-box attack on the defence
  provenance   measured from a clean commit (the card records it)
  served_votes the served maximum VOTES attacked as well, on each declared threat model (EoT on the averaged
               probabilities, outcome the majority label; >= min_eot purifications per step, n >= min_n.eot),
               evidence intact, and it beats the bare classifier as the vs_bare rule demands
  baseline     against the deployed version, same images and seeds: every setting non-inferior (paired lower
               bound > -margin; EoT on per-image expected accuracy) and, Holm-adjusted, one declared setting
               significantly better
Diagnostics, printed and never a reason: attack_ineffective (robust inside the clean interval: low power,
not a broken attack), robust_above_clean, bare_not_collapsed, zero_gradients, eot_gradient_inconsistent.

  v = evaluate(card, load_policy())       # {"passed", "reasons", "rules", "diagnostics"}
  verify(card)                            # signature, then evaluate; raises VerdictError
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from ..paired import (NotComparableError, OutcomeRecord, PairedTable, check_comparable, mcnemar_exact,
                      mcnemar_one_sided, newcombe_interval, paired_hits)
from ..stats import wilson
from ..threat_models import MODES, THREAT_MODELS
from .policy import is_declared, load_policy

SCHEMA = "dbp.robustness_card/3"
FIGURE_TOL = 1e-9


class VerdictError(ValueError):
    """A card does not pass under the pinned policy (or cannot be checked); `reasons` lists every rule broken."""

    def __init__(self, message: str, reasons: Optional[list[str]] = None):
        super().__init__(message)
        self.reasons = reasons or [message]


def _acc(bits) -> float:
    bits = list(bits)
    return sum(1 for b in bits if b) / len(bits) if bits else float("nan")


def _bits(v: Any, n: int, what: str) -> list[bool]:
    if isinstance(v, str) and set(v) <= {"0", "1"}:
        v = [c == "1" for c in v]
    if not isinstance(v, list) or len(v) != n or not all(isinstance(b, (bool, int)) and b in (0, 1) for b in v):
        raise ValueError(f"{what}: expected {n} per-image 0/1 outcomes")
    return [bool(b) for b in v]


def _same(a: Any, b: float) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and abs(float(a) - b) <= FIGURE_TOL


def find_setting(card: Mapping, tm: str, norm: str, mode: str) -> Optional[Mapping]:
    return next((s for s in card.get("settings") or [] if isinstance(s, Mapping) and s.get("threat_model_name") == tm
                 and s.get("threat_model") == norm and s.get("mode") == mode), None)


def required_settings(policy: Mapping) -> list[tuple[str, str, str, float]]:
    out = []
    for tm in policy["declared"]["threat_models"]:
        out += [(tm, norm, md, eps) for norm, (eps, _) in THREAT_MODELS[tm].items() for md in MODES]
    rep = policy.get("reported") or {}
    for tm in rep.get("threat_models", []):
        out += [(tm, norm, md, eps) for norm, (eps, _) in THREAT_MODELS[tm].items()
                for md in rep.get("modes", ["dwbox"])]
    return out


class _Judge:
    def __init__(self, card: Mapping, policy: Mapping):
        self.card, self.policy = card, policy
        self.rules: list[dict] = []
        self.diagnostics: list[dict] = []

    def rule(self, name: str, where: str, ok: bool, detail: str) -> bool:
        self.rules.append({"rule": name, "where": where, "passed": bool(ok), "detail": detail})
        return ok

    def diag(self, name: str, where: str, raised: bool, detail: str) -> None:
        self.diagnostics.append({"diagnostic": name, "where": where, "raised": bool(raised), "detail": detail})

    # ---- per setting ------------------------------------------------------------------------------------

    def setting(self, tm: str, norm: str, mode: str, eps: float) -> Optional[dict]:
        """Checks one required setting; returns its evidence (outcomes, hits) for the baseline rule."""
        p, where = self.policy, f"{tm} {norm} eps={eps:.4g} {mode}"
        s = find_setting(self.card, tm, norm, mode)
        if not self.rule("strength", where, s is not None, "setting measured" if s else "setting missing"):
            return None
        atk = s.get("attack") if isinstance(s.get("attack"), Mapping) else {}
        n = s.get("n") if isinstance(s.get("n"), int) else 0
        problems = []
        if not _same(s.get("eps"), eps):
            problems.append(f"eps {s.get('eps')} is not the threat model's {eps:.6g}")
        if int(atk.get("steps") or 0) < p["attack"]["min_steps"]:
            problems.append(f"PGD-{atk.get('steps')} < {p['attack']['min_steps']} steps")
        if n < p["min_n"][mode]:
            problems.append(f"n={n} < {p['min_n'][mode]}")
        exp = s.get("expected_per_image") if isinstance(s.get("expected_per_image"), Mapping) else None
        if mode == "eot":
            if int(atk.get("eot") or 0) < p["attack"]["min_eot"]:
                problems.append(f"EoT-{atk.get('eot')} < {p['attack']['min_eot']}")
            if not exp or int(exp.get("k") or 0) < p["attack"]["min_k"]:
                problems.append(f"no per-image expected accuracy over k >= {p['attack']['min_k']}")
        self.rule("strength", where, not problems, "; ".join(problems) or
                  f"PGD-{atk.get('steps')}" + (f", EoT-{atk.get('eot')}, k={exp.get('k')}" if exp else "") + f", n={n}")
        # evidence: the records are intact, on the card's images, and the card's figures are theirs
        try:
            rec = OutcomeRecord.from_dict(s["outcomes"])
            if len(rec) != n:
                raise ValueError(f"{len(rec)} outcomes for n={n}")
            data = self.card.get("data") or {}
            if rec.dataset != data.get("dataset") or list(rec.indices) != list(data.get("indices") or [])[:n]:
                raise ValueError("the outcomes are not on the card's images (dataset or indices differ)")
            bare = _bits(s.get("bare_outcomes"), n, "bare_outcomes")
            clean = _bits(s.get("clean_outcomes"), n, "clean_outcomes")
            hits = None
            if exp:
                if exp.get("outcomes_sha256") != rec.sha256:
                    raise ValueError("the per-image expected hits are not bound to this setting's outcomes")
                k = int(exp["k"])
                hits = [int(h) for h in exp["hits"]]
                if len(hits) != n or not all(0 <= h <= k for h in hits):
                    raise ValueError(f"expected hits must be {n} integers in [0, {k}]")
            shown = (s.get("worst_case") or s.get("robust") or {}).get("acc")
            if not _same(shown, _acc(rec.outcomes)):
                raise ValueError(f"shown robust accuracy {shown} is not its outcomes' {_acc(rec.outcomes):.6g}")
            if hits is not None and not _same((s.get("robust_expected") or {}).get("acc"), sum(hits) / (k * n)):
                raise ValueError("shown expected accuracy is not its per-image hits'")
        except (KeyError, TypeError, ValueError, NotComparableError) as e:
            self.rule("evidence", where, False, str(e))
            return None
        self.rule("evidence", where, True, f"{n} per-image outcomes, sha256 {rec.sha256[:12]}")
        robust, bare_acc, clean_acc = _acc(rec.outcomes), _acc(bare), _acc(clean)
        # diagnostics: shown, never a reason
        lo, _ = wilson(sum(clean), n)
        self.diag("attack_ineffective", where, robust >= lo,
                  f"robust {robust:.1%} vs the clean interval's lower end {lo:.1%} (unpaired; low power at small n)")
        self.diag("robust_above_clean", where, robust > clean_acc, f"robust {robust:.1%}, clean {clean_acc:.1%}")
        flags = s.get("flags") if isinstance(s.get("flags"), Mapping) else {}
        for f in ("zero_gradients", "bare_not_collapsed"):
            if isinstance(flags.get(f), Mapping):
                self.diag(f, where, bool(flags[f].get("raised")), str(flags[f].get("value")))
        traj = [float(v) for v in s.get("loss_trajectory") or []]
        rise = (max(traj[1:]) - traj[0]) if len(traj) > 1 else float("nan")
        self.rule("loss_rise", where, rise > 0, f"mean attack loss rises by {rise:.4g} over {len(traj)} steps")
        if is_declared(self.policy, tm):
            t = PairedTable.from_outcomes(rec.outcomes, bare)
            p1 = mcnemar_one_sided(t.b, t.c)
            lo_d, hi_d = newcombe_interval(t)
            vb = p["vs_bare"]
            self.rule("vs_bare", where, p1 < vb["alpha"] and lo_d >= vb["min_lower_bound"],
                      f"defended {robust:.1%} vs bare classifier {bare_acc:.1%}: +{robust - bare_acc:.1%} "
                      f"[{lo_d:+.1%}, {hi_d:+.1%}], discordant {t.b}/{t.c}, one-sided McNemar p={p1:.3g} "
                      f"(needs p < {vb['alpha']} and lower bound >= {vb['min_lower_bound']:+.0%})")
        return {"where": where, "declared": is_declared(self.policy, tm), "record": rec, "hits": hits,
                "k": int(exp["k"]) if exp else None, "name": s.get("name")}

    def served_votes(self) -> None:
        p, sv = self.policy, self.card.get("served_votes")
        if not isinstance(sv, Mapping) or not isinstance(sv.get("max"), int) or sv["max"] < 1:
            self.rule("served_votes", "card", False, "no served_votes block (which VOTES were attacked)")
            return
        vmax = sv["max"]
        if vmax == 1:
            self.rule("served_votes", "card", True, "the served maximum is 1 vote: the EoT rows are the served setting")
            return
        rows = [r for r in sv.get("rows") or [] if isinstance(r, Mapping)]
        for tm in p["declared"]["threat_models"]:
            for norm, (eps, _) in THREAT_MODELS[tm].items():
                where = f"{tm} {norm} eps={eps:.4g} votes={vmax}"
                r = next((r for r in rows if r.get("threat_model_name") == tm and r.get("threat_model") == norm
                          and r.get("votes") == vmax), None)
                if not self.rule("served_votes", where, r is not None,
                                 "measured" if r else "the served maximum VOTES was not attacked"):
                    continue
                atk = r.get("attack") if isinstance(r.get("attack"), Mapping) else {}
                n = r.get("n") if isinstance(r.get("n"), int) else 0
                per_step = int(atk.get("eot") or 0) * vmax
                problems = []
                if not _same(r.get("eps"), eps):
                    problems.append(f"eps {r.get('eps')} is not the threat model's {eps:.6g}")
                if int(atk.get("steps") or 0) < p["attack"]["min_steps"]:
                    problems.append(f"PGD-{atk.get('steps')} < {p['attack']['min_steps']} steps")
                if per_step < p["attack"]["min_eot"]:
                    problems.append(f"{per_step} purifications per step < {p['attack']['min_eot']}")
                if n < p["min_n"]["eot"]:
                    problems.append(f"n={n} < {p['min_n']['eot']}")
                try:
                    rec = OutcomeRecord.from_dict(r["outcomes"])
                    data = self.card.get("data") or {}
                    if len(rec) != n or list(rec.indices) != list(data.get("indices") or [])[:n]:
                        raise ValueError("the outcomes are not on the card's images")
                    bare = _bits(r.get("bare_outcomes"), n, "bare_outcomes")
                    if not _same((r.get("robust") or {}).get("acc"), _acc(rec.outcomes)):
                        raise ValueError("shown robust accuracy is not its outcomes'")
                except (KeyError, TypeError, ValueError) as e:
                    problems.append(f"evidence: {e}")
                    self.rule("served_votes", where, False, "; ".join(problems))
                    continue
                t = PairedTable.from_outcomes(rec.outcomes, bare)
                p1, (lo_d, hi_d), vb = mcnemar_one_sided(t.b, t.c), newcombe_interval(t), p["vs_bare"]
                robust = _acc(rec.outcomes)
                if not (p1 < vb["alpha"] and lo_d >= vb["min_lower_bound"]):
                    problems.append("does not beat the bare classifier as vs_bare demands")
                self.rule("served_votes", where, not problems, "; ".join(problems + [
                    f"voted defence {robust:.1%} vs bare {_acc(bare):.1%} [{lo_d:+.1%}, {hi_d:+.1%}], p={p1:.3g}; "
                    f"PGD-{atk.get('steps')}, {atk.get('eot')} draw(s) x {vmax} votes per step, n={n}"]))

    # ---- whole card -------------------------------------------------------------------------------------

    def clean(self) -> None:
        p, c = self.policy, self.card.get("clean") or {}
        ev = c.get("evidence") if isinstance(c.get("evidence"), Mapping) else {}
        n = (self.card.get("data") or {}).get("n")
        try:
            pur, bare = _bits(ev.get("purified"), n, "clean.evidence.purified"), _bits(ev.get("bare"), n,
                                                                                      "clean.evidence.bare")
            for key, bits in (("purified", pur), ("bare", bare)):
                if not _same((c.get(key) or {}).get("acc"), _acc(bits)):
                    raise ValueError(f"shown clean {key} accuracy is not its evidence's")
        except (TypeError, ValueError) as e:
            self.rule("evidence", "clean", False, str(e))
            return
        self.rule("clean", "purified", _acc(pur) >= p["min_clean_purified"],
                  f"{_acc(pur):.1%} on {n} images (floor {p['min_clean_purified']:.0%})")
        self.rule("clean", "bare classifier", _acc(bare) >= p["min_clean_bare"],
                  f"{_acc(bare):.1%} on {n} images (floor {p['min_clean_bare']:.0%})")

    def sanity(self) -> None:
        checks = self.card.get("sanity_checks") if isinstance(self.card.get("sanity_checks"), Mapping) else {}
        lb = checks.get("large_budget_not_collapsed") if isinstance(checks.get("large_budget_not_collapsed"),
                                                                    Mapping) else None
        want = self.policy["large_budget"]
        if lb is None or not isinstance(lb.get("outcomes"), list) or not lb["outcomes"]:
            self.rule("collapse", "sanity check", False, "no large-budget check with per-image outcomes")
        else:
            acc, eps = _acc(lb["outcomes"]), (lb.get("value") or {}).get("eps")
            self.rule("collapse", "sanity check", _same(eps, want["eps"]) and acc <= want["max_acc"],
                      f"l_inf {eps} leaves {acc:.1%} of {len(lb['outcomes'])} images (max {want['max_acc']:.0%} "
                      f"at eps {want['eps']})")
        tr = checks.get("transfer_beats_white_box") if isinstance(checks.get("transfer_beats_white_box"),
                                                                  Mapping) else None
        if tr is None or not isinstance(tr.get("outcomes"), list) or not isinstance(tr.get("white_box"), list):
            self.rule("transfer", "sanity check", False, "no transfer check with per-image outcomes")
        else:
            t, w = _acc(tr["outcomes"]), _acc(tr["white_box"])
            self.rule("transfer", "sanity check", not t < w,
                      f"transfer from the bare classifier leaves {t:.1%}, the white-box attack {w:.1%}")
        eg = checks.get("eot_gradient_inconsistent")
        if isinstance(eg, Mapping):
            self.diag("eot_gradient_inconsistent", "sanity check", bool(eg.get("raised")), str(eg.get("value")))

    def baseline(self, evidence: list[dict]) -> Optional[dict]:
        base = self.card.get("baseline")
        if not isinstance(base, Mapping):
            return None
        margin, alpha = self.policy["baseline"]["non_inferiority_margin"], self.policy["baseline"]["superiority_alpha"]
        bsets = base.get("settings") if isinstance(base.get("settings"), Mapping) else {}
        tests = []
        for ev in evidence:
            b = bsets.get(ev["name"]) if isinstance(bsets.get(ev["name"]), Mapping) else None
            where = f"{ev['where']} vs version {base.get('version')}"
            try:
                brec = OutcomeRecord.from_dict(b["outcomes"])
                check_comparable(ev["record"], brec)
            except (KeyError, TypeError, NotComparableError) as e:
                self.rule("baseline", where, False, f"not comparable with the baseline: {e}")
                continue
            if ev["hits"] is not None:
                bexp = b.get("expected_per_image") or {}
                if bexp.get("outcomes_sha256") != brec.sha256 or int(bexp.get("k") or 0) != ev["k"]:
                    self.rule("baseline", where, False, "the baseline's per-image expected hits are missing or unbound")
                    continue
                r = paired_hits(ev["hits"], bexp["hits"], ev["k"])
                diff, lo, hi = r["diff"], *r["ci95"]
                p_two = r["p_value"]
                p_better = p_two / 2 if diff > 0 else 1.0
                how = f"expected accuracy over k={ev['k']}, sign-flip p={p_two:.3g}"
            else:
                t = PairedTable.from_outcomes(ev["record"].outcomes, brec.outcomes)
                diff, (lo, hi) = (t.b - t.c) / t.n, newcombe_interval(t)
                p_better, p_two = mcnemar_one_sided(t.b, t.c), mcnemar_exact(t.b, t.c)
                how = f"discordant {t.b}/{t.c}, McNemar p={p_two:.3g}"
            self.rule("baseline", where, lo > -margin,
                      f"non-inferiority: {diff:+.1%} [{lo:+.1%}, {hi:+.1%}] ({how}; lower bound must be > "
                      f"{-margin:+.0%})")
            if ev["declared"]:
                tests.append((p_better, where))
        if tests:  # Holm: at least one rejection iff the smallest p <= alpha / m
            m = len(tests)
            ranked = sorted(tests)
            adjusted, running = [], 0.0
            for i, (pv, where) in enumerate(ranked):
                running = max(running, min(1.0, (m - i) * pv))
                adjusted.append((running, where))
            best = adjusted[0]
            self.rule("baseline", "superiority (Holm, declared settings)", best[0] < alpha,
                      f"smallest Holm-adjusted one-sided p {best[0]:.3g} ({best[1]}); needs < {alpha}")
        return {"version": base.get("version"), "purifier_sha256": base.get("purifier_sha256"),
                "classifier_sha256": base.get("classifier_sha256")}


def evaluate(card: Mapping, policy: Optional[Mapping] = None) -> dict:
    """The verdict on a card's evidence under `policy` (default: the pinned one). Never raises for a bad card:
    every problem is a failed rule."""
    policy = policy or load_policy()
    j = _Judge(card, policy)
    if card.get("schema") != SCHEMA:
        j.rule("schema", "card", False, f"schema {card.get('schema')!r}: not {SCHEMA!r} (no per-image evidence)")
    pol = card.get("policy") if isinstance(card.get("policy"), Mapping) else {}
    j.rule("policy", "card", pol.get("sha256") == policy["sha256"],
           f"measured under policy {str(pol.get('sha256'))[:12]}..., the pinned policy is {policy['sha256'][:12]}...")
    commit = str(card.get("git_commit") or "")
    j.rule("provenance", "card", bool(commit) and commit != "unknown" and not commit.endswith("-dirty"),
           f"measured by commit {commit!r} (a clean checkout is required: every figure from committed code)")
    evidence = []
    if card.get("schema") == SCHEMA:
        j.clean()
        for tm, norm, mode, eps in required_settings(policy):
            ev = j.setting(tm, norm, mode, eps)
            if ev is not None:
                evidence.append(ev)
        j.sanity()
        j.served_votes()
        base = j.baseline(evidence)
    else:
        base = None
    reasons = [f"{r['rule']} ({r['where']}): {r['detail']}" for r in j.rules if not r["passed"]]
    return {"passed": not reasons, "reasons": reasons, "rules": j.rules, "diagnostics": j.diagnostics,
            "policy_sha256": policy["sha256"], "baseline": base}


def verify(card: Mapping, *, policy: Optional[Mapping] = None, keys=None) -> dict:
    """Signature (trusted key, exact content), then `evaluate`. Raises VerdictError with every reason.
    Whether the baseline is the deployed version is the caller's question (dbp.card.card_passes_for)."""
    from .signing import SignatureError, verify as verify_signature

    try:
        key = verify_signature(card, keys)
    except SignatureError as e:
        raise VerdictError(f"signature: {e}") from None
    v = evaluate(card, policy)
    if not v["passed"]:
        raise VerdictError("the card does not pass under the pinned policy: " + "; ".join(v["reasons"]), v["reasons"])
    v["signed_by"] = key
    return v


def summary_lines(v: Mapping) -> list[str]:
    """One line per rule and diagnostic, for the CLI and the README."""
    out = [f"{'PASS' if r['passed'] else 'FAIL'}  {r['rule']:<9} {r['where']}: {r['detail']}" for r in v["rules"]]
    out += [f"{'NOTE' if d['raised'] else 'ok  '}  {d['diagnostic']} {d['where']}: {d['detail']}"
            for d in v["diagnostics"]]
    return out
