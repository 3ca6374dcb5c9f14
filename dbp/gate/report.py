"""The robustness card from the merged per-image results: per setting the worst case over the attacks that
ran, intervals, flags, per-image outcomes bound to images and seeds, EoT hits out of k, the served-VOTES rows,
the baseline's evidence; plus its plots and the printed summary. Readers of cards: dbp/card.py, verdict.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .. import config as C, repository
from ..card import binding_sha256, meta_sha256, plot_card, write_card
from ..checkpoint import load_meta
from ..paired import OutcomeRecord
from ..plots import image_grid
from ..robustness import sanity_flags, summarize, worst_case
from ..runtime import git_commit
from .config import GateConfig, GateError, Setting, voted_eot, voted_settings, voted_stream
from .policy import CLAIM_DECLARED, CLAIM_REPORTED
from .protocol import Ctx, attack_config, batch_seed, eval_salt, image_seeds
from .verdict import SCHEMA


# ---- card and gate -------------------------------------------------------------------------------------

def expected_summary(fractions, k: int) -> tuple[dict, list[int]]:
    """(summary, per-image hits out of k) of an EoT setting's expected accuracy. The figure is computed from the
    integer hits, exactly as the verdict recomputes it (sum(hits) / (k n)): averaging the float32 fractions
    (0.4 is 0.40000000596) drifts by ~1e-9, past the verdict's FIGURE_TOL, and made a signed card fail its own
    evidence check."""
    hits = [round(float(v) * k) for v in torch.as_tensor(fractions).flatten()]
    return summarize(torch.tensor(hits, dtype=torch.float64) / k, f"expected over k={k} purifications", k=k), hits


def build_card(ctx: Ctx, m: dict[str, torch.Tensor], randomized: bool, checks: Optional[dict], policy: dict,
               wall: float, world: int) -> dict:
    from ..sanity_checks import attack_ineffective

    cfg, pur = ctx.cfg, ctx.defense.purifier
    n = len(ctx.y)
    clean = {"bare": summarize(m["clean_bare"], "single-shot, bare classifier"),
             "purified": summarize(m["clean_purified"], "single-shot (one fresh purification)")}
    if cfg.k:
        clean["purified_expected"] = summarize(m["clean_expected"], f"expected over k={cfg.k} purifications", k=cfg.k)
    clean["evidence"] = {"bare": [int(v) for v in m["clean_bare"].tolist()],
                         "purified": [int(v) for v in m["clean_purified"].tolist()]}
    bare_robust = {}
    for s in ctx.settings:
        if s.group not in bare_robust:
            bare_robust[s.group] = summarize(m[f"bare_robust/{s.group}"], "PGD on the bare classifier (no purifier)",
                                             eps=s.eps, step=s.step, steps=cfg.bare_steps)
    settings = []
    for s in ctx.settings:
        k = s.name
        if f"{k}/pgd-ce" not in m:
            continue
        atk = attack_config(cfg, s)
        nn_ = len(m[f"{k}/pgd-ce"])
        if s.mode == "dwbox":
            clean_c = m[f"{k}/clean"]
            entry_clean = summarize(clean_c, "single-shot with the fixed DW-box noise")
        else:
            clean_c = m["clean_purified"][:nn_]
            entry_clean = summarize(clean_c, "single-shot (one fresh purification)")
        attacks = {a: m[f"{k}/{a}"] for a in ("pgd-ce", "apgd-ce", "apgd-dlr", "dwbox-transfer") if f"{k}/{a}" in m}
        worst = worst_case(attacks)
        robust = summarize(m[f"{k}/pgd-ce"], "PGD best iterate, single-shot " + (
            "with the attack's fixed noise" if s.mode == "dwbox" else "(one fresh purification of x_adv)"))
        expected, hits = (expected_summary(m[f"{k}/robust_expected"], cfg.k) if f"{k}/robust_expected" in m
                          else (None, None))
        rec = OutcomeRecord.build(worst.correct, indices=m["index"][:nn_].tolist(), seeds=image_seeds(ctx, s, nn_),
                                  dataset=ctx.dataset, split="test", setting=setting_key(cfg, s, pur))
        extra = {}
        if s.mode == "dwbox":
            extra["fresh_noise"] = summarize(m[f"{k}/pgd-ce-fresh"], "the DW-box adversarial images under fresh "
                                             "noise (the served setting), single-shot")
            extra["last_iterate"] = summarize(m[f"{k}/last"], "PGD last iterate with the fixed noise (the paper's)")
        bare = bare_robust[s.group]
        flags = sanity_flags(clean_acc=entry_clean["acc"], robust_acc=worst.acc,
                             zero_grad_frac=float(m[f"{k}/zero_grad"].mean()), randomized=randomized, mode=s.mode,
                             eot=atk.eot, bare_robust_acc=bare["acc"])
        flags["attack_ineffective"] = attack_ineffective(clean_c, worst.correct, m[f"{k}/loss"]).to_dict()
        declared = s.threat_model in policy["declared"]["threat_models"]
        settings.append({
            "name": k, "threat_model_name": s.threat_model, "threat_model": s.norm, "eps": s.eps, "step": s.step,
            "mode": s.mode, "declared": declared, "votes": 1,
            "claim": CLAIM_DECLARED if declared else CLAIM_REPORTED,
            "setting": "DW-box (noise fixed per batch)" if s.mode == "dwbox"
                       else "stochastic white-box (EoT, fresh noise per sample), the served setting",
            "attack": {"algorithm": "PGD", "steps": atk.steps, "eot": atk.eot, "eot_batched": atk.eot_batched,
                       "keep": atk.keep, "init": "zero", "loss": "cross-entropy, untargeted",
                       "also_ran": [a for a in attacks if a != "pgd-ce"],
                       "gradient": "full backpropagation through every purification step; no BPDA, no surrogate"},
            "forward_passes_per_sample": {"attack": atk.steps * atk.eot * len([a for a in attacks if "apgd" in a or
                                                                               a == "pgd-ce"]),
                                          "unet_calls_per_pass": pur.n_unet_calls},
            "n": nn_, "clean": entry_clean, "robust": robust, "robust_expected": expected,
            "worst_case": {k2: v for k2, v in worst.to_dict().items() if k2 not in ("per_image", "per_image_attack")},
            "outcomes": rec.to_dict(), "worst_by": worst.by, **extra,
            # the mean of robust_expected is not enough to pair two cards: keep each image's hits out of k
            "expected_per_image": None if expected is None else {
                "k": cfg.k, "hits": hits,
                "outcomes_sha256": rec.sha256},
            "bare_robust": bare,
            # the verdict's evidence: the bare classifier and the clean defence on the same images, per image
            "bare_outcomes": [int(v) for v in m[f"bare_robust/{s.group}"][:nn_].tolist()],
            "clean_outcomes": [int(v) for v in clean_c.tolist()],
            "loss_trajectory": [float(v) for v in m[f"{k}/loss"].mean(0)],
            "flags": flags,
        })
        if s.mode == "eot":
            settings[-1]["evaluation_noise"] = ("single-shot rows: the attack's seed + 1 + a salt from the "
                                                f"purifier's sha256 ({eval_salt(ctx)}); expected "
                                                "accuracy: the attack's seed + 2, shared with the baseline")
    card = {
        "schema": SCHEMA,
        "model": {"purifier": repository.relative_path(ctx.purifier_dir),
                  "classifier": repository.relative_path(ctx.classifier_dir),
                  "purifier_sha256": ctx.sha["purifier"], "classifier_sha256": ctx.sha["classifier"],
                  "purifier_meta_sha256": meta_sha256(ctx.purifier_dir),
                  "classifier_meta_sha256": meta_sha256(ctx.classifier_dir),
                  "purifier_kind": load_meta(ctx.purifier_dir).get("kind"),
                  "repository": repository.relative_path(cfg.repository), "version": cfg.version,
                  "purification": {"t_star": pur.t_star, "sampler": pur.sampler,
                                   "num_inference_steps": pur.num_inference_steps, "unet_calls": pur.n_unet_calls}},
        "data": {"dataset": ctx.dataset, "split": "test", "n": n, "n_eot": ctx.n_eot,
                 "indices": [int(i) for i in m["index"].tolist()], "images_sha256": ctx.images_sha256,
                 "selection": f"first {n} test images (stochastic setting: first {ctx.n_eot})",
                 "batch_size": cfg.batch_size},
        "randomized": randomized,
        "policy": {"file": "dbp/gate/promotion_policy.json", "sha256": policy["sha256"]},
        "clean": clean, "bare_robust": bare_robust, "settings": settings, "sanity_checks": checks,
        "served_votes": served_votes_block(ctx, m),
        "git_commit": git_commit(), "wall_time_s": round(wall, 1),
        "compute_time_s": round(float(m["time_s"]), 1), "world_size": world, "device": str(ctx.device),
        "torch": torch.__version__,
        "config": {k: v for k, v in C.to_dict(cfg).items() if k not in ("out_dir", "data_root")},
    }
    for key in ("purifier", "classifier", "repository", "baseline_card"):
        if card["config"].get(key):
            card["config"][key] = repository.relative_path(card["config"][key])
    card["binding"] = binding_sha256(card)
    return card


def served_votes_block(ctx: Ctx, m: dict[str, torch.Tensor]) -> dict:
    """Which VOTES were attacked: the default (1: the EoT rows) and the served maximum, per declared norm."""
    cfg, v = ctx.cfg, ctx.cfg.votes or 1
    block = {"default": 1, "max": v, "attacked": sorted({1, v}), "rows": []}
    if f"clean_voted{v}" in m:
        block["clean"] = summarize(m[f"clean_voted{v}"], f"majority of {v} fresh purifications")
    for s in voted_settings(cfg):
        k = f"{s.name}/voted{v}"
        if k not in m:
            continue
        n = len(m[k])
        rec = OutcomeRecord.build(m[k], indices=m["index"][:n].tolist(),
                                  seeds=[batch_seed(cfg, b, voted_stream(s)) for b, lo, hi in ctx.batches()
                                         for _ in range(lo, hi)][:n],
                                  dataset=ctx.dataset, split="test", setting=setting_key(cfg, s, ctx.defense.purifier)
                                  + f" votes={v} draws={voted_eot(cfg)}")
        block["rows"].append({
            "name": f"{s.name}-votes{v}", "threat_model_name": s.threat_model, "threat_model": s.norm, "eps": s.eps,
            "step": s.step, "votes": v, "n": n, "mode": "eot", "declared": True, "claim": CLAIM_DECLARED,
            "attack": {"algorithm": "PGD", "steps": cfg.steps, "eot": voted_eot(cfg), "keep": cfg.keep,
                       "loss": f"cross-entropy of the mean softmax over the {v} votes (the served PROBS)",
                       "outcome": f"the majority of {v} fresh votes (the served LABEL, served tie-break)"},
            "robust": summarize(m[k], f"majority of {v} fresh purifications of x_adv"),
            "outcomes": rec.to_dict(),
            "bare_outcomes": [int(b) for b in m[f"bare_robust/{s.group}"][:n].tolist()],
            "loss_trajectory": [float(x) for x in m[f"{k}/loss"].mean(0)]})
    return block


def setting_key(cfg: GateConfig, s: Setting, pur) -> str:
    """What a per-image outcome depends on besides the model: two cards compare only if these agree."""
    return (f"{s.name} eps={s.eps:.6g} steps={cfg.steps} eot={cfg.eot if s.mode == 'eot' else 1} keep={cfg.keep} "
            f"apgd={cfg.apgd} {pur.sampler} t*={pur.t_star} N={pur.num_inference_steps}")


def baseline_block(baseline: dict, source: Optional[str]) -> dict:
    """The baseline card's per-image evidence, carried (and signed) in the candidate's card."""
    if baseline.get("schema") != SCHEMA:
        raise GateError(f"--baseline_card {source}: schema {baseline.get('schema')!r} holds no per-image "
                            f"evidence; measure the deployed version with this gate first (--gate false)")
    return {"card": source, "version": (baseline.get("model") or {}).get("version"),
            "purifier_sha256": baseline["model"]["purifier_sha256"],
            "classifier_sha256": baseline["model"]["classifier_sha256"],
            "settings": {s["name"]: {"outcomes": s["outcomes"], "expected_per_image": s.get("expected_per_image")}
                         for s in baseline.get("settings", []) if isinstance(s, dict) and s.get("outcomes")}}


def write_outputs(ctx: Ctx, card: dict, m: dict[str, torch.Tensor]) -> None:
    out = Path(ctx.cfg.out_dir)
    write_card(card, out / "card.json")
    plot_card(card, out)
    if "grid/clean" not in m:
        return
    rows = [m["grid/clean"], m["grid/purified"]]
    names = []
    for s in ctx.settings:
        if f"grid/{s.name}/adv" in m and len(m[f"grid/{s.name}/adv"]) == len(rows[0]):
            rows += [m[f"grid/{s.name}/adv"], m[f"grid/{s.name}/purified"]]
            names.append(s.name)
    if len(rows[0]):
        image_grid(rows, out / "grid.png")
        (out / "grid.txt").write_text("rows, top to bottom: clean, purified clean, then for each of "
                                      + ", ".join(names) + ": adversarial, purified adversarial\n")


def summary_table(card: dict) -> str:
    c = card["clean"]
    lines = [f"clean: bare {c['bare']['acc']:.1%}, purified {c['purified']['acc']:.1%}"
             + (f", purified expected {c['purified_expected']['acc']:.1%}" if "purified_expected" in c else "")
             + " | bare robust: " + ", ".join(f"{k} {v['acc']:.1%}" for k, v in card["bare_robust"].items())]
    for s in card["settings"]:
        w = s.get("worst_case") or s["robust"]
        lo, hi = w["ci95"]
        exp = f", expected {s['robust_expected']['acc']:.1%}" if s.get("robust_expected") else ""
        raised = [k for k, v in s["flags"].items() if v["raised"]]
        lines.append(f"{s['name']:>18}: n={s['n']} clean {s['clean']['acc']:.1%}  robust {w['acc']:.1%} "
                     f"[{lo:.1%}, {hi:.1%}]{exp}" + (f"  flags: {', '.join(raised)}" if raised else ""))
    for r in (card.get("served_votes") or {}).get("rows", []):
        lo, hi = r["robust"]["ci95"]
        lines.append(f"{r['name']:>18}: n={r['n']} robust {r['robust']['acc']:.1%} [{lo:.1%}, {hi:.1%}] "
                     f"(majority of {r['votes']} votes)")
    return "\n".join(lines)


