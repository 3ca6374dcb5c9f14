"""The purification trade-off of issue 22 item 4: t* and DDIM-step sweeps of the deployed purifier + classifier.

  python -m experiments.sweeps.purification_sweep                    # every point, resumes what is done
  python -m experiments.sweeps.purification_sweep --points A         # sweep A only (or B, or names: t100-n100,...)
  python -m experiments.sweeps.purification_sweep --copy             # and copy the results to docs/results/sweeps/

Sweep A: t* in {0.05, 0.1, 0.15, 0.2, 0.3} x T with the served sampler and steps (DDIM, N = 100).
Sweep B: DDIM at the served t* with num_inference_steps chosen so the reverse chain makes about {5, 10, 20, 50}
UNet calls (Purifier.n_unet_calls: DDIM's "leading" stride T // N must divide t*, so the counts are the nearest
reachable ones, e.g. N = 40 -> 5 calls, N = 100 -> 11); both N and the calls are recorded.
The served point (t* = 100, N = 100) belongs to both sweeps and is measured once.

Per point, on the LAST --n_images Fashion-MNIST test images (the gate measures the first 256):
  - clean: single-shot purified accuracy under fresh noise (dbp.robustness.single_shot);
  - DW-box PGD l_inf 8/255 (the paper's budget) and l_inf 0.1 (Fashion-MNIST's), dbp.attacks mode "dwbox",
    --steps steps, best iterate; the outcome under the attack's fixed noise (dbp.robustness.adversarial_correct),
    and the same images under fresh noise (the served setting);
  - EoT: PGD-EoT l_inf 8/255 (--eot draws per step) on the first --n_eot of those images, then the expected
    accuracy over --k fresh purifications (dbp.robustness.expected_correct);
  - latency per image of purification + classification at batch 1 and batch 16 (torch.inference_mode, median of
    --latency_reps timed calls after one warm-up, at --threads threads): wall time, and the process's CPU time,
    which a shared machine does not inflate (the wall figures carry the load average they were taken at);
  - stochasticity: the cosine of input gradients under two independent noise draws (dbp.sanity_checks.
    eot_gradient_consistency with k = 1, all images) and of two EoT-(--eot) gradients (first --n_eot images).
Intervals: 95%, Wilson for 0/1 outcomes, normal over per-image scores for expected accuracy and cosines.

Resumable: each measurement of a point is saved atomically as it finishes (points/<name>.partial.json), the point
as points/<name>.json when all are done; a rerun skips what is saved and refuses a directory holding results of
another configuration (dbp.state.require_same names the differing keys). Writes <out>/purification_sweep.{json,md},
<out>/sweep_tstar.png, <out>/sweep_steps.png after every point; --copy puts them in docs/results/sweeps/
(--report_only --copy: from what is saved, measuring nothing, while a run goes on). One run per --out (a lock).
Only the library's purification and attack code runs here (dbp.models, dbp.attacks, dbp.robustness).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from dbp import repository
from dbp.attacks import AttackConfig, build_attack
from dbp.data import load_fashion_mnist
from dbp.models import Defense, Purifier, load_classifier, load_unet
from dbp.paired import PairedTable, mcnemar_exact, newcombe_interval, paired_hits
from dbp.robustness import adversarial_correct, expected_correct, mean_interval, single_shot
from dbp.runtime import git_commit, set_threads
from dbp.sanity_checks import eot_gradient_consistency
from dbp.state import require_same, write_json, write_text
from dbp.stats import Z95
from dbp.threat_models import THREAT_MODELS

ROOT = Path(__file__).resolve().parents[2]
PROG = "python -m experiments.sweeps.purification_sweep"
T_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.3)
CALL_TARGETS = (5, 10, 20, 50)
BUDGETS = {"linf_8_255": THREAT_MODELS["paper"]["linf"], "linf_0.1": THREAT_MODELS["fashion"]["linf"]}
FORMAT = 1  # bump when a measurement changes meaning: old results are then refused, not mixed in
COMPONENTS = ("clean", "dwbox_linf_8_255", "dwbox_linf_0.1", "eot_linf_8_255", "gradient_cosine", "latency")
FIGURES = {"A": "sweep_tstar.png", "B": "sweep_steps.png"}


# ---- the points -------------------------------------------------------------------------------------------

def point_name(t_star: int, n: int) -> str:
    return f"t{t_star:03d}-n{n}"


def steps_for_calls(eps_net, t_star: int, sampler: str, target: int) -> tuple[int, int]:
    """(num_inference_steps, UNet calls): the valid N whose chain from t_star makes the number of UNet calls
    closest to `target`, as Purifier.n_unet_calls counts them. Ties: fewer calls, then an N that divides T (the
    stride T // N is exact, as for the served N = 100; other N with the same stride run the same chain), then the
    smaller N."""
    best = None
    for n in range(1, 1001):
        try:
            calls = Purifier(eps_net, t_star=t_star, sampler=sampler, num_inference_steps=n).n_unet_calls
        except ValueError:  # t* not on the grid of stride T // N
            continue
        key = (abs(calls - target), calls, 1000 % n != 0, n)
        if best is None or key < best[0]:
            best = (key, n, calls)
    return best[1], best[2]


def plan_points(eps_net, served: dict) -> list[dict]:
    """Every point of both sweeps, the served one once (in both), cheapest first."""
    T = 1000
    sampler, t_served, n_served = served["sampler"], served["t_star"], served["num_inference_steps"]
    pts: dict[str, dict] = {}

    def add(t_star, n, sweep, target=None):
        name = point_name(t_star, n)
        p = pts.setdefault(name, {"name": name, "t_star": t_star, "num_inference_steps": n, "sampler": sampler,
                                  "unet_calls": Purifier(eps_net, t_star=t_star, sampler=sampler,
                                                         num_inference_steps=n).n_unet_calls,
                                  "sweeps": [], "served": t_star == t_served and n == n_served})
        p["sweeps"].append(sweep)
        if target is not None:
            p["target_calls"] = target
    for f in T_FRACTIONS:
        add(int(round(f * T)), n_served, "A")
    for c in CALL_TARGETS:
        n, _ = steps_for_calls(eps_net, t_served, sampler, c)
        add(t_served, n, "B", c)
    return sorted(pts.values(), key=lambda p: (p["unet_calls"], p["t_star"]))


def select(points: list[dict], spec: Optional[str]) -> list[dict]:
    if not spec:
        return points
    want = [s.strip() for s in spec.split(",") if s.strip()]
    names = {p["name"] for p in points}
    bad = [w for w in want if w not in names and w not in FIGURES]
    if bad:
        raise SystemExit(f"{PROG}: unknown --points {bad}; choose sweeps A, B or names {sorted(names)}")
    return [p for p in points if p["name"] in want or any(s in want for s in p["sweeps"])]


# ---- measurements -----------------------------------------------------------------------------------------

def _gen(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + salt)


def _acc(scores: torch.Tensor, protocol: str, **extra) -> dict:
    s = scores.detach().float().flatten().cpu()
    lo, hi = mean_interval(s)
    return {"acc": float(s.mean()), "ci95": [lo, hi], "n": int(s.numel()), "protocol": protocol,
            "per_image": [round(float(v), 4) for v in s], **extra}


def _mean_ci(v: torch.Tensor) -> dict:
    v = v.detach().double().flatten().cpu()
    m = float(v.mean())
    half = Z95 * float(v.std(unbiased=True)) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"mean": m, "ci95": [m - half, m + half], "n": int(v.numel()), "min": float(v.min()),
            "per_image": [round(float(c), 4) for c in v]}


def _batched(fn, x, y, batch):
    return torch.cat([fn(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)])


def measure_clean(defense, x, y, a) -> dict:
    g = _gen(a.seed, 1)
    c = _batched(lambda xb, yb: single_shot(defense, xb, yb, generator=g), x, y, a.batch)
    return _acc(c, "single-shot, fresh noise")


def measure_dwbox(defense, x, y, a, budget: str, salt: int) -> dict:
    eps, step = BUDGETS[budget]
    atk = build_attack(defense, AttackConfig(norm="linf", eps=eps, step=step, steps=a.steps, mode="dwbox"))
    g = _gen(a.seed, salt)
    fixed, fresh = [], []
    for i in range(0, len(x), a.batch):
        xb, yb = x[i:i + a.batch], y[i:i + a.batch]
        res = atk(xb, yb, generator=g)
        fixed.append(adversarial_correct(defense, res, yb))
        fresh.append(single_shot(defense, res.x_adv, yb, generator=g))
    return {**_acc(torch.cat(fixed), "DW-box PGD, outcome under the attack's fixed noise",
                   eps=eps, step=step, steps=a.steps),
            "fresh_noise": _acc(torch.cat(fresh), "the DW-box images, single-shot under fresh noise")}


def measure_eot(defense, x, y, a) -> dict:
    eps, step = BUDGETS["linf_8_255"]
    atk = build_attack(defense, AttackConfig(norm="linf", eps=eps, step=step, steps=a.steps, mode="eot", eot=a.eot))
    g = _gen(a.seed, 4)
    xe, ye = x[:a.n_eot], y[:a.n_eot]
    b = max(1, a.batch // 4)  # b * eot rows per gradient
    scores = []
    for i in range(0, len(xe), b):
        res = atk(xe[i:i + b], ye[i:i + b], generator=g)
        scores.append(expected_correct(defense, res.x_adv, ye[i:i + b], a.k, generator=g))
    return _acc(torch.cat(scores), f"PGD-EoT, expected accuracy over k={a.k} fresh purifications",
                eps=eps, step=step, steps=a.steps, eot=a.eot, k=a.k)


def measure_cosine(defense, x, y, a) -> dict:
    g = _gen(a.seed, 5)
    one = torch.cat([eot_gradient_consistency(defense, x[i:i + a.batch], y[i:i + a.batch], k=1, generator=g)
                     .outcomes["cos"] for i in range(0, len(x), a.batch)])
    b = max(1, a.batch // 4)
    xe, ye = x[:a.n_eot], y[:a.n_eot]
    eot = torch.cat([eot_gradient_consistency(defense, xe[i:i + b], ye[i:i + b], k=a.eot, generator=g)
                     .outcomes["cos"] for i in range(0, len(xe), b)])
    return {"draws_1": {**_mean_ci(one), "what": "cosine of the CE input gradients under two independent noise "
                                                "draws (one purification each), at the clean images"},
            f"eot_{a.eot}": {**_mean_ci(eot), "what": f"cosine of two independent EoT-{a.eot} gradient sums"}}


def measure_latency(defense, x, a) -> dict:
    out = {}
    g = _gen(a.seed, 6)
    for bs in (1, a.latency_batch):
        xb = x[:bs] if len(x) >= bs else x.repeat((bs + len(x) - 1) // len(x), 1, 1, 1)[:bs]
        times, cpu = [], []
        with torch.inference_mode():
            for r in range(a.latency_reps + 1):
                c0, t0 = time.process_time(), time.perf_counter()
                defense(xb, generator=g).argmax(1)
                if r:  # the first call is the warm-up
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
        med, cmed = statistics.median(times), statistics.median(cpu)
        # wall time is what a caller waits; on a shared machine it includes waiting for a core, so the process's
        # CPU time (all threads) is kept too: at --threads 1 it is the latency of an otherwise idle core
        out[f"batch_{bs}"] = {"ms_per_image": 1000 * med / bs, "ms_per_call": 1000 * med,
                              "calls_ms": [round(1000 * t, 2) for t in times],
                              "cpu_ms_per_image": 1000 * cmed / bs, "calls_cpu_ms": [round(1000 * t, 2) for t in cpu],
                              "load_average": list(os.getloadavg())}
    return out


def measure(name: str, defense, x, y, a) -> dict:
    if name == "clean":
        return measure_clean(defense, x, y, a)
    if name == "dwbox_linf_8_255":
        return measure_dwbox(defense, x, y, a, "linf_8_255", 2)
    if name == "dwbox_linf_0.1":
        return measure_dwbox(defense, x, y, a, "linf_0.1", 3)
    if name == "eot_linf_8_255":
        return measure_eot(defense, x, y, a)
    if name == "gradient_cosine":
        return measure_cosine(defense, x, y, a)
    if name == "latency":
        return measure_latency(defense, x, a)
    raise ValueError(name)


# ---- configuration and state ------------------------------------------------------------------------------

def _sha256(d: Path) -> str:
    """Of meta.json and the weights the loaders read (EMA, else the model's: dbp.checkpoint.weights_file)."""
    from dbp.checkpoint import weights_file
    h = hashlib.sha256()
    for f in (Path(d) / "meta.json", weights_file(d, "ema")):
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def load_models(a) -> tuple[dict, object, object]:
    """(the models' part of the config, eps-net, classifier) from --version or --purifier/--classifier."""
    repo = Path(a.repository)
    if (a.purifier is None) != (a.classifier is None):
        raise SystemExit(f"{PROG}: give both --purifier and --classifier, or neither (then --version)")
    if a.purifier is None:
        version = a.version if a.version is not None else repository.newest_version(
            repository.model_dir(repo, "purifier"))
        if version is None:
            raise SystemExit(f"{PROG}: no deployed purifier in {repo}")
        pur, cls = (repository.weights_dir(repo, r, version) for r in ("purifier", "classifier"))
    else:
        version, pur, cls = None, Path(a.purifier), Path(a.classifier)
    s = repository.purification_settings(repo)
    served = {"t_star": int(s["t_star"]), "sampler": s["sampler"], "num_inference_steps": int(s["num_inference_steps"])}
    info = {"version": version, "purifier": repository.relative_path(pur), "purifier_sha256": _sha256(pur),
            "classifier": repository.relative_path(cls), "classifier_sha256": _sha256(cls), "served": served}
    return info, load_unet(pur), load_classifier(cls)


def run_config(a, models: dict) -> dict:
    """Everything that decides a point's numbers: saved with each point, checked on resume."""
    return {"format": FORMAT, **models, "images": f"Fashion-MNIST test, the last {a.n_images}",
            "n_images": a.n_images, "n_eot": a.n_eot, "k": a.k, "steps": a.steps, "eot": a.eot, "seed": a.seed,
            "batch": a.batch, "threads": a.threads, "latency_reps": a.latency_reps,
            "latency_batch": a.latency_batch,
            "budgets": {k: list(v) for k, v in BUDGETS.items()}}


HINT = "use another --out, or delete the directory to start over"


def _read(p: Path) -> Optional[dict]:
    return json.loads(p.read_text()) if p.exists() else None


def check_dir(out: Path, cfg: dict) -> None:
    """Refuse a directory with results of another configuration (every saved point is checked)."""
    if (out / "config.json").exists():
        require_same(_read(out / "config.json"), cfg, out / "config.json", HINT)
    for f in sorted((out / "points").glob("*.json")):
        require_same(json.loads(f.read_text()).get("config"), cfg, f, HINT)


def _lock(out: Path):
    """An exclusive lock on <out>/.lock for the life of the process: two runs on one directory would measure the
    same points twice."""
    import fcntl
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"{PROG}: another run is measuring in {out} (it holds {out / '.lock'}); "
                         f"wait for it, or use --report_only") from None
    return f


def run_point(p: dict, cfg: dict, eps_net, classifier, x, y, a, out: Path) -> dict:
    final, partial = out / "points" / f"{p['name']}.json", out / "points" / f"{p['name']}.partial.json"
    if final.exists():
        print(f"{p['name']}: done, skipped", flush=True)
        return json.loads(final.read_text())
    state = _read(partial) or {"config": cfg, "point": p, "results": {}, "seconds": {}}
    purifier = Purifier(eps_net, t_star=p["t_star"], sampler=p["sampler"],
                        num_inference_steps=p["num_inference_steps"]).eval()
    defense = Defense(purifier, classifier).eval()
    for c in COMPONENTS:
        if c in state["results"]:
            print(f"{p['name']} {c}: saved, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        state["results"][c] = measure(c, defense, x, y, a)
        state["seconds"][c] = round(time.perf_counter() - t0, 1)
        state["load_average"] = list(os.getloadavg())
        write_json(partial, state)
        print(f"{p['name']} {c}: {summary(c, state['results'][c])} ({state['seconds'][c]} s)", flush=True)
    state["point"] = p
    state["finished_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    state["git_commit"] = git_commit()
    write_json(final, state)
    partial.unlink(missing_ok=True)
    return state


def summary(c: str, r: dict) -> str:
    if c == "latency":
        return " / ".join(f"{v['ms_per_image']:.1f} (cpu {v.get('cpu_ms_per_image', float('nan')):.1f})"
                          for v in r.values()) + " ms per image (" + "/".join(k.replace("batch_", "b") for k in r) + ")"
    if c == "gradient_cosine":
        return "mean cos " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in r.items())
    return f"{100 * r['acc']:.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] (n={r['n']})"


# ---- paired comparisons -------------------------------------------------------------------------------------
# Every point runs on the same images with the same seeds and attack salts, so two points' per-image outcomes pair.

PAIRED_OUTCOMES = ("clean", "dwbox_linf_8_255", "dwbox_linf_0.1")


def _outcomes(r: dict) -> list[bool]:
    return [v >= 0.5 for v in r["per_image"]]


def paired_results(cand: dict, base: dict, k: int, names: tuple[str, str] = ("candidate", "baseline"),
                   outcomes: tuple[str, ...] = PAIRED_OUTCOMES) -> dict:
    """`cand` - `base` (two points' results) per measurement: exact McNemar with a Newcombe interval on the 0/1
    outcomes, the exact sign-flip test on the EoT hits out of k (dbp.paired)."""
    out = {}
    for c in outcomes:
        t = PairedTable.from_outcomes(_outcomes(cand[c]), _outcomes(base[c]))
        out[c] = {"n": t.n, f"only_{names[0]}_right": t.b, f"only_{names[1]}_right": t.c, "diff": (t.b - t.c) / t.n,
                  "ci95": list(newcombe_interval(t)), "p_value": mcnemar_exact(t.b, t.c),
                  "method": "exact McNemar, Newcombe interval"}
    hits = [[round(v * k) for v in r["eot_linf_8_255"]["per_image"]] for r in (cand, base)]
    out["eot_linf_8_255"] = paired_hits(hits[0], hits[1], k)
    return out


def paired_vs_served(cfg: dict, points: list[dict], done: dict) -> dict:
    """Each measured point against the served one: what moving off the served setting changes, image by image."""
    served = next((p["name"] for p in points if p["served"] and p["name"] in done), None)
    if served is None:
        return {}
    return {p["name"]: paired_results(done[p["name"]]["results"], done[served]["results"], cfg["k"],
                                      names=("point", "served"))
            for p in points if p["name"] in done and p["name"] != served}


def paired_markdown(cfg: dict, points: list[dict], pairs: dict) -> list[str]:
    if not pairs:
        return []
    served = next(p["name"] for p in points if p["served"])

    def cell(q):
        if "only_point_right" in q:
            return (f"{100 * q['diff']:+.1f} ({q['only_point_right']} / {q['only_served_right']}, "
                    f"p={q['p_value']:.2g})")
        return f"{100 * q['diff']:+.1f} [{100 * q['ci95'][0]:+.0f}, {100 * q['ci95'][1]:+.0f}] (p={q['p_value']:.2g})"
    lines = ["", f"## Each point against the served one ({served}), paired", "",
             "Point - served in points, on the same images and noise. 0/1 outcomes: (images right only at the point "
             "/ only at the served setting, exact McNemar p); EoT: the mean difference of expected accuracy "
             f"[95% interval] (exact sign-flip p over the hits out of k={cfg['k']}).", "",
             "| point | UNet calls | clean | DW-box 8/255 | DW-box 0.1 | EoT 8/255 |", "| --- " * 6 + "|"]
    for p in points:
        q = pairs.get(p["name"])
        if q is not None:
            lines.append(f"| {p['name']} | {p['unet_calls']} | "
                         + " | ".join(cell(q[c]) for c, _ in ACC_ROWS) + " |")
    return lines


# ---- outputs ------------------------------------------------------------------------------------------------

ACC_ROWS = (("clean", "clean"), ("dwbox_linf_8_255", "DW-box 8/255"), ("dwbox_linf_0.1", "DW-box 0.1"),
            ("eot_linf_8_255", "EoT 8/255 (expected)"))


def markdown(cfg: dict, points: list[dict], done: dict) -> str:
    def cell(r):
        return f"{100 * r['acc']:.1f} [{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}]"
    lines = ["# Purification sweeps (issue 22 item 4)", "",
             f"Version {cfg['version']} (`{cfg['purifier']}`, `{cfg['classifier']}`), served setting "
             f"{cfg['served']}; {cfg['images']} images, PGD-{cfg['steps']}, EoT-{cfg['eot']} on the first "
             f"{cfg['n_eot']} images scored over k={cfg['k']}; latency at {cfg['threads']} thread(s). "
             f"Accuracies in % [95% interval]. Made by `{PROG}`.", "",
             "| point | sweep | t* | N | UNet calls | clean | DW-box 8/255 | DW-box 0.1 | EoT 8/255 | grad cos (1 draw) "
             f"| grad cos (EoT-{cfg['eot']}) | ms/img b1 | ms/img b{cfg['latency_batch']} | cpu ms/img b1 | cpu ms/img b{cfg['latency_batch']} "
             "| point s |",
             "| --- " * 16 + "|"]
    lb = f"batch_{cfg['latency_batch']}"
    for p in points:
        s = done.get(p["name"])
        tag = p["name"] + (" (served)" if p["served"] else "")
        head = f"| {tag} | {'+'.join(p['sweeps'])} | {p['t_star']} | {p['num_inference_steps']} | {p['unet_calls']} |"
        if s is None:
            lines.append(head + " not run yet |" + " |" * 10)
            continue
        r = s["results"]
        cos = r["gradient_cosine"]
        ce = [v for k, v in cos.items() if k != "draws_1"][0]
        lines.append(head + " " + " | ".join(cell(r[k]) for k, _ in ACC_ROWS)
                     + f" | {cos['draws_1']['mean']:.3f} | {ce['mean']:.3f} | {r['latency']['batch_1']['ms_per_image']:.1f}"
                     f" | {r['latency'][lb]['ms_per_image']:.1f}"
                     f" | {r['latency']['batch_1'].get('cpu_ms_per_image', float('nan')):.1f}"
                     f" | {r['latency'][lb].get('cpu_ms_per_image', float('nan')):.1f} | {sum(s['seconds'].values()):.0f} |")
    return "\n".join(lines + paired_markdown(cfg, points, paired_vs_served(cfg, points, done))) + "\n"


def figure(sweep: str, points: list[dict], done: dict, path: Path) -> Optional[Path]:
    from dbp.plots import _plt, save_figure
    pts = [p for p in points if sweep in p["sweeps"] and p["name"] in done]
    if not pts:
        return None
    xkey, xlabel = (("t_star", "t* (of T = 1000)") if sweep == "A" else ("unet_calls", "UNet calls (DDIM steps)"))
    pts.sort(key=lambda p: p[xkey])
    xs = [p[xkey] for p in pts]
    plt = _plt()
    fig, (ax, axl, axc) = plt.subplots(1, 3, figsize=(15, 4.2))
    dodge = 0.012 * ((max(xs) - min(xs)) or 10)  # the four series side by side, so their intervals stay readable
    for i, (key, label) in enumerate(ACC_ROWS):
        rs = [done[p["name"]]["results"][key] for p in pts]
        acc = [100 * r["acc"] for r in rs]
        err = [[100 * (r["acc"] - r["ci95"][0]) for r in rs], [100 * (r["ci95"][1] - r["acc"]) for r in rs]]
        ax.errorbar([v + (i - 1.5) * dodge for v in xs], acc, yerr=err, marker="o", capsize=3, label=label)
    for bs, style in ((1, "o-"), (done[pts[0]["name"]]["config"]["latency_batch"], "s--")):
        lat = [done[p["name"]]["results"]["latency"][f"batch_{bs}"] for p in pts]
        line, = axl.plot(xs, [v["ms_per_image"] for v in lat], style, label=f"batch {bs}, wall")
        axl.plot(xs, [v.get("cpu_ms_per_image", float("nan")) for v in lat], style, color=line.get_color(),
                 alpha=0.45, label=f"batch {bs}, CPU time")
    for key, style in (("draws_1", "o-"), (None, "s--")):
        vals_all = vals = [done[p["name"]]["results"]["gradient_cosine"] for p in pts]
        vals = [v[key] if key else [w for k, w in v.items() if k != "draws_1"][0] for v in vals]
        label = "1 draw each" if key else "EoT sums (" + [k for k in vals_all[0] if k != "draws_1"][0] + ")"
        axc.errorbar(xs, [v["mean"] for v in vals], yerr=[[v["mean"] - v["ci95"][0] for v in vals],
                                                          [v["ci95"][1] - v["mean"] for v in vals]],
                     fmt=style, capsize=3, label=label)
    served = [p for p in pts if p["served"]]
    for a_ in (ax, axl, axc):
        for p in served:
            a_.axvline(p[xkey], color="grey", ls=":", lw=1.2)
        a_.set_xlabel(xlabel)
        a_.grid(alpha=0.3)
        a_.legend(fontsize=8)
        a_.set_xticks(xs)
    if served:
        ax.annotate(" served", (served[0][xkey], 1), color="grey", fontsize=8, ha="left")
    if sweep == "B":
        for p in pts:
            ax.annotate(f"N={p['num_inference_steps']}", (p[xkey], 6), fontsize=7, ha="center")
    ax.set_ylim(0, 102)
    ax.set_ylabel("accuracy (%), 95% intervals")
    axl.set_ylabel("purify + classify, ms per image")
    axc.set_ylabel("input-gradient cosine, two noise draws")
    title = ("Sweep A: t* (DDIM N = 100)" if sweep == "A" else "Sweep B: DDIM steps at the served t*")
    fig.suptitle(f"{title}; dotted: the served setting")
    return save_figure(fig, path)


def write_outputs(out: Path, cfg: dict, points: list[dict], copy_to: Optional[Path]) -> list[Path]:
    done = {}
    for p in points:
        s = _read(out / "points" / f"{p['name']}.json")
        if s is not None:
            done[p["name"]] = s
    doc = {"config": cfg, "points": [{**p, **({"results": done[p["name"]]["results"],
                                              "seconds": done[p["name"]]["seconds"],
                                              "load_average": done[p["name"]].get("load_average"),
                                              "finished_utc": done[p["name"]].get("finished_utc"),
                                              "git_commit": done[p["name"]].get("git_commit")}
                                             if p["name"] in done else {"results": None})} for p in points],
           "paired_vs_served": paired_vs_served(cfg, points, done),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}}
    paths = [write_json(out / "purification_sweep.json", doc), write_text(out / "purification_sweep.md",
                                                                          markdown(cfg, points, done))]
    for sweep, fname in FIGURES.items():
        f = figure(sweep, points, done, out / fname)
        if f is not None:
            paths.append(f)
    if copy_to is not None:
        for f in list(paths):
            dst = copy_to / f.name
            if f.suffix == ".png":
                from dbp.state import save_atomic
                save_atomic(dst, lambda tmp, f=f: tmp.write_bytes(f.read_bytes()))
            else:
                write_text(dst, f.read_text())
            paths.append(dst)
    return paths


# ---- CLI --------------------------------------------------------------------------------------------------------

def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--n_images", type=int, default=64)
    ap.add_argument("--n_eot", type=int, default=16, help="images of the EoT attack (the first of --n_images)")
    ap.add_argument("--k", type=int, default=10, help="purifications scoring each EoT image (expected accuracy)")
    ap.add_argument("--steps", type=int, default=20, help="PGD steps")
    ap.add_argument("--eot", type=int, default=10, help="EoT draws per PGD step")
    ap.add_argument("--batch", type=int, default=16, help="images per attack batch (EoT: batch/4 images)")
    ap.add_argument("--latency_reps", type=int, default=5, help="timed calls per batch size after one warm-up")
    ap.add_argument("--latency_batch", type=int, default=16, help="the larger latency batch (and 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/sweeps/purification")
    ap.add_argument("--repository", default=str(repository.default_repository()))
    ap.add_argument("--version", type=int, default=None, help="default: the newest deployed version")
    ap.add_argument("--purifier", default=None, help="a diffusion checkpoint dir instead of --version (tests)")
    ap.add_argument("--classifier", default=None, help="a classifier checkpoint dir instead of --version (tests)")
    ap.add_argument("--points", default=None, help="comma-separated: sweeps A/B and/or point names (t100-n100)")
    ap.add_argument("--list", action="store_true", help="print the points and exit")
    ap.add_argument("--report_only", action="store_true",
                    help="measure nothing: write the table and figures (and --copy them) from the saved points; "
                         "safe while a run is going")
    ap.add_argument("--copy", action="store_true", help="copy the outputs to --copy_to")
    ap.add_argument("--copy_to", default=str(ROOT / "docs" / "results" / "sweeps"))
    ap.add_argument("--data_root", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    set_threads(a.threads)
    models, eps_net, classifier = load_models(a)
    cfg = run_config(a, models)
    points = plan_points(eps_net, models["served"])
    if a.list:
        for p in points:
            print(json.dumps(p))
        return {"points": points}
    todo = select(points, a.points)
    out = Path(a.out)
    check_dir(out, cfg)
    copy_to = Path(a.copy_to) if a.copy else None
    if a.report_only:
        paths = write_outputs(out, cfg, points, copy_to)
        print("wrote " + ", ".join(map(str, paths)), flush=True)
        return {"config": cfg, "points": points, "paths": [str(p) for p in paths]}
    held = _lock(out)
    write_json(out / "config.json", cfg)
    ds = load_fashion_mnist("test", a.data_root)
    idx = list(range(len(ds) - a.n_images, len(ds)))
    x, y = ds.float01(idx), ds.labels[idx].clone()
    t_start = time.perf_counter()
    for p in todo:
        t0 = time.perf_counter()
        run_point(p, cfg, eps_net, classifier, x, y, a, out)
        print(f"{p['name']}: {time.perf_counter() - t0:.0f} s this run", flush=True)
        write_outputs(out, cfg, points, copy_to)
    held.close()
    paths = write_outputs(out, cfg, points, copy_to)
    print(f"{len(todo)} point(s) in {time.perf_counter() - t_start:.0f} s; wrote " + ", ".join(map(str, paths)),
          flush=True)
    return {"config": cfg, "points": points, "paths": [str(p) for p in paths]}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
