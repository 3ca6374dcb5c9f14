"""The gate's configuration: what to measure (GateConfig, presets), the settings (threat model x norm x mode)
and their noise streams, the served purification settings filled in from the repository, and GateError, the
one error the gate library raises (a ValueError; only the CLI, training/gate.py, turns it into an exit status).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import repository
from ..serving.contract import PROFILE_KEYS as PURIFICATION_KEYS
from ..threat_models import MODES, NORMS, THREAT_MODELS
from .policy import load_policy


class GateError(ValueError):
    """Bad gate input (configuration, models, data, baseline card): the CLI exits 2 with this message."""


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
    threat_models: tuple[str, ...] = ("paper", "fashion")  # budgets: dbp.threat_models.THREAT_MODELS
    norms: tuple[str, ...] = ("linf", "l2")  # filter on the threat models' norms
    modes: tuple[str, ...] = ("dwbox", "eot")
    # purification settings: default what the repository serves (purifier/config.pbtxt)
    sampler: Optional[str] = None
    num_inference_steps: Optional[int] = None
    t_star: Optional[int] = None
    # a serving profile of the repository's purifier config (`profiles`; "default" = the top-level settings): its
    # t_star / sampler / num_inference_steps, so the card is computed on exactly that pinned setting
    profile: Optional[str] = None
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


def validate(cfg: GateConfig) -> None:
    by_ckpt, by_repo = cfg.purifier or cfg.classifier, cfg.repository or cfg.version is not None
    if by_ckpt and by_repo:
        raise GateError("give either --purifier and --classifier, or --repository and --version, not both")
    if cfg.repository is not None and cfg.version is None:
        raise GateError("--repository needs --version (give neither to gate the deployed version)")
    if by_ckpt and not (cfg.purifier and cfg.classifier):
        raise GateError("give --purifier CKPT_DIR and --classifier CKPT_DIR (or --repository DIR --version N, "
                            "or none of them for the deployed version)")
    for name, vals, known in (("norms", cfg.norms, NORMS), ("modes", cfg.modes, MODES),
                              ("threat_models", cfg.threat_models, tuple(THREAT_MODELS))):
        bad = [v for v in vals if v not in known]
        if bad or not vals or len(set(vals)) != len(vals):
            raise GateError(f"--{name} must be a comma list of distinct values from {known}, got {','.join(vals)}")
    if not all_settings(cfg):
        raise GateError(f"--threat_models {','.join(cfg.threat_models)} has no norm in --norms {','.join(cfg.norms)}")
    from ..diffusion import SAMPLERS  # here, not at import: this module stays importable without torch

    if cfg.sampler is not None and cfg.sampler not in SAMPLERS:
        raise GateError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {cfg.sampler!r}")
    if cfg.keep not in ("best", "last"):
        raise GateError(f"--keep must be best or last, got {cfg.keep!r}")
    if cfg.report not in ("card", "convergence"):
        raise GateError(f"--report must be card or convergence, got {cfg.report!r}")
    for name, lo in (("n_images", 1), ("batch_size", 1), ("steps", 0), ("eot", 1), ("k", 0), ("bare_steps", 0),
                     ("max_batches", 0), ("grid_n", 0), ("sanity_n", 0)):
        if getattr(cfg, name) < lo:
            raise GateError(f"--{name} must be >= {lo}, got {getattr(cfg, name)}")
    if cfg.votes is not None and cfg.votes < 1:
        raise GateError(f"--votes must be >= 1, got {cfg.votes}")
    if cfg.votes and cfg.votes > 1 and not cfg.eot_batched:
        raise GateError("--votes > 1 needs --eot_batched true (the votes are rows of one batched call)")
    if cfg.n_images_eot is not None and cfg.n_images_eot < 1:
        raise GateError(f"--n_images_eot must be >= 1, got {cfg.n_images_eot}")


def use_deployed(cfg: GateConfig) -> None:
    """No model named: gate the deployed pair, the newest version of the default model repository."""
    if cfg.purifier or cfg.classifier or cfg.repository is not None:
        return
    repo = repository.default_repository()
    if cfg.version is None:
        cfg.version = repository.newest_version(repository.model_dir(repo, "purifier"))
        if cfg.version is None:
            raise GateError(f"no model given and none deployed in {repo}: give --purifier and --classifier")
    cfg.repository = str(repo)
    print(f"gate: no --purifier/--classifier given; gating version {cfg.version} of {repo}", file=sys.stderr)


def use_served_purification(cfg: GateConfig) -> None:
    """Fill sampler / t* / N that were not given from the repository's purifier config: gate what is served
    (--profile NAME: that serving profile's settings, which --sampler / --t_star / --num_inference_steps may not
    contradict)."""
    if cfg.profile is not None:
        repo = cfg.repository or repository.default_repository()
        try:
            served = repository.purification_settings(repo, cfg.profile)
        except KeyError:
            raise GateError(f"--profile {cfg.profile}: the purifier config of {repo} declares the profiles "
                            f"{', '.join(repository.profile_settings(repo))}") from None
        except (OSError, repository.RepositoryError) as e:
            raise GateError(f"cannot read the profiles of {repo}: {e}") from None
        for key in PURIFICATION_KEYS:
            given = getattr(cfg, key)
            if given is not None and str(given) != str(served[key]):
                raise GateError(f"--{key} {given} contradicts profile {cfg.profile!r} ({key} {served[key]}); "
                                "leave it out")
        cfg.sampler, cfg.t_star = served["sampler"], int(served["t_star"])
        cfg.num_inference_steps = int(served["num_inference_steps"])
        if cfg.votes is None:
            cfg.votes = int(served.get("max_votes", 1))
        return
    if cfg.sampler is not None and cfg.t_star is not None and cfg.num_inference_steps is not None:
        # an experiment's own settings: one vote unless --votes says otherwise (export and the server refuse a
        # card that attacked fewer VOTES than the repository serves)
        cfg.votes = 1 if cfg.votes is None else cfg.votes
        return
    repo = cfg.repository or repository.default_repository()
    try:
        served = repository.purification_settings(repo)
    except (OSError, repository.RepositoryError, KeyError) as e:
        raise GateError(f"cannot read the served purification settings of {repo}: {e}; give --sampler, "
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

