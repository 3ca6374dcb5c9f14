"""What the gateway tests share (importable as `gateway_testing` from tests/service): the Gateway process
wrapper (a real uvicorn via `python -m service` on a free loopback port; service/process.py) and image builders.

png_bytes(size, mode, fmt) builds image files; Gateway.metrics() parses /metrics into {'name{labels}': value}.
"""
from __future__ import annotations

import io
import os
import signal
import tempfile
from pathlib import Path
from typing import Optional

import httpx
import numpy as np

from service.process import GatewayProcess

ROOT = Path(__file__).resolve().parents[1]
ARTEFACTS = Path(os.environ.get("DBP_TEST_ARTEFACTS", ROOT / "runs" / "test-artefacts"))
GATEWAY_START_TIMEOUT = 60.0


class Gateway(GatewayProcess):
    """`python -m service` bound to port 0 on loopback (the port read from uvicorn's log); `env` holds
    DBP_GATEWAY_* settings. start() returns once it listens, wait_ready() once /readyz answers 200. Its log is
    a temporary file, removed when it stops cleanly."""

    def __init__(self, env: dict[str, str]):
        fd, log = tempfile.mkstemp(prefix="dbp-gateway-", suffix=".log")
        os.close(fd)
        super().__init__(env, log_path=Path(log))

    def start(self) -> "Gateway":
        super().start(ready_timeout=None)
        try:
            self.wait_listening(GATEWAY_START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        super().wait_ready(timeout)

    def stop(self) -> Optional[int]:
        rc = super().stop()
        if rc in (0, -signal.SIGTERM):  # uvicorn re-raises the SIGTERM it handled: a clean stop
            self.log_path.unlink(missing_ok=True)
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


