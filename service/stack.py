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
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent


def _die_with_parent() -> None:
    try:  # a killed stack must not leave servers behind
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def _launcher() -> list[str]:
    script = Path(sys.executable).parent / "dbp-triton"  # console script of dbp.serving.launcher
    return [str(script)] if script.exists() else [sys.executable, "-m", "dbp.serving.launcher"]


def _wait(url: str, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while _get(url) != 200:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s ({url})")
        time.sleep(0.3)


def stop_process(proc: Optional[subprocess.Popen], grace_s: float = 20.0) -> Optional[int]:
    """SIGTERM (uvicorn and Triton drain and exit), SIGKILL to its whole session if it has not gone after
    grace_s; the exit code (None for no process). Shared with loadtests.stack."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


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
        triton = subprocess.Popen(
            _launcher() + ["--repo", str(repo), "--host", a.host, "--http-port", str(http), "--grpc-port", str(grpc),
                           "--metrics-port", str(metrics), "--ready-timeout", str(a.ready_timeout), "--quiet"],
            cwd=ROOT, start_new_session=True, preexec_fn=_die_with_parent)
        _wait(f"http://{a.host}:{http}/v2/health/ready", triton, a.ready_timeout + 30, "Triton")
        env = {**os.environ, "DBP_GATEWAY_TRITON_URLS": f"{a.host}:{grpc}", "DBP_GATEWAY_MODEL_REPOSITORY": str(repo),
               "DBP_GATEWAY_HOST": a.host, "DBP_GATEWAY_PORT": str(a.port)}
        if a.api_key:
            env["DBP_GATEWAY_API_KEY"] = a.api_key
        print("starting the gateway ...", file=sys.stderr, flush=True)
        gateway = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, start_new_session=True,
                                   preexec_fn=_die_with_parent)
        base = f"http://{a.host}:{a.port}"
        _wait(base + "/readyz", gateway, a.ready_timeout, "the gateway")
        print(f"\nready:\n  API        {base}  (POST /classify, POST /purify)\n  docs       {base}/docs\n"
              f"  demo page  {base}/\n  metrics    {base}/metrics  (Triton: http://{a.host}:{metrics}/metrics)\n"
              f"  Triton     http {a.host}:{http}  grpc {a.host}:{grpc}\nCtrl-C stops both.", file=sys.stderr,
              flush=True)
        while not stop.wait(0.5):
            for name, proc in (("gateway", gateway), ("Triton", triton)):
                if proc.poll() is not None:
                    print(f"error: {name} exited with code {proc.returncode}; stopping", file=sys.stderr)
                    rc = 1
                    stop.set()
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        rc = 1
    finally:
        g = stop_process(gateway, 20)
        t = stop_process(triton, 120)
        print(f"stopped: gateway {g}, Triton {t}", file=sys.stderr, flush=True)
        # uvicorn re-raises the SIGTERM it handled, so -15 after its clean shutdown is a normal stop
        if rc == 0 and (g not in (0, -signal.SIGTERM, None) or t not in (0, None)):
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
