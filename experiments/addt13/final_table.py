"""Issue 13: the final table from the cards of experiments/addt13/final.sh, with the paired tests.

  .venv/bin/python -m experiments.addt13.final_table [--runs runs/final] [--copy docs/results/addt13] [--steps 1500]

Reads <runs>/<model>-{linf,l2,linf-dwbox}/card.json for the models base, clean<steps> and addt<steps>
(linf-dwbox: final.sh PART=linf-dwbox, paired with the base's l_inf card on the same 512 images); prints a markdown table
(accuracy with 95% Wilson intervals; EoT expected accuracy with its normal interval) and the paired
comparisons ADDT vs clean, ADDT vs base, clean vs base per setting (dbp.paired.compare: McNemar's
exact test and Newcombe's interval on the per-image outcomes, which every card keeps with its images and
seeds; the EoT row's per-image expected accuracy goes through dbp.paired.paired_scores, a sign-flip
permutation test). --copy also writes the cards and the table (final.md, final.json; final<steps>.* for
other --steps) there, for committing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from dbp.card import load_card
from dbp.paired import NotComparableError, OutcomeRecord, compare, paired_scores

NORMS = ("linf", "l2", "linf-dwbox")


def paired_comparison(card: dict, baseline: dict, alpha: float, source: str) -> dict:
    """Per setting: McNemar's exact test and Newcombe's interval on the two cards' per-image outcomes."""
    base = {s["name"]: s for s in baseline.get("settings", [])}
    out: dict = {"baseline_card": source, "settings": {}, "reasons": []}
    for s in card["settings"]:
        b = base.get(s["name"])
        if b is None or not b.get("outcomes"):
            out["reasons"].append(f"{s['name']}: the baseline card has no per-image outcomes for this setting")
            continue
        try:
            res = compare(OutcomeRecord.from_dict(s["outcomes"]), OutcomeRecord.from_dict(b["outcomes"]), alpha)
        except NotComparableError as e:
            out["reasons"].append(f"{s['name']}: not comparable with the baseline: {e}")
            continue
        out["settings"][s["name"]] = res.to_dict()
    return out


def models_for(steps: int, ref: int = 1500) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The base and both arms at `steps`; other steps are also paired with the arms at `ref` (did more help?)."""
    models = {"base": "base (v1, the served purifier)"}
    for st in ([ref] if steps != ref else []) + [steps]:
        models.update({f"clean{st}": f"clean fine-tuning, {st} steps", f"addt{st}": f"ADDT, {st} steps"})
    a, c = f"addt{steps}", f"clean{steps}"
    pairs = [(a, c), (a, "base"), (c, "base")]
    if steps != ref:
        pairs += [(a, f"addt{ref}"), (c, f"clean{ref}")]
    return models, pairs


def pct(d: dict | None) -> str:
    if not d:
        return "-"
    lo, hi = d["ci95"]
    return f"{d['acc']:.1%} [{lo:.1%}, {hi:.1%}]"


def load(runs: Path, models: dict[str, str]) -> dict[str, dict[str, dict]]:
    cards: dict[str, dict[str, dict]] = {}
    for name in models:
        for norm in NORMS:
            p = runs / f"{name}-{norm}" / "card.json"
            if p.exists():
                cards.setdefault(name, {})[norm] = load_card(p)
    return cards


def settings_of(cards: dict[str, dict]) -> dict[str, dict]:
    return {s["name"]: s for c in cards.values() for s in c["settings"]}


def expected_scores(runs: Path, name: str, setting: str = "linf-eot") -> torch.Tensor | None:
    """Per-image expected accuracy over k purifications (the card keeps only its mean): from the run's state."""
    files = sorted((runs / f"{name}-linf" / "state").glob("batch_*.safetensors"))
    parts = [load_file(f).get(f"{setting}/robust_expected") for f in files]
    parts = [t for t in parts if t is not None]
    return torch.cat(parts).double() if parts else None


def table(cards: dict[str, dict[str, dict]], runs: Path, models: dict[str, str],
          pairs: list[tuple[str, str]]) -> tuple[str, dict]:
    out = {"models": {}, "paired": {}}
    lines = ["| model | clean purified (fixed noise) | DW-box l_inf 8/255 | ... last iterate | ... its images, "
             "fresh noise | EoT-10 l_inf single-shot | EoT-10 expected (k=10) | DW-box l_2 0.5 | bare classifier "
             "l_inf / l_2 |", "|" + "---|" * 9]
    for name, label in models.items():
        if name not in cards:
            continue
        s = settings_of(cards[name])
        li, eo, l2 = s.get("linf-dwbox"), s.get("linf-eot"), s.get("l2-dwbox")
        bare = [c["bare_robust"] for c in cards[name].values()]
        bare_txt = " / ".join(f"{v['acc']:.1%}" for b in bare for v in b.values())
        row = {"clean": li and li["clean"], "linf_dwbox": li and li["worst_case"],
               "linf_dwbox_last": li and li.get("last_iterate"), "linf_dwbox_fresh": li and li.get("fresh_noise"),
               "linf_eot": eo and eo["worst_case"], "linf_eot_expected": eo and eo.get("robust_expected"),
               "l2_dwbox": l2 and l2["worst_case"]}
        out["models"][name] = row
        lines.append(f"| {label} (n={li['n'] if li else '-'}/{eo['n'] if eo else '-'}/{l2['n'] if l2 else '-'}) | "
                     + " | ".join(pct(row[k]) for k in ("clean", "linf_dwbox", "linf_dwbox_last", "linf_dwbox_fresh",
                                                         "linf_eot", "linf_eot_expected", "l2_dwbox"))
                     + f" | {bare_txt} |")
    lines += ["", "Paired tests (same images, same seeds and fixed noise; per-image minimum over the attacks run):", "",
              "| candidate vs baseline | setting | n | candidate only / baseline only | difference [95%] | McNemar p "
              "| verdict |", "|" + "---|" * 7]
    for cand, base in pairs:
        if cand not in cards or base not in cards:
            continue
        for norm in NORMS:
            # a DW-box-only card pairs with the baseline's full l_inf card: same images, seed and setting
            bnorm = norm if norm in cards[base] else "linf" if norm == "linf-dwbox" else None
            if norm not in cards[cand] or bnorm not in cards[base]:
                continue
            cmp = paired_comparison(cards[cand][norm], cards[base][bnorm], 0.05, f"{base}-{bnorm}")
            for setting, d in cmp["settings"].items():
                out["paired"][f"{cand} vs {base}: {setting}"] = d
                lines.append(f"| {cand} vs {base} | {setting} | {d['n']} | {d['table']['only_candidate_right']} / {d['table']['only_baseline_right']} | "
                             f"{d['diff']:+.1%} [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}] | {d['p_value']:.3g} | "
                             f"{d['verdict']} |")
            for r in cmp["reasons"]:
                lines.append(f"| {cand} vs {base} | {r} | | | | | |")
        ea, eb = expected_scores(runs, cand), expected_scores(runs, base)
        if ea is not None and eb is not None and len(ea) == len(eb):
            d = paired_scores(ea, eb)
            out["paired"][f"{cand} vs {base}: linf-eot expected"] = d
            lines.append(f"| {cand} vs {base} | linf-eot, expected over k (per-image scores) | {d['n']} | - | "
                         f"{d['diff']:+.1%} [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}] | {d['p_value']:.3g} "
                         f"(sign-flip) | - |")
    return "\n".join(lines), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.addt13.final_table")
    ap.add_argument("--runs", default="runs/final")
    ap.add_argument("--copy", default=None, help="directory to copy the cards and the table into")
    ap.add_argument("--steps", type=int, default=1500, help="the fine-tuning step of the two arms' cards")
    a = ap.parse_args(argv)
    runs = Path(a.runs)
    models, pairs = models_for(a.steps)
    cards = load(runs, models)
    if not cards:
        print(f"no cards under {runs}/<model>-<norm>/card.json", file=sys.stderr)
        return 2
    md, data = table(cards, runs, models, pairs)
    print(md)
    if a.copy:
        dst = Path(a.copy)
        dst.mkdir(parents=True, exist_ok=True)
        for name, by_norm in cards.items():
            for norm in by_norm:
                shutil.copy(runs / f"{name}-{norm}" / "card.json", dst / f"{name}-{norm}.json")
        stem = "final" if a.steps == 1500 else f"final{a.steps}"
        (dst / f"{stem}.md").write_text(md + "\n")
        (dst / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
