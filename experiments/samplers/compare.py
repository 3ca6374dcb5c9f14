"""ADDT under each sampler (issue 22 item 3): the deployed ADDT purifier against the base, under DDPM, DDIM,
VP-SDE and EDM, on the same images, with paired tests per sampler.

  python -m experiments.samplers.compare                 # every unit, resumes what is done
  python -m experiments.samplers.compare --units edm     # one sampler's two units (or names: edm-addt,...)
  python -m experiments.samplers.compare --report_only --copy   # table and figure from what is saved

Models: --addt (default: purifier version 2, the ADDT fine-tune) and --base (version 1, the diffusion model it was
fine-tuned from), both with the served classifier (--classifier, default version 2). Every sampler runs at the
served t* with about the served compute (11 UNet calls: DDIM's served N = 100):
  ddpm  N = 100: 10 ancestral steps of stride 10 + the final x0 step (11 calls)
  ddim  N = 100: the same grid, eta = 0 (11 calls) -- the served sampler
  vpsde N = 100: 10 Euler-Maruyama steps of h = 0.01 from t* = 0.1 (10 calls; DiffPure's h = 1e-3 is 100 calls)
  edm   N = 6, S_churn = 0: Heun on 6 sigmas (11 calls); its reverse chain is deterministic (docs/samplers.md)
Per unit, on the last --n_images Fashion-MNIST test images, the measurements of the purification sweep
(experiments/sweeps/purification_sweep.py, the same seeds, salts and attack settings, so the ddim-addt unit IS the
sweep's served point and is taken from it when --sweep holds it with the same settings): clean single-shot
accuracy, DW-box PGD l_inf 8/255, PGD-EoT l_inf 8/255 scored as expected accuracy over k purifications, the
input-gradient cosine under two noise draws (how random the purifier is), latency.
Paired per sampler, ADDT vs base: exact McNemar on the DW-box and clean outcomes (dbp.paired.compare's table),
an exact sign-flip test on the EoT hits (dbp.paired.paired_hits). The paper's claim to check: ADDT helps under
every sampler, most where the purifier is least random (highest gradient cosine).

Resumable like the sweep: each measurement saved atomically (units/<name>.partial.json), the unit as
units/<name>.json; a directory of another configuration is refused. Writes <out>/samplers.{json,md} and
<out>/samplers.png; --copy puts them in docs/results/samplers/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from dbp import repository
from dbp.data import load_fashion_mnist
from dbp.models import Defense, Purifier, load_classifier, load_unet
from dbp.runtime import git_commit, set_threads
from dbp.state import require_same, write_json, write_text
from experiments.sweeps import purification_sweep as sweep

ROOT = Path(__file__).resolve().parents[2]
PROG = "python -m experiments.samplers.compare"
FORMAT = 1
SAMPLERS = {"ddpm": {"num_inference_steps": 100}, "ddim": {"num_inference_steps": 100},
            "vpsde": {"num_inference_steps": 100}, "edm": {"num_inference_steps": 6, "s_churn": 0.0}}
MODELS = ("base", "addt")
COMPONENTS = ("clean", "dwbox_linf_8_255", "eot_linf_8_255", "gradient_cosine", "latency")
# ddim last: by then the sweep has usually measured the served point, which is the ddim-addt unit
ORDER = ("ddpm", "vpsde", "edm", "ddim")
SERVED_SAMPLER = "ddim"  # version 2's default profile (config.pbtxt); from_sweep takes its ADDT unit from the sweep


def unit_name(sampler: str, model: str) -> str:
    return f"{sampler}-{model}"


def plan_units(eps: dict, t_star: int) -> list[dict]:
    units = []
    for s in ORDER:
        for m in MODELS:
            p = Purifier(eps[m], t_star=t_star, sampler=s, **SAMPLERS[s])
            units.append({"name": unit_name(s, m), "sampler": s, "model": m, "t_star": t_star, **SAMPLERS[s],
                          "unet_calls": p.n_unet_calls})
    return units


def select(units: list[dict], spec: Optional[str]) -> list[dict]:
    if not spec:
        return units
    want = [w.strip() for w in spec.split(",") if w.strip()]
    names = {u["name"] for u in units}
    bad = [w for w in want if w not in names and w not in SAMPLERS and w not in MODELS]
    if bad:
        raise SystemExit(f"{PROG}: unknown --units {bad}; choose samplers {list(SAMPLERS)}, models {list(MODELS)} "
                         f"or names {sorted(names)}")
    return [u for u in units if u["name"] in want or u["sampler"] in want or u["model"] in want]


def run_config(a, models: dict) -> dict:
    """Everything that decides a unit's numbers; the attack/measurement keys are the sweep's."""
    return {"format": FORMAT, **models, "images": f"Fashion-MNIST test, the last {a.n_images}",
            "n_images": a.n_images, "n_eot": a.n_eot, "k": a.k, "steps": a.steps, "eot": a.eot, "seed": a.seed,
            "batch": a.batch, "threads": a.threads, "latency_reps": a.latency_reps, "latency_batch": a.latency_batch,
            "budgets": {k: list(v) for k, v in sweep.BUDGETS.items()}}


SWEEP_KEYS = ("n_images", "n_eot", "k", "steps", "eot", "seed", "batch", "threads", "latency_reps",
              "latency_batch", "budgets")


def from_sweep(u: dict, cfg: dict, sweep_dir: Optional[Path]) -> Optional[dict]:
    """The sweep's measurement of this unit, if the sweep ran it with the same models and settings: only the
    served (ddim, t*, N) point on the ADDT weights qualifies."""
    if sweep_dir is None or u["model"] != "addt":
        return None
    f = sweep_dir / "points" / f"{sweep.point_name(u['t_star'], u['num_inference_steps'])}.json"
    if not f.exists():
        return None
    s = json.loads(f.read_text())
    sc, p = s["config"], s["point"]
    same = (p["sampler"] == u["sampler"] and sc["purifier_sha256"] == cfg["addt_sha256"]
            and sc["classifier_sha256"] == cfg["classifier_sha256"] and all(sc[k] == cfg[k] for k in SWEEP_KEYS))
    if not same:
        return None
    return {"results": {c: s["results"][c] for c in COMPONENTS}, "seconds": {c: s["seconds"][c] for c in COMPONENTS},
            "load_average": s.get("load_average"), "git_commit": s.get("git_commit"),
            "finished_utc": s.get("finished_utc"), "taken_from": repository.relative_path(f)}


def run_unit(u: dict, cfg: dict, eps: dict, classifier, x, y, a, out: Path, sweep_dir: Optional[Path]) -> dict:
    final, partial = out / "units" / f"{u['name']}.json", out / "units" / f"{u['name']}.partial.json"
    if final.exists():
        print(f"{u['name']}: done, skipped", flush=True)
        return json.loads(final.read_text())
    borrowed = from_sweep(u, cfg, sweep_dir)
    if borrowed is not None:
        state = {"config": cfg, "unit": u, **borrowed}
        write_json(final, state)
        print(f"{u['name']}: taken from {borrowed['taken_from']}", flush=True)
        return state
    state = sweep._read(partial) or {"config": cfg, "unit": u, "results": {}, "seconds": {}}
    kw = {k: u[k] for k in ("num_inference_steps", "s_churn") if k in u}
    defense = Defense(Purifier(eps[u["model"]], t_star=u["t_star"], sampler=u["sampler"], **kw).eval(),
                      classifier).eval()
    for c in COMPONENTS:
        if c in state["results"]:
            continue
        t0 = time.perf_counter()
        state["results"][c] = sweep.measure(c, defense, x, y, a)
        state["seconds"][c] = round(time.perf_counter() - t0, 1)
        state["load_average"] = list(os.getloadavg())
        write_json(partial, state)
        print(f"{u['name']} {c}: {sweep.summary(c, state['results'][c])} ({state['seconds'][c]} s)", flush=True)
    state.update(finished_utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), git_commit=git_commit())
    write_json(final, state)
    partial.unlink(missing_ok=True)
    return state


# ---- paired comparisons and outputs ------------------------------------------------------------------------

def paired(addt: dict, base: dict, cfg: dict) -> dict:
    return sweep.paired_results(addt, base, cfg["k"], names=("addt", "base"), outcomes=("clean", "dwbox_linf_8_255"))


def vs_served_sampler(cfg: dict, done: dict) -> dict:
    """Each other sampler against the served one (ddim, the sweep's served point), both on the ADDT weights: what a
    serving profile with that sampler changes, image by image (it chose the `strong` profile, README)."""
    served = done.get(unit_name(SERVED_SAMPLER, "addt"))
    if served is None:
        return {}
    return {s: sweep.paired_results(done[unit_name(s, "addt")]["results"], served["results"], cfg["k"],
                                    names=("sampler", "served"), outcomes=("clean", "dwbox_linf_8_255"))
            for s in ORDER if s != SERVED_SAMPLER and unit_name(s, "addt") in done}


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def markdown(cfg: dict, units: list[dict], done: dict, pairs: dict) -> str:
    lines = ["# ADDT under each sampler (issue 22 item 3)", "",
             f"ADDT purifier `{cfg['addt']}` vs base `{cfg['base']}`, classifier `{cfg['classifier']}`; t* = "
             f"{cfg['t_star']}; {cfg['images']} images, PGD-{cfg['steps']} l_inf 8/255, EoT-{cfg['eot']} on the "
             f"first {cfg['n_eot']} scored over k={cfg['k']}. Accuracies in %. Paired: ADDT - base in points "
             f"[95% interval], exact p. Made by `{PROG}`.", "",
             "| sampler | UNet calls | clean base / ADDT | DW-box base / ADDT | DW-box ADDT - base (p) | "
             "EoT base / ADDT | EoT ADDT - base (p) | grad cos base / ADDT | ms/img b1 (cpu) |",
             "| --- " * 9 + "|"]
    for s in ORDER:
        b, d = done.get(unit_name(s, "base")), done.get(unit_name(s, "addt"))
        calls = next(u["unet_calls"] for u in units if u["sampler"] == s)
        if b is None or d is None:
            have = [m for m, v in (("base", b), ("addt", d)) if v is not None]
            lines.append(f"| {s} | {calls} | not run yet (done: {', '.join(have) or 'none'}) |" + " |" * 6)
            continue
        rb, rd, p = b["results"], d["results"], pairs[s]

        def diff(c):
            q = p[c]
            return f"{100 * q['diff']:+.1f} [{100 * q['ci95'][0]:+.0f}, {100 * q['ci95'][1]:+.0f}] (p={q['p_value']:.2g})"
        lines.append(f"| {s} | {calls} | {_pct(rb['clean']['acc'])} / {_pct(rd['clean']['acc'])} "
                     f"| {_pct(rb['dwbox_linf_8_255']['acc'])} / {_pct(rd['dwbox_linf_8_255']['acc'])} "
                     f"| {diff('dwbox_linf_8_255')} "
                     f"| {_pct(rb['eot_linf_8_255']['acc'])} / {_pct(rd['eot_linf_8_255']['acc'])} "
                     f"| {diff('eot_linf_8_255')} "
                     f"| {rb['gradient_cosine']['draws_1']['mean']:.2f} / {rd['gradient_cosine']['draws_1']['mean']:.2f} "
                     f"| {rd['latency']['batch_1']['ms_per_image']:.0f} ({rd['latency']['batch_1']['cpu_ms_per_image']:.0f}) |")
    if pairs:
        # a count, not a test: the samplers attack the same images, so their tables are not independent
        tot = {c: [sum(pairs[s][c][f"only_{m}_right"] for s in pairs) for m in ("addt", "base")]
               for c in ("clean", "dwbox_linf_8_255")}
        lines += ["", f"Summed over the {len(pairs)} samplers ({', '.join(pairs)}), images right only with ADDT / only "
                  f"with the base: DW-box {tot['dwbox_linf_8_255'][0]} / {tot['dwbox_linf_8_255'][1]}, clean "
                  f"{tot['clean'][0]} / {tot['clean'][1]}. A count, not a test: the samplers share their images."]
    vs = vs_served_sampler(cfg, done)
    if vs:
        def cell(q):
            if "only_sampler_right" in q:
                return f"{100 * q['diff']:+.1f} ({q['only_sampler_right']} / {q['only_served_right']}, p={q['p_value']:.2g})"
            return (f"{100 * q['diff']:+.1f} [{100 * q['ci95'][0]:+.0f}, {100 * q['ci95'][1]:+.0f}] "
                    f"(p={q['p_value']:.2g})")
        lines += ["", f"## Each sampler against the served one ({SERVED_SAMPLER}), both ADDT", "",
                  "Sampler - served in points on the same images and noise seeds; 0/1 outcomes: (images right only "
                  "with the sampler / only with the served one, exact McNemar p); EoT: mean difference of expected "
                  "accuracy [95% interval] (exact sign-flip p).", "",
                  "| sampler | clean | DW-box 8/255 | EoT 8/255 |", "| --- " * 4 + "|"]
        lines += [f"| {s} | {cell(q['clean'])} | {cell(q['dwbox_linf_8_255'])} | {cell(q['eot_linf_8_255'])} |"
                  for s, q in vs.items()]
    return "\n".join(lines) + "\n"


def figure(done: dict, pairs: dict, path: Path) -> Optional[Path]:
    from dbp.plots import _plt, save_figure
    ss = [s for s in ORDER if s in pairs]
    if not ss:
        return None
    plt = _plt()
    fig, (ax, axc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (c, label) in enumerate((("dwbox_linf_8_255", "DW-box 8/255"), ("eot_linf_8_255", "EoT 8/255"))):
        d = [100 * pairs[s][c]["diff"] for s in ss]
        err = [[100 * (pairs[s][c]["diff"] - pairs[s][c]["ci95"][0]) for s in ss],
               [100 * (pairs[s][c]["ci95"][1] - pairs[s][c]["diff"]) for s in ss]]
        ax.errorbar([j + (i - 0.5) * 0.15 for j in range(len(ss))], d, yerr=err, fmt="o", capsize=3, label=label)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xticks(range(len(ss)), ss)
    ax.set_ylabel("ADDT - base, points (95% interval)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for s in ss:
        cos = done[unit_name(s, "addt")]["results"]["gradient_cosine"]["draws_1"]["mean"]
        axc.scatter(cos, 100 * pairs[s]["dwbox_linf_8_255"]["diff"])
        axc.annotate(f" {s}", (cos, 100 * pairs[s]["dwbox_linf_8_255"]["diff"]), fontsize=8)
    axc.set_xlabel("input-gradient cosine, two noise draws (ADDT; 1 = deterministic)")
    axc.set_ylabel("DW-box gain of ADDT, points")
    axc.grid(alpha=0.3)
    fig.suptitle("ADDT vs base under each sampler (same images, same noise)")
    return save_figure(fig, path)


def write_outputs(out: Path, cfg: dict, units: list[dict], copy_to: Optional[Path]) -> list[Path]:
    done = {u["name"]: s for u in units if (s := sweep._read(out / "units" / f"{u['name']}.json")) is not None}
    pairs = {s: paired(done[unit_name(s, "addt")]["results"], done[unit_name(s, "base")]["results"], cfg)
             for s in ORDER if unit_name(s, "addt") in done and unit_name(s, "base") in done}
    doc = {"config": cfg, "units": [{**u, **({k: done[u["name"]].get(k) for k in
                                             ("results", "seconds", "load_average", "finished_utc", "git_commit",
                                              "taken_from")} if u["name"] in done else {"results": None})}
                                    for u in units],
           "paired": pairs, "addt_vs_served_sampler": vs_served_sampler(cfg, done), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                        "torch": torch.__version__}}
    paths = [write_json(out / "samplers.json", doc), write_text(out / "samplers.md", markdown(cfg, units, done, pairs))]
    f = figure(done, pairs, out / "samplers.png")
    if f is not None:
        paths.append(f)
    if copy_to is not None:
        from dbp.state import save_atomic
        for f in list(paths):
            dst = copy_to / f.name
            save_atomic(dst, lambda tmp, f=f: tmp.write_bytes(f.read_bytes()))
            paths.append(dst)
    return paths


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    for name, default, what in (("n_images", 64, "the last N test images"), ("n_eot", 16, "EoT images"),
                                ("k", 10, "purifications scoring an EoT image"), ("steps", 20, "PGD steps"),
                                ("eot", 10, "EoT draws per step"), ("batch", 16, "images per attack batch"),
                                ("latency_reps", 5, "timed calls"), ("latency_batch", 16, "the larger batch"),
                                ("threads", 1, "torch threads"), ("seed", 0, "seed")):
        ap.add_argument(f"--{name}", type=int, default=default, help=what)
    ap.add_argument("--repository", default=str(repository.default_repository()))
    ap.add_argument("--addt", default=None, help="ADDT purifier checkpoint dir (default: purifier version 2)")
    ap.add_argument("--base", default=None, help="base purifier checkpoint dir (default: purifier version 1)")
    ap.add_argument("--classifier", default=None, help="classifier checkpoint dir (default: classifier version 2)")
    ap.add_argument("--t_star", type=int, default=None, help="default: the served t*")
    ap.add_argument("--units", default=None, help="comma-separated samplers, models or unit names")
    ap.add_argument("--out", default="runs/samplers")
    ap.add_argument("--sweep", default="runs/sweeps/purification", help="the sweep's --out, to reuse its served "
                    "point as ddim-addt ('' to measure it here)")
    ap.add_argument("--report_only", action="store_true")
    ap.add_argument("--copy", action="store_true")
    ap.add_argument("--copy_to", default=str(ROOT / "docs" / "results" / "samplers"))
    ap.add_argument("--data_root", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    set_threads(a.threads)
    repo = Path(a.repository)
    dirs = {"addt": Path(a.addt) if a.addt else repository.weights_dir(repo, "purifier", 2),
            "base": Path(a.base) if a.base else repository.weights_dir(repo, "purifier", 1),
            "classifier": Path(a.classifier) if a.classifier else repository.weights_dir(repo, "classifier", 2)}
    for k, d in dirs.items():
        if not (d / "meta.json").exists():
            raise SystemExit(f"{PROG}: --{k} {d} is not a checkpoint directory (no meta.json)")
    t_star = a.t_star if a.t_star is not None else int(repository.purification_settings(repo)["t_star"])
    models = {"t_star": t_star}
    for k, d in dirs.items():
        models[k], models[f"{k}_sha256"] = repository.relative_path(d), sweep._sha256(d)
    cfg = run_config(a, models)
    eps = {m: load_unet(dirs[m]) for m in MODELS}
    units = plan_units(eps, t_star)
    out = Path(a.out)
    if (out / "config.json").exists():
        require_same(sweep._read(out / "config.json"), cfg, out / "config.json", sweep.HINT)
    copy_to = Path(a.copy_to) if a.copy else None
    if a.report_only:
        paths = write_outputs(out, cfg, units, copy_to)
        print("wrote " + ", ".join(map(str, paths)), flush=True)
        return {"config": cfg, "paths": [str(p) for p in paths]}
    todo = select(units, a.units)
    held = sweep._lock(out)
    write_json(out / "config.json", cfg)
    classifier = load_classifier(dirs["classifier"])
    ds = load_fashion_mnist("test", a.data_root)
    idx = list(range(len(ds) - a.n_images, len(ds)))
    x, y = ds.float01(idx), ds.labels[idx].clone()
    sweep_dir = Path(a.sweep) if a.sweep else None
    for u in todo:
        t0 = time.perf_counter()
        run_unit(u, cfg, eps, classifier, x, y, a, out, sweep_dir)
        print(f"{u['name']}: {time.perf_counter() - t0:.0f} s this run", flush=True)
        write_outputs(out, cfg, units, copy_to)
    held.close()
    paths = write_outputs(out, cfg, units, copy_to)
    print("wrote " + ", ".join(map(str, paths)), flush=True)
    return {"config": cfg, "paths": [str(p) for p in paths]}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
