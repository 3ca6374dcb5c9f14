"""Load test: start a local stack (Triton + gateway on free loopback ports), run locust headless, report.

  python -m loadtests.run                                  # mixed workload, 4 users, 60 s, model_repository/
  python -m loadtests.run --scenario classify --users 8 --duration 2m
  python -m loadtests.run --host http://127.0.0.1:8080     # an already running gateway (no stack started)

Writes into --out (default runs/loadtest/<time>): locust_stats.csv / _stats_history.csv / _failures.csv,
report.html, summary.json, and prints requests/s, p50/p95/p99 and failures per request type. Exits 1 when the
failure ratio is above --max-failure-ratio. Bounded: users, duration and a hard wall-clock limit.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from loadtests.images import ENV_DIR, render_pngs

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = {"classify": "ClassifyUser", "purify": "PurifyUser", "mixed": "MixedUser"}


def parse_duration(s: str) -> float:
    """'90', '90s', '2m', '1h' -> seconds (locust's own --run-time syntax)."""
    s = s.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(s[:-1]) * units[s[-1]] if s[-1] in units else float(s)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"bad duration {s!r} (e.g. 30s, 2m)") from None


def machine() -> dict:
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"cpus": os.cpu_count(), "cpu": cpu, "loadavg_1m": round(os.getloadavg()[0], 2),
            "host": platform.node(), "python": platform.python_version()}


def read_stats(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def summarise(rows: list[dict]) -> dict:
    """Per request name and aggregated: count, failures, req/s, p50/p95/p99 and mean in ms."""
    out = {}
    for r in rows:
        name = r["Name"] if r["Name"] != "Aggregated" else "all"
        n = int(r["Request Count"])
        out[name] = {"requests": n, "failures": int(r["Failure Count"]),
                     "rps": round(float(r["Requests/s"]), 3),
                     "p50_ms": float(r["50%"] or 0), "p95_ms": float(r["95%"] or 0), "p99_ms": float(r["99%"] or 0),
                     "mean_ms": round(float(r["Average Response Time"] or 0), 1)}
    return out


def format_summary(s: dict) -> str:
    head = f"{'request':<24} {'count':>7} {'fail':>5} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    lines = [head, "-" * len(head)]
    for name, r in sorted(s.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        lines.append(f"{name:<24} {r['requests']:>7} {r['failures']:>5} {r['rps']:>7.2f} {r['p50_ms']:>8.0f} "
                     f"{r['p95_ms']:>8.0f} {r['p99_ms']:>8.0f}")
    return "\n".join(lines)


def run_locust(host: str, scenario: str, users: int, spawn_rate: float, duration: float, out: Path,
               images_dir: Path, rate_per_user: float = 0.0, api_key: Optional[str] = None) -> dict:
    """Run locust headless as a subprocess (its own CSV/HTML writers); returns the parsed summary."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{ENV_DIR: str(images_dir)})
    if rate_per_user > 0:
        env["DBP_LOADTEST_RATE"] = str(rate_per_user)
    if api_key:
        env["DBP_LOADTEST_API_KEY"] = api_key
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
           "--host", host, "-u", str(users), "-r", str(spawn_rate), "-t", f"{int(round(duration))}s",
           "--stop-timeout", "30", "--csv", str(out / "locust"), "--html", str(out / "report.html"),
           "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0", SCENARIOS[scenario]]
    # hard bound: run time + spawn + the stop timeout for in-flight requests + start-up slack
    limit = duration + users / max(spawn_rate, 0.1) + 30 + 120
    with open(out / "locust.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
    stats = out / "locust_stats.csv"
    if proc.returncode != 0 or not stats.exists():
        raise RuntimeError(f"locust failed (exit {proc.returncode}); see {out / 'locust.log'}:\n"
                           + (out / "locust.log").read_text()[-3000:])
    return summarise(read_stats(stats))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="mixed")
    p.add_argument("--users", type=int, default=4, help="concurrent users, closed loop (default %(default)s)")
    p.add_argument("--spawn-rate", type=float, default=4.0)
    p.add_argument("--duration", type=parse_duration, default=60.0, help="e.g. 60s, 2m (default 60s)")
    p.add_argument("--rate-per-user", type=float, default=0.0,
                   help="requests/s per user (open pacing); 0 = back-to-back (default)")
    p.add_argument("--host", default=None, help="gateway URL; default: start a local stack")
    p.add_argument("--repo", type=Path, default=ROOT / "model_repository", help="model repository for the stack")
    p.add_argument("--max-in-flight", type=int, default=32, help="gateway MAX_IN_FLIGHT of the local stack")
    p.add_argument("--images", type=int, default=64, help="distinct Fashion-MNIST test images (default 64)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default runs/loadtest/<time>)")
    p.add_argument("--max-failure-ratio", type=float, default=0.01)
    p.add_argument("--api-key", default=os.environ.get("DBP_GATEWAY_API_KEY"))
    a = p.parse_args(argv)
    if a.users < 1 or a.duration <= 0 or a.duration > 3600 or a.users > 1000:
        p.error("--users must be 1..1000 and --duration within (0, 1h]")
    if a.host is None and not (a.repo / "purifier" / "config.pbtxt").exists():
        p.error(f"--repo {a.repo} is not a model repository (no purifier/config.pbtxt)")
    if a.host and not a.host.startswith(("http://127.", "http://localhost", "http://[::1]")):
        p.error("--host must be a loopback URL (http://127.0.0.1:PORT): load tests never leave this machine")

    out = a.out or ROOT / "runs" / "loadtest" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    images = out / "images"
    render_pngs(images, n=a.images)

    stack = None
    info: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), "scenario": a.scenario,
                  "users": a.users, "duration_s": a.duration, "rate_per_user": a.rate_per_user}
    try:
        if a.host is None:
            from loadtests.stack import GatewayConfig, Stack
            print(f"starting Triton ({a.repo}) + gateway on free loopback ports ...", flush=True)
            stack = Stack(a.repo, run_dir=out / "stack", gateway=GatewayConfig(max_in_flight=a.max_in_flight))
            stack.start()
            host = stack.gateway_url
            info["stack"] = {"gateway": host, "triton_metrics": stack.triton.metrics_url,
                             "triton_startup_s": round(stack.triton.startup_s or 0, 1)}
            print(f"gateway {host} ready (Triton up in {info['stack']['triton_startup_s']} s)", flush=True)
        else:
            host = a.host
        info["host"] = host
        info["rss_before"] = stack.rss() if stack else None
        print(f"locust: {a.scenario}, {a.users} users, {a.duration:.0f} s ...", flush=True)
        summary = run_locust(host, a.scenario, a.users, a.spawn_rate, a.duration, out, images,
                             a.rate_per_user, a.api_key)
        info["rss_after"] = stack.rss() if stack else None
    finally:
        if stack is not None:
            stack.stop()
    info["machine"]["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    info["summary"] = summary
    (out / "summary.json").write_text(json.dumps(info, indent=2))
    print(format_summary(summary))
    allr = summary.get("all", {"requests": 0, "failures": 0})
    ratio = allr["failures"] / max(allr["requests"], 1)
    print(f"reports: {out}/report.html, {out}/locust_stats.csv, {out}/summary.json")
    print(f"machine: {info['machine']['cpus']} CPUs ({info['machine']['cpu']}), load {info['machine']['loadavg_1m']}"
          f" -> {info['machine']['loadavg_1m_after']}")
    if allr["requests"] == 0:
        print("error: no request completed", file=sys.stderr)
        return 1
    if ratio > a.max_failure_ratio:
        print(f"error: failure ratio {ratio:.3f} > {a.max_failure_ratio}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
