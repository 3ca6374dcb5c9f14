"""Train the purifier's diffusion model (epsilon prediction, linear betas, T=1000) from scratch.

  python -m training.train_diffusion --preset default --out_dir runs/diffusion
  torchrun --nproc_per_node 2 -m training.train_diffusion --preset default

`--t_max 100` restricts training to the timesteps purification at t*=100 ever visits; `--t_min`/`--t_max`
choose any range [t_min, t_max]. `--init CKPT` fine-tunes a dbp diffusion checkpoint's EMA weights instead of
starting from scratch (e.g. widening the shipped purifier's t <= 100 to the t a smoothing sigma needs,
docs/certify.md); a resumed run continues from its own checkpoint, not from --init.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from dbp import checkpoint as ckpt, config as C, distributed
from dbp.data import load_dataset
from dbp.diffusion import Diffusion, to_image_range, to_model_range
from dbp.models import Purifier
from dbp.nets import EpsNet, build_unet
from dbp.plots import image_grid, line_plot
from dbp.runtime import git_commit, set_threads
from dbp.trainer import LoopConfig, Trainer, warmup_then_cosine


@dataclass
class DiffusionConfig:
    dataset: str = "fashion_mnist"
    data_root: Optional[str] = None
    unet: str = "small"
    out_dir: str = "runs/diffusion"
    steps: int = 1800
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-6
    warmup: int = 100
    t_min: int = 0  # sample training timesteps uniformly from [t_min, t_max]
    t_max: int = 999
    init: Optional[str] = None  # a dbp diffusion/ADDT checkpoint whose EMA weights start the run (fine-tuning)
    ema_decay: float = 0.999  # cap of the warm-up EMA 1 - (1 + step)^-0.75
    dropout: float = 0.0
    flip: bool = True
    ckpt_every: int = 200
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    grid_n: int = 12  # test images in the final purification grid


PRESETS = {
    "smoke": dict(steps=12, batch_size=16, ckpt_every=5, warmup=2, t_max=100, grid_n=4),
    "default": dict(t_max=100),
    "cifar10": dict(dataset="cifar10", unet="ddpm-cifar10", steps=800000, batch_size=128, lr=2e-4, warmup=5000,
                    dropout=0.1, ema_decay=0.9999, ckpt_every=5000),
}


def main(argv=None) -> dict:
    cfg = C.parse_cli(DiffusionConfig, argv, PRESETS, prog="python -m training.train_diffusion")
    if not 0 <= cfg.t_max <= 999:
        raise C.ConfigError(f"--t_max must be in [0, 999], got {cfg.t_max}")
    if not 0 <= cfg.t_min <= cfg.t_max:
        raise C.ConfigError(f"--t_min must be in [0, t_max={cfg.t_max}], got {cfg.t_min}")
    if cfg.init is not None and not (Path(cfg.init) / "meta.json").exists():
        raise C.ConfigError(f"--init {cfg.init}: not a dbp checkpoint (no meta.json)")
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    with distributed.session(cfg.device) as d:
        return run(cfg, d)


def run(cfg: DiffusionConfig, d: distributed.Dist) -> dict:
    train = load_dataset(cfg.dataset, "train", cfg.data_root)
    overrides = {"dropout": cfg.dropout} if cfg.dropout else {}
    unet = build_unet(cfg.unet, **overrides)
    if cfg.init is not None:
        load_init(unet, cfg)
    unet.to(d.device)
    diffusion = Diffusion().to(d.device)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=0.75)

    def loss_fn(net, x, y, step):
        if cfg.flip:
            x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
        x0 = to_model_range(x)
        t = sample_timesteps(cfg, x.shape[0], x.device)
        eps = torch.randn_like(x0)
        return F.mse_loss(net(diffusion.q_sample(x0, t, eps), t).sample, eps), {}

    meta = {"kind": "diffusion", "arch": {"unet": cfg.unet, "unet_overrides": overrides, "dataset": cfg.dataset},
            "config": C.to_dict(cfg), "git_commit": git_commit()}
    if cfg.init is not None:
        meta["init"] = {"path": str(cfg.init), "ema_sha256": ckpt.weights_sha256(cfg.init, "ema")}
    trainer = Trainer(unet, opt, loss_fn, train.images, train.labels,
                      LoopConfig(cfg.steps, cfg.batch_size, cfg.ckpt_every, grad_clip=1.0, seed=cfg.seed),
                      Path(cfg.out_dir), meta, d, ema=ema, lr_at=warmup_then_cosine(cfg.warmup, cfg.steps, 0.1))
    trainer.fit("diffusion")
    result = {}
    if d.is_main:
        out = Path(cfg.out_dir)
        ema.copy_to(unet.parameters())
        test = load_dataset(cfg.dataset, "test", cfg.data_root).head(cfg.grid_n)
        write_grid(EpsNet(unet).eval(), test.float01(), out / "purification_grid.png")
        line_plot({"loss": [h["loss"] for h in trainer.history]}, out / "loss.png", "log step (x10)", "eps MSE")
        result = {"steps": cfg.steps, "final_loss": trainer.history[-1]["loss"] if trainer.history else None,
                  "wall_time_s": round(trainer.wall_time, 1)}
        (out / "report.json").write_text(json.dumps({**result, "config": C.to_dict(cfg)}, indent=2))
        print(json.dumps(result))
    return result


def sample_timesteps(cfg: DiffusionConfig, n: int, device) -> torch.Tensor:
    """The training timesteps of one batch: uniform on [t_min, t_max] (the global torch RNG, seeded per step)."""
    return torch.randint(cfg.t_min, cfg.t_max + 1, (n,), device=device)


def load_init(unet: torch.nn.Module, cfg: DiffusionConfig) -> None:
    """Start from --init's EMA weights; the architecture and dataset must be the run's own."""
    meta = ckpt.load_meta(cfg.init)
    if meta.get("kind") not in ckpt.PURIFIER_KINDS:
        raise C.ConfigError(f"--init {cfg.init} holds a {meta.get('kind')!r} checkpoint, not a diffusion model")
    arch = meta.get("arch", {})
    if arch.get("unet") != cfg.unet or arch.get("dataset") != cfg.dataset:
        raise C.ConfigError(f"--init {cfg.init} is a {arch.get('unet')!r} UNet for {arch.get('dataset')!r}; "
                            f"this run trains {cfg.unet!r} on {cfg.dataset!r}")
    unet.load_state_dict(ckpt.load_weights(cfg.init, "ema"))


def write_grid(eps_net, x01: torch.Tensor, path: Path) -> Path:
    """Rows: clean, forward-noised to t*=100, DDIM-purified, DDPM-purified (shows what the purifier does)."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        p_ddim = Purifier(eps_net, sampler="ddim")
        noise = p_ddim.sample_noise(x01, g)
        t_star = torch.tensor(p_ddim.t_star)
        noised = to_image_range(p_ddim.diffusion.q_sample(to_model_range(x01), t_star, noise.forward))
        rows = [x01, noised, p_ddim(x01, noise=noise), Purifier(eps_net, sampler="ddpm")(x01, generator=g)]
    return image_grid(rows, path)


if __name__ == "__main__":
    main()
