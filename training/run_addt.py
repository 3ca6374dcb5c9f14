"""Fine-tune a pretrained diffusion purifier with ADDT (or its controls) against a frozen classifier.

  python -m training.run_addt --preset default                       # ADDT on the deployed Fashion-MNIST model
  python -m training.run_addt --preset default --mode clean          # control: plain fine-tuning, same recipe
  python -m training.run_addt --preset default --no_rbgm             # control: CGPO without RBGM
  torchrun --nproc_per_node 8 -m training.run_addt --preset cifar10 --init /models/ddpm_ema_cifar10 \
      --classifier /models/wrn-28-10 --data_root /data/cifar-10-batches-py

Without --init/--classifier it fine-tunes the deployed purifier against the deployed classifier (the newest
versions in model_repository/, dbp.repository.deployed_weights), so it runs from a fresh clone.
Writes <out_dir>/checkpoint (EMA weights served by export), report.json and loss.png; reruns resume.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel

from dbp import checkpoint as ckpt, config as C, distributed
from dbp.addt import ADDTConfig, addt_loss
from dbp.data import load_dataset
from dbp.diffusion import Diffusion, to_model_range
from dbp.models import freeze, load_classifier, load_raw_unet
from dbp.nets import load_diffusers_unet, set_dropout
from dbp.plots import line_plot
from dbp.runtime import git_commit, set_threads
from dbp.trainer import LoopConfig, Trainer, constant
from training.defaults import deployed_default


@dataclass
class RunConfig:
    init: Optional[str] = None  # dbp diffusion checkpoint or local diffusers folder; default: the deployed purifier
    classifier: Optional[str] = None  # dbp classifier checkpoint; default: the deployed classifier
    dataset: str = "fashion_mnist"
    data_root: Optional[str] = None
    out_dir: str = "runs/addt"
    mode: str = "addt"  # addt | clean
    no_rbgm: bool = False
    steps: int = 150
    batch_size: int = 32  # global batch
    lr: float = 2e-4
    betas: tuple[float, ...] = (0.95, 0.999)
    weight_decay: float = 1e-6
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    dropout: float = 0.1
    ema_decay: float = 0.9999  # warm-up EMA (inv_gamma 1, power 3/4), restarted at the start of fine-tuning
    t_min: int = 0
    t_max: int = 999  # the full range by default, as the reference recipe
    cgpo_steps: int = 5
    lambda_unit: float = 0.03
    lambda_min: float = 0.0
    lambda_max: float = 0.3
    flip: bool = True
    ckpt_every: int = 25
    keep_every: int = 0  # weights-only snapshots under <out_dir>/snapshots/step_N (learning curves)
    seed: int = 0
    threads: int = 0
    device: str = "auto"


PRESETS = {
    "smoke": dict(steps=4, batch_size=8, ckpt_every=2, t_max=100),
    # the Fashion-MNIST base model was trained on t <= 100 only (all that purification at t*=100 visits)
    "default": dict(steps=150, batch_size=32, t_max=100, ckpt_every=25),
    # method.md §5.6: 8 GPUs x 32 = 256 global, 100 epochs of CIFAR-10 (~19.6k steps), all timesteps
    "cifar10": dict(dataset="cifar10", steps=19600, batch_size=256, t_max=999, ckpt_every=1000,
                    init="ddpm_ema_cifar10", classifier="wrn-28-10-cifar10"),
}


def load_init_unet(path: str) -> tuple[UNet2DModel, dict]:
    p = Path(path)
    if (p / "meta.json").exists():
        try:
            return load_raw_unet(p, "ema"), ckpt.load_meta(p)["arch"]
        except ckpt.CheckpointError as e:
            raise C.ConfigError(f"--init {e}") from None
    if (p / "config.json").exists() or (p / "unet" / "config.json").exists():
        unet = load_diffusers_unet(p)
        return unet, {"unet": "diffusers", "unet_config": dict(unet.config), "dataset": None}
    raise C.ConfigError(f"--init {p}: neither a dbp checkpoint (meta.json) nor a diffusers folder (config.json)")


def validate(cfg: RunConfig) -> None:
    if cfg.mode not in ("addt", "clean"):
        raise C.ConfigError(f"--mode must be 'addt' or 'clean', got {cfg.mode!r}")
    if cfg.mode == "clean" and cfg.no_rbgm:
        raise C.ConfigError("--no_rbgm only applies to --mode addt")
    if not 0 <= cfg.t_min <= cfg.t_max <= 999:
        raise C.ConfigError(f"need 0 <= t_min <= t_max <= 999, got {cfg.t_min}, {cfg.t_max}")
    if len(cfg.betas) != 2:
        raise C.ConfigError(f"--betas needs two values, got {cfg.betas}")
    for name in ("init", "classifier"):
        if not Path(getattr(cfg, name)).exists():
            raise C.ConfigError(f"--{name} {getattr(cfg, name)} does not exist")


def main(argv=None) -> dict:
    cfg = C.parse_cli(RunConfig, argv, PRESETS, prog="python -m training.run_addt")
    cfg.init = deployed_default(cfg.init, "purifier", "--init", "run_addt")
    cfg.classifier = deployed_default(cfg.classifier, "classifier", "--classifier", "run_addt")
    validate(cfg)
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    with distributed.session(cfg.device) as d:
        return run(cfg, d)


def run(cfg: RunConfig, d: distributed.Dist) -> dict:
    unet, arch = load_init_unet(cfg.init)
    set_dropout(unet, cfg.dropout)
    unet.to(d.device)
    classifier = freeze(load_classifier(cfg.classifier, d.device))  # eval mode: a loss provider only
    train = load_dataset(cfg.dataset, "train", cfg.data_root)
    diffusion = Diffusion().to(d.device)
    addt_cfg = ADDTConfig(cfg.cgpo_steps, cfg.lambda_unit, cfg.lambda_min, cfg.lambda_max, rbgm=not cfg.no_rbgm)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                            eps=cfg.adam_eps)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=0.75)

    def loss_fn(net, x, y, step):
        if cfg.flip:
            x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
        t = torch.randint(cfg.t_min, cfg.t_max + 1, (x.shape[0],), device=x.device)
        bare = net.module if hasattr(net, "module") else net
        cgpo_model = (lambda xt, tt: bare(xt, tt).sample) if cfg.mode == "addt" else None
        return addt_loss(lambda xt, tt: net(xt, tt).sample, cgpo_model, classifier, diffusion,
                         to_model_range(x), y, t, addt_cfg)

    meta = {"kind": "addt", "arch": arch, "mode": cfg.mode, "rbgm": not cfg.no_rbgm, "config": C.to_dict(cfg),
            "init": str(cfg.init), "classifier": str(cfg.classifier), "git_commit": git_commit()}
    trainer = Trainer(unet, opt, loss_fn, train.images, train.labels,
                      LoopConfig(cfg.steps, cfg.batch_size, cfg.ckpt_every, cfg.grad_clip, cfg.seed, log_every=1,
                                 keep_every=cfg.keep_every),
                      Path(cfg.out_dir), meta, d, ema=ema, lr_at=constant())
    trainer.fit(f"{cfg.mode}{'' if addt_cfg.rbgm else '-no-rbgm'}")
    result = {}
    if d.is_main:
        out = Path(cfg.out_dir)
        hist = trainer.history
        series = {"loss": [h["loss"] for h in hist]}
        if hist and "ce" in hist[0]:
            series["CGPO CE"] = [h["ce"] for h in hist]
        line_plot(series, out / "loss.png", "step", "value", f"run_addt --mode {cfg.mode}")
        result = {"mode": cfg.mode, "rbgm": addt_cfg.rbgm, "steps": cfg.steps,
                  "final_loss": hist[-1]["loss"] if hist else None, "wall_time_s": round(trainer.wall_time, 1),
                  "s_per_step": round(trainer.wall_time / max(1, trainer.steps_run), 3),
                  "world_size": d.world_size, "ranks_in_sync": len(set(trainer.rank_digests)) == 1,
                  "rank_weight_sha256": trainer.rank_digests}
        (out / "report.json").write_text(json.dumps({**result, "config": C.to_dict(cfg)}, indent=2))
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
