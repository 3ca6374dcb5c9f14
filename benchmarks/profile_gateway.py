"""Where one POST /classify spends the gateway's CPU: py-spy samples the real uvicorn process (python -m service)
while it serves --requests sequential requests (the same PNG and seed as bench_gateway), and the samples are
attributed to the parts of the hot path.

  python -m benchmarks.profile_gateway                       # table on stdout, JSON + raw stacks in runs/bench/
  python -m benchmarks.profile_gateway --out docs/results/gateway_profile/after.json

Only samples where the gateway is on the CPU count (py-spy without --idle): the time it waits for Triton is not
in the table, so the shares are of the gateway's own work per request. Each sample's leaf frame is attributed to
the first part (in PARTS' order) whose module pattern appears anywhere on its stack from the leaf up, so a JSON
encode called from a FastAPI handler counts as "JSON", not "FastAPI".
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx

from benchmarks.bench_gateway import SAMPLE, served_pair
from dbp import repository

ROOT = Path(__file__).resolve().parent.parent

# (part, substrings of a frame "function (file:line)"): the first match from the leaf up names the sample
PARTS = (
    ("image decode/convert (PIL, numpy)", ("PIL/", "service/app/images.py")),
    ("JSON encode/decode", ("json/", "rapidjson", "orjson", "render (", "jsonable_encoder")),
    ("response model (pydantic)", ("pydantic", "model_validate", "model_dump")),
    ("multipart parsing", ("multipart", "form(", "_get_form")),
    ("gRPC client (tritonclient, grpc, protobuf)", ("tritonclient", "grpc", "protobuf")),
    ("seeds (HMAC)", ("core/seeds.py", "hmac", "hashlib")),
    ("metrics (prometheus_client)", ("prometheus_client", "core/metrics.py")),
    ("HTTP protocol (uvicorn, h11/httptools)", ("h11", "httptools", "uvicorn/protocols")),
    ("routing, dependencies (FastAPI, Starlette)", ("fastapi/", "starlette/")),
    ("gateway code", ("service/app/",)),
    ("event loop (asyncio, uvloop)", ("asyncio/", "uvloop", "selectors")),
)


def part_of(stack: list[str]) -> str:
    for frame in reversed(stack):  # leaf first
        for part, pats in PARTS:
            if any(p in frame for p in pats):
                return part
    return "other"


def summarise(raw: Path) -> dict:
    """py-spy's raw (collapsed) format: 'frame;frame;...;leaf count' per line, root first."""
    parts, leaves, total = Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack_s, _, n = line.rpartition(" ")
        if not stack_s or not n.isdigit():
            continue
        stack, n = stack_s.split(";"), int(n)
        total += n
        parts[part_of(stack)] += n
        leaves[stack[-1]] += n
    return {"samples": total, "parts": {k: v / total for k, v in parts.most_common()} if total else {},
            "top_leaves": [(k, v / total) for k, v in leaves.most_common(15)] if total else []}


async def send(url: str, png: bytes, seed: int, n: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        t0 = time.perf_counter()
        for _ in range(n):
            r = await client.post("/classify", params={"seed": seed},
                                  files=[("images", ("sample.png", png, "image/png"))])
            r.raise_for_status()
        return (time.perf_counter() - t0) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=str(ROOT / "model_repository"))
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "gateway_profile.json"))
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(os.sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("error: py-spy not found (it is pinned in requirements.lock: make venv)")
    png = SAMPLE.read_bytes()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix(".stacks.txt")
    with served_pair(Path(args.repo), "profile-gateway-") as (_, gw, version):
        asyncio.run(send(gw.url, png, args.seed, 10))  # warm-up: imports, first gRPC channel
        rec = subprocess.Popen([spy, "record", "--pid", str(gw.pid), "--rate", str(args.rate), "--format",
                                "raw", "--output", str(raw), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        per_request = asyncio.run(send(gw.url, png, args.seed, args.requests))
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=60)
        if not raw.exists():
            raise SystemExit(f"error: py-spy wrote no profile: {err.decode()[-500:]}")
    res = summarise(raw)
    res.update({"requests": args.requests, "mean_request_ms": per_request * 1000, "version_pair": version,
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": os.getloadavg(), "args": repository.relative_paths(vars(args))})
    res["gateway_cpu_ms_per_request"] = res["samples"] / args.rate / args.requests * 1000
    out.write_text(json.dumps(res, indent=2))
    print(f"{res['samples']} samples over {args.requests} requests: ~{res['gateway_cpu_ms_per_request']:.2f} ms of "
          f"gateway CPU per request (mean request {res['mean_request_ms']:.1f} ms; load {res['loadavg'][0]:.2f})")
    for k, v in res["parts"].items():
        print(f"  {v:6.1%}  {k}")
    print("top leaf frames:")
    for k, v in res["top_leaves"]:
        print(f"  {v:6.1%}  {k[:110]}")
    print(f"written {out} and {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
