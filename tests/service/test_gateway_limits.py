"""Backpressure, the request timeout and Triton's own rejections, against the real servers."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from gateway_testing import png_bytes

GOOD = png_bytes((28, 28), "L", seed=3)


def heavy_files(n=8):
    return [("images", (f"{i}.png", png_bytes((28, 28), "L", seed=i), "image/png")) for i in range(n)]


def test_backpressure_fast_429_and_timeout_504(gateway_factory):
    # one request at a time, and a timeout far below what 8 images x 16 votes (256 UNet calls) take on a CPU
    gw = gateway_factory(max_in_flight=1, request_timeout_s=0.25, max_images=16, max_votes=16, retry_after_s=3)

    def post(i):
        t0 = time.monotonic()
        with httpx.Client(base_url=gw.url, timeout=30) as c:
            r = c.post("/classify", params={"votes": 16}, files=heavy_files())
        return r, time.monotonic() - t0

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(post, range(6)))
    codes = sorted(r.status_code for r, _ in results)
    assert set(codes) <= {429, 504} and codes.count(504) >= 1 and codes.count(429) >= 1, codes
    for r, dt in results:
        assert r.headers["content-type"] == "application/problem+json"
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "3" and r.json()["reason"] == "overload"
            assert dt < 5, "an overload answer must not queue"
        else:
            assert "0.25 s" in r.json()["detail"] and dt < 10, (r.text, dt)
    m = gw.metrics()
    assert m['dbp_gateway_rejections_total{reason="overload"}'] == codes.count(429)
    assert m['dbp_gateway_rejections_total{reason="timeout"}'] == codes.count(504)
    assert m["dbp_gateway_in_flight_requests"] == 0
    # the slot is free again: a light request goes through once Triton has worked off the heavy ones
    deadline = time.monotonic() + 60
    while True:
        r = httpx.post(gw.url + "/purify", files=[("images", ("a.png", GOOD, "image/png"))], timeout=30)
        if r.status_code != 504 or time.monotonic() > deadline:
            break
    assert r.status_code == 200, r.text


def test_triton_rejection_is_400_with_its_message(triton):
    """Input the gateway would never send (it validates first), straight through its Triton pool, so the
    mapping of a real INVALID_ARGUMENT answer is checked."""
    from service.app.core.config import Settings
    from service.app.core.errors import ApiError
    from service.app.core.metrics import GatewayMetrics
    from service.app.triton.pool import TritonPool

    async def go():
        pool = TritonPool(Settings(TRITON_URLS=[triton.grpc_url], MAX_VOTES=4), GatewayMetrics())
        await pool.start()
        try:
            assert pool.ready_backends(), pool.backends[0].reason
            wrong = np.zeros((1, 1, 30, 32), np.float32)
            with pytest.raises(ApiError) as e:
                await pool.run("purify", lambda pair: ({"IMAGES": wrong}, 1), time.monotonic() + 30)
            return e.value
        finally:
            await pool.close()

    err = asyncio.run(go())
    assert err.status == 400 and err.reason == "triton_rejected"
    assert "IMAGES must be [B, 1, 32, 32]" in err.detail and "[1, 1, 30, 32]" in err.detail
