"""Robustness gate: attack purifier+classifier, write a robustness card, pass or fail against thresholds.

  # checkpoints, a CPU-sized run (DDIM, 64 images)
  python -m training.gate --purifier runs/diffusion/checkpoint --classifier runs/classifier/checkpoint \
      --preset cpu --out_dir runs/gate/v1
  # a model_repository version (purifier/<N>/weights and classifier/<N>/weights are dbp checkpoints)
  python -m training.gate --repository model_repository --version 3 --out_dir runs/gate/repo-v3
  # no model named: the deployed pair (the newest version in model_repository/)
  python -m training.gate --preset cpu
  # paper scale (1024 images, DDPM 101 steps, PGD-20 + EoT-10): a GPU job, sharded
  torchrun --nproc_per_node 4 -m training.gate --purifier ... --classifier ... --preset paper

Thresholds come from --thresholds FILE, else `gate.json` beside the purifier checkpoint (its parent dir,
then the grandparent). Keys (all optional):
  {"min_clean": 0.8 | {"linf-eot": 0.8, "*": 0.7},  # purified clean accuracy per setting
   "min_robust": 0.3 | {...},                      # robust accuracy per setting (min over protocols)
   "min_clean_bare": 0.85,                          # bare-classifier clean accuracy
   "max_drop": 0.02,                                # vs --baseline_card (the deployed version's card)
   "bare_robust_max": 0.1,                          # threshold of the bare_not_collapsed flag
   "fail_on_flags": ["robust_above_clean", ...]}    # flags that fail the gate (default: all)

Exit codes: 0 card written and gate passed (or --gate false); 1 gate failed (reasons on stderr);
2 bad input; 3 stopped early (--max_batches) with results saved: rerun the same command to resume.
Results are saved per batch under OUT_DIR/state/, so a killed run continues where it stopped.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from dbp import config as C, distributed, repository
from dbp.attacks import MODES, NORMS, PGD, AttackConfig
from dbp.card import SCHEMA, CardError, load_card, plot_card, write_card
from dbp.checkpoint import CLASSIFIER_KINDS, PURIFIER_KINDS, CheckpointError, load_meta, weights_sha256
from dbp.data import DatasetError, load_dataset
from dbp.models import Defense, Purifier, load_classifier, load_unet
from dbp.plots import image_grid
from dbp.robustness import (FLAG_NAMES, bare_attack_config, bare_robust_correct, expected_correct, is_randomized,
                            sanity_flags, single_shot, summarize)
from dbp.runtime import git_commit, set_threads

EXIT_PASS, EXIT_FAIL, EXIT_INCOMPLETE = 0, 1, 3


@dataclass
class GateConfig:
    purifier: Optional[str] = None  # dbp diffusion/addt checkpoint dir
    classifier: Optional[str] = None  # dbp classifier checkpoint dir
    repository: Optional[str] = None  # model_repository root (instead of --purifier/--classifier)
    version: Optional[int] = None  # none of the four given: the newest version of the default repository
    classifier_version: Optional[int] = None  # default: --version
    dataset: Optional[str] = None  # default: the classifier checkpoint's dataset
    data_root: Optional[str] = None
    n_images: int = 1024  # the first n_images test images (the paper's subset; --n would clash with torchrun)
    norms: tuple[str, ...] = ("linf", "l2")
    modes: tuple[str, ...] = ("dwbox", "eot")
    sampler: str = "ddpm"
    num_inference_steps: Optional[int] = None  # default 1000 (ddpm, 101 UNet calls) / 100 (ddim, 11)
    t_star: int = 100
    steps: int = 20  # PGD iterations
    eot: int = 10  # EoT samples per step in the stochastic setting
    eot_batched: bool = True
    eps_linf: float = 8 / 255
    step_linf: float = 2 / 255
    eps_l2: float = 0.5
    step_l2: float = 0.1
    k: int = 20  # purifications per sample for expected accuracy (0: skip that protocol)
    bare_steps: int = 20  # PGD steps of the bare-classifier check (always at the paper's eps)
    batch_size: int = 16  # images per batch; the attack runs batch_size * eot rows at once
    seed: int = 0
    out_dir: str = "runs/gate"
    thresholds: Optional[str] = None
    baseline_card: Optional[str] = None
    max_drop: Optional[float] = None
    gate: bool = True  # false: evaluate and write the card only (gate.passed=false, exit 0)
    max_batches: int = 0  # stop after this many new batches per rank (0: all); rerun to resume
    grid_n: int = 8
    threads: int = 0
    device: str = "auto"
    grad_checkpoint: str = "auto"  # per-UNet-call checkpointing: true / false / auto (by memory; same gradients)
    checkpoint_budget_mb: Optional[float] = None  # auto's memory budget; default a quarter of free memory
    channels_last: bool = True  # run the chain in NHWC: faster CPU convolutions, same results up to float rounding


PRESETS = {
    "smoke": dict(n_images=8, batch_size=4, sampler="ddim", num_inference_steps=50, steps=2, eot=2, k=2, bare_steps=5),
    "cpu": dict(n_images=64, batch_size=8, sampler="ddim", num_inference_steps=100, k=10),
    "paper": dict(),
}

# Fields that do not change the numbers: a resumed run may differ in these.
NON_EVAL_FIELDS = {"out_dir", "thresholds", "baseline_card", "max_drop", "gate", "max_batches", "grid_n", "threads",
                   "device", "repository", "version", "classifier_version", "purifier", "classifier", "data_root",
                   "grad_checkpoint", "checkpoint_budget_mb", "channels_last"}
THRESHOLD_KEYS = {"min_clean", "min_robust", "min_clean_bare", "max_drop", "bare_robust_max", "fail_on_flags"}
# Fixed generator streams per purpose, so results do not depend on which settings or ranks ran
SETTING_STREAM = {"linf-dwbox": 10, "linf-eot": 20, "l2-dwbox": 30, "l2-eot": 40}


# ---- set-up ------------------------------------------------------------------------------------------

@dataclass
class Ctx:
    cfg: GateConfig
    purifier_dir: Path
    classifier_dir: Path
    defense: Defense
    x: torch.Tensor  # [n, C, H, W] float in [0, 1], on CPU
    y: torch.Tensor
    classes: tuple
    dataset: str
    device: torch.device
    sha: dict
    state: Path

    @property
    def settings(self) -> list[AttackConfig]:
        c = self.cfg
        budget = {"linf": (c.eps_linf, c.step_linf), "l2": (c.eps_l2, c.step_l2)}
        return [AttackConfig(norm=nm, eps=budget[nm][0], step=budget[nm][1], steps=c.steps,
                             eot=c.eot if md == "eot" else 1, mode=md, eot_batched=c.eot_batched)
                for nm in c.norms for md in c.modes]

    def batches(self) -> list[tuple[int, int, int]]:
        bs = self.cfg.batch_size
        return [(b, s, min(s + bs, len(self.y))) for b, s in enumerate(range(0, len(self.y), bs))]


def validate(cfg: GateConfig) -> None:
    by_ckpt, by_repo = cfg.purifier or cfg.classifier, cfg.repository or cfg.version is not None
    if by_ckpt and by_repo:
        raise C.ConfigError("give either --purifier and --classifier, or --repository and --version, not both")
    if cfg.repository is not None and cfg.version is None:
        raise C.ConfigError("--repository needs --version (give neither to gate the deployed version)")
    if by_ckpt and not (cfg.purifier and cfg.classifier):
        raise C.ConfigError("give --purifier CKPT_DIR and --classifier CKPT_DIR (or --repository DIR --version N, "
                            "or none of them for the deployed version)")
    for name, vals, known in (("norms", cfg.norms, NORMS), ("modes", cfg.modes, MODES)):
        bad = [v for v in vals if v not in known]
        if bad or not vals or len(set(vals)) != len(vals):
            raise C.ConfigError(f"--{name} must be a comma list of distinct values from {known}, got {','.join(vals)}")
    if cfg.sampler not in ("ddpm", "ddim"):
        raise C.ConfigError(f"--sampler must be ddpm or ddim, got {cfg.sampler!r}")
    for name, lo in (("n_images", 1), ("batch_size", 1), ("steps", 0), ("eot", 1), ("k", 0), ("bare_steps", 0),
                     ("max_batches", 0), ("grid_n", 0)):
        if getattr(cfg, name) < lo:
            raise C.ConfigError(f"--{name} must be >= {lo}, got {getattr(cfg, name)}")
    for name in ("eps_linf", "eps_l2"):
        if getattr(cfg, name) < 0:
            raise C.ConfigError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("step_linf", "step_l2"):
        if getattr(cfg, name) <= 0:
            raise C.ConfigError(f"--{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.max_drop is not None and not 0 <= cfg.max_drop <= 1:
        raise C.ConfigError(f"--max_drop must be in [0, 1], got {cfg.max_drop}")


def use_deployed(cfg: GateConfig) -> None:
    """No model named: gate the deployed pair, the newest version of the default model repository."""
    if cfg.purifier or cfg.classifier or cfg.repository is not None:
        return
    repo = repository.default_repository()
    if cfg.version is None:
        cfg.version = repository.newest_version(repository.model_dir(repo, "purifier"))
        if cfg.version is None:
            raise C.ConfigError(f"no model given and none deployed in {repo}: give --purifier and --classifier")
    cfg.repository = str(repo)
    print(f"gate: no --purifier/--classifier given; gating version {cfg.version} of {repo}", file=sys.stderr)


def resolve_dirs(cfg: GateConfig) -> tuple[Path, Path]:
    if cfg.repository is not None:
        cv = cfg.classifier_version if cfg.classifier_version is not None else cfg.version
        return (repository.weights_dir(cfg.repository, "purifier", cfg.version),
                repository.weights_dir(cfg.repository, "classifier", cv))
    return Path(cfg.purifier), Path(cfg.classifier)


def build(cfg: GateConfig, d: distributed.Dist) -> Ctx:
    pdir, cdir = resolve_dirs(cfg)
    try:
        pmeta, cmeta = load_meta(pdir), load_meta(cdir)
        eps_net, classifier = load_unet(pdir, device=d.device), load_classifier(cdir, device=d.device)
        sha = {"purifier": weights_sha256(pdir), "classifier": weights_sha256(cdir)}
    except (CheckpointError, OSError, KeyError, RuntimeError) as e:
        raise C.ConfigError(f"cannot load the models: {e}") from None
    if pmeta.get("kind") not in PURIFIER_KINDS or cmeta.get("kind") not in CLASSIFIER_KINDS:
        raise C.ConfigError(f"--purifier must be a diffusion/addt checkpoint and --classifier a classifier one, "
                            f"got {pmeta.get('kind')!r} and {cmeta.get('kind')!r}")
    try:
        purifier = Purifier(eps_net, cfg.t_star, cfg.sampler, cfg.num_inference_steps,
                            grad_checkpoint=cfg.grad_checkpoint, checkpoint_budget_mb=cfg.checkpoint_budget_mb,
                            channels_last=cfg.channels_last)
    except ValueError as e:
        raise C.ConfigError(f"bad purifier settings: {e}") from None
    dataset = cfg.dataset or cmeta["arch"].get("dataset", "fashion_mnist")
    try:
        test = load_dataset(dataset, "test", cfg.data_root)
    except (DatasetError, ValueError) as e:
        raise C.ConfigError(str(e)) from None
    if cfg.n_images > len(test):
        raise C.ConfigError(f"--n_images {cfg.n_images} exceeds the {len(test)} images of the {dataset} test split")
    test = test.head(cfg.n_images)
    return Ctx(cfg, pdir, cdir, Defense(purifier, classifier).to(d.device), test.float01(), test.labels,
               test.classes, dataset, d.device, sha, Path(cfg.out_dir) / "state")


def eval_config(ctx: Ctx) -> dict:
    """What the saved per-sample results depend on; a resumed run must match it exactly."""
    keep = {k: v for k, v in C.to_dict(ctx.cfg).items() if k not in NON_EVAL_FIELDS}
    keep.update(dataset=ctx.dataset, num_inference_steps=ctx.defense.purifier.num_inference_steps,
                purifier_sha256=ctx.sha["purifier"], classifier_sha256=ctx.sha["classifier"])
    return json.loads(json.dumps(keep))  # tuples -> lists, as they come back from disk


def check_state(ctx: Ctx, d: distributed.Dist) -> None:
    ctx.state.mkdir(parents=True, exist_ok=True)
    f = ctx.state / "config.json"
    want = eval_config(ctx)
    if f.exists():
        have = json.loads(f.read_text())
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if diff:
            detail = ", ".join(f"{k}: saved {have.get(k)!r} vs now {want.get(k)!r}" for k in diff)
            raise C.ConfigError(f"{ctx.state} holds results of a different evaluation ({detail}); "
                                f"use another --out_dir or delete that folder")
    elif d.is_main:
        _atomic_text(f, json.dumps(want, indent=2))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- one batch -----------------------------------------------------------------------------------------

def generator(ctx: Ctx, batch: int, stream: int) -> torch.Generator:
    return torch.Generator(device=ctx.device).manual_seed(ctx.cfg.seed * 1_000_003 + batch * 1009 + stream)


def eval_batch(ctx: Ctx, b: int, lo: int, hi: int) -> dict[str, torch.Tensor]:
    cfg, defense = ctx.cfg, ctx.defense
    x, y = ctx.x[lo:hi].to(ctx.device), ctx.y[lo:hi].to(ctx.device)
    t0 = time.time()
    out: dict[str, torch.Tensor] = {"index": torch.arange(lo, hi), "label": y}
    out["clean_bare"] = single_shot(defense.classifier, x, y)
    out["clean_purified"] = single_shot(defense, x, y, generator=generator(ctx, b, 1))
    if cfg.k:
        out["clean_expected"] = expected_correct(defense, x, y, cfg.k, generator=generator(ctx, b, 2),
                                                 max_rows=cfg.batch_size * cfg.eot)
    for norm in cfg.norms:
        out[f"bare_robust/{norm}"] = bare_robust_correct(defense.classifier, x, y, norm, cfg.bare_steps)
    grid = b == 0 and cfg.grid_n > 0
    if grid:
        g = min(cfg.grid_n, hi - lo)
        out["grid/clean"] = x[:g]
        with torch.inference_mode():
            out["grid/purified"] = defense.purifier(x[:g], generator=generator(ctx, b, 3))
    for atk in ctx.settings:
        s, stream = atk.name, SETTING_STREAM[atk.name]
        res = PGD(defense, atk)(x, y, generator=generator(ctx, b, stream))
        if atk.mode == "dwbox":  # the evaluation reuses the attacker's fixed noise (method.md §4)
            out[f"{s}/clean"] = single_shot(defense, x, y, noise=res.noise)
            out[f"{s}/robust"] = single_shot(defense, res.x_adv, y, noise=res.noise)
        else:
            out[f"{s}/robust"] = single_shot(defense, res.x_adv, y, generator=generator(ctx, b, stream + 1))
            if cfg.k:
                out[f"{s}/robust_expected"] = expected_correct(defense, res.x_adv, y, cfg.k,
                                                               generator=generator(ctx, b, stream + 2),
                                                               max_rows=cfg.batch_size * cfg.eot)
        out[f"{s}/loss"] = res.loss
        out[f"{s}/zero_grad"] = res.zero_grad
        if grid:
            out[f"grid/{s}/adv"] = res.x_adv[:g]
            with torch.inference_mode():
                head = None if res.noise is None else res.noise[:g]
                out[f"grid/{s}/purified"] = defense.purifier(res.x_adv[:g], noise=head,
                                                             generator=generator(ctx, b, stream + 3))
    out["time_s"] = torch.tensor([time.time() - t0], dtype=torch.float64)
    return {k: (v.float() if v.dtype == torch.bool else v).detach().cpu().contiguous() for k, v in out.items()}


def batch_file(ctx: Ctx, b: int) -> Path:
    return ctx.state / f"batch_{b:05d}.safetensors"


def load_batch(ctx: Ctx, b: int) -> Optional[dict[str, torch.Tensor]]:
    f = batch_file(ctx, b)
    if not f.exists():
        return None
    try:
        return load_file(f)
    except Exception:  # a torn file from a kill mid-write: recompute that batch
        return None


def save_batch(ctx: Ctx, b: int, res: dict[str, torch.Tensor]) -> None:
    f = batch_file(ctx, b)
    tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
    save_file(res, tmp)
    os.replace(tmp, f)


# ---- the run -------------------------------------------------------------------------------------------

def running(results: list[dict], keys: list[str]) -> dict[str, str]:
    post = {}
    for k in keys:
        vals = [r[k] for r in results if k in r]
        if vals:
            post[k.replace("/robust", "").replace("clean_purified", "clean")] = f"{float(torch.cat(vals).mean()):.1%}"
    return post


def run_shard(ctx: Ctx, d: distributed.Dist) -> bool:
    """This rank's batches (b % world == rank); True when all of them are saved."""
    mine = [bt for bt in ctx.batches() if bt[0] % d.world_size == d.rank]
    done = {b: r for b, r in ((bt[0], load_batch(ctx, bt[0])) for bt in mine) if r is not None}
    keys = ["clean_purified"] + [f"{a.name}/robust" for a in ctx.settings]
    bar = tqdm(total=sum(hi - lo for _, lo, hi in mine), initial=sum(hi - lo for b, lo, hi in mine if b in done),
               desc=f"gate[{d.rank}]" if d.world_size > 1 else "gate", unit="img", position=d.rank,
               dynamic_ncols=True, mininterval=1.0)
    bar.set_postfix(running(list(done.values()), keys))
    new = 0
    for b, lo, hi in mine:
        if b in done:
            continue
        if ctx.cfg.max_batches and new >= ctx.cfg.max_batches:
            break
        done[b] = eval_batch(ctx, b, lo, hi)
        save_batch(ctx, b, done[b])
        new += 1
        bar.update(hi - lo)
        bar.set_postfix(running(list(done.values()), keys))
    bar.close()
    return len(done) == len(mine)


def wait_for_ranks(ctx: Ctx, d: distributed.Dist, run_id: str, complete: bool) -> bool:
    """Ranks report through files, not a collective: a barrier would time out on multi-hour imbalances."""
    _atomic_text(ctx.state / f"status-{run_id}-{d.rank}.json", json.dumps({"complete": complete}))
    if not d.is_main:
        return complete
    files = [ctx.state / f"status-{run_id}-{r}.json" for r in range(d.world_size)]
    while not all(f.exists() for f in files):
        time.sleep(1.0)
    ok = all(json.loads(f.read_text())["complete"] for f in files)
    for f in files:
        f.unlink(missing_ok=True)
    return ok


def merge(ctx: Ctx) -> dict[str, torch.Tensor]:
    parts = [load_batch(ctx, b) for b, _, _ in ctx.batches()]
    missing = [b for b, p in enumerate(parts) if p is None]
    if missing:
        raise RuntimeError(f"batches {missing} missing from {ctx.state}")
    merged = {}
    for k in parts[0]:
        if k.startswith("grid/"):
            merged[k] = parts[0][k]
        elif k == "time_s":
            merged[k] = torch.cat([p[k] for p in parts]).sum()
        else:
            merged[k] = torch.cat([p[k] for p in parts])
    assert torch.equal(merged["index"], torch.arange(len(ctx.y))), "per-sample results out of order"
    return merged


# ---- card and gate -------------------------------------------------------------------------------------

def find_thresholds(cfg: GateConfig, purifier_dir: Path) -> tuple[Optional[dict], Optional[str]]:
    if cfg.thresholds:
        path = Path(cfg.thresholds)
        if not path.exists():
            raise C.ConfigError(f"--thresholds {path} does not exist")
    else:
        path = next((p for p in (purifier_dir.parent / "gate.json", purifier_dir.parent.parent / "gate.json")
                     if p.exists()), None)
        if path is None:
            return None, None
    try:
        th = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise C.ConfigError(f"cannot read thresholds file {path}: {e}") from None
    if not isinstance(th, dict):
        raise C.ConfigError(f"thresholds file {path} must hold a JSON object")
    unknown = sorted(set(th) - THRESHOLD_KEYS)
    if unknown:
        raise C.ConfigError(f"thresholds file {path}: unknown key(s) {unknown}; known: {sorted(THRESHOLD_KEYS)}")
    for key in ("min_clean", "min_robust", "min_clean_bare", "max_drop", "bare_robust_max"):
        vals = th.get(key)
        if isinstance(vals, dict) and set(vals) - set(SETTING_STREAM) - {"*"}:
            raise C.ConfigError(f"thresholds file {path}: {key} names unknown setting(s) "
                                f"{sorted(set(vals) - set(SETTING_STREAM) - {'*'})}; known: {sorted(SETTING_STREAM)} "
                                f"and '*'")
        vals = list(vals.values()) if isinstance(vals, dict) else [] if vals is None else [vals]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in vals):
            raise C.ConfigError(f"thresholds file {path}: {key} must be a fraction in [0, 1] (or a map of setting "
                                f"name to fraction), got {th[key]!r}")
    if not isinstance(th.get("fail_on_flags", []), list):
        raise C.ConfigError(f"thresholds file {path}: fail_on_flags must be a list of flag names")
    bad_flags = sorted(set(th.get("fail_on_flags", [])) - set(FLAG_NAMES))
    if bad_flags:
        raise C.ConfigError(f"thresholds file {path}: unknown flag(s) {bad_flags}; known: {list(FLAG_NAMES)}")
    return th, str(path)


def _per_setting(value: Any, name: str) -> Optional[float]:
    if isinstance(value, dict):
        value = value.get(name, value.get("*"))
    return None if value is None else float(value)


def build_card(ctx: Ctx, m: dict[str, torch.Tensor], randomized: bool, bare_max: float, wall: float,
               world: int) -> dict:
    cfg, pur = ctx.cfg, ctx.defense.purifier
    n = len(ctx.y)
    clean = {"bare": summarize(m["clean_bare"], "single-shot, bare classifier"),
             "purified": summarize(m["clean_purified"], "single-shot (one fresh purification)")}
    if cfg.k:
        clean["purified_expected"] = summarize(m["clean_expected"], f"expected over k={cfg.k} purifications", k=cfg.k)
    bare_robust = {}
    for norm in cfg.norms:
        b = bare_attack_config(norm, cfg.bare_steps)
        bare_robust[norm] = summarize(m[f"bare_robust/{norm}"], "PGD on the bare classifier (no purifier)",
                                      eps=b.eps, step=b.step, steps=b.steps)
    settings = []
    for atk in ctx.settings:
        s = atk.name
        entry_clean = (summarize(m[f"{s}/clean"], "single-shot with the fixed DW-box noise")
                       if atk.mode == "dwbox" else clean["purified"])
        robust = summarize(m[f"{s}/robust"], "single-shot with the attack's fixed noise" if atk.mode == "dwbox"
                           else "single-shot (one fresh purification of the final x_adv)")
        expected = (summarize(m[f"{s}/robust_expected"], f"expected over k={cfg.k} purifications", k=cfg.k)
                    if f"{s}/robust_expected" in m else None)
        eval_passes = 1 + (cfg.k if expected else 0)
        settings.append({
            "name": s, "threat_model": atk.norm, "eps": atk.eps, "step": atk.step,
            "mode": atk.mode,
            "setting": "DW-box (noise fixed per batch, plain PGD)" if atk.mode == "dwbox"
                       else "stochastic white-box (PGD + EoT, fresh noise per sample)",
            "attack": {"algorithm": "PGD", "steps": atk.steps, "eot": atk.eot, "eot_batched": atk.eot_batched,
                       "init": "zero", "loss": "cross-entropy, untargeted",
                       "gradient": "full backpropagation through every purification step (UNet calls "
                                   "checkpointed when memory needs it: same gradients); no BPDA, no surrogate"},
            "protocol": robust["protocol"],
            "forward_passes_per_sample": {"attack": atk.steps * atk.eot, "evaluation": eval_passes,
                                          "total": atk.steps * atk.eot + eval_passes,
                                          "unet_calls_per_pass": pur.n_unet_calls},
            "n": n, "clean": entry_clean, "robust": robust, "robust_expected": expected,
            "loss_trajectory": [float(v) for v in m[f"{s}/loss"].mean(0)],
            "flags": sanity_flags(clean_acc=entry_clean["acc"], robust_acc=robust["acc"],
                                  zero_grad_frac=float(m[f"{s}/zero_grad"].mean()), randomized=randomized,
                                  mode=atk.mode, eot=atk.eot,
                                  bare_robust_acc=bare_robust[atk.norm]["acc"], bare_max=bare_max),
        })
    return {
        "schema": SCHEMA,
        "model": {"purifier": str(ctx.purifier_dir.resolve()), "classifier": str(ctx.classifier_dir.resolve()),
                  "purifier_sha256": ctx.sha["purifier"], "classifier_sha256": ctx.sha["classifier"],
                  "purifier_kind": load_meta(ctx.purifier_dir).get("kind"),
                  "repository": cfg.repository, "version": cfg.version,
                  "purification": {"t_star": pur.t_star, "sampler": pur.sampler,
                                   "num_inference_steps": pur.num_inference_steps, "unet_calls": pur.n_unet_calls}},
        "data": {"dataset": ctx.dataset, "split": "test", "n": n, "selection": f"first {n} test images",
                 "batch_size": cfg.batch_size},
        "randomized": randomized,
        "clean": clean, "bare_robust": bare_robust, "settings": settings,
        "git_commit": git_commit(), "wall_time_s": round(wall, 1),
        "compute_time_s": round(float(m["time_s"]), 1), "world_size": world, "device": str(ctx.device),
        "torch": torch.__version__, "config": C.to_dict(cfg),
    }


def gate_verdict(card: dict, th: Optional[dict], th_source: Optional[str], cfg: GateConfig,
                 baseline: Optional[dict]) -> dict:
    th = dict(th or {})
    if cfg.max_drop is not None:
        th["max_drop"] = cfg.max_drop
    reasons: list[str] = []
    if not th and baseline is None:
        reasons.append("no thresholds configured: pass --thresholds FILE or put gate.json next to the purifier "
                       "checkpoint (or --baseline_card with --max_drop)")
    clean_bare_min = th.get("min_clean_bare")
    if clean_bare_min is not None and card["clean"]["bare"]["acc"] < clean_bare_min:
        reasons.append(f"bare classifier clean accuracy {card['clean']['bare']['acc']:.2%} < {clean_bare_min:.2%}")
    fail_flags = th.get("fail_on_flags", list(FLAG_NAMES))
    for s in card["settings"]:
        name = s["name"]
        robust = gate_robust(s)
        lo = _per_setting(th.get("min_clean"), name)
        if lo is not None and s["clean"]["acc"] < lo:
            reasons.append(f"{name}: clean accuracy {s['clean']['acc']:.2%} < minimum {lo:.2%}")
        lo = _per_setting(th.get("min_robust"), name)
        if lo is not None and robust < lo:
            reasons.append(f"{name}: robust accuracy {robust:.2%} < minimum {lo:.2%}")
        for f in fail_flags:
            if s["flags"].get(f, {}).get("raised"):
                reasons.append(f"{name}: sanity flag {f} raised (value {s['flags'][f]['value']}; see "
                               f"docs/robustness-flags.md)")
    if baseline is not None:
        drop = th["max_drop"]
        base = {s["name"]: s for s in baseline.get("settings", [])}
        for s in card["settings"]:
            b = base.get(s["name"])
            if b is None or abs(b.get("eps", -1) - s["eps"]) > 1e-9:
                continue  # not comparable: recorded below
            for what, new, old in (("robust", gate_robust(s), gate_robust(b)),
                                   ("clean", s["clean"]["acc"], b["clean"]["acc"])):
                if new < old - drop:
                    reasons.append(f"{s['name']}: {what} accuracy {new:.2%} is more than {drop:.2%} below the "
                                   f"baseline's {old:.2%}")
    compared = sorted({s["name"] for s in card["settings"]} & {s["name"] for s in (baseline or {}).get("settings", [])})
    return {"passed": not reasons, "reasons": reasons,
            "thresholds": {**th, "source": th_source, "fail_on_flags": fail_flags,
                           "robust_metric": "min over the single-shot and expected-accuracy protocols"},
            "baseline_card": cfg.baseline_card, "baseline_compared": compared}


def gate_robust(s: dict) -> float:
    """The gate reads the lowest robust accuracy over the protocols that ran (Fixed-AutoAttack keeps the min)."""
    vals = [s["robust"]["acc"]] + ([s["robust_expected"]["acc"]] if s.get("robust_expected") else [])
    return min(vals)


def write_outputs(ctx: Ctx, card: dict, m: dict[str, torch.Tensor]) -> None:
    out = Path(ctx.cfg.out_dir)
    write_card(card, out / "card.json")
    plot_card(card, out)
    if "grid/clean" not in m:  # --grid_n 0 when batch 0 was evaluated
        return
    rows = [m["grid/clean"], m["grid/purified"]]
    for atk in ctx.settings:
        rows += [m[f"grid/{atk.name}/adv"], m[f"grid/{atk.name}/purified"]]
    if len(rows[0]):
        image_grid(rows, out / "grid.png")
        (out / "grid.txt").write_text("rows, top to bottom: clean, purified clean, then for each of "
                                      + ", ".join(a.name for a in ctx.settings)
                                      + ": adversarial, purified adversarial\n")


def main(argv=None) -> int:
    t0 = time.time()
    cfg = C.parse_cli(GateConfig, argv, PRESETS, prog="python -m training.gate")
    validate(cfg)
    use_deployed(cfg)
    set_threads(cfg.threads)
    d = distributed.setup(cfg.device)
    try:
        # thresholds and baseline first: a typo there should not cost a model load
        th, th_source = find_thresholds(cfg, resolve_dirs(cfg)[0]) if cfg.gate else (None, None)
        baseline = None
        if cfg.gate and cfg.baseline_card:
            try:
                baseline = load_card(cfg.baseline_card)
            except CardError as e:
                raise C.ConfigError(str(e)) from None
            if cfg.max_drop is None and (th or {}).get("max_drop") is None:
                raise C.ConfigError("--baseline_card needs --max_drop (or max_drop in the thresholds file)")
        ctx = build(cfg, d)
        check_state(ctx, d)
        run_id = distributed.all_gather_object(uuid.uuid4().hex if d.is_main else None)[0]
        complete = wait_for_ranks(ctx, d, run_id, run_shard(ctx, d))
        if not d.is_main:
            return EXIT_PASS if complete else EXIT_INCOMPLETE
        if not complete:
            print(f"stopped before all {len(ctx.batches())} batches were evaluated; per-sample results are in "
                  f"{ctx.state}. Rerun the same command to continue.", file=sys.stderr)
            return EXIT_INCOMPLETE
        m = merge(ctx)
        with torch.no_grad():
            randomized = is_randomized(ctx.defense, ctx.x[:4].to(ctx.device),
                                       generator=torch.Generator(device=ctx.device).manual_seed(cfg.seed))
        bare_max = float((th or {}).get("bare_robust_max", 0.1))
        card = build_card(ctx, m, randomized, bare_max, time.time() - t0, d.world_size)
        if cfg.gate:
            card["gate"] = gate_verdict(card, th, th_source, cfg, baseline)
        else:
            card["gate"] = {"passed": False, "reasons": ["gate not evaluated (--gate false)"], "thresholds": {}}
        write_outputs(ctx, card, m)
        print(summary_table(card))
        print(f"card: {Path(cfg.out_dir) / 'card.json'}")
        if not cfg.gate:
            return EXIT_PASS
        if card["gate"]["passed"]:
            print("GATE PASSED")
            return EXIT_PASS
        print("GATE FAILED:\n  " + "\n  ".join(card["gate"]["reasons"]), file=sys.stderr)
        return EXIT_FAIL
    finally:
        distributed.teardown()


def summary_table(card: dict) -> str:
    c = card["clean"]
    lines = [f"clean: bare {c['bare']['acc']:.1%}, purified {c['purified']['acc']:.1%}"
             + (f", purified expected {c['purified_expected']['acc']:.1%}" if "purified_expected" in c else "")
             + " | bare robust: " + ", ".join(f"{k} {v['acc']:.1%}" for k, v in card["bare_robust"].items())]
    for s in card["settings"]:
        lo, hi = s["robust"]["ci95"]
        exp = f", expected {s['robust_expected']['acc']:.1%}" if s.get("robust_expected") else ""
        raised = [k for k, v in s["flags"].items() if v["raised"]]
        lines.append(f"{s['name']:>11}: clean {s['clean']['acc']:.1%}  robust {s['robust']['acc']:.1%} "
                     f"[{lo:.1%}, {hi:.1%}]{exp}" + (f"  flags: {', '.join(raised)}" if raised else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
