"""The robustness gate: attack purifier+classifier in every required setting, build the card, decide.

`training/gate.py` is the CLI over `run(cfg)`. Pieces (each testable on its own):
  - the per-batch protocol (`eval_batch`): clean accuracy (bare, purified, expected), the bare classifier
    under PGD per threat model, and per setting (threat model x norm x mode) PGD with best-iterate
    tracking (plus APGD-CE/DLR with `--apgd true`); DW-box adversarial images are also evaluated under
    fresh noise, the served setting. Saved per batch (state/), sharded over torchrun ranks, merged.
  - sanity checks on a small subset (`sanity`): l_inf 0.3 must collapse the accuracy, EoT gradient
    consistency, a transfer attack from the bare classifier must not beat the white-box one.
  - the card (`build_card`): per setting the per-image minimum over the attacks that ran
    (`worst_case`), intervals, flags (incl. `attack_ineffective`), per-image outcomes bound to the image
    indices and noise seeds (`dbp.paired.OutcomeRecord`), EoT settings' per-image hits out of k, the binding
    hash and the requirements.
  - the verdict: `dbp.gate.verdict.evaluate`, recomputed from the card's per-image evidence under the pinned
    policy (dbp/gate/promotion_policy.json); the baseline is a card measured the same way on the deployed
    version's weights, whose per-image outcomes travel in the new card. The card is signed when
    DBP_GATE_SIGNING_KEY names the gate's private key (dbp.gate.signing); unsigned cards never export.
  - `convergence_report`: robust accuracy against PGD steps and EoT samples (plot).

Purification settings (sampler, N, t*) default to what the repository serves (purifier/config.pbtxt), so the
gate measures what is served.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import config as C, distributed, repository
from ..attacks import NORMS, AttackConfig, build_attack
from ..card import CardError, binding_sha256, load_card, meta_sha256, plot_card, write_card
from ..checkpoint import CLASSIFIER_KINDS, PURIFIER_KINDS, CheckpointError, load_meta, weights_sha256
from ..data import DatasetError, load_dataset
from ..models import Defense, Purifier, VotedDefense, load_classifier, load_unet
from ..paired import OutcomeRecord
from ..plots import image_grid
from ..robustness import (expected_correct, is_randomized, mean_interval, sanity_flags, single_shot,
                         summarize, worst_case)
from ..runtime import git_commit
from ..serving.contract import aggregate_votes
from . import signing
from .policy import MODES, THREAT_MODELS, load_policy
from .verdict import SCHEMA, evaluate, summary_lines

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
    n_images: int = 1024  # DW-box: the first n_images test images (the paper's subset)
    n_images_eot: Optional[int] = None  # the stochastic setting on the first n_images_eot of them (default all)
    threat_models: tuple[str, ...] = ("paper", "fashion")  # budgets: dbp.card.THREAT_MODELS
    norms: tuple[str, ...] = ("linf", "l2")  # filter on the threat models' norms
    modes: tuple[str, ...] = ("dwbox", "eot")
    # purification settings: default what the repository serves (purifier/config.pbtxt)
    sampler: Optional[str] = None
    num_inference_steps: Optional[int] = None
    t_star: Optional[int] = None
    # the served maximum VOTES (purifier config.pbtxt max_votes), attacked as well: EoT on the averaged
    # probabilities of the votes, outcome the majority label (issue 20); 1 = the EoT rows are the served setting
    votes: Optional[int] = None
    steps: int = 20  # PGD iterations
    eot: int = 10  # EoT samples per step in the stochastic setting
    eot_batched: bool = True
    keep: str = "best"  # best-iterate tracking (issue 9); "last" = the paper's PGD
    apgd: bool = False  # also run APGD-CE and APGD-DLR (AutoAttack's rand recipe at --steps/--eot)
    k: int = 10  # purifications per sample for expected accuracy (0: skip that protocol)
    bare_steps: int = 20  # PGD steps of the bare-classifier attack (at each threat model's budget)
    sanity_n: int = 8  # images for the sanity checks (0: skip them; a passing card needs them)
    batch_size: int = 16  # images per batch; the attack runs batch_size * eot rows at once
    seed: int = 0
    out_dir: str = "runs/gate"
    # a card measured with this protocol on the deployed version's weights (same images and seeds); export
    # requires it once a version is deployed, and its per-image outcomes travel in the new card
    baseline_card: Optional[str] = None
    gate: bool = True  # false: evaluate and write the card only (gate.passed=false, exit 0)
    report: str = "card"  # "convergence": robust accuracy vs PGD steps / EoT samples on --n_images (plot)
    max_batches: int = 0  # stop after this many new batches per rank (0: all); rerun to resume
    grid_n: int = 8
    threads: int = 0
    device: str = "auto"
    grad_checkpoint: str = "auto"
    checkpoint_budget_mb: Optional[float] = None
    channels_last: bool = True


PRESETS = {
    "smoke": dict(n_images=8, batch_size=4, sampler="ddim", num_inference_steps=50, steps=2, eot=2, k=2, bare_steps=5,
                  sanity_n=2),
    # the pinned policy's CPU sizes: DW-box 256 images per norm, EoT 64 at k = 10
    "cpu": dict(n_images=256, n_images_eot=64, batch_size=8, k=10),
    "paper": dict(),  # 1024 images in both modes (the paper's subset): a GPU job
}

NON_EVAL_FIELDS = {"out_dir", "baseline_card", "gate", "max_batches", "grid_n", "threads", "report",
                   "device", "repository", "version", "classifier_version", "purifier", "classifier", "data_root",
                   "grad_checkpoint", "checkpoint_budget_mb", "channels_last"}


@dataclass(frozen=True)
class Setting:
    threat_model: str
    norm: str
    mode: str
    eps: float
    step: float

    @property
    def name(self) -> str:  # the paper's settings keep their old names
        base = f"{self.norm}-{self.mode}"
        return base if self.threat_model == "paper" else f"{base}@{self.threat_model}"

    @property
    def group(self) -> str:
        return f"{self.threat_model}:{self.norm}"


def all_settings(cfg: GateConfig) -> list[Setting]:
    out = []
    for tm in cfg.threat_models:
        for norm, (eps, step) in THREAT_MODELS[tm].items():
            if norm in cfg.norms:
                out += [Setting(tm, norm, md, eps, step) for md in MODES if md in cfg.modes]  # DW-box first
    return out


def stream_of(s: Setting) -> int:
    """Fixed generator stream per setting, so results do not depend on which settings or ranks ran."""
    keys = [(tm, nm, md) for tm in THREAT_MODELS for nm in THREAT_MODELS[tm] for md in MODES]
    return 10 * (1 + keys.index((s.threat_model, s.norm, s.mode)))


def voted_stream(s: Setting) -> int:
    """The voted attack's stream (after every setting's): attack +0, majority evaluation +1."""
    return 10 * (1 + len(THREAT_MODELS) * len(NORMS) * len(MODES)) + stream_of(s)


def voted_settings(cfg: GateConfig) -> list[Setting]:
    """The EoT settings of the declared threat models: where the served maximum VOTES is attacked too."""
    if not cfg.votes or cfg.votes < 2:
        return []
    declared = load_policy()["declared"]["threat_models"]
    return [s for s in all_settings(cfg) if s.mode == "eot" and s.threat_model in declared]


def voted_eot(cfg: GateConfig) -> int:
    """Draws of the k votes per step: at least cfg.eot purifications per gradient, as the EoT rows."""
    return max(1, -(-cfg.eot // cfg.votes))


# ---- set-up ------------------------------------------------------------------------------------------

@dataclass
class Ctx:
    cfg: GateConfig
    purifier_dir: Path
    classifier_dir: Path
    defense: Defense
    x: torch.Tensor
    y: torch.Tensor
    classes: tuple
    dataset: str
    device: torch.device
    sha: dict
    state: Path
    images_sha256: str = ""

    @property
    def settings(self) -> list[Setting]:
        return all_settings(self.cfg)

    @property
    def n_eot(self) -> int:
        return min(len(self.y), self.cfg.n_images_eot or len(self.y))

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
    for name, vals, known in (("norms", cfg.norms, NORMS), ("modes", cfg.modes, MODES),
                              ("threat_models", cfg.threat_models, tuple(THREAT_MODELS))):
        bad = [v for v in vals if v not in known]
        if bad or not vals or len(set(vals)) != len(vals):
            raise C.ConfigError(f"--{name} must be a comma list of distinct values from {known}, got {','.join(vals)}")
    if not all_settings(cfg):
        raise C.ConfigError(f"--threat_models {','.join(cfg.threat_models)} has no norm in --norms {','.join(cfg.norms)}")
    if cfg.sampler is not None and cfg.sampler not in ("ddpm", "ddim"):
        raise C.ConfigError(f"--sampler must be ddpm or ddim, got {cfg.sampler!r}")
    if cfg.keep not in ("best", "last"):
        raise C.ConfigError(f"--keep must be best or last, got {cfg.keep!r}")
    if cfg.report not in ("card", "convergence"):
        raise C.ConfigError(f"--report must be card or convergence, got {cfg.report!r}")
    for name, lo in (("n_images", 1), ("batch_size", 1), ("steps", 0), ("eot", 1), ("k", 0), ("bare_steps", 0),
                     ("max_batches", 0), ("grid_n", 0), ("sanity_n", 0)):
        if getattr(cfg, name) < lo:
            raise C.ConfigError(f"--{name} must be >= {lo}, got {getattr(cfg, name)}")
    if cfg.votes is not None and cfg.votes < 1:
        raise C.ConfigError(f"--votes must be >= 1, got {cfg.votes}")
    if cfg.votes and cfg.votes > 1 and not cfg.eot_batched:
        raise C.ConfigError("--votes > 1 needs --eot_batched true (the votes are rows of one batched call)")
    if cfg.n_images_eot is not None and cfg.n_images_eot < 1:
        raise C.ConfigError(f"--n_images_eot must be >= 1, got {cfg.n_images_eot}")


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


def use_served_purification(cfg: GateConfig) -> None:
    """Fill sampler / t* / N that were not given from the repository's purifier config: gate what is served."""
    if cfg.sampler is not None and cfg.t_star is not None and cfg.num_inference_steps is not None:
        # an experiment's own settings: one vote unless --votes says otherwise (export and the server refuse a
        # card that attacked fewer VOTES than the repository serves)
        cfg.votes = 1 if cfg.votes is None else cfg.votes
        return
    repo = cfg.repository or repository.default_repository()
    try:
        served = repository.purification_settings(repo)
    except (OSError, repository.RepositoryError, KeyError) as e:
        raise C.ConfigError(f"cannot read the served purification settings of {repo}: {e}; give --sampler, "
                            f"--t_star and --num_inference_steps") from None
    cfg.sampler = cfg.sampler or served["sampler"]
    cfg.t_star = cfg.t_star if cfg.t_star is not None else int(served["t_star"])
    if cfg.num_inference_steps is None:
        cfg.num_inference_steps = int(served["num_inference_steps"])
    if cfg.votes is None:
        cfg.votes = int(served.get("max_votes", 1))


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
    return ctx_for(cfg, pdir, cdir, Defense(purifier, classifier).to(d.device), cmeta, sha, d.device)


def ctx_for(cfg: GateConfig, pdir: Path, cdir: Path, defense: Defense, cmeta: dict, sha: dict,
            device: torch.device) -> Ctx:
    dataset = cfg.dataset or cmeta["arch"].get("dataset", "fashion_mnist")
    try:
        test = load_dataset(dataset, "test", cfg.data_root)
    except (DatasetError, ValueError) as e:
        raise C.ConfigError(str(e)) from None
    if cfg.n_images > len(test):
        raise C.ConfigError(f"--n_images {cfg.n_images} exceeds the {len(test)} images of the {dataset} test split")
    test = test.head(cfg.n_images)
    return Ctx(cfg, pdir, cdir, defense, test.float01(), test.labels, test.classes, dataset, device, sha,
               Path(cfg.out_dir) / "state", images_sha256(test))


def images_sha256(test) -> str:
    """sha256 of the exact pixels and labels evaluated (decoded, so a recompressed archive hashes the same)."""
    import hashlib
    h = hashlib.sha256()
    h.update(test.images.contiguous().numpy().tobytes())
    h.update(test.labels.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def eval_config(ctx: Ctx) -> dict:
    keep = {k: v for k, v in C.to_dict(ctx.cfg).items() if k not in NON_EVAL_FIELDS}
    keep.update(dataset=ctx.dataset, num_inference_steps=ctx.defense.purifier.num_inference_steps,
                purifier_sha256=ctx.sha["purifier"], classifier_sha256=ctx.sha["classifier"])
    return json.loads(json.dumps(keep))


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

def batch_seed(cfg: GateConfig, batch: int, stream: int) -> int:
    return cfg.seed * 1_000_003 + batch * 1009 + stream


def generator(ctx: Ctx, batch: int, stream: int, salt: int = 0) -> torch.Generator:
    return torch.Generator(device=ctx.device).manual_seed(batch_seed(ctx.cfg, batch, stream) + salt)


def eval_salt(ctx: Ctx) -> int:
    """Added to the seed of single-shot evaluations under fresh noise (not to the attack's, nor to the expected
    accuracy's draws, which two cards share to be paired): two fine-tunes of one start, measured with one seed,
    would otherwise be judged on the very same draw per image."""
    import hashlib
    return int(hashlib.sha256(str(ctx.sha["purifier"]).encode()).hexdigest()[:8], 16)


def attack_config(cfg: GateConfig, s: Setting, algorithm: str = "pgd", loss: str = "ce") -> AttackConfig:
    return AttackConfig(norm=s.norm, eps=s.eps, step=s.step, steps=cfg.steps, eot=cfg.eot if s.mode == "eot" else 1,
                        mode=s.mode, eot_batched=cfg.eot_batched, keep=cfg.keep, algorithm=algorithm, loss=loss)


def eval_batch(ctx: Ctx, b: int, lo: int, hi: int) -> dict[str, torch.Tensor]:
    cfg, defense = ctx.cfg, ctx.defense
    x, y = ctx.x[lo:hi].to(ctx.device), ctx.y[lo:hi].to(ctx.device)
    n_eot = max(0, min(hi, ctx.n_eot) - lo)  # the stochastic setting runs on the first n_images_eot images
    t0 = time.time()
    out: dict[str, torch.Tensor] = {"index": torch.arange(lo, hi), "label": y}
    out["clean_bare"] = single_shot(defense.classifier, x, y)
    out["clean_purified"] = single_shot(defense, x, y, generator=generator(ctx, b, 1))
    if cfg.k:
        out["clean_expected"] = expected_correct(defense, x, y, cfg.k, generator=generator(ctx, b, 2),
                                                 max_rows=cfg.batch_size * cfg.eot)
    for g in dict.fromkeys(s.group for s in ctx.settings):
        s = next(s for s in ctx.settings if s.group == g)
        bare = AttackConfig(norm=s.norm, eps=s.eps, step=s.step, steps=cfg.bare_steps, eot=1, mode="dwbox",
                            keep=cfg.keep)
        res = build_attack(defense.classifier, bare)(x, y)
        out[f"bare_robust/{g}"] = single_shot(defense.classifier, res.x_adv, y)
    grid = b == 0 and cfg.grid_n > 0
    g_n = min(cfg.grid_n, hi - lo)
    if grid:
        out["grid/clean"] = x[:g_n]
        with torch.inference_mode():
            out["grid/purified"] = defense.purifier(x[:g_n], generator=generator(ctx, b, 3))
    dw_adv: dict[str, torch.Tensor] = {}
    for s in ctx.settings:
        k, stream = s.name, stream_of(s)
        if s.mode == "eot" and n_eot == 0:
            continue
        xs, ys = (x, y) if s.mode == "dwbox" else (x[:n_eot], y[:n_eot])
        algos = [("pgd", "ce")] + ([("apgd", "ce"), ("apgd", "dlr")] if cfg.apgd else [])
        for j, (alg, loss) in enumerate(algos):
            name = f"{alg}-{loss}"
            res = build_attack(defense, attack_config(cfg, s, alg, loss))(xs, ys, generator=generator(ctx, b,
                                                                                                       stream + 5 * j))
            if s.mode == "dwbox":  # the evaluation reuses the attacker's fixed noise (method.md §4)
                if j == 0:
                    out[f"{k}/clean"] = single_shot(defense, xs, ys, noise=res.noise)
                    out[f"{k}/last"] = single_shot(defense, res.x_last, ys, noise=res.noise)
                    dw_adv[s.group] = res.x_adv
                out[f"{k}/{name}"] = single_shot(defense, res.x_adv, ys, noise=res.noise)
                # the same images under fresh noise: the setting the server runs
                out[f"{k}/{name}-fresh"] = single_shot(defense, res.x_adv, ys, generator=generator(ctx, b, stream + 4))
            else:
                out[f"{k}/{name}"] = single_shot(defense, res.x_adv, ys,
                                                 generator=generator(ctx, b, stream + 1, eval_salt(ctx)))
                if cfg.k and j == 0:
                    out[f"{k}/robust_expected"] = expected_correct(defense, res.x_adv, ys, cfg.k,
                                                                   generator=generator(ctx, b, stream + 2),
                                                                   max_rows=cfg.batch_size * cfg.eot)
            if j == 0:
                out[f"{k}/loss"] = res.loss
                out[f"{k}/zero_grad"] = res.zero_grad
                if grid:
                    out[f"grid/{k}/adv"] = res.x_adv[:g_n]
                    with torch.inference_mode():
                        head = None if res.noise is None else res.noise[:g_n]
                        out[f"grid/{k}/purified"] = defense.purifier(res.x_adv[:g_n], noise=head,
                                                                     generator=generator(ctx, b, stream + 3))
        if s.mode == "eot" and s.group in dw_adv:  # DW-box adversarials against the served setting
            out[f"{k}/dwbox-transfer"] = single_shot(defense, dw_adv[s.group][:n_eot], ys,
                                                     generator=generator(ctx, b, stream + 1, eval_salt(ctx)))
    if n_eot and voted_settings(cfg):
        voted = VotedDefense(defense, cfg.votes)
        xs, ys = x[:n_eot], y[:n_eot]
        out[f"clean_voted{cfg.votes}"] = majority_correct(voted, xs, ys, generator(ctx, b, 4, eval_salt(ctx)))
        for s in voted_settings(cfg):
            acfg = dataclasses.replace(attack_config(cfg, s), eot=voted_eot(cfg))
            res = build_attack(voted, acfg)(xs, ys, generator=generator(ctx, b, voted_stream(s)))
            k = f"{s.name}/voted{cfg.votes}"
            out[k] = majority_correct(voted, res.x_adv, ys, generator(ctx, b, voted_stream(s) + 1, eval_salt(ctx)))
            out[f"{k}/loss"] = res.loss
    out["time_s"] = torch.tensor([time.time() - t0], dtype=torch.float64)
    return {k: (v.float() if v.dtype == torch.bool else v).detach().cpu().contiguous() for k, v in out.items()}


@torch.inference_mode()
def majority_correct(voted: VotedDefense, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """[B] bool: the served decision (the majority of the k votes, served tie-break) is the label."""
    label = aggregate_votes(voted.vote_logits(x, generator=gen).float().cpu().numpy(), voted.votes)["LABEL"][:, 0]
    return torch.from_numpy(label).to(y.device) == y


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
            post[k.replace("/pgd-ce", "").replace("clean_purified", "clean")] = f"{float(torch.cat(vals).mean()):.1%}"
    return post


def run_shard(ctx: Ctx, d: distributed.Dist) -> bool:
    """This rank's batches (b % world == rank); True when all of them are saved."""
    mine = [bt for bt in ctx.batches() if bt[0] % d.world_size == d.rank]
    done = {b: r for b, r in ((bt[0], load_batch(ctx, bt[0])) for bt in mine) if r is not None}
    keys = ["clean_purified"] + [f"{s.name}/pgd-ce" for s in ctx.settings]
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
    for k in dict.fromkeys(k for p in parts for k in p):
        if k.startswith("grid/"):
            merged[k] = parts[0][k]
        elif k == "time_s":
            merged[k] = torch.cat([p[k] for p in parts]).sum()
        else:
            merged[k] = torch.cat([p[k] for p in parts if k in p])
    assert torch.equal(merged["index"], torch.arange(len(ctx.y))), "per-sample results out of order"
    return merged


def image_seeds(ctx: Ctx, s: Setting, n: int) -> list[int]:
    """Per image, the seed of the generator that drew its noise (the batch's stream for the setting)."""
    return [batch_seed(ctx.cfg, b, stream_of(s)) for b, lo, hi in ctx.batches() for _ in range(lo, hi)][:n]


# ---- sanity checks on a small subset --------------------------------------------------------------------

def sanity(ctx: Ctx, m: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The three checks of dbp.sanity_checks on the first sanity_n images; cached in state/sanity.json."""
    from ..sanity_checks import eot_gradient_consistency, large_budget_check, transfer_check

    cfg = ctx.cfg
    f = ctx.state / "sanity.json"
    if f.exists():
        return json.loads(f.read_text())
    n = min(cfg.sanity_n, len(ctx.y))
    x, y = ctx.x[:n].to(ctx.device), ctx.y[:n].to(ctx.device)
    gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed * 7 + 12345)
    out = {"n": n, "indices": list(range(n))}
    out["large_budget_not_collapsed"] = large_budget_check(ctx.defense, x, y, steps=max(cfg.steps, 1),
                                                           generator=gen).to_dict()
    out["eot_gradient_inconsistent"] = eot_gradient_consistency(ctx.defense, x, y, k=cfg.eot, generator=gen).to_dict()
    dw = next((s for s in ctx.settings if s.mode == "dwbox"), None)
    if dw is not None:  # white-box DW-box outcome of these images (fresh noise of the card) vs transfer
        wb = m[f"{dw.name}/pgd-ce-fresh"][:n].to(ctx.device)
        out["transfer_beats_white_box"] = transfer_check(ctx.defense, ctx.defense.classifier, x, y, wb,
                                                         attack_config(cfg, dw), generator=gen,
                                                         source_name="bare classifier").to_dict()
        out["transfer_beats_white_box"]["white_box"] = [int(v) for v in wb.tolist()]
    for key in ("large_budget_not_collapsed", "transfer_beats_white_box"):  # the verdict reads per-image 0/1
        if key in out and "per_image" in out[key]:
            out[key]["outcomes"] = [int(round(v)) for v in out[key]["per_image"]["correct"]]
    _atomic_text(f, json.dumps(out))
    return out


# ---- card and gate -------------------------------------------------------------------------------------

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
        expected = (summarize(m[f"{k}/robust_expected"], f"expected over k={cfg.k} purifications", k=cfg.k)
                    if f"{k}/robust_expected" in m else None)
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
                "k": cfg.k, "hits": [round(float(v) * cfg.k) for v in m[f"{k}/robust_expected"]],
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


CLAIM_DECLARED = "declared threat model: the defence is claimed and judged here"
CLAIM_REPORTED = "reported: not defended at this budget (measured and shown, judged by non-inferiority only)"


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
        raise C.ConfigError(f"--baseline_card {source}: schema {baseline.get('schema')!r} holds no per-image "
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


# ---- convergence -----------------------------------------------------------------------------------------

def convergence_report(ctx: Ctx, steps: tuple[int, ...] = (20, 50, 100), eots: tuple[int, ...] = (10, 20, 50),
                       out: Optional[Path] = None) -> dict:
    """Robust accuracy vs PGD steps (DW-box, each threat model's first norm) and vs EoT samples (stochastic,
    PGD --steps) on ctx's images: the card's figures are converged when the curves are flat. Resumable
    per point (convergence.json, which also keeps the evaluation's configuration: points of another model,
    image count or seed are never mixed in); writes convergence.png."""
    from ..plots import _plt

    cfg = ctx.cfg
    out = Path(out or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    f = out / "convergence.json"
    want = eval_config(ctx)
    res = json.loads(f.read_text()) if f.exists() else {"config": want, "points": {}}
    have = res.get("config")
    if have != want:
        detail = ("it does not record its configuration (an older run)" if have is None else ", ".join(
            f"{k}: saved {have.get(k)!r} vs now {want.get(k)!r}" for k in sorted(set(have) | set(want))
            if have.get(k) != want.get(k)))
        raise C.ConfigError(f"{f} holds points of a different evaluation ({detail}); use another --out_dir or "
                            f"delete that file")
    x, y = ctx.x.to(ctx.device), ctx.y.to(ctx.device)
    groups = list(dict.fromkeys((s.threat_model, s.norm, s.eps, s.step) for s in ctx.settings))
    todo = [(g, "dwbox", st, 1) for g in groups for st in steps] + [(g, "eot", cfg.steps, k) for g in groups
                                                                    for k in eots]
    for (tm, norm, eps, step), mode, st, k in tqdm(todo, desc="convergence"):
        key = f"{tm}:{norm}:{mode}:steps={st}:eot={k}"
        if key in res["points"]:
            continue
        gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed)
        acfg = AttackConfig(norm=norm, eps=eps, step=step, steps=st, eot=k, mode=mode, keep=cfg.keep)
        r = build_attack(ctx.defense, acfg)(x, y, generator=gen)
        c = (single_shot(ctx.defense, r.x_adv, y, noise=r.noise) if mode == "dwbox"
             else expected_correct(ctx.defense, r.x_adv, y, max(cfg.k, 1), generator=gen))
        res["points"][key] = {"acc": float(c.float().mean()), "ci95": list(mean_interval(c.float())), "n": len(y),
                              "steps": st, "eot": k, "mode": mode, "threat_model": tm, "norm": norm, "eps": eps}
        _atomic_text(f, json.dumps(res, indent=2))
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, mode, xs, xl in ((axes[0], "dwbox", steps, "PGD steps (DW-box)"),
                             (axes[1], "eot", eots, f"EoT samples (stochastic, PGD-{cfg.steps})")):
        for tm, norm, eps, _ in groups:
            pts = [res["points"][f"{tm}:{norm}:{mode}:steps={st if mode == 'dwbox' else cfg.steps}:"
                                 f"eot={1 if mode == 'dwbox' else st}"] for st in xs]
            acc = [p["acc"] for p in pts]
            err = [[a - p["ci95"][0] for a, p in zip(acc, pts)], [p["ci95"][1] - a for a, p in zip(acc, pts)]]
            ax.errorbar(xs, acc, yerr=err, marker="o", capsize=3, label=f"{tm} {norm} eps={eps:.3g}")
        ax.set_xlabel(xl), ax.set_ylabel("robust accuracy (95% interval)"), ax.set_ylim(0, 1), ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"gate convergence, n={len(y)} images, {ctx.defense.purifier.sampler} "
                 f"x{ctx.defense.purifier.n_unet_calls}")
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=110)
    plt.close(fig)
    return res


# ---- the whole run ---------------------------------------------------------------------------------------

def run(cfg: GateConfig) -> int:
    t0 = time.time()
    validate(cfg)
    use_deployed(cfg)
    d = distributed.setup(cfg.device)
    try:
        policy = load_policy()
        use_served_purification(cfg)
        private_key = signing.load_private_key() if cfg.gate else None
        baseline = None
        if cfg.gate and cfg.baseline_card:
            try:
                baseline = load_card(cfg.baseline_card)
            except CardError as e:
                raise C.ConfigError(str(e)) from None
        ctx = build(cfg, d)
        if cfg.report == "convergence":
            if d.is_main:
                convergence_report(ctx)
                print(f"convergence: {Path(cfg.out_dir) / 'convergence.png'}")
            return EXIT_PASS
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
        checks = sanity(ctx, m) if cfg.sanity_n else None
        card = build_card(ctx, m, randomized, checks, policy, time.time() - t0, d.world_size)
        if baseline is not None:
            card["baseline"] = baseline_block(baseline, repository.relative_path(cfg.baseline_card))
        if cfg.gate:  # a cache of the verdict: export and the server recompute it from the evidence
            card["gate"] = evaluate(card, policy)
            if private_key is not None:
                card = signing.sign(card, private_key)
            else:
                print(f"warning: {signing.SIGNING_KEY_ENV} is not set: the card is not signed and cannot be "
                      f"exported", file=sys.stderr)
        else:
            card["gate"] = {"passed": False, "reasons": ["gate not evaluated (--gate false)"]}
        write_outputs(ctx, card, m)
        print(summary_table(card))
        if cfg.gate:
            print("\n".join(summary_lines(card["gate"])))
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
