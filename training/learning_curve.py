"""ADDT learning curve: DW-box l_inf PGD robust accuracy and clean purified accuracy of the base purifier and of
every snapshot of the fine-tuning arms, on one fixed held-out subset with one fixed noise draw.

  python -m training.learning_curve                                   # base v1 + runs/addt13/{addt,clean} snapshots
  python -m training.learning_curve --n_images 8 --arms "" --figure runs/curve-check/curve.png \
      --out_dir runs/curve-check                                      # the base model alone, a quick check
  python -m training.learning_curve --keep last                       # the paper's last-iterate PGD

Models: `--base` (step 0 of every arm) and each `<arm>/snapshots/step_NNNNNN/` (weights-only dbp checkpoints,
EMA weights) of the `--arms` directories; an arm is named after its directory. Images: `--n_images` test
images drawn once (seeded permutation, `--subset_seed`) from the indices >= `--first_image`, i.e. outside the
first 1024 the gate's cards use; the first n of the permutation, so a larger n keeps the smaller subset as
its head. Noise: one draw per image from the seed noise_seed * 1_000_003 + index, the same for every model
(the DW-box setting: the attacker knows it, the evaluation reuses it). Attack: PGD (eps 8/255, step 2/255,
20 steps, the gate's setting) on classifier(purify(x)) with DDIM N=100 from t*=100 as served; `--keep best`
(default) keeps each image's best iterate (dbp.attacks), `--keep last` the final one.

Outputs in --out_dir: results.json (the cache: per model the weights' sha256 and per-image outcomes as
dbp.paired.OutcomeRecord dicts; a rerun evaluates only models not in it, or whose weights changed),
curve.json and curve.md (the table, with paired McNemar tests against the base and between the arms at the
same step), and the plot --figure (robust and clean accuracy vs step, both arms and the base, 95% Wilson
intervals). The config is saved in every output. Exit 2 on bad input, 3 when --max_models stopped it early.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from dbp import config as C, state
from dbp.repository import relative_path
from dbp.attacks import PGD, AttackConfig
from dbp.checkpoint import CheckpointError, load_meta, weights_sha256
from dbp.data import DatasetError, load_dataset
from dbp.diffusion import PurifyNoise
from dbp.grad_checkpointing import parse_grad_checkpoint
from dbp.models import Defense, Purifier, freeze, load_classifier, load_unet
from dbp.paired import OutcomeRecord, compare
from dbp.robustness import single_shot, wilson
from dbp.runtime import git_commit, set_threads

EXIT_INCOMPLETE = 3
RESULTS, TABLE_JSON, TABLE_MD = "results.json", "curve.json", "curve.md"


@dataclass
class CurveConfig:
    base: str = "model_repository/purifier/1/weights"  # the starting model of both arms (plotted at step 0)
    arms: tuple[str, ...] = ("runs/addt13/addt", "runs/addt13/clean")  # each holds snapshots/step_NNNNNN/
    classifier: str = "model_repository/classifier/1/weights"
    which: str = "ema"  # weights of each checkpoint to evaluate (ema: what export serves)
    dataset: str = "fashion_mnist"
    data_root: Optional[str] = None
    n_images: int = 128
    first_image: int = 1024  # held out: the gate's cards use the first 1024 test images
    subset_seed: int = 13
    noise_seed: int = 0
    t_star: int = 100
    sampler: str = "ddim"
    num_inference_steps: int = 100  # DDIM N=100 from t*=100: 11 UNet calls, as served
    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 20
    keep: str = "best"  # best: per-image best iterate (dbp.attacks); last: the paper's last-iterate PGD
    batch_size: int = 16  # images per attack batch (results do not depend on it beyond float rounding)
    grad_checkpoint: str = "auto"  # true / false / auto (dbp.grad_checkpointing)
    channels_last: bool = True  # NHWC chain: faster on CPU (benchmarks/bench_attack.py), same up to float rounding
    alpha: float = 0.05  # level of the paired McNemar tests in the table
    out_dir: str = "runs/learning_curve"  # outside runs/addt13/, which the training runs own
    figure: str = "docs/figures/addt_learning_curve.png"
    max_models: int = 0  # evaluate at most this many new models, then stop (exit 3); 0: all
    every: int = 0  # evaluate only snapshots whose step is a multiple of this (0: all): a coarse curve first,
    #                 a later run without it fills in the rest; cached models are always in the table
    threads: int = 1
    device: str = "cpu"


# Fields that change the numbers: the cache holds results of exactly these
EVAL_FIELDS = ("classifier", "which", "dataset", "n_images", "first_image", "subset_seed", "noise_seed", "t_star",
               "sampler", "num_inference_steps", "eps", "step", "steps", "keep")


@dataclass
class ModelSpec:
    key: str  # "base" or "<arm>/step_NNNNNN"
    arm: str  # "base" or the arm's name
    step: int
    path: Path


# ---- set-up -------------------------------------------------------------------------------------------

def validate(cfg: CurveConfig) -> None:
    for name, lo in (("n_images", 1), ("first_image", 0), ("steps", 1), ("batch_size", 1), ("max_models", 0),
                     ("every", 0),
                     ("num_inference_steps", 1)):
        if getattr(cfg, name) < lo:
            raise C.ConfigError(f"--{name} must be >= {lo}, got {getattr(cfg, name)}")
    if cfg.sampler not in ("ddim", "ddpm"):
        raise C.ConfigError(f"--sampler must be ddim or ddpm, got {cfg.sampler!r}")
    if cfg.keep not in ("best", "last"):
        raise C.ConfigError(f"--keep must be best or last, got {cfg.keep!r}")
    if not (cfg.eps >= 0 and cfg.step > 0):
        raise C.ConfigError(f"need --eps >= 0 and --step > 0, got {cfg.eps} and {cfg.step}")
    if not 0 < cfg.alpha < 1:
        raise C.ConfigError(f"--alpha must be in (0, 1), got {cfg.alpha}")
    try:
        parse_grad_checkpoint(cfg.grad_checkpoint)
    except ValueError as e:
        raise C.ConfigError(f"--{e}") from None


def discover(cfg: CurveConfig) -> list[ModelSpec]:
    base = Path(cfg.base)
    if not (base / "meta.json").exists():
        raise C.ConfigError(f"--base {base} is not a dbp checkpoint directory (no meta.json)")
    models = [ModelSpec("base", "base", 0, base)]
    names = set()
    for arm_dir in map(Path, cfg.arms):
        name = arm_dir.name
        if name in names or name == "base":
            raise C.ConfigError(f"--arms: two arms named {name!r} (an arm is named after its directory)")
        names.add(name)
        snaps = arm_dir / "snapshots"
        if not snaps.is_dir():
            raise C.ConfigError(f"--arms: {snaps} does not exist (run_addt writes snapshots there with "
                                f"--keep_every N)")
        for d in sorted(snaps.glob("step_*")):  # hidden .step_*.tmp* dirs of a save in progress are skipped
            if not (d / "meta.json").exists():
                continue
            try:
                step = int(d.name.split("_", 1)[1])
            except ValueError:
                continue
            models.append(ModelSpec(f"{name}/{d.name}", name, step, d))
    return models


def held_out_subset(cfg: CurveConfig, n_test: int) -> list[int]:
    pool = n_test - cfg.first_image
    if cfg.n_images > pool:
        raise C.ConfigError(f"--n_images {cfg.n_images} exceeds the {max(pool, 0)} test images from index "
                            f"{cfg.first_image} on")
    perm = torch.randperm(pool, generator=torch.Generator().manual_seed(cfg.subset_seed))
    return [cfg.first_image + int(i) for i in perm[:cfg.n_images]]


def image_seeds(cfg: CurveConfig, indices: list[int]) -> list[int]:
    return [cfg.noise_seed * 1_000_003 + i for i in indices]


def fixed_noise(purifier: Purifier, x: torch.Tensor, seeds: list[int]) -> PurifyNoise:
    """One draw per image from its own seed: the noise of an image never depends on the subset around it."""
    return PurifyNoise.cat([purifier.sample_noise(x[i:i + 1], torch.Generator(device=x.device).manual_seed(s))
                            for i, s in enumerate(seeds)])


def eval_key(cfg: CurveConfig, classifier_sha: str) -> dict:
    d = {k: getattr(cfg, k) for k in EVAL_FIELDS}
    d["classifier"] = classifier_sha  # the weights, not where they lie
    return json.loads(json.dumps(d))


def settings(cfg: CurveConfig) -> dict[str, str]:
    chain = f"{cfg.sampler} N={cfg.num_inference_steps} t*={cfg.t_star}"
    return {"clean": f"clean purified, fixed noise, {chain}",
            "robust": f"linf-dwbox eps={cfg.eps:.6g} step={cfg.step:.6g} PGD-{cfg.steps} keep={cfg.keep}, {chain}"}


# ---- one model ------------------------------------------------------------------------------------------

def evaluate_model(cfg: CurveConfig, spec: ModelSpec, classifier, x, y, indices, seeds, device) -> dict:
    t0 = time.time()
    try:
        eps_net = freeze(load_unet(spec.path, which=cfg.which, device=device))
    except (CheckpointError, OSError, KeyError, RuntimeError) as e:
        raise C.ConfigError(f"cannot load {spec.path}: {e}") from None
    purifier = Purifier(eps_net, cfg.t_star, cfg.sampler, cfg.num_inference_steps,
                        grad_checkpoint=parse_grad_checkpoint(cfg.grad_checkpoint), channels_last=cfg.channels_last)
    defense = Defense(purifier, classifier).to(device).eval()
    noise = fixed_noise(purifier, x, seeds)
    atk = PGD(defense, AttackConfig(norm="linf", eps=cfg.eps, step=cfg.step, steps=cfg.steps, eot=1, mode="dwbox",
                                    keep=cfg.keep))
    clean, robust = [], []
    bar = tqdm(range(0, len(y), cfg.batch_size), desc=spec.key, leave=False, unit="batch")
    for lo in bar:
        hi = min(lo + cfg.batch_size, len(y))
        xb, yb, nb = x[lo:hi], y[lo:hi], noise[lo:hi]
        clean.append(single_shot(defense, xb, yb, noise=nb).cpu())
        res = atk(xb, yb, noise=nb)
        robust.append(single_shot(defense, res.x_adv, yb, noise=nb).cpu())
        bar.set_postfix(clean=f"{torch.cat(clean).float().mean():.1%}", robust=f"{torch.cat(robust).float().mean():.1%}")
    bar.close()
    meta = load_meta(spec.path)
    recs = {}
    for what, outs in (("clean", clean), ("robust", robust)):
        recs[what] = OutcomeRecord.build(torch.cat(outs), indices=indices, seeds=seeds, dataset=cfg.dataset,
                                         split="test", setting=settings(cfg)[what]).to_dict()
    return {"key": spec.key, "arm": spec.arm, "step": spec.step, "path": relative_path(spec.path),
            "sha256": weights_sha256(spec.path, cfg.which), "kind": meta.get("kind"), "mode": meta.get("mode"),
            "trained_step": meta.get("step"), "records": recs, "wall_s": round(time.time() - t0, 1),
            "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": git_commit()}


# ---- cache ---------------------------------------------------------------------------------------------

def load_cache(path: Path, key: dict) -> dict:
    if not path.exists():
        return {"eval": key, "models": {}}
    try:
        cache = json.loads(path.read_text())
        have = cache["eval"]
        models = cache["models"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise C.ConfigError(f"cannot read the results cache {path}: {e!r}; move it away to start over") from None
    state.require_same(have, key, path, "use another --out_dir", C.ConfigError)
    return {"eval": have, "models": models}


def write_json(path: Path, obj) -> None:
    state.write_json(path, obj, indent=1)


# ---- table and plot ------------------------------------------------------------------------------------

def summarize(entry: dict) -> dict:
    row = {k: entry[k] for k in ("key", "arm", "step", "path", "sha256", "wall_s")}
    for what in ("clean", "robust"):
        outs = entry["records"][what]["outcomes"]
        k, n = outs.count("1"), len(outs)
        row[what] = {"acc": k / n, "ci95": list(wilson(k, n)), "n": n}
    return row


def comparisons(entries: dict[str, dict], alpha: float) -> list[dict]:
    """Every model against the base, and the arms against each other at equal steps (paired, same images)."""
    def cmp(a: str, b: str, what: str) -> dict:
        ra, rb = (OutcomeRecord.from_dict(entries[k]["records"][what]) for k in (a, b))
        return {"candidate": a, "baseline": b, "metric": what, **compare(ra, rb, alpha).to_dict()}

    out = []
    if "base" in entries:
        for k in entries:
            if k != "base":
                out += [cmp(k, "base", "robust"), cmp(k, "base", "clean")]
    by_step: dict[int, list[str]] = {}
    for k, e in entries.items():
        if k != "base":
            by_step.setdefault(e["step"], []).append(k)
    for step, keys in sorted(by_step.items()):
        keys = sorted(keys, key=lambda k: (entries[k]["arm"] != "addt", k))  # ADDT as the candidate when present
        for i in range(len(keys)):
            for j in range(i + 1, len(keys)):
                out.append(cmp(keys[i], keys[j], "robust"))
    return out


def markdown(rows: list[dict], comps: list[dict], cfg: CurveConfig, subset: dict) -> str:
    def pct(d):
        return f"{d['acc']:.1%} [{d['ci95'][0]:.1%}, {d['ci95'][1]:.1%}]"

    vs_base = {(c["candidate"], c["metric"]): c for c in comps if c["baseline"] == "base"}
    lines = [f"DW-box l_inf PGD-{cfg.steps} (eps {cfg.eps * 255:.0f}/255, step {cfg.step * 255:.0f}/255, "
             f"keep={cfg.keep}), {cfg.sampler} N={cfg.num_inference_steps} t*={cfg.t_star}; {subset['n']} "
             f"{cfg.dataset} test images (indices >= {cfg.first_image}, subset seed {cfg.subset_seed}), one fixed "
             f"noise draw per image (noise seed {cfg.noise_seed}); 95% Wilson intervals; paired tests: McNemar "
             f"exact, difference with Newcombe's interval.", "",
             "| model | arm | step | clean purified | robust | robust vs base: diff [95% CI], p | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c = vs_base.get((r["key"], "robust"))
        vs = "" if c is None else f"{c['diff']:+.1%} [{c['ci95'][0]:+.1%}, {c['ci95'][1]:+.1%}], p={c['p_value']:.3g}"
        lines.append(f"| {r['key']} | {r['arm']} | {r['step']} | {pct(r['clean'])} | {pct(r['robust'])} | {vs} | "
                     f"{r['wall_s']} |")
    between = [c for c in comps if c["baseline"] != "base"]
    if between:
        lines += ["", "| robust, same step | diff [95% CI] | discordant (cand./base) | p | verdict |",
                  "| --- | --- | --- | --- | --- |"]
        for c in between:
            t = c["table"]
            lines.append(f"| {c['candidate']} vs {c['baseline']} | {c['diff']:+.1%} [{c['ci95'][0]:+.1%}, "
                         f"{c['ci95'][1]:+.1%}] | {t['only_candidate_right']}/{t['only_baseline_right']} | "
                         f"{c['p_value']:.3g} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, cfg: CurveConfig, n: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dbp.plots import save_figure

    base = next((r for r in rows if r["arm"] == "base"), None)
    arms = sorted({r["arm"] for r in rows} - {"base"})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, what, title in ((axes[0], "robust", f"DW-box l_inf PGD-{cfg.steps} robust accuracy"),
                            (axes[1], "clean", "clean purified accuracy")):
        for i, arm in enumerate(arms):
            pts = sorted([r for r in rows if r["arm"] == arm], key=lambda r: r["step"])
            if base is not None:
                pts = [base] + pts  # both arms start from the base model
            xs = [r["step"] for r in pts]
            acc = [r[what]["acc"] for r in pts]
            lo = [r[what]["acc"] - r[what]["ci95"][0] for r in pts]
            hi = [r[what]["ci95"][1] - r[what]["acc"] for r in pts]
            off = (i - (len(arms) - 1) / 2) * max(1.0, 0.006 * max(xs + [1]))  # keep the error bars apart
            ax.errorbar([v + off for v in xs], acc, yerr=[lo, hi], marker="o", capsize=3, label=arm)
        if base is not None:
            b = base[what]
            ax.axhline(b["acc"], color="grey", ls=":", lw=1)
            ax.errorbar([0], [b["acc"]], yerr=[[b["acc"] - b["ci95"][0]], [b["ci95"][1] - b["acc"]]], color="black",
                        marker="s", capsize=3, ls="none", label="base (step 0)", zorder=3)
        ax.set_title(title, fontsize=10), ax.set_xlabel("fine-tuning step"), ax.grid(alpha=0.3)
        ax.set_ylabel("accuracy")
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    axes[0].legend()
    fig.suptitle(f"{cfg.dataset}: {n} held-out test images, one fixed noise draw, {cfg.sampler} N="
                 f"{cfg.num_inference_steps} t*={cfg.t_star}, 95% Wilson intervals", fontsize=9)
    save_figure(fig, path)


# ---- main ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    cfg = C.parse_cli(CurveConfig, argv, prog="python -m training.learning_curve")
    validate(cfg)
    set_threads(cfg.threads)
    device = torch.device(cfg.device)
    models = discover(cfg)
    try:
        test = load_dataset(cfg.dataset, "test", cfg.data_root)
        classifier = freeze(load_classifier(cfg.classifier, device=device))
        classifier_sha = weights_sha256(cfg.classifier)
    except (DatasetError, ValueError) as e:
        raise C.ConfigError(str(e)) from None
    except (CheckpointError, OSError, KeyError, RuntimeError) as e:
        raise C.ConfigError(f"cannot load --classifier {cfg.classifier}: {e}") from None
    indices = held_out_subset(cfg, len(test))
    seeds = image_seeds(cfg, indices)
    x, y = test.float01(indices).to(device), test.labels[indices].to(device)
    out = Path(cfg.out_dir)
    cache_path = out / RESULTS
    cache = load_cache(cache_path, eval_key(cfg, classifier_sha))
    cache["config"] = C.to_dict(cfg)

    missing = []  # not evaluated yet, or the weights changed since
    for m in models:
        have = cache["models"].get(m.key)
        if have is None or have.get("sha256") != weights_sha256(m.path, cfg.which):
            missing.append(m)
    todo = [m for m in missing if not cfg.every or m.step % cfg.every == 0]
    cached = len(models) - len(missing)
    stopped_early = bool(cfg.max_models) and len(todo) > cfg.max_models
    if stopped_early:
        todo = todo[:cfg.max_models]
    skipped = f", {len(models) - cached - len(todo)} left for later (--every {cfg.every})" if cfg.every else ""
    print(f"{len(models)} models: {cached} cached, {len(todo)} to evaluate on {len(indices)} held-out images{skipped}",
          file=sys.stderr, flush=True)
    for m in tqdm(todo, desc="models", unit="model"):
        cache["models"][m.key] = evaluate_model(cfg, m, classifier, x, y, indices, seeds, device)
        write_json(cache_path, cache)  # after every model: a kill loses at most the model in progress
    write_json(cache_path, cache)

    stale = {m.key for m in missing} - {m.key for m in todo}  # changed weights left for later: not in the table
    entries = {m.key: cache["models"][m.key] for m in models if m.key in cache["models"] and m.key not in stale}
    rows = sorted((summarize(e) for e in entries.values()), key=lambda r: (r["arm"] != "base", r["arm"], r["step"]))
    comps = comparisons(entries, cfg.alpha)
    subset = {"dataset": cfg.dataset, "split": "test", "n": len(indices), "indices": indices,
              "first_image": cfg.first_image, "subset_seed": cfg.subset_seed, "noise_seed": cfg.noise_seed,
              "noise": "per image: torch.Generator().manual_seed(noise_seed * 1_000_003 + index)"}
    table = {"rows": rows, "comparisons": comps, "subset": subset, "settings": settings(cfg),
             "config": C.to_dict(cfg), "git_commit": git_commit(), "complete": not stopped_early}
    write_json(out / TABLE_JSON, table)
    md = markdown(rows, comps, cfg, subset)
    (out / TABLE_MD).write_text(md)
    if rows:
        plot(rows, Path(cfg.figure), cfg, len(indices))
    print(md)
    print(f"table: {out / TABLE_MD}, {out / TABLE_JSON}; plot: {cfg.figure}; per-image outcomes: {cache_path}")
    if stopped_early:
        print(f"stopped after --max_models {cfg.max_models} new models; rerun to continue", file=sys.stderr)
        return EXIT_INCOMPLETE
    return 0


if __name__ == "__main__":
    sys.exit(main())
