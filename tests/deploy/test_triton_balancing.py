"""The gateway in front of TWO real tritonservers (tiny test models), as on Kubernetes where it holds one gRPC
channel per Triton pod: with both up it uses both; one is killed mid-traffic and the gateway keeps answering
from the other, then uses the restarted one again. Who served what is counted from each server's OWN metrics
endpoint (nv_inference_request_success), not from the gateway.
"""
from __future__ import annotations

import io
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway_testing import Gateway
from helpers import FAST_PURIFIER, running_triton

# 5xx answers tolerated while the gateway notices a killed backend (its pool retries a request on the next
# backend when the chosen one is UNAVAILABLE, so 0 is expected)
MAX_5XX_DURING_FAILOVER = 1


def png(seed: int) -> bytes:
    from PIL import Image
    a = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, format="PNG")
    return buf.getvalue()


def served(srv, model: str = "purifier") -> float:
    """Successful requests of `model` (all versions) according to the server's own metrics endpoint."""
    text = httpx.get(srv.metrics_url, timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "nv_inference_request_success"
               for s in f.samples if s.labels.get("model") == model)


def backend_ready(gw: Gateway) -> dict[str, float]:
    return {k.split('url="', 1)[1].rstrip('"}'): v for k, v in gw.metrics().items()
            if k.startswith("dbp_gateway_triton_backend_ready{")}


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def classify_many(client: httpx.Client, n: int, seed0: int, workers: int = 2) -> list[int]:
    def one(i: int) -> int:
        return client.post("/classify", params={"seed": seed0 + i},
                           files=[("images", (f"{i}.png", png(seed0 + i), "image/png"))]).status_code
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(one, range(n)))


@pytest.fixture(scope="module")
def two_repos(export_repo_factory, tmp_path_factory) -> tuple[Path, Path]:
    a = export_repo_factory(**FAST_PURIFIER)
    b = tmp_path_factory.mktemp("repo-b") / "model_repository"
    shutil.copytree(a, b)  # one repository each, as each pod has its own
    return a, b


def test_gateway_balances_over_two_tritons_and_survives_losing_one(two_repos, tmp_path_factory):
    t_start = time.monotonic()
    repo_a, repo_b = two_repos
    with running_triton(repo_a, tmp_path_factory.mktemp("tA"), ready_timeout=300) as a, \
         running_triton(repo_b, tmp_path_factory.mktemp("tB"), ready_timeout=300) as b:
        # Kubernetes probes these on every Triton pod (deploy/k8s/triton-statefulset.yaml)
        for path in ("/v2/health/live", "/v2/health/ready"):
            assert httpx.get(f"http://{a.http_url}{path}", timeout=10).status_code == 200, path
        gw = Gateway({"DBP_GATEWAY_TRITON_URLS": f"{a.grpc_url},{b.grpc_url}", "DBP_GATEWAY_PROBE_INTERVAL_S": "0.5",
                      "DBP_GATEWAY_REQUEST_TIMEOUT_S": "60"}).start()
        try:
            gw.wait_ready()
            wait_for(lambda: backend_ready(gw) == {a.grpc_url: 1.0, b.grpc_url: 1.0}, 30, "both backends ready")
            with gw.client(timeout=120) as c:
                # 1) both up: both serve, and each request runs purifier and classifier on the same server
                base_a, base_b = served(a), served(b)
                codes = classify_many(c, 8, seed0=0)
                assert codes == [200] * 8
                da, db = served(a) - base_a, served(b) - base_b
                assert da >= 2 and db >= 2 and da + db == 8, (da, db)
                assert served(a, "classifier") == served(a) and served(b, "classifier") == served(b)
                # the adapter's HPA metric for Triton (deploy/k8s/prometheus-adapter/config.yaml) exists
                text = httpx.get(a.metrics_url, timeout=10).text
                assert 'nv_inference_queue_duration_us{model="purifier"' in text

                # 2) B killed (SIGKILL, server and its stubs) while requests are in flight
                codes, stop = [], threading.Event()

                def traffic():
                    i = 100
                    while not stop.is_set():
                        codes.append(c.post("/classify", params={"seed": i},
                                            files=[("images", ("x.png", png(i), "image/png"))]).status_code)
                        i += 1
                workers = [threading.Thread(target=traffic) for _ in range(2)]
                for w in workers:
                    w.start()
                wait_for(lambda: len(codes) >= 2, 60, "traffic before the kill")
                os.killpg(b.proc.pid, signal.SIGKILL)
                killed_at = len(codes)
                wait_for(lambda: backend_ready(gw).get(b.grpc_url) == 0.0, 15, "the gateway to mark B unready")
                wait_for(lambda: len(codes) >= killed_at + 4, 60, "traffic after the kill")
                stop.set()
                for w in workers:
                    w.join(120)
                errors = [s for s in codes if s >= 500]
                assert len(errors) <= MAX_5XX_DURING_FAILOVER, codes
                assert all(s == 200 or s >= 500 for s in codes), codes

                # 3) B down: everything goes to A, and the gateway stays ready
                assert httpx.get(gw.url + "/readyz", timeout=10).status_code == 200
                base_a = served(a)
                assert classify_many(c, 6, seed0=1000) == [200] * 6
                assert served(a) - base_a == 6

                # 4) B back (same ports, fresh counters): the probe brings it back and it serves again
                b.stop()
                b.start()
                wait_for(lambda: backend_ready(gw).get(b.grpc_url) == 1.0, 60, "B ready again in the gateway")
                assert served(b) == 0
                assert classify_many(c, 8, seed0=2000) == [200] * 8
                assert served(b) >= 1, "the restarted backend gets requests again"
                print(f"\nbalancing: {time.monotonic() - t_start:.1f} s; {len(codes)} requests while B was killed, "
                      f"{len(errors)} answered 5xx")
        finally:
            gw.stop()
