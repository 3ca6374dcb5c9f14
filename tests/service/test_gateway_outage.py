"""Triton stopped in the middle of a test, then restarted: the gateway answers 503 + Retry-After quickly,
/readyz turns 503, nothing hangs, and it serves again by itself (same process) when Triton is back."""
from __future__ import annotations

import threading
import time

import httpx

from gateway_testing import png_bytes

GOOD = png_bytes((28, 28), "L", seed=5)
FILES = [("images", ("a.png", GOOD, "image/png"))]


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_triton_down_then_back(gateway, triton):
    pid = gateway.proc.pid
    assert httpx.post(gateway.url + "/classify", files=FILES, timeout=60).status_code == 200

    seen: list[tuple[int, float, str]] = []
    stop = threading.Event()

    def traffic():  # requests keep coming while Triton goes away
        with httpx.Client(base_url=gateway.url, timeout=70) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                r = c.post("/classify", files=FILES)
                seen.append((r.status_code, time.monotonic() - t0, r.headers.get("Retry-After", "")))
                time.sleep(0.05)

    th = threading.Thread(target=traffic, daemon=True)
    th.start()
    try:
        triton.stop()
        wait_for(lambda: httpx.get(gateway.url + "/readyz", timeout=10).status_code == 503, 30, "/readyz 503")
        ready = httpx.get(gateway.url + "/readyz", timeout=10)
        assert ready.json()["status"] == "not ready" and ready.headers["Retry-After"]
        assert triton.grpc_url in ready.json()["detail"]
        t0 = time.monotonic()
        r = httpx.post(gateway.url + "/classify", files=FILES, timeout=70)
        assert r.status_code == 503 and r.headers["Retry-After"] and time.monotonic() - t0 < 5, r.text
        assert r.headers["content-type"] == "application/problem+json" and r.json()["reason"] == "triton_unavailable"
        wait_for(lambda: sum(1 for s in seen if s[0] == 503) >= 3, 30, "503s under traffic")
    finally:
        stop.set()
        th.join(80)
        triton.start()  # same ports: the gateway must find it again by itself
    assert not th.is_alive(), "a request hung"
    codes = {c for c, _, _ in seen}
    assert codes <= {200, 503}, seen
    assert all(ra for c, _, ra in seen if c == 503)
    assert max(dt for _, dt, _ in seen) < 60  # the request timeout bounds every answer

    wait_for(lambda: httpx.get(gateway.url + "/readyz", timeout=10).status_code == 200, 60, "/readyz 200 again")
    r = httpx.post(gateway.url + "/classify", files=FILES, timeout=60)
    assert r.status_code == 200, r.text
    assert gateway.proc.pid == pid and gateway.proc.poll() is None  # no restart of the gateway
    m = gateway.metrics()
    assert m[f'dbp_gateway_triton_backend_ready{{url="{triton.grpc_url}"}}'] == 1
    assert m['dbp_gateway_rejections_total{reason="triton_unavailable"}'] >= 3
