"""PGD+EoT with the K EoT samples batched (B*K rows per pass) vs a loop over them (the reference code's way).

Same images, same PGD steps, same noise draws in both modes; each mode runs in its own subprocess so its
peak RSS is clean. Prints seconds per attacked image, the speed ratio (goal >= 2x), peak memory and both
robust accuracies (they must agree within noise; with shared noise they agree up to float rounding).

  python -m benchmarks.bench_eot                          # small UNet + small_cnn, random init, DDIM x6
  python -m benchmarks.bench_eot --purifier runs/diffusion/checkpoint --classifier runs/classifier/checkpoint \
      --batch_sizes 1,4 --steps 5 --repeats 2
Random-init weights time the same; trained ones make the accuracy check meaningful.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dbp import repository
from dbp.attacks import PGD, AttackConfig
from dbp.models import Defense, Purifier, freeze, load_classifier, load_unet
from dbp.nets import EpsNet, build_classifier, build_unet
from dbp.robustness import expected_correct, single_shot, wilson


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--purifier", help="dbp diffusion checkpoint dir (default: random-init small UNet)")
    ap.add_argument("--classifier", help="dbp classifier checkpoint dir (default: random-init small_cnn)")
    ap.add_argument("--n_images", type=int, default=2)
    ap.add_argument("--batch_sizes", default="1,2", help="images per attack batch, comma list")
    ap.add_argument("--steps", type=int, default=2, help="PGD steps")
    ap.add_argument("--eot", type=int, default=10)
    ap.add_argument("--norm", default="linf", choices=["linf", "l2"])
    ap.add_argument("--sampler", default="ddim", choices=["ddpm", "ddim"])
    ap.add_argument("--num_inference_steps", type=int, default=50)
    ap.add_argument("--k", type=int, default=10, help="purifications per image for the expected accuracy")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats per mode (median is reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", choices=["batched", "loop"], help=argparse.SUPPRESS)
    ap.add_argument("--batch_size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("n_images", "steps", "eot", "num_inference_steps", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    return args


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    eps_net = load_unet(args.purifier, device=dev) if args.purifier else EpsNet(build_unet("small")).to(dev).eval()
    clf = load_classifier(args.classifier, device=dev) if args.classifier else \
        build_classifier("small_cnn", "fashion_mnist").to(dev).eval()
    defense = Defense(Purifier(freeze(eps_net), sampler=args.sampler, num_inference_steps=args.num_inference_steps),
                      freeze(clf)).to(dev)
    try:
        from dbp.data import load_fashion_mnist
        test = load_fashion_mnist("test").head(args.n_images)
        x, y = test.float01().to(dev), test.labels.to(dev)
    except Exception:  # no dataset installed: timing does not depend on the pixels
        x, y = torch.rand(args.n_images, 1, 32, 32, device=dev), torch.randint(0, 10, (args.n_images,), device=dev)
    cfg = AttackConfig(norm=args.norm, steps=args.steps, eot=args.eot, mode="eot",
                       eot_batched=args.child == "batched")
    PGD(defense, AttackConfig(norm=args.norm, steps=1, eot=2, mode="eot"))(x[:1], y[:1])  # warm-up allocations
    rss_before = rss_mb()
    advs, t0 = [], time.perf_counter()
    for i in range(0, len(x), args.batch_size):
        g = torch.Generator(device=dev).manual_seed(1000 + i)  # same draws in both modes
        advs.append(PGD(defense, cfg)(x[i:i + args.batch_size], y[i:i + args.batch_size], generator=g).x_adv)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    x_adv = torch.cat(advs)
    g = torch.Generator(device=dev).manual_seed(7)
    single = single_shot(defense, x_adv, y, generator=g).float()
    expected = expected_correct(defense, x_adv, y, args.k, generator=g)
    if args.save:
        torch.save(x_adv.cpu(), args.save)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"mode": args.child, "batch_size": args.batch_size, "seconds": secs, "s_per_image": secs / len(x),
           "rss_before_mb": rss_before, "peak_rss_mb": peak, "robust_single": float(single.mean()),
           "robust_expected": float(expected.mean()), "n": len(x)}
    if dev.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_child(args, mode: str, bs: int, save: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--batch_size", str(bs), "--save", str(save)]
    for name in ("n_images", "steps", "eot", "norm", "sampler", "num_inference_steps", "k", "threads", "device"):
        cmd += [f"--{name}", str(getattr(args, name))]
    for name in ("purifier", "classifier"):
        if getattr(args, name):
            cmd += [f"--{name}", getattr(args, name)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"child {mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    print(f"PGD-{args.steps} + EoT-{args.eot} ({args.norm}), {args.sampler} N={args.num_inference_steps}, "
          f"{args.n_images} images, threads={args.threads}, device={args.device}, "
          f"weights={'trained' if args.purifier and args.classifier else 'random-init'}; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    summary = {"config": repository.relative_paths(vars(args)), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for bs in sizes:
            runs: dict[str, list[dict]] = {"batched": [], "loop": []}
            for r in range(args.repeats):  # interleaved, so background load hits both modes alike
                for mode in runs:
                    runs[mode].append(run_child(args, mode, bs, Path(tmp) / f"{mode}.pt"))
            med = {m: statistics.median(x["s_per_image"] for x in v) for m, v in runs.items()}
            peak = {m: max(x["peak_rss_mb"] for x in v) for m, v in runs.items()}
            before = {m: min(x["rss_before_mb"] for x in v) for m, v in runs.items()}
            diff = (torch.load(Path(tmp) / "batched.pt") - torch.load(Path(tmp) / "loop.pt")).abs().max().item()
            b, lp = runs["batched"][-1], runs["loop"][-1]
            n = b["n"]
            lo, hi = wilson(lp["robust_single"] * n, n)
            agree = lo <= b["robust_single"] <= hi
            ratio = med["loop"] / med["batched"]
            print(f"\nimages per attack batch {bs} (rows per UNet pass: batched {bs * args.eot}, loop {bs})")
            for m in runs:
                extra = f", cuda peak {runs[m][-1]['cuda_peak_mb']:.0f} MB" if "cuda_peak_mb" in runs[m][-1] else ""
                print(f"  {m:>7}: {med[m]:7.2f} s/image  peak RSS {peak[m]:6.0f} MB (+{peak[m] - before[m]:.0f} MB over "
                      f"the {before[m]:.0f} MB after loading)"
                      f"{extra}  robust single-shot {runs[m][-1]['robust_single']:.0%}, "
                      f"expected {runs[m][-1]['robust_expected']:.0%}")
            print(f"  speed ratio loop/batched: {ratio:.2f}x (goal >= 2x)   max |x_adv batched - loop| = {diff:.2e}"
                  f"   accuracies agree within the 95% interval: {agree}")
            summary["results"].append({"batch_size": bs, "s_per_image": med, "speed_ratio": ratio,
                                       "peak_rss_mb": peak, "rss_after_load_mb": before, "x_adv_max_diff": diff,
                                       "robust_single": {m: runs[m][-1]["robust_single"] for m in runs},
                                       "robust_expected": {m: runs[m][-1]["robust_expected"] for m in runs},
                                       "accuracy_agrees": agree})
    print(json.dumps(summary["results"]))
    return summary


if __name__ == "__main__":
    main()
