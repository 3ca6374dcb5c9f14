"""Clean accuracy of the bare classifier and of purify -> classify, per sampler (no attack).

  python -m training.evaluate --purifier runs/diffusion/checkpoint --classifier runs/classifier/checkpoint \
      --n 1024 --samplers ddim,ddpm --out runs/eval_base.json
  python -m training.evaluate --n 256          # the deployed pair (newest version in model_repository/)
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dbp import config as C
from dbp.data import load_dataset
from dbp.evaluation import accuracy, predict, purify_batched
from dbp.models import Purifier, load_classifier, load_unet
from dbp.runtime import git_commit, set_threads
from training.defaults import deployed_default


@dataclass
class EvalConfig:
    purifier: Optional[str] = None  # default: the deployed purifier (newest version in model_repository/)
    classifier: Optional[str] = None  # default: the deployed classifier
    dataset: str = "fashion_mnist"
    data_root: Optional[str] = None
    n: int = 1024  # the paper's evaluation subset: the first 1024 test images
    samplers: tuple[str, ...] = ("ddim", "ddpm")
    t_star: int = 100
    ddim_steps: int = 100
    ddpm_steps: int = 1000
    batch_size: int = 128
    seed: int = 0
    threads: int = 0
    out: Optional[str] = None


def main(argv=None) -> dict:
    cfg = C.parse_cli(EvalConfig, argv, prog="python -m training.evaluate")
    cfg.purifier = deployed_default(cfg.purifier, "purifier", "--purifier", "evaluate")
    cfg.classifier = deployed_default(cfg.classifier, "classifier", "--classifier", "evaluate")
    for s in cfg.samplers:
        if s not in ("ddim", "ddpm"):
            raise C.ConfigError(f"--samplers: unknown sampler {s!r} (ddim, ddpm)")
    set_threads(cfg.threads)
    test = load_dataset(cfg.dataset, "test", cfg.data_root).head(cfg.n)
    x, y = test.float01(), test.labels
    clf, eps_net = load_classifier(cfg.classifier), load_unet(cfg.purifier)
    res = {"n": len(test), "classifier_clean_acc": accuracy(predict(clf, x), y), "purified": {}}
    for s in cfg.samplers:
        t0 = time.time()
        p = Purifier(eps_net, cfg.t_star, s, cfg.ddim_steps if s == "ddim" else cfg.ddpm_steps, grad_checkpoint=False)
        xp = purify_batched(p, x, cfg.batch_size, cfg.seed, progress=True, desc=f"purify {s}")
        res["purified"][s] = {"acc": accuracy(predict(clf, xp), y), "unet_calls": p.n_unet_calls,
                              "wall_s": round(time.time() - t0, 1)}
        print(s, res["purified"][s], flush=True)
    res.update(config=C.to_dict(cfg), git_commit=git_commit())
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "config"}))
    return res


if __name__ == "__main__":
    main()
