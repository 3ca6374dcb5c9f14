"""`python -m service.stack` (the `make up` command): Triton, then the gateway, URLs printed, Ctrl-C stops both."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx

from gateway_testing import ROOT, png_bytes
from helpers import free_ports


def test_stack_starts_both_serves_and_stops_cleanly_on_ctrl_c(gateway_repo):
    port, h, g, m = free_ports(4)
    proc = subprocess.Popen([sys.executable, "-m", "service.stack", "--repo", str(gateway_repo), "--port", str(port),
                             "--triton-ports", str(h), str(g), str(m)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops both.\n" not in lines:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-40:])
            time.sleep(0.3)
        out = "".join(lines)
        base = f"http://127.0.0.1:{port}"
        for url in (base, f"{base}/docs", f"{base}/metrics", f"grpc 127.0.0.1:{g}"):
            assert url in out, out
        assert httpx.get(base + "/readyz", timeout=10).status_code == 200
        r = httpx.post(base + "/classify", files=[("images", ("a.png", png_bytes(), "image/png"))], timeout=60)
        assert r.status_code == 200 and r.json()["robustness"] is not None, r.text
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        rc = proc.wait(150)
    out = "".join(lines)
    assert rc == 0, out[-3000:]
    assert "stopped: gateway" in out and "Triton 0" in out
    for p in (port, h, g):  # nothing listens any more
        try:
            httpx.get(f"http://127.0.0.1:{p}/", timeout=2)
            raise AssertionError(f"port {p} still answers")
        except httpx.TransportError:
            pass
