"""Purifier engines vs torch, in one run: the same requests, the same noise, the chain as served.

  .venv/bin/python -m benchmarks.bench_engines                       # deployed purifier + classifier, served settings
  .venv/bin/python -m benchmarks.bench_engines --rounds 3 --agree_n 256 --json docs/results/engines/<date>.json

For each engine (torch, onnxruntime, openvino; dbp.serving.engines) the deployed purifier version's UNet is
evaluated by that engine inside dbp's purification chain (dbp.models.Purifier, t*, sampler and steps from
model_repository/purifier/config.pbtxt, the served `threads`). Per batch size (1 and 16): p50 latency of one
purification and images/s = batch / p50, timed interleaved over `--rounds` (each round runs every engine in turn,
so background load hits all alike), with the same images and the same noise. Achieved FLOP/s = UNet calls x FLOPs
per call (benchmarks.bench_flops.unet_flops) / p50, as a share of bench_flops' fp32 GEMM peak (gemm_peak: the
better of torch.mm and ONNX Runtime's MatMul, best of the rounds).
Outputs: max |purified_engine - purified_torch| and purified-classification agreement with torch on `--agree_n`
Fashion-MNIST test images, deployed classifier, the same noise. Goals (issue 21): batch 1 >= 1.8x torch's
images/s (>= 45% of peak), batch 16 >= 1.2x, agreement >= 99.5%.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_flops import gemm_peak, unet_flops
from dbp import repository
from dbp.models import Purifier, load_classifier, load_unet
from dbp.serving import engines
from dbp.serving.contract import PurifierSettings, parse_parameters

GOALS = {"speedup_b1": 1.8, "peak_b1": 0.45, "speedup_b16": 1.2, "agreement": 0.995}


def served_settings(repo: Path) -> PurifierSettings:
    return parse_parameters(PurifierSettings, repository.read_parameters(repo / "purifier" / repository.CONFIG_FILE))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=str(repository.default_repository()))
    p.add_argument("--version", type=int, default=None, help="purifier/classifier version (default: newest)")
    p.add_argument("--engines", default="torch,onnxruntime,openvino")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", default="10,3", help="timed purifications per engine per round, per batch size")
    p.add_argument("--agree_n", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="default: the served config's `threads`")
    p.add_argument("--json", default=None, help="default: docs/results/engines/bench-<date>.json")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    repo = Path(a.repo)
    st = served_settings(repo)
    threads = st.threads if a.threads is None else a.threads
    if threads > 0:
        torch.set_num_threads(threads)
    v = a.version or repository.newest_version(repository.model_dir(repo, "purifier"))
    vdir = repository.version_dir(repo, "purifier", v)
    card = repository.check_version(vdir, "purifier")
    torch_net = load_unet(vdir / repository.WEIGHTS_DIR).eval()
    chw = engines.chw_of(torch_net)
    nets = {}
    for name in a.engines.split(","):
        nets[name] = torch_net if name == "torch" else engines.load_engine(name, vdir, card, torch_net, threads)[0]
    purifiers = {n: Purifier(net, t_star=st.t_star, sampler=st.sampler, num_inference_steps=st.num_inference_steps)
                 for n, net in nets.items()}
    calls = purifiers["torch"].n_unet_calls if "torch" in purifiers else next(iter(purifiers.values())).n_unet_calls
    batches = [int(b) for b in a.batch.split(",")]
    reps = dict(zip(batches, [int(r) for r in a.reps.split(",")]))

    from dbp.data import load_fashion_mnist
    test = load_fashion_mnist("test").head(max(a.agree_n, *batches))
    x_all, y_all = test.float01(), test.labels
    inputs = {b: x_all[:b].clone() for b in batches}
    noises = {b: purifiers[next(iter(purifiers))].sample_noise(inputs[b], torch.Generator().manual_seed(b))
              for b in batches}
    flops = {b: unet_flops(torch_net, b, chw) for b in batches}
    load0 = os.getloadavg()

    lat = {(n, b): [] for n in purifiers for b in batches}
    peaks = None
    with torch.inference_mode():
        for n, pur in purifiers.items():  # warm-up: primitive creation, first-call allocations
            for b in batches:
                pur(inputs[b], noise=noises[b])
        for r in range(a.rounds):
            peaks = gemm_peak([1024, 2048], reps=3, best=peaks)
            peak = peaks["peak"]
            for b in batches:
                for n, pur in purifiers.items():
                    for _ in range(reps.get(b, 3)):
                        t0 = time.perf_counter()
                        pur(inputs[b], noise=noises[b])
                        lat[(n, b)].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{a.rounds} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)

        # outputs: the same agree_n images and noise through every engine, then the deployed classifier
        cls = load_classifier(repository.weights_dir(repo, "classifier", v)).eval()
        xa = x_all[:a.agree_n]
        na = purifiers[next(iter(purifiers))].sample_noise(xa, torch.Generator().manual_seed(12345))
        purified, labels = {}, {}
        for n, pur in purifiers.items():
            purified[n] = torch.cat([pur(xa[i:i + 64], noise=na[i:i + 64]) for i in range(0, len(xa), 64)])
            labels[n] = cls(purified[n]).argmax(1)

    rows = []
    for b in batches:
        for n in purifiers:
            p50 = statistics.median(lat[(n, b)])
            achieved = calls * flops[b] / p50
            rows.append({"engine": n, "batch": b, "n_timed": len(lat[(n, b)]), "p50_ms": 1e3 * p50,
                         "images_per_s": b / p50, "achieved_gflops": achieved / 1e9, "share_of_peak": achieved / peak})
    base = {r["batch"]: r["images_per_s"] for r in rows if r["engine"] == "torch"}
    for r in rows:
        r["speedup_vs_torch"] = r["images_per_s"] / base[r["batch"]] if r["batch"] in base else None
    agreement = {}
    for n in purifiers:
        agreement[n] = {"max_abs_diff_purified": float((purified[n] - purified["torch"]).abs().max())
                        if "torch" in purified else None,
                        "agreement_with_torch": float((labels[n] == labels["torch"]).float().mean())
                        if "torch" in labels else None,
                        "accuracy": float((labels[n] == y_all[:a.agree_n]).float().mean())}

    def verdict(n):
        if n == "torch":
            return None
        r1 = next(r for r in rows if r["engine"] == n and r["batch"] == min(batches))
        r16 = next(r for r in rows if r["engine"] == n and r["batch"] == max(batches))
        return {"speedup_b1": r1["speedup_vs_torch"] >= GOALS["speedup_b1"],
                "peak_b1": r1["share_of_peak"] >= GOALS["peak_b1"],
                "speedup_b16": r16["speedup_vs_torch"] >= GOALS["speedup_b16"],
                "agreement": agreement[n]["agreement_with_torch"] >= GOALS["agreement"]}

    goals = {n: verdict(n) for n in purifiers if n != "torch"}
    # the default: the fastest engine at batch 1 that agrees (>= 99.5%) and beats torch at both batch sizes
    eligible = [n for n in goals if goals[n]["agreement"]
                and all(r["speedup_vs_torch"] > 1 for r in rows if r["engine"] == n)]
    best = max(eligible, key=lambda n: next(r["images_per_s"] for r in rows if r["engine"] == n
                                            and r["batch"] == min(batches)), default="torch")
    import onnxruntime
    import openvino
    from dbp.revision import git_commit
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(), "version": v,
              "settings": {
                  "t_star": st.t_star, "sampler": st.sampler, "num_inference_steps": st.num_inference_steps,
                  "unet_calls": calls, "threads": torch.get_num_threads()},
              "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                           "openvino": openvino.__version__},
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "loadavg_before": load0, "loadavg_after": os.getloadavg(), "peak_matmul_gflops": peak / 1e9,
              "peak_by_library_gflops": {k: v / 1e9 for k, v in peaks.items() if k != "peak"},
              "gflop_per_image_per_call": flops[batches[0]] / batches[0] / 1e9, "rows": rows,
              "outputs": {"n": a.agree_n, **agreement}, "goals": GOALS, "goals_met": goals, "chosen_default": best}

    print(f"\npurifier v{v}: {st.sampler} t*={st.t_star} N={st.num_inference_steps} ({calls} UNet calls), "
          f"{torch.get_num_threads()} thread(s); fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (torch.mm "
          f"{peaks['torch'] / 1e9:.1f}, ONNX Runtime {peaks['onnxruntime'] / 1e9:.1f}); "
          f"load avg {load0[0]:.1f} -> {result['loadavg_after'][0]:.1f}")
    hdr = f"{'engine':>12} {'batch':>5} {'p50 ms':>8} {'img/s':>8} {'x torch':>8} {'GFLOP/s':>8} {'of peak':>8}"
    print(hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['engine']:>12} {r['batch']:>5} {r['p50_ms']:>8.1f} {r['images_per_s']:>8.1f} "
              f"{r['speedup_vs_torch']:>7.2f}x {r['achieved_gflops']:>8.2f} {100 * r['share_of_peak']:>7.1f}%")
    print(f"\noutputs on {a.agree_n} test images, same noise:")
    for n, g in agreement.items():
        print(f"{n:>12}: max |d purified| {g['max_abs_diff_purified']:.2e}, agreement with torch "
              f"{100 * g['agreement_with_torch']:.2f}%, accuracy {100 * g['accuracy']:.2f}%")
    for n, g in goals.items():
        print(f"{n:>12}: goals " + ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in g.items()))
    print(f"default by measurement: {best}")
    out = Path(a.json) if a.json else Path("docs/results/engines") / f"bench-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
