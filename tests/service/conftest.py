"""Real servers for the gateway tests: one tritonserver with the tiny test models for the whole session, and
gateways run by a real uvicorn (`python -m service`) on free loopback ports.

Fixtures others can reuse (tests/service/...):
  gateway_repo     a temporary model repository: version 1 of the tiny models, fast DDPM settings
  triton           a started TritonServer serving gateway_repo (session; .grpc_url, .stop(), .start())
  gateway_factory  start(**DBP_GATEWAY_* overrides, urls=[...]) -> a running Gateway (stopped at teardown)
  gateway          the default gateway in front of `triton` (session), with a dead URL listed first, so every
                   test also checks that unready backends are skipped
  png_bytes(...)   helper: an image file of a given size/mode/format
"""
from __future__ import annotations

import collections
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import httpx
import numpy as np
import pytest

from helpers import free_ports, running_triton  # noqa: F401 - free_ports re-exported for the tests

ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = Path(os.environ.get("DBP_TEST_ARTEFACTS", ROOT / "runs" / "test-artefacts"))
GATEWAY_START_TIMEOUT = 60.0


class Gateway:
    """`python -m service` in a subprocess, bound to port 0 on loopback; the port is read from uvicorn's log."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.proc: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        self._log: collections.deque[str] = collections.deque(maxlen=300)
        self._port_seen = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 60) -> str:
        return "".join(list(self._log)[-n:])

    def _pump(self) -> None:
        assert self.proc and self.proc.stdout
        for line in iter(self.proc.stdout.readline, ""):
            self._log.append(line)
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                self._port_seen.set()

    def start(self) -> "Gateway":
        env = {**os.environ, "DBP_GATEWAY_HOST": "127.0.0.1", "DBP_GATEWAY_PORT": "0", **self.env}
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + GATEWAY_START_TIMEOUT
        while not self._port_seen.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gateway did not start:\n{self.log_tail()}")
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gateway not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120.0), **kw)

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {'name{labels}': value} (labels in exposition order)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


@pytest.fixture(scope="session")
def gateway_repo(export_repo_factory) -> Path:
    # DDPM with t* = 20 on a 50-step grid: 2 UNet calls per purification, stochastic in both directions
    return export_repo_factory(sampler="ddpm", t_star=20, num_inference_steps=50)


@pytest.fixture(scope="session")
def triton(gateway_repo, tmp_path_factory):
    with running_triton(gateway_repo, tmp_path_factory.mktemp("gw-triton"), ready_timeout=300) as srv:
        yield srv


@pytest.fixture(scope="session")
def gateway_factory(triton):
    started: list[Gateway] = []

    def start(urls: Optional[list[str]] = None, wait_ready: bool = True, **settings) -> Gateway:
        env = {"DBP_GATEWAY_TRITON_URLS": ",".join(urls or [triton.grpc_url]), "DBP_GATEWAY_PROBE_INTERVAL_S": "0.5",
               "DBP_GATEWAY_REQUEST_TIMEOUT_S": "60"}
        env.update({f"DBP_GATEWAY_{k.upper()}": str(v) for k, v in settings.items()})
        gw = Gateway(env).start()
        started.append(gw)
        if wait_ready:
            gw.wait_ready()
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture(scope="session")
def dead_url() -> str:
    return f"127.0.0.1:{free_ports(1)[0]}"  # nobody listens there


@pytest.fixture(scope="session")
def gateway(gateway_factory, triton, gateway_repo, dead_url) -> Gateway:
    return gateway_factory(urls=[dead_url, triton.grpc_url], model_repository=gateway_repo, max_images=4,
                           max_votes=8, max_body_bytes=512 * 1024, max_pixels=1 << 20)


def png_bytes(size=(28, 28), mode="L", fmt="PNG", seed=0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    from PIL import Image
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}.get(mode)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16), "I;16")
    else:
        a = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        img = Image.fromarray(a[..., 0] if channels == 1 else a, mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


@pytest.fixture(scope="session")
def fashion_pngs() -> dict[str, bytes]:
    """The demo page's bundled Fashion-MNIST test images (real 28x28 grayscale files)."""
    d = ROOT / "service" / "app" / "static" / "samples"
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.png"))}
