"""The gate's measurement protocol: the set-up (models, images, the evaluation's saved configuration), one
batch of every setting (`eval_batch`: clean, the bare classifier, PGD per setting with best-iterate tracking,
DW-box images under fresh noise, EoT with per-image expected hits, the served maximum VOTES), and the sanity
checks on a small subset. Every noise draw comes from a generator seeded by (seed, batch, stream).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import config as C, distributed, state
from ..attacks import AttackConfig, build_attack
from ..checkpoint import CLASSIFIER_KINDS, PURIFIER_KINDS, CheckpointError, load_meta, weights_sha256
from ..data import DatasetError, load_dataset
from ..models import Defense, Purifier, VotedDefense, load_classifier, load_unet
from ..robustness import expected_correct, single_shot
from ..serving.contract import aggregate_votes
from .config import (NON_EVAL_FIELDS, GateConfig, GateError, Setting, all_settings, resolve_dirs, stream_of,
                     voted_eot, voted_settings, voted_stream)


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


def build(cfg: GateConfig, d: distributed.Dist) -> Ctx:
    pdir, cdir = resolve_dirs(cfg)
    try:
        pmeta, cmeta = load_meta(pdir), load_meta(cdir)
        eps_net, classifier = load_unet(pdir, device=d.device), load_classifier(cdir, device=d.device)
        sha = {"purifier": weights_sha256(pdir), "classifier": weights_sha256(cdir)}
    except (CheckpointError, OSError, KeyError, RuntimeError) as e:
        raise GateError(f"cannot load the models: {e}") from None
    if pmeta.get("kind") not in PURIFIER_KINDS or cmeta.get("kind") not in CLASSIFIER_KINDS:
        raise GateError(f"--purifier must be a diffusion/addt checkpoint and --classifier a classifier one, "
                            f"got {pmeta.get('kind')!r} and {cmeta.get('kind')!r}")
    try:
        purifier = Purifier(eps_net, cfg.t_star, cfg.sampler, cfg.num_inference_steps,
                            grad_checkpoint=cfg.grad_checkpoint, checkpoint_budget_mb=cfg.checkpoint_budget_mb,
                            channels_last=cfg.channels_last)
    except ValueError as e:
        raise GateError(f"bad purifier settings: {e}") from None
    return ctx_for(cfg, pdir, cdir, Defense(purifier, classifier).to(d.device), cmeta, sha, d.device)


def ctx_for(cfg: GateConfig, pdir: Path, cdir: Path, defense: Defense, cmeta: dict, sha: dict,
            device: torch.device) -> Ctx:
    dataset = cfg.dataset or cmeta["arch"].get("dataset", "fashion_mnist")
    try:
        test = load_dataset(dataset, "test", cfg.data_root)
    except (DatasetError, ValueError) as e:
        raise GateError(str(e)) from None
    if cfg.n_images > len(test):
        raise GateError(f"--n_images {cfg.n_images} exceeds the {len(test)} images of the {dataset} test split")
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
        state.require_same(json.loads(f.read_text()), want, ctx.state, "use another --out_dir or delete that folder",
                           GateError)
    elif d.is_main:
        state.write_json(f, want)


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
                        out[f"grid/{k}/purified"] = defense.purifier(
                            res.x_adv[:g_n], noise=head, generator=None if head is not None else generator(ctx, b,
                                                                                                          stream + 3))
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
    state.write_json(f, out, indent=None)
    return out


