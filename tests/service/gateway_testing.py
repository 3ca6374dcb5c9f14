"""What the gateway tests share (importable as `gateway_testing` from tests/service): the Gateway process
wrapper (a real uvicorn via `python -m service` on a free loopback port) and image builders.

png_bytes(size, mode, fmt) builds image files; Gateway.metrics() parses /metrics into {'name{labels}': value}.
"""
from __future__ import annotations

import collections
import io
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import httpx
import numpy as np

from loadtests.stack import stop_process

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
        rc = stop_process(self.proc)
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


def png_bytes(size=(28, 28), mode="L", fmt="PNG", seed=0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    from PIL import Image
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}.get(mode)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))  # 16-bit grayscale
    else:
        a = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        img = Image.fromarray(a[..., 0] if channels == 1 else a, mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


