"""Throughput of purify_classify through the real Triton server vs the in-process PyTorch ceiling.

  python -m benchmarks.bench_triton                       # DDIM (11 UNet calls), concurrency 16
  python -m benchmarks.bench_triton --sampler ddpm --num-inference-steps 1000 --requests 64

Measured in one run, on the same weights and thread count:
  * ceiling: classifier(purifier(x)) batched in-process under torch.inference_mode, at several batch
    sizes (the best one counts); measured before and after the server part, the higher figure is used,
  * Triton: `--requests` single-image requests to purify_classify from `--concurrency` client threads
    (gRPC), and the same requests one at a time (batch-1 sequential),
  * server start-up time (launch -> /v2/health/ready) and RSS/PSS of tritonserver and each model stub.
Goal: Triton >= 0.9x the ceiling. Weights: the newest version in --repo (served from a throwaway copy).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from dbp import repository
from dbp.models import Purifier, load_classifier, load_unet
from dbp.repository import newest_version, set_parameter
from dbp.serving.launcher import ServerConfig, TritonServer, free_ports

ROOT = Path(__file__).resolve().parent.parent


def prepare_repo(src: Path, work: Path, args) -> Path:
    """A copy of the repository's configs with the benchmark's purifier settings, plus one version."""
    repo = work / "model_repository"
    shutil.copytree(src, repo, ignore=shutil.ignore_patterns("[0-9]*", "__pycache__"))
    (repo / "purify_classify" / "1").mkdir(exist_ok=True)
    cfg = repo / "purifier" / "config.pbtxt"
    for k in ("t_star", "sampler", "num_inference_steps", "threads"):
        set_parameter(cfg, k, getattr(args, k))
    set_parameter(repo / "classifier" / "config.pbtxt", "threads", args.classifier_threads)
    if args.queue_delay_us is not None:
        delay = f"max_queue_delay_microseconds: {args.queue_delay_us}"
        cfg.write_text(re.sub(r"max_queue_delay_microseconds: \d+", delay, cfg.read_text()))
    pur_v, cls_v = newest_version(src / "purifier"), newest_version(src / "classifier")
    if pur_v and cls_v:
        # the deployed pair as it is served, under its own version number (a legacy version's entry in the
        # copied legacy.json names it): the server checks the copy exactly as it checks the original
        for role, v in (("purifier", pur_v), ("classifier", cls_v)):
            dst = repository.version_dir(repo, role, v)
            shutil.copytree(repository.version_dir(src, role, v), dst, ignore=shutil.ignore_patterns("__pycache__"))
            repository.check_version(dst, role)
        print(f"weights: {src}/purifier/{pur_v} + {src}/classifier/{cls_v}")
        return repo
    # random weights would need a card that passes the gate, and nothing may serve without one
    raise SystemExit(f"error: no deployed version in {src}: the benchmark serves the deployed pair "
                     f"(export one with `python -m training.export`)")


# ---- in-process ceiling ----------------------------------------------------------------------------

def ceiling(weights_pur: Path, weights_cls: Path, args, x_pool: np.ndarray, batch_sizes) -> dict[int, dict]:
    """{batch size: {"wall": images/s, "cpu": images per CPU-second of this process}}."""
    torch.set_num_threads(args.threads)
    purifier = Purifier(load_unet(weights_pur), t_star=args.t_star, sampler=args.sampler,
                        num_inference_steps=args.num_inference_steps).eval()
    classifier = load_classifier(weights_cls)
    res = {}
    for bs in batch_sizes:
        x = torch.from_numpy(x_pool[:bs].copy())
        n_batches = max(2, -(-args.ceiling_images // bs))
        with torch.inference_mode():
            classifier(purifier(x))  # warm-up (allocator, oneDNN primitives)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n_batches):
                classifier(purifier(x)).argmax(1)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        res[bs] = {"wall": n_batches * bs / dt, "cpu": n_batches * bs / dc}
        print(f"  in-process batch {bs:3d}: {res[bs]['wall']:7.2f} images/s  {res[bs]['cpu']:7.2f} images/CPU-s")
    return res


# ---- through Triton -------------------------------------------------------------------------------

def server_pids(server: TritonServer) -> list[int]:
    pids = [server.proc.pid]
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if server.shm_prefix in (p / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return sorted(set(pids))


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


def triton_throughput(server: TritonServer, x_pool: np.ndarray, n_requests: int, concurrency: int) -> dict:
    """{"wall": images/s, "cpu": images per CPU-second of tritonserver + its stubs} for single-image requests."""
    import tritonclient.grpc as grpcclient
    next_i, lock, errors = [0], threading.Lock(), []
    # connect every client first and start them together: a request that arrives alone while the others
    # are still connecting forms its own batch, and closed-loop clients keep that split for the whole run
    clients = [grpcclient.InferenceServerClient(server.grpc_url) for _ in range(concurrency)]
    for c in clients:
        c.is_server_ready()
    start = threading.Barrier(concurrency + 1)

    def worker(c):
        start.wait()
        try:
            while True:
                with lock:
                    i = next_i[0]
                    next_i[0] += 1
                if i >= n_requests:
                    return
                inp = grpcclient.InferInput("IMAGES", [1, *x_pool.shape[1:]], "FP32")
                inp.set_data_from_numpy(x_pool[i % len(x_pool)][None])
                try:
                    c.infer("purify_classify", [inp])
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors.append(repr(e))
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    pids = server_pids(server)
    start.wait()
    t0, c0 = time.perf_counter(), cpu_seconds(pids)
    for t in threads:
        t.join()
    dt, dc = time.perf_counter() - t0, cpu_seconds(pids) - c0
    if errors:
        raise SystemExit(f"error: {len(errors)} failed requests, e.g. {errors[0]}")
    return {"wall": n_requests / dt, "cpu": n_requests / dc}


def batch_stats(server: TritonServer, model: str) -> dict[int, int]:
    import tritonclient.http as httpclient
    c = httpclient.InferenceServerClient(server.http_url)
    try:
        stats = c.get_inference_statistics(model)["model_stats"]
    finally:
        c.close()
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for m in stats for b in m.get("batch_stats", [])}


def memory(server: TritonServer) -> dict[str, dict[str, float]]:
    """RSS and PSS (MiB) of the server and of each stub (a stub's argv names its model dir)."""
    out = {}
    procs = {"tritonserver": server.proc.pid}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "triton_python_backend_stub" in cmd and server.shm_prefix in cmd:
            m = re.search(r"/(\w+)/(\d+)/model\.py", cmd)
            procs[f"stub {m.group(1)} v{m.group(2)}" if m else f"stub {p.name}"] = int(p.name)
    for name, pid in sorted(procs.items()):
        try:
            rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024
            pss = int(re.search(r"Pss:\s+(\d+)", Path(f"/proc/{pid}/smaps_rollup").read_text()).group(1)) / 1024
        except (OSError, AttributeError):
            continue
        out[name] = {"rss_mib": round(rss, 1), "pss_mib": round(pss, 1)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=str(ROOT / "model_repository"))
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--t-star", dest="t_star", type=int, default=100)
    p.add_argument("--num-inference-steps", dest="num_inference_steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the purifier (stub and in-process)")
    p.add_argument("--classifier-threads", type=int, default=1)
    p.add_argument("--queue-delay-us", type=int, default=None, help="override the purifier's max_queue_delay")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=160, help="single-image requests at --concurrency")
    p.add_argument("--sequential-requests", type=int, default=24)
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16, 32, 64])
    p.add_argument("--ceiling-images", type=int, default=64, help="images per in-process batch size")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)

    from dbp.data import load_fashion_mnist
    x_pool = load_fashion_mnist("test").head(max(64, *args.batch_sizes)).float01().numpy()
    work = Path(tempfile.mkdtemp(prefix="bench-triton-"))
    try:
        repo = prepare_repo(Path(args.repo), work, args)
        pur_w = repository.weights_dir(repo, "purifier", newest_version(repo / "purifier"))
        cls_w = repository.weights_dir(repo, "classifier", newest_version(repo / "classifier"))
        print(f"purifier: {args.sampler}, t*={args.t_star}, N={args.num_inference_steps}, "
              f"{Purifier(load_unet(pur_w), args.t_star, args.sampler, args.num_inference_steps).n_unet_calls} "
              f"UNet calls, {args.threads} thread(s)")
        print("ceiling (before):")
        before = ceiling(pur_w, cls_w, args, x_pool, args.batch_sizes)

        h, g, m = free_ports(3)
        server = TritonServer(ServerConfig(repo=str(repo), http_port=h, grpc_port=g, metrics_port=m,
                                           model_control_mode="none", run_dir=str(work / "run")))
        server.start()
        try:
            print(f"server start-up: {server.startup_s:.1f} s")
            triton_throughput(server, x_pool, 2 * args.concurrency, args.concurrency)  # warm-up
            seq = triton_throughput(server, x_pool, args.sequential_requests, 1)
            print(f"  Triton batch-1 sequential: {seq['wall']:7.2f} images/s  {seq['cpu']:7.2f} images/CPU-s")
            s0 = batch_stats(server, "purifier")
            conc = triton_throughput(server, x_pool, args.requests, args.concurrency)
            s1 = batch_stats(server, "purifier")
            print(f"  Triton concurrency {args.concurrency}:   {conc['wall']:7.2f} images/s  "
                  f"{conc['cpu']:7.2f} images/CPU-s")
            batches = {b: s1.get(b, 0) - s0.get(b, 0) for b in s1 if s1.get(b, 0) - s0.get(b, 0)}
            print(f"  purifier batch sizes formed by the dynamic batcher (size: executions): {batches}")
            mem = memory(server)
        finally:
            rc = server.stop()
        print("ceiling (after, at the best batch size so far):")
        best_bs = max(before, key=lambda b: before[b]["wall"])
        after = ceiling(pur_w, cls_w, args, x_pool, [best_bs])
        best = {bs: {k: max(v[k], after.get(bs, v)[k]) for k in v} for bs, v in before.items()}
        best_bs = max(best, key=lambda b: best[b]["wall"])
        top = {"wall": best[best_bs]["wall"], "cpu": max(b["cpu"] for b in best.values())}
        print("\n== results (one run; the machine may be shared with other jobs: CPU-time figures are the ones "
              "contention distorts least) ==")
        print(f"ceiling: in-process at batch {best_bs}: {top['wall']:.2f} images/s; best {top['cpu']:.2f} images/CPU-s"
              + (f" (batch 1: {best[1]['wall']:.2f} images/s)" if 1 in best else ""))
        print(f"Triton purify_classify at concurrency {args.concurrency}: {conc['wall']:.2f} images/s = "
              f"{conc['wall'] / top['wall']:.2f}x the ceiling; per CPU-second {conc['cpu']:.2f} images = "
              f"{conc['cpu'] / top['cpu']:.2f}x (goal >= 0.9x)")
        if args.concurrency in best and args.concurrency != best_bs:
            b = best[args.concurrency]  # single-image requests cannot form batches above the concurrency
            print(f"  vs in-process at batch {args.concurrency}: {conc['wall'] / b['wall']:.2f}x wall, "
                  f"{conc['cpu'] / b['cpu']:.2f}x CPU")
        print(f"gain over batch-1 sequential requests through Triton ({seq['wall']:.2f} images/s): "
              f"{conc['wall'] / seq['wall']:.2f}x")
        print(f"server start-up (launch -> ready): {server.startup_s:.1f} s; exit code on stop: {rc}")
        for name, v in mem.items():
            print(f"memory {name:22s} RSS {v['rss_mib']:7.1f} MiB  PSS {v['pss_mib']:7.1f} MiB")
        result = {"sampler": args.sampler, "t_star": args.t_star, "num_inference_steps": args.num_inference_steps,
                  "threads": args.threads, "concurrency": args.concurrency, "requests": args.requests,
                  "ceiling": {"before": before, "after": after, "best_batch": best_bs},
                  "triton": conc, "ratio_wall": conc["wall"] / top["wall"], "ratio_cpu": conc["cpu"] / top["cpu"],
                  "sequential": seq, "gain_over_sequential": conc["wall"] / seq["wall"], "purifier_batches": batches,
                  "startup_s": server.startup_s, "memory_mib": mem}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
