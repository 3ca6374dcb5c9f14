"""When to checkpoint the UNet calls of a differentiable purification: "auto" decides from memory.

Backpropagating through a purification chain keeps every UNet call's activations until the backward pass.
Per-call checkpointing (torch.utils.checkpoint) keeps only each call's input and recomputes the call in
backward: memory O(one call) instead of O(calls), at the price of one extra forward per call (a PGD step
costs about 1.3-1.9x more). For the 35.7M CIFAR-10 UNet at batch 32 x 101 DDPM calls the activations
run to ~100 GB, so checkpointing is what makes the attack possible; for the 1.1M Fashion-MNIST UNet at the
gate's 16 rows x 11 DDIM calls they are a few hundred MB and the recomputation is pure waste.

"auto" measures what autograd saves for ONE call on ONE row (a saved-tensor hook on a probe call, run once
per model and input shape, RNG state untouched), scales it by rows x calls, and checkpoints only when that
exceeds the budget: `budget_bytes` if given, else a quarter of the memory free right now (CUDA:
mem_get_info; CPU: MemAvailable). The choice never changes results: with or without checkpointing the
gradients are the same (tests/test_checkpointing.py).

  plan = plan_grad_checkpoint("auto", eps_model, x, n_calls=11)
  plan.use, plan.need_bytes, plan.budget_bytes, plan.reason
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

GradCheckpoint = Union[bool, str]  # True, False or "auto"
BUDGET_FRACTION = 0.25  # of the memory free when the chain starts: room for the rest of the process

_probe_cache: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def parse_grad_checkpoint(value) -> GradCheckpoint:
    """True / False / "auto" from a bool or a CLI string (true/false/on/off/1/0/auto)."""
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s == "auto":
        return "auto"
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"grad_checkpoint must be true, false or 'auto', got {value!r}")


def autograd_bytes_per_row(eps_model: Callable, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward through one eps_model call on one row shaped like x[0] (excluding
    the model's own parameters and buffers, which live anyway). Cached per module and row shape."""
    module = eps_model if isinstance(eps_model, torch.nn.Module) else None
    key = (tuple(x.shape[1:]), x.dtype, str(x.device), module.training if module is not None else None)
    if module is not None and key in _probe_cache.get(module, {}):
        return _probe_cache[module][key]
    own = set()
    if module is not None:
        own = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            saved[st.data_ptr()] = max(saved.get(st.data_ptr(), 0), st.nbytes())
        return t

    row = x[:1].detach().clone().requires_grad_(True)
    t = torch.full((1,), 500, device=x.device, dtype=torch.long)
    devices = [x.device] if x.device.type == "cuda" else []
    # fork_rng: a dropout in train mode must not shift the caller's random stream (results stay reproducible)
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        eps_model(row, t)
    n = sum(saved.values())
    if module is not None:
        _probe_cache.setdefault(module, {})[key] = n
    return n


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass(frozen=True)
class CheckpointPlan:
    use: bool
    need_bytes: Optional[int]  # estimated activations of the whole chain without checkpointing
    budget_bytes: Optional[int]
    reason: str


def plan_grad_checkpoint(setting: GradCheckpoint, eps_model: Callable, x: torch.Tensor, n_calls: int,
                         budget_bytes: Optional[int] = None) -> CheckpointPlan:
    """Whether to checkpoint each of `n_calls` UNet calls on a batch shaped like x (rows = x.shape[0])."""
    setting = parse_grad_checkpoint(setting)
    if setting is not True and setting is not False:
        need = autograd_bytes_per_row(eps_model, x) * x.shape[0] * n_calls
        budget = int(budget_bytes) if budget_bytes is not None else int(BUDGET_FRACTION * free_memory_bytes(x.device))
        use = need > budget
        return CheckpointPlan(use, need, budget,
                              f"auto: chain activations ~{need / 2**20:.0f} MiB {'>' if use else '<='} budget "
                              f"{budget / 2**20:.0f} MiB ({x.shape[0]} rows x {n_calls} calls)")
    return CheckpointPlan(setting, None, None, f"explicit grad_checkpoint={setting}")
