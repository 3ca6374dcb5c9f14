"""One resumable training loop shared by the diffusion, classifier and ADDT CLIs.

Resumability: the data order is a pure function of (seed, epoch), so a resumed run replays the exact
batches it would have seen; checkpoints are atomic, so SIGKILL loses at most `ckpt_every` steps.
DDP: the loop only sees the wrapped module; DistributedSampler shards the data per rank.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .distributed import Dist, all_gather_object

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class LoopConfig:
    total_steps: int
    batch_size: int  # global batch; each rank gets batch_size // world_size
    ckpt_every: int
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    keep_every: int = 0  # also keep a weights-only snapshot every N steps (learning curves); 0 = never


@dataclass
class Trainer:
    model: nn.Module  # unwrapped
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    images: torch.Tensor  # uint8 [N, C, H, W], kept on CPU
    labels: torch.Tensor
    loop: LoopConfig
    out_dir: Path
    meta: dict[str, Any]  # kind, arch, config: saved with every checkpoint
    dist: Dist
    ema: Any = None  # diffusers.training_utils.EMAModel over model.parameters()
    lr_at: Optional[Callable[[int], float]] = None  # multiplier on the base lr per step
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.out_dir) / "checkpoint"

    # ---- state -----------------------------------------------------------------------------------
    def ema_state(self) -> Optional[dict[str, torch.Tensor]]:
        if self.ema is None:
            return None
        names = [n for n, _ in self.model.named_parameters()]
        sd = dict(zip(names, self.ema.shadow_params))
        sd.update({n: b for n, b in self.model.named_buffers()})
        return sd

    def save(self, step: int) -> None:
        if not self.dist.is_main:
            return
        meta = {**self.meta, "step": step, "world_size": self.dist.world_size, "history": self.history[-2000:]}
        if self.ema is not None:
            meta["ema"] = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        ckpt.save_checkpoint(self.ckpt_dir, meta, self.model.state_dict(), self.ema_state(),
                             self.optimizer.state_dict())
        if self.loop.keep_every and step % self.loop.keep_every == 0:
            # weights only (no optimizer): a learning curve evaluates these, a resume never reads them
            ckpt.save_checkpoint(Path(self.out_dir) / "snapshots" / f"step_{step:06d}", meta,
                                 self.model.state_dict(), self.ema_state())

    def try_resume(self) -> int:
        try:
            meta = ckpt.load_meta(self.ckpt_dir)
        except ckpt.CheckpointError:
            return 0
        if meta.get("kind") != self.meta.get("kind") or meta.get("arch") != self.meta.get("arch"):
            raise ckpt.CheckpointError(f"{self.ckpt_dir} holds a different run ({meta.get('kind')}, {meta.get('arch')}); "
                                       f"use another --out_dir")
        self.model.load_state_dict(ckpt.load_weights(self.ckpt_dir, "model"))
        opt = ckpt.load_optimizer(self.ckpt_dir)
        if opt is not None:
            self.optimizer.load_state_dict(opt)
        if self.ema is not None and "ema" in meta:
            ema_sd = ckpt.load_weights(self.ckpt_dir, "ema")
            names = [n for n, _ in self.model.named_parameters()]
            self.ema.load_state_dict({**meta["ema"], "shadow_params": [ema_sd[n] for n in names]})
        self.history = meta.get("history", [])
        return int(meta["step"])

    # ---- loop ------------------------------------------------------------------------------------
    def fit(self, progress_desc: str = "train") -> int:
        d, cfg = self.dist, self.loop
        if cfg.batch_size % d.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by world size {d.world_size}")
        per_rank = cfg.batch_size // d.world_size
        base_lrs = [g["lr"] for g in self.optimizer.param_groups]  # before a resume overwrites them with scheduled lrs
        start = self.try_resume()
        if start and d.is_main:
            print(f"resuming from {self.ckpt_dir} at step {start}", file=sys.stderr, flush=True)
        net = DDP(self.model) if d.world_size > 1 else self.model
        sampler = DistributedSampler(range(len(self.labels)), num_replicas=d.world_size, rank=d.rank,
                                     shuffle=True, seed=cfg.seed, drop_last=True)
        steps_per_epoch = len(sampler) // per_rank
        if steps_per_epoch == 0:
            raise ValueError(f"dataset of {len(self.labels)} is smaller than one batch of {cfg.batch_size}")
        bar = tqdm(total=cfg.total_steps, initial=start, desc=progress_desc, disable=not d.is_main,
                   dynamic_ncols=True, mininterval=1.0)
        step, t0 = start, time.time()
        self.model.train()
        while step < cfg.total_steps:
            epoch, skip = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch)
            idx = torch.tensor(list(sampler))
            for b in range(skip, steps_per_epoch):
                if step >= cfg.total_steps:
                    break
                sel = idx[b * per_rank:(b + 1) * per_rank]
                x = self.images[sel].to(d.device).float().div_(255.0)
                y = self.labels[sel].to(d.device)
                # the step's random draws (noise, t, augmentation, dropout) depend only on (seed, rank, step),
                # so a resumed run continues exactly as an uninterrupted one would have
                torch.manual_seed(step_seed(cfg.seed, d.rank, step))
                if self.lr_at is not None:
                    for g, lr in zip(self.optimizer.param_groups, base_lrs):
                        g["lr"] = lr * self.lr_at(step)
                loss, logs = self.loss_fn(net, x, y, step)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip) \
                    if cfg.grad_clip and cfg.grad_clip > 0 else torch.tensor(0.0)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {step}")
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.step(self.model.parameters())
                step += 1
                logs = {"loss": loss.item(), **logs, "grad_norm": float(gnorm)}
                if step % cfg.log_every == 0 or step == cfg.total_steps:
                    self.history.append({"step": step, **logs})
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
                if (step % cfg.ckpt_every == 0 or (cfg.keep_every and step % cfg.keep_every == 0)) \
                        and step < cfg.total_steps:
                    self.save(step)
        self.save(step)
        bar.close()
        self.rank_digests = weight_digests(self.model)
        d.barrier()
        self.wall_time = time.time() - t0  # of this invocation: a resumed run counts only its own steps
        self.steps_run = step - start
        return step


def weight_digests(model: nn.Module) -> list[str]:
    """sha256 of the weights on every rank (rank order): DDP must leave them identical."""
    import hashlib
    h = hashlib.sha256()
    for _, p in sorted(model.state_dict().items()):
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return all_gather_object(h.hexdigest())


def step_seed(seed: int, rank: int, step: int) -> int:
    return ((seed * 1_000_003 + step) << 12) + rank


def warmup_then_cosine(warmup: int, total: int, final: float = 0.0) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    return f


def constant() -> Callable[[int], float]:
    return lambda step: 1.0
