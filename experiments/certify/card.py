"""The certification card of issue 23: certified l_2 accuracy at radii 0 .. 1.0 for each sigma, on the first
--images test images, bound to the denoiser's and the classifier's weights and to the images; with a curve figure.

  python -m experiments.certify.card                      # measure (resumable: rerun to continue) and report
  python -m experiments.certify.card --report_only --copy # rewrite the card from what is measured, into docs/

One JSON line per certificate in <out_dir>/sigma_<s>.jsonl, written as soon as it is measured: a killed run loses
at most one image. A rerun with another configuration (weights, n, alpha, images) refuses to mix its results with
the saved ones (dbp.state.StateMismatch names what differs). The card compares the curve with the empirical l_2 0.5
accuracy of the served purifier (its robustness card), since certified <= empirical at the same radius.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from dbp import repository
from dbp.certify import ABSTAIN, SmoothingConfig, certify, image_seeds, smoothed_base
from dbp.checkpoint import weights_sha256
from dbp.data import load_dataset
from dbp.gate.protocol import images_sha256
from dbp.models import load_classifier, load_unet
from dbp.runtime import set_threads
from dbp.state import require_same, write_json, write_text
from dbp.stats import wilson

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
DOCS = Path("docs/results/certify")


@dataclass
class CardConfig:
    unet: str = "runs/certify/denoiser/checkpoint"
    classifier: str = ""  # default: the deployed classifier
    sigmas: tuple = (0.25, 0.5)
    images: int = 500
    n0: int = 32
    n: int = 320  # the smallest n whose largest radius (alpha 0.001) reaches 1.0 at sigma 0.5 and 0.5 at 0.25
    alpha: float = 0.001
    max_rows: int = 352
    seed: int = 0
    out_dir: str = "runs/certify/card"
    threads: int = 1
    # the empirical check on the same smoothed classifier g: EoT-PGD l_2 at attack_eps on the first
    # attack_images images, then PREDICT (n, alpha) with fresh noise at the adversarial point
    attack_images: int = 100
    attack_eps: float = 0.5
    attack_steps: int = 20
    attack_eot: int = 10
    attack_batch: int = 10


def parse(argv) -> tuple[CardConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="python -m experiments.certify.card", description=__doc__.split("\n")[0])
    for f in fields(CardConfig):
        if f.name == "sigmas":
            ap.add_argument("--sigmas", type=float, nargs="+", default=list(f.default))
        else:
            ap.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    ap.add_argument("--report_only", action="store_true", help="no measuring: write the card from the saved lines")
    ap.add_argument("--copy", action="store_true", help=f"copy the card, its table and figure into {DOCS}")
    a = ap.parse_args(argv)
    cfg = CardConfig(**{f.name: getattr(a, f.name) for f in fields(CardConfig)})
    cfg.sigmas = tuple(cfg.sigmas)
    if not cfg.classifier:
        cfg.classifier = str(repository.deployed_weights("classifier"))
    if cfg.images < 1 or cfg.n < 1 or cfg.n0 < 1:
        ap.error("--images, --n and --n0 must be >= 1")
    return cfg, a


def binding(cfg: CardConfig, test) -> dict:
    """What the certificates are about: any change here is a different card."""
    return {"unet_sha256": weights_sha256(cfg.unet), "classifier_sha256": weights_sha256(cfg.classifier),
            "images_sha256": images_sha256(test), "images": f"first {cfg.images} fashion_mnist test images",
            "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha, "seed": cfg.seed}


def attack_binding(cfg: CardConfig, bind: dict, acfg) -> dict:
    return {**bind, "attack": asdict(acfg), "attack_images": cfg.attack_images}


def read_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: measured again
            break
    return out


def measure(cfg: CardConfig, test, bind: dict) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "binding.json"
    if saved.exists():
        require_same(json.loads(saved.read_text()), bind, saved,
                     hint=f"use another --out_dir or delete {out} to start over")
    else:
        write_json(saved, bind)
    x01 = test.float01()
    classifier = load_classifier(cfg.classifier)
    unet = load_unet(cfg.unet)
    seeds = image_seeds(SmoothingConfig(seed=cfg.seed), len(test))
    for sigma in cfg.sigmas:
        path = out / f"sigma_{sigma}.jsonl"
        done = read_lines(path)
        # rewrite without a torn last line before appending
        write_text(path, "".join(json.dumps(d) + "\n" for d in done))
        model = smoothed_base(classifier, sigma, unet)
        scfg = SmoothingConfig(sigma=sigma, n0=cfg.n0, n=cfg.n, alpha=cfg.alpha, max_rows=cfg.max_rows,
                               seed=cfg.seed)
        with path.open("a") as f, tqdm(total=len(test), initial=len(done), desc=f"certify sigma={sigma}",
                                       unit="img") as bar:
            for i in range(len(done), len(test)):
                cert = certify(model, x01[i], scfg, torch.Generator().manual_seed(int(seeds[i])))
                row = {"i": i, "y": int(test.labels[i]), "seed": int(seeds[i]), **cert.to_dict()}
                f.write(json.dumps(row) + "\n")
                f.flush()
                done.append(row)
                bar.update(1)
                bar.set_postfix(certified_r0=f"{certified_at(done, 0.0) / len(done):.1%}")


def attack(cfg: CardConfig, test) -> None:
    """Empirical l_2 accuracy of the same smoothed classifier g, per image: PGD (keep the best iterate) with EoT
    over the smoothing noise on the base classifier h, then PREDICT at the adversarial point with fresh noise.
    One JSON line per image; resumes at the first image without one."""
    from dbp.attacks import AttackConfig, build_attack
    from dbp.certify import predict
    out = Path(cfg.out_dir)
    x01 = test.float01()
    classifier, unet = load_classifier(cfg.classifier), load_unet(cfg.unet)
    acfg = AttackConfig(norm="l2", eps=cfg.attack_eps, step=cfg.attack_eps / 4, steps=cfg.attack_steps,
                        eot=cfg.attack_eot, mode="eot")
    m = min(cfg.attack_images, len(test))
    abind = attack_binding(cfg, binding(cfg, test), acfg)
    saved = out / "attack_binding.json"
    if saved.exists():
        require_same(json.loads(saved.read_text()), abind, saved,
                     hint=f"delete {out}/attack_* to measure the attack again")
    else:
        write_json(saved, abind)
    for sigma in cfg.sigmas:
        path = out / f"attack_sigma_{sigma}.jsonl"
        done = read_lines(path)
        write_text(path, "".join(json.dumps(d) + "\n" for d in done))
        model = smoothed_base(classifier, sigma, unet)
        pcfg = SmoothingConfig(sigma=sigma, n0=1, n=cfg.n, alpha=cfg.alpha, max_rows=cfg.max_rows, seed=cfg.seed)
        with path.open("a") as f, tqdm(total=m, initial=len(done), desc=f"attack sigma={sigma}", unit="img") as bar:
            for lo in range(len(done), m, cfg.attack_batch):
                hi = min(m, lo + cfg.attack_batch)
                res = build_attack(model, acfg)(x01[lo:hi], test.labels[lo:hi],
                                                generator=torch.Generator().manual_seed(cfg.seed + 7919 * lo))
                for j, i in enumerate(range(lo, hi)):
                    # fresh noise for the judgement: a seed the attack never saw
                    p = predict(model, res.x_adv[j], pcfg, torch.Generator().manual_seed(10**9 + cfg.seed + i))
                    row = {"i": i, "y": int(test.labels[i]), "label": p.label, "p_value": p.p_value,
                           "l2": float((res.x_adv[j] - x01[i]).flatten().norm())}
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    done.append(row)
                bar.update(hi - lo)
                bar.set_postfix(robust=f"{sum(d['label'] == d['y'] for d in done) / len(done):.1%}")


def certified_at(rows: list[dict], radius: float) -> int:
    return sum(1 for d in rows if d["label"] == d["y"] and d["label"] != ABSTAIN and d["radius"] >= radius)


def max_radius(sigma: float, n: int, alpha: float) -> float:
    from scipy.stats import norm
    return sigma * float(norm.ppf(alpha ** (1.0 / n)))


def empirical_l2() -> list[dict]:
    """The served purifier's empirical l_2 rows (its robustness card), for the certified <= empirical check."""
    out = []
    vdir = repository.deployed_weights("purifier").parent
    ver = int(vdir.name)
    card = json.loads((vdir / "robustness_card.json").read_text())
    for s in card["settings"]:
        if s.get("threat_model") == "l2" and "robust" in s:
            out.append({"version": ver, "setting": s["name"], "eps": s["eps"], "acc": s["robust"]["acc"],
                        "ci95": s["robust"]["ci95"], "n": s["robust"]["n"], "protocol": s["robust"]["protocol"]})
    return out


def report(cfg: CardConfig, bind: dict, copy: bool) -> dict:
    out = Path(cfg.out_dir)
    card = {"schema": "certify-card/1", "what": "randomized smoothing, one-shot diffusion denoiser (Carlini et al. "
            "2023) in front of the classifier; CERTIFY of Cohen et al. 2019 per image",
            "claim": "an l_2 certificate at the stated radius for the smoothed classifier at that sigma, n and "
                     "alpha; no other threat (not l_inf beyond the l_2 ball, not a chosen noise seed)",
            "config": repository.relative_paths(asdict(cfg)), "binding": bind, "git_commit": git_commit(), "radii": list(RADII), "sigmas": []}
    for sigma in cfg.sigmas:
        rows = read_lines(out / f"sigma_{sigma}.jsonl")
        n = len(rows)
        if not n:
            continue
        acc = {}
        for r in RADII:
            k = certified_at(rows, r)
            lo, hi = wilson(k, n)
            acc[str(r)] = {"acc": k / n, "ci95": [lo, hi], "k": k}
        card["sigmas"].append({
            "sigma": sigma, "images": n, "complete": n >= cfg.images, "certified_accuracy": acc,
            "abstain": sum(1 for d in rows if d["label"] == ABSTAIN),
            "max_radius_allowed": max_radius(sigma, cfg.n, cfg.alpha),
            "seconds_per_image_mean": sum(d["seconds"] for d in rows) / n,
            "empirical": empirical(cfg, rows, read_lines(out / f"attack_sigma_{sigma}.jsonl")),
            "certificates": rows})
    card["empirical_l2"] = empirical_l2()
    write_json(out / "card.json", card)
    write_text(out / "card.md", markdown(card))
    plot(card, out / "curve.png")
    if copy:
        DOCS.mkdir(parents=True, exist_ok=True)
        for name in ("card.json", "card.md", "curve.png"):
            shutil.copy(out / name, DOCS / name)
    return card


def empirical(cfg: CardConfig, certs: list[dict], attacked: list[dict]) -> Optional[dict]:
    """g's accuracy under the attack, beside its certified accuracy at the attack's radius on the same images,
    and the broken certificates: certified (correctly) at >= that radius, yet PREDICT at the adversarial point
    answers another class. Each needs a wrong certificate or a wrong PREDICT (probability <= alpha each), so
    more than the 99.9% quantile of Bin(certified, 2 alpha) would be a bug."""
    if not attacked:
        return None
    from scipy.stats import binom
    m = len(attacked)
    by_i = {d["i"]: d for d in certs}
    k = sum(1 for d in attacked if d["label"] == d["y"])
    lo, hi = wilson(k, m)
    cert = [by_i[d["i"]] for d in attacked if d["i"] in by_i]
    certified = [c for c in cert if c["label"] == c["y"] and c["label"] != ABSTAIN and c["radius"] >= cfg.attack_eps]
    adv = {d["i"]: d for d in attacked}
    broken = [c["i"] for c in certified if adv[c["i"]]["label"] not in (ABSTAIN, c["label"])]
    return {"images": m, "eps": cfg.attack_eps, "attack": f"PGD-{cfg.attack_steps} l_2 with EoT-{cfg.attack_eot} "
            "over the smoothing noise (best iterate), judged by PREDICT with fresh noise", "acc": k / m,
            "ci95": [lo, hi], "certified_same_images": len(certified) / m if m else math.nan,
            "certified_count": len(certified), "broken_certificates": broken,
            "broken_allowed": int(binom.ppf(1 - 1e-3, len(certified), 2 * cfg.alpha)),
            "abstain": sum(1 for d in attacked if d["label"] == ABSTAIN)}


def markdown(card: dict) -> str:
    c = card["config"]
    lines = [f"# Certified l_2 accuracy (n0 = {c['n0']}, n = {c['n']}, alpha = {c['alpha']})", "",
             f"`python -m experiments.certify.card` at {card['git_commit']}; denoiser sha256 "
             f"{card['binding']['unet_sha256'][:12]}, classifier sha256 {card['binding']['classifier_sha256'][:12]}, "
             f"{card['binding']['images']} (sha256 {card['binding']['images_sha256'][:12]}). Accuracy [95% Wilson]; "
             "an abstention counts as wrong; '-' where the radius exceeds what n and alpha allow.", "",
             "| sigma | images | " + " | ".join(f"r = {r}" for r in card["radii"]) + " | abstain | s/image |",
             "| --- | --- | " + " | ".join("---" for _ in card["radii"]) + " | --- | --- |"]
    for s in card["sigmas"]:
        cells = []
        for r in card["radii"]:
            a = s["certified_accuracy"][str(r)]
            cells.append("-" if r > s["max_radius_allowed"] else
                         f"{a['acc']:.1%} [{a['ci95'][0]:.1%}, {a['ci95'][1]:.1%}]")
        lines.append(f"| {s['sigma']} | {s['images']}{'' if s['complete'] else ' (running)'} | " + " | ".join(cells)
                     + f" | {s['abstain']} | {s['seconds_per_image_mean']:.1f} |")
    emp = [(s["sigma"], s["empirical"]) for s in card["sigmas"] if s.get("empirical")]
    if emp:
        lines += ["", "The same smoothed classifier attacked (certified <= empirical must hold on the same images; a "
                  "broken certificate is a certified image whose attacked PREDICT answers another class):", "",
                  "| sigma | images | l_2 eps | certified at eps | empirical under attack | abstain | broken (allowed) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for sigma, e in emp:
            lines.append(f"| {sigma} | {e['images']} | {e['eps']} | {e['certified_same_images']:.1%} | "
                         f"{e['acc']:.1%} [{e['ci95'][0]:.1%}, {e['ci95'][1]:.1%}] | {e['abstain']} | "
                         f"{len(e['broken_certificates'])} ({e['broken_allowed']}) |")
        lines += ["", f"Attack: {emp[0][1]['attack']}."]
    lines += ["", "Largest radius n and alpha allow: " + ", ".join(
        f"{s['max_radius_allowed']:.3f} at sigma {s['sigma']}" for s in card["sigmas"]) + ".", "",
              "For comparison, the served purifier (a different defence: DDPM purification at t*, not the smoothed "
              "classifier) under its own card's l_2 attack:", ""]
    for e in card["empirical_l2"]:
        lines.append(f"- version {e['version']} {e['setting']} at eps {e['eps']}: {e['acc']:.1%} "
                     f"[{e['ci95'][0]:.1%}, {e['ci95'][1]:.1%}] on {e['n']} images ({e['protocol']})")
    return "\n".join(lines) + "\n"


def plot(card: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dbp.plots import save_figure
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in card["sigmas"]:
        rows = s["certificates"]
        grid = np.linspace(0, max(card["radii"]), 101)
        ys = [certified_at(rows, r) / len(rows) for r in grid]
        line, = ax.plot(grid, ys, label=f"sigma = {s['sigma']} ({len(rows)} images)")
        pts = [r for r in card["radii"] if r <= s["max_radius_allowed"]]
        accs = [s["certified_accuracy"][str(r)] for r in pts]
        ax.errorbar(pts, [a["acc"] for a in accs], fmt="o", color=line.get_color(),
                    yerr=[[a["acc"] - a["ci95"][0] for a in accs], [a["ci95"][1] - a["acc"] for a in accs]])
        e = s.get("empirical")
        if e:
            ax.errorbar([e["eps"]], [e["acc"]], yerr=[[e["acc"] - e["ci95"][0]], [e["ci95"][1] - e["acc"]]],
                        fmt="s", mfc="none", color=line.get_color(),
                        label=f"sigma = {s['sigma']}: same g under EoT-PGD l_2 ({e['images']} images)")
    for e in card["empirical_l2"]:
        ax.errorbar([e["eps"]], [e["acc"]], yerr=[[e["acc"] - e["ci95"][0]], [e["ci95"][1] - e["acc"]]], fmt="kx",
                    label=f"served v{e['version']} empirical {e['setting']} (n = {e['n']})")
    ax.set_xlabel("l_2 radius (pixels in [0, 1])")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"certified l_2 accuracy, n = {card['config']['n']}, alpha = {card['config']['alpha']}")
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=120)


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout
        return sha.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> dict:
    cfg, a = parse(argv)
    set_threads(cfg.threads)
    test = load_dataset("fashion_mnist", "test").head(cfg.images)
    bind = binding(cfg, test)
    if not a.report_only:
        t0 = time.perf_counter()
        measure(cfg, test, bind)
        if cfg.attack_images > 0:
            attack(cfg, test)
        print(f"measured in {time.perf_counter() - t0:.0f} s")
    card = report(cfg, bind, a.copy)
    print(markdown(card))
    return card


if __name__ == "__main__":
    main()
