"""Throughput of purify_classify through the real Triton server vs the in-process PyTorch ceiling.

  python benchmarks/bench_triton.py                       # DDIM (11 UNet calls), concurrency 16
  python benchmarks/bench_triton.py --sampler ddpm --num-inference-steps 1000 --requests 64

Measured in one run, on the same weights and thread count:
  * ceiling: classifier(purifier(x)) batched in-process under torch.inference_mode, at several batch
    sizes (the best one counts); measured before and after the server part, the higher figure is used,
  * Triton: `--requests` single-image requests to purify_classify from `--concurrency` client threads
    (gRPC), and the same requests one at a time (batch-1 sequential),
  * server start-up time (launch -> /v2/health/ready) and RSS/PSS of tritonserver and each model stub.
Goal: Triton >= 0.9x the ceiling. Weights: the newest version in --repo; if it has none, random weights of
the default architectures (throughput does not depend on weight values) in a throwaway repository.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "training"))
from dbp import serving  # noqa: E402
from dbp.checkpoint import save_checkpoint, weights_sha256  # noqa: E402
from dbp.models import Purifier, load_classifier, load_unet  # noqa: E402
from dbp.triton_server import ServerConfig, TritonServer, free_ports  # noqa: E402


def newest_version(model_dir: Path) -> Path | None:
    vs = sorted((int(d.name) for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit()), reverse=True)
    return model_dir / str(vs[0]) if vs else None


def set_param(config: Path, key: str, value) -> None:
    text, n = re.subn(rf'(key: "{key}" value: {{ string_value: )"[^"]*"', rf'\g<1>"{value}"', config.read_text())
    if n != 1:
        raise SystemExit(f"error: parameter {key} not found in {config}")
    config.write_text(text)


def prepare_repo(src: Path, work: Path, args) -> Path:
    """A copy of the repository's configs with the benchmark's purifier settings, plus one version."""
    import export
    repo = work / "model_repository"
    shutil.copytree(src, repo, ignore=shutil.ignore_patterns("[0-9]*", "__pycache__"))
    (repo / "purify_classify" / "1").mkdir(exist_ok=True)
    cfg = repo / "purifier" / "config.pbtxt"
    for k in ("t_star", "sampler", "num_inference_steps", "threads"):
        set_param(cfg, k, getattr(args, k))
    set_param(repo / "classifier" / "config.pbtxt", "threads", args.classifier_threads)
    pur_v, cls_v = newest_version(src / "purifier"), newest_version(src / "classifier")
    if pur_v and cls_v:
        pur, cls, card = pur_v / "weights", cls_v / "weights", pur_v / serving.CARD_FILE
        print(f"weights: {pur_v} + {cls_v}")
    else:
        from dbp.nets import build_classifier, build_unet
        pur, cls = work / "ckpt" / "purifier", work / "ckpt" / "classifier"
        save_checkpoint(pur, {"kind": "diffusion", "arch": {"unet": "small"}}, build_unet("small").state_dict())
        save_checkpoint(cls, {"kind": "classifier", "arch": {"classifier": "small_cnn", "dataset": "fashion_mnist"}},
                        build_classifier("small_cnn", "fashion_mnist").state_dict())
        card = work / "card.json"
        # throwaway repository only: random weights measure speed, and nothing here is ever published
        card.write_text(json.dumps({
            "schema": "dbp.robustness_card/1",
            "model": {"purifier_sha256": weights_sha256(pur), "classifier_sha256": weights_sha256(cls)},
            "gate": {"passed": True, "reasons": ["benchmark stand-in: random weights, throughput only"]},
            "settings": []}))
        print(f"weights: none in {src}; random weights of the default architectures (small UNet, small_cnn)")
    export.export(pur, cls, card, repo)
    return repo


# ---- in-process ceiling ----------------------------------------------------------------------------

def ceiling(weights_pur: Path, weights_cls: Path, args, x_pool: np.ndarray, batch_sizes) -> dict[int, float]:
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
            t0 = time.perf_counter()
            for _ in range(n_batches):
                classifier(purifier(x)).argmax(1)
            dt = time.perf_counter() - t0
        res[bs] = n_batches * bs / dt
        print(f"  in-process batch {bs:3d}: {res[bs]:7.2f} images/s")
    return res


# ---- through Triton -------------------------------------------------------------------------------

def triton_throughput(server: TritonServer, x_pool: np.ndarray, n_requests: int, concurrency: int) -> float:
    import tritonclient.grpc as grpcclient
    next_i, lock, errors = [0], threading.Lock(), []

    def worker():
        c = grpcclient.InferenceServerClient(server.grpc_url)
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

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"error: {len(errors)} failed requests, e.g. {errors[0]}")
    return n_requests / dt


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
        pur_w, cls_w = repo / "purifier" / "1" / "weights", repo / "classifier" / "1" / "weights"
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
            print(f"  Triton batch-1 sequential: {seq:7.2f} images/s")
            s0 = batch_stats(server, "purifier")
            conc = triton_throughput(server, x_pool, args.requests, args.concurrency)
            s1 = batch_stats(server, "purifier")
            print(f"  Triton concurrency {args.concurrency}:   {conc:7.2f} images/s")
            batches = {b: s1.get(b, 0) - s0.get(b, 0) for b in s1 if s1.get(b, 0) - s0.get(b, 0)}
            print(f"  purifier batch sizes formed by the dynamic batcher (size: executions): {batches}")
            mem = memory(server)
        finally:
            rc = server.stop()
        print("ceiling (after, at the best batch size so far):")
        best_bs = max(before, key=before.get)
        after = ceiling(pur_w, cls_w, args, x_pool, [best_bs])
        best = {bs: max(v, after.get(bs, 0.0)) for bs, v in before.items()}
        ratio = conc / best[best_bs]
        print("\n== results (one run; the machine may be shared with training jobs) ==")
        print(f"ceiling: {best[best_bs]:.2f} images/s in-process at batch {best_bs} "
              f"(batch 1: {best[1] if 1 in best else float('nan'):.2f})")
        print(f"Triton purify_classify, concurrency {args.concurrency}: {conc:.2f} images/s = {ratio:.2f}x the ceiling "
              f"(goal >= 0.9x)")
        print(f"gain over batch-1 sequential requests through Triton ({seq:.2f} images/s): {conc / seq:.2f}x")
        print(f"server start-up: {server.startup_s:.1f} s; exit code on stop: {rc}")
        for name, v in mem.items():
            print(f"memory {name:22s} RSS {v['rss_mib']:7.1f} MiB  PSS {v['pss_mib']:7.1f} MiB")
        result = {"sampler": args.sampler, "t_star": args.t_star, "num_inference_steps": args.num_inference_steps,
                  "threads": args.threads, "concurrency": args.concurrency, "requests": args.requests,
                  "ceiling_images_per_s": {"before": before, "after": after, "best_batch": best_bs},
                  "triton_images_per_s": conc, "ratio_to_ceiling": ratio, "sequential_images_per_s": seq,
                  "gain_over_sequential": conc / seq, "purifier_batches": batches,
                  "startup_s": server.startup_s, "memory_mib": mem}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
