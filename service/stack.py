"""`python -m service.stack` (what `make up` runs): Triton with the shipped models, then the gateway.

  python -m service.stack                       # Triton :8000/:8001/:8002, gateway :8080, model_repository/
  python -m service.stack --port 9080 --triton-ports 9000 9001 9002 --repo /path/to/model_repository

Starts Triton through the project's launcher (the nvidia-pytriton wheel's tritonserver, loopback), waits
until it is ready, starts the gateway (uvicorn) against it, waits until /readyz answers 200, prints the
URLs, and on Ctrl-C (or SIGTERM) stops the gateway first, then Triton. If either dies, the other is
stopped too and the exit code is 1. This module only runs processes: it imports neither torch nor dbp.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from .process import GatewayProcess, ServerProcess, ServerProcessError

ROOT = Path(__file__).resolve().parent.parent


def _launcher() -> list[str]:
    script = Path(sys.executable).parent / "dbp-triton"  # console script of dbp.serving.launcher
    return [str(script)] if script.exists() else [sys.executable, "-m", "dbp.serving.launcher"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.stack", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", default=str(ROOT / "model_repository"), help="Triton model repository")
    p.add_argument("--host", default="127.0.0.1", help="address of both servers (loopback by default)")
    p.add_argument("--port", type=int, default=8080, help="gateway port")
    p.add_argument("--triton-ports", type=int, nargs=3, default=(8000, 8001, 8002), metavar=("HTTP", "GRPC", "METRICS"))
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for each server")
    p.add_argument("--api-key", default=os.environ.get("DBP_GATEWAY_API_KEY"), help="optional X-API-Key")
    a = p.parse_args(argv)
    repo = Path(a.repo).resolve()
    if not (repo / "purify_classify" / "config.pbtxt").exists():
        print(f"error: {repo} is not the model repository (no purify_classify/config.pbtxt)", file=sys.stderr)
        return 2
    http, grpc, metrics = a.triton_ports
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    triton = gateway = None
    rc = 0
    try:
        print(f"starting Triton on {repo} ...", file=sys.stderr, flush=True)
        triton = ServerProcess(
            _launcher() + ["--repo", str(repo), "--host", a.host, "--http-port", str(http), "--grpc-port", str(grpc),
                           "--metrics-port", str(metrics), "--ready-timeout", str(a.ready_timeout), "--quiet"],
            name="Triton", ready_url=f"http://{a.host}:{http}/v2/health/ready", stop_grace_s=120)
        triton.start(a.ready_timeout + 30)
        settings = {"TRITON_URLS": f"{a.host}:{grpc}", "MODEL_REPOSITORY": repo}
        if a.api_key:
            settings["API_KEY"] = a.api_key
        print("starting the gateway ...", file=sys.stderr, flush=True)
        gateway = GatewayProcess(settings, host=a.host, port=a.port).start(a.ready_timeout)
        base = gateway.url
        print(f"\nready:\n  API        {base}  (POST /classify, POST /purify)\n  docs       {base}/docs\n"
              f"  demo page  {base}/\n  metrics    {base}/metrics  (Triton: http://{a.host}:{metrics}/metrics)\n"
              f"  Triton     http {a.host}:{http}  grpc {a.host}:{grpc}\nCtrl-C stops both.", file=sys.stderr,
              flush=True)
        while not stop.wait(0.5):
            for name, server in (("gateway", gateway), ("Triton", triton)):
                if not server.is_alive():
                    print(f"error: {name} exited with code {server.proc.returncode}; stopping", file=sys.stderr)
                    rc = 1
                    stop.set()
    except ServerProcessError as e:
        print(f"error: {e}", file=sys.stderr)
        rc = 1
    finally:
        g = gateway.stop() if gateway is not None else None
        t = triton.stop() if triton is not None else None
        print(f"stopped: gateway {g}, Triton {t}", file=sys.stderr, flush=True)
        # uvicorn re-raises the SIGTERM it handled, so -15 after its clean shutdown is a normal stop
        if rc == 0 and (g not in (0, -signal.SIGTERM, None) or t not in (0, None)):
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
