"""The attack's own efficiency at the gate's setting, old (every UNet call checkpointed) vs new (grad_checkpoint
"auto" + channels_last), in one run: PGD steps/s, image-steps/s and achieved FLOP/s beside the purifier's forward FLOP/s.

  .venv/bin/python -m benchmarks.bench_attack                       # v2 models, batch 16, 5 PGD steps x 3 rounds
  .venv/bin/python -m benchmarks.bench_attack --steps 20 --rounds 5 --threads 1 --json out.json
  .venv/bin/python -m benchmarks.bench_attack --variants old,new     # only the two that the goal compares

Setting (the gate's DW-box l_inf card): PGD eps 8/255 step 2/255 on classifier(purify(x)), DDIM N=100 from
t*=100 (11 UNet calls), the default "small" UNet (model_repository/purifier/2/weights) and its classifier,
the gate's batch of 16 test images, one fixed DW-box noise draw shared by every variant. Variants: old (every
UNet call checkpointed, NCHW: the code before issue 13), auto (grad_checkpoint="auto" alone) and new ("auto"
plus Purifier(channels_last=True)). torch.compile is not a variant: on this 2-core CPU it took ~3 min to
compile the UNet's forward+backward and then ran a PGD step only ~7% faster. Variants are timed
in interleaved rounds (order rotated each round) so background load hits all alike; the median s/step and
the median of the per-round ratios are reported, with the load average. The script asserts that every
variant produces the same adversarial examples up to float rounding (max |x_adv_old - x_adv_new|).

FLOPs are counted as in bench_flops.py (FlopCounterMode: convolutions, matmuls, attention, their backward):
"useful" FLOPs of one PGD step = forward + backward of the chain without recomputation, the same numerator
for every variant, so the achieved FLOP/s ratio equals the speed ratio; the checkpointed variant also
executes each UNet forward twice ("executed" FLOPs). Peak RSS per variant comes from a fresh subprocess
running one PGD step (--no_memory skips it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dbp import repository
from dbp.attacks import PGD, AttackConfig
from dbp.models import Defense, Purifier, freeze, load_classifier, load_unet

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # name: (grad_checkpoint, channels_last)
    "old": (True, False),  # before issue 13: every UNet call checkpointed, NCHW
    "auto": ("auto", False),  # checkpointing only when the chain's activations do not fit the budget
    "new": ("auto", True),  # ... and the chain in channels_last (Purifier(channels_last=True))
}


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--purifier", default=str(ROOT / "model_repository/purifier/2/weights"))
    ap.add_argument("--classifier", default=str(ROOT / "model_repository/classifier/2/weights"))
    ap.add_argument("--batch", type=int, default=16, help="images per attack batch (the gate's batch_size)")
    ap.add_argument("--steps", type=int, default=5, help="PGD steps per timed attack")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: what the gate runs with under load)")
    ap.add_argument("--num_inference_steps", type=int, default=100)
    ap.add_argument("--t_star", type=int, default=100)
    ap.add_argument("--variants", default="old,auto,new", help=f"comma list from {list(VARIANTS)}; old comes first")
    ap.add_argument("--no_memory", action="store_true", help="skip the per-variant peak-RSS subprocesses")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="max |x_adv_old - x_adv_new| accepted")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("batch", "steps", "rounds", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    bad = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if bad:
        ap.error(f"--variants: unknown {bad}; known: {list(VARIANTS)}")
    for name in ("purifier", "classifier"):
        if not (Path(getattr(args, name)) / "meta.json").exists():
            ap.error(f"--{name} {getattr(args, name)} is not a dbp checkpoint directory (no meta.json)")
    return args


def load_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from dbp.data import load_dataset
    test = load_dataset("fashion_mnist", "test").head(n)  # batch 0 of the gate's cards
    return test.float01(), test.labels


def build(args, variant: str) -> Defense:
    ckpt, cl = VARIANTS[variant]
    eps_net, clf = freeze(load_unet(args.purifier)), freeze(load_classifier(args.classifier))
    return Defense(Purifier(eps_net, args.t_star, "ddim", args.num_inference_steps, grad_checkpoint=ckpt,
                            channels_last=cl), clf).eval()


def attack(defense: Defense, x, y, noise, steps: int) -> torch.Tensor:
    # keep="last": time the PGD steps alone (best-iterate tracking adds one scoring pass per attack)
    cfg = AttackConfig(norm="linf", eps=8 / 255, step=2 / 255, steps=steps, eot=1, mode="dwbox", keep="last")
    return PGD(defense, cfg)(x, y, noise=noise).x_adv


def step_flops(defense: Defense, x, y, noise) -> int:
    """FLOPs of one PGD gradient (forward + backward through the chain) as this defence executes it."""
    xi = x.detach().clone().requires_grad_(True)
    with FlopCounterMode(display=False) as fc:
        ce = F.cross_entropy(defense(xi, noise=noise), y, reduction="none")
        ce.sum().backward()  # parameters are frozen: only xi gets a gradient, as in PGD.gradient
    return fc.get_total_flops()


def forward_flops_and_time(defense: Defense, x, noise, reps: int = 2) -> tuple[int, float]:
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            defense.purifier(x, noise=noise)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            defense.purifier(x, noise=noise)
            best = min(best, time.perf_counter() - t)
    return fc.get_total_flops(), best


def peak_rss_child(args) -> dict:
    torch.set_num_threads(args.threads)
    defense = build(args, args.child)
    x, y = load_batch(args.batch)
    noise = defense.purifier.sample_noise(x, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        defense(x, noise=noise)  # warm-up: what a process holds before its first gradient
    before = vm_hwm_mb()
    attack(defense, x, y, noise, 1)
    return {"rss_before_mb": before, "peak_rss_mb": vm_hwm_mb()}


def vm_hwm_mb() -> float:
    """Peak RSS of this process's own address space (ru_maxrss would carry the parent's peak over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(args, variant: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_attack", "--child", variant, "--purifier", args.purifier, "--classifier",
           args.classifier, "--batch", str(args.batch), "--threads", str(args.threads),
           "--num_inference_steps", str(args.num_inference_steps), "--t_star", str(args.t_star)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"memory child {variant} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(peak_rss_child(args)))
        return {}
    names = ["old"] + [n for n in args.variants.split(",") if n and n != "old"]
    defenses = {n: build(args, n) for n in names}
    x, y = load_batch(args.batch)
    noise = defenses["old"].purifier.sample_noise(x, torch.Generator().manual_seed(0))  # one DW-box draw for all
    plans = {n: defenses[n].purifier.checkpoint_plan(x) for n in names}  # (also runs auto's one-row probe)
    calls = defenses["old"].purifier.n_unet_calls
    load0 = os.getloadavg()
    print(f"DW-box l_inf PGD, DDIM N={args.num_inference_steps} from t*={args.t_star} ({calls} UNet calls), "
          f"batch {args.batch}, {args.steps} steps x {args.rounds} rounds, {torch.get_num_threads()} thread(s), "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, load avg {load0[0]:.2f}",
          flush=True)
    for n in names:
        print(f"  {n}: {plans[n].reason}", flush=True)

    useful = step_flops(_no_ckpt(defenses["old"]), x, y, noise)
    executed = {n: step_flops(defenses[n], x, y, noise) for n in names}  # also warms up every variant
    fwd_flops, _ = forward_flops_and_time(defenses["old"], x, noise, reps=1)
    forward_of = {n: n for n in names if n == "old" or VARIANTS[n][1]}  # forward time per memory format

    secs: dict[str, list[float]] = {n: [] for n in names}
    fwd_secs: dict[str, list[float]] = {n: [] for n in forward_of}
    adv: dict[str, torch.Tensor] = {}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t = time.perf_counter()
            adv[n] = attack(defenses[n], x, y, noise, args.steps)
            secs[n].append((time.perf_counter() - t) / args.steps)
        for n in forward_of:
            fwd_secs[n].append(forward_flops_and_time(defenses[n], x, noise, reps=1)[1])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {secs[n][-1]:.2f} s/step" for n in names)
              + ", purify forward " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in fwd_secs.items())
              + f" (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    load1 = os.getloadavg()

    med = {n: statistics.median(v) for n, v in secs.items()}
    fwd_s = statistics.median(fwd_secs["old"])
    rows = []
    for n in names:
        ratio = statistics.median(o / s for o, s in zip(secs["old"], secs[n]))
        diff = (adv[n] - adv["old"]).abs().max().item()
        frac = (adv[n] != adv["old"]).float().mean().item()
        rows.append({"variant": n, "grad_checkpoint": VARIANTS[n][0], "checkpointed": plans[n].use,
                     "channels_last": VARIANTS[n][1], "s_per_step": med[n], "s_per_step_rounds": secs[n],
                     "pgd_steps_per_s": 1 / med[n], "image_steps_per_s": args.batch / med[n],
                     "speedup_vs_old": ratio, "useful_gflops_per_step": useful / 1e9,
                     "executed_gflops_per_step": executed[n] / 1e9, "achieved_useful_gflops": useful / med[n] / 1e9,
                     "achieved_executed_gflops": executed[n] / med[n] / 1e9,
                     "x_adv_max_abs_diff_vs_old": diff, "x_adv_frac_pixels_differing": frac,
                     "activation_estimate_mb": None if plans[n].need_bytes is None else plans[n].need_bytes / 2**20})
    if not args.no_memory:
        for row in rows:
            row.update(run_child(args, row["variant"]))
    forward = {"s_per_purify": fwd_s, "gflops": fwd_flops / 1e9, "achieved_gflops": fwd_flops / fwd_s / 1e9,
               "s_per_purify_by_variant": {n: statistics.median(v) for n, v in fwd_secs.items()}}
    result = {"setting": {"attack": "DW-box l_inf PGD eps 8/255 step 2/255", "sampler": "ddim",
                          "num_inference_steps": args.num_inference_steps, "t_star": args.t_star, "unet_calls": calls,
                          "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
                          "purifier": repository.relative_path(args.purifier),
                          "classifier": repository.relative_path(args.classifier)},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "loadavg_before": load0, "loadavg_after": load1,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "purify_forward": forward, "rows": rows}

    print(f"\npurifier forward (inference_mode, batch {args.batch}, NCHW): {fwd_s:.2f} s, {fwd_flops / 1e9:.2f} GFLOP, "
          f"{forward['achieved_gflops']:.2f} GFLOP/s"
          + "".join(f"; {n}: {statistics.median(v):.2f} s" for n, v in fwd_secs.items() if n != "old"))
    hdr = (f"{'variant':>18} {'ckpt':>5} {'s/step':>7} {'steps/s':>8} {'img-steps/s':>11} {'useful GFLOP/s':>14} "
           f"{'of fwd':>7} {'executed':>9} {'speedup':>8} {'max|dx_adv|':>11} {'peak RSS':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        rss = f"{r['peak_rss_mb'] - r['rss_before_mb']:+.0f} MB" if "peak_rss_mb" in r else "-"
        print(f"{r['variant']:>18} {str(r['checkpointed']):>5} {r['s_per_step']:>7.3f} {r['pgd_steps_per_s']:>8.3f} "
              f"{r['image_steps_per_s']:>11.2f} {r['achieved_useful_gflops']:>14.2f} "
              f"{r['achieved_useful_gflops'] / forward['achieved_gflops']:>6.0%} "
              f"{r['achieved_executed_gflops']:>9.2f} {r['speedup_vs_old']:>7.2f}x {r['x_adv_max_abs_diff_vs_old']:>11.2e} "
              f"{rss:>9}")
    print(f"load average {load0[0]:.2f} -> {load1[0]:.2f}; speedup = median of per-round old/new s/step ratios "
          f"(goal >= 1.5x); 'of fwd' = useful attack FLOP/s / purifier forward FLOP/s; peak RSS: one PGD step in "
          f"a fresh process, over what it held after one inference pass")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    bad = [r["variant"] for r in rows if r["x_adv_max_abs_diff_vs_old"] > args.tolerance]
    if bad:
        raise SystemExit(f"adversarial examples differ from the old path beyond {args.tolerance}: {bad}")
    return result


def _no_ckpt(defense: Defense) -> Defense:
    p = defense.purifier
    return Defense(Purifier(p.eps_net, p.t_star, p.sampler, p.num_inference_steps, grad_checkpoint=False),
                   defense.classifier).eval()


if __name__ == "__main__":
    main()
