"""Cost of one ADDT step vs one clean fine-tuning step on the same batch (goal: <= 6.5x).

The inherent cost is ~6x: 5 CGPO forward+backward passes (UNet + classifier) and 1 training pass.
  python -m benchmarks.bench_addt [--batch 32] [--repeats 5] [--unet small] [--threads 2]
Random-init weights are enough: the cost does not depend on what the weights are.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from dbp.addt import ADDTConfig, addt_loss
from dbp.diffusion import Diffusion
from dbp.models import freeze
from dbp.nets import EpsNet, build_classifier, build_unet, set_dropout


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--unet", default="small")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = build_unet(args.unet)
    set_dropout(unet, 0.1)
    eps_net = EpsNet(unet).train()
    c = unet.config.in_channels
    clf = freeze(build_classifier("small_cnn" if c == 1 else "wrn-28-10", "fashion_mnist" if c == 1 else "cifar10")).eval()
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-4, betas=(0.95, 0.999), weight_decay=1e-6)
    d = Diffusion()
    x0 = torch.rand(args.batch, c, 32, 32) * 2 - 1
    y = torch.randint(0, 10, (args.batch,))
    t = torch.randint(0, 1000, (args.batch,))

    def step(mode: str) -> None:
        loss, _ = addt_loss(eps_net, eps_net if mode == "addt" else None, clf, d, x0, y, t, ADDTConfig())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()

    times = {"clean": [], "addt": []}
    for mode in times:  # warm-up
        step(mode)
    for _ in range(args.repeats):  # interleaved, so machine noise hits both modes alike
        for mode in times:
            t0 = time.perf_counter()
            step(mode)
            times[mode].append(time.perf_counter() - t0)
    med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    res = {"unet": args.unet, "batch": args.batch, "threads": torch.get_num_threads(),
           "clean_step_s": round(med["clean"], 4), "addt_step_s": round(med["addt"], 4),
           "ratio": round(med["addt"] / med["clean"], 2), "goal": "<= 6.5", "machine": platform.processor() or platform.machine()}
    print(f"clean step {med['clean'] * 1e3:.0f} ms | ADDT step {med['addt'] * 1e3:.0f} ms | ratio {res['ratio']}x (goal <= 6.5x)")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
