"""Real servers for the gateway tests: one tritonserver with the tiny test models for the whole session, and
gateways run by a real uvicorn (`python -m service`) on free loopback ports.

Fixtures others can reuse (tests/service/...; helpers in tests/gateway_testing.py):
  gateway_repo     a temporary model repository: version 1 of the tiny models, fast DDPM settings
  triton           a started TritonServer serving gateway_repo (session; .grpc_url, .stop(), .start())
  gateway_factory  start(urls=[...], wait_ready=True, **settings) -> a running Gateway; settings are
                   DBP_GATEWAY_* names in lower case (max_in_flight=1, api_key=...); all stopped at teardown
  gateway          the default gateway in front of `triton` (session), with a dead URL listed first, so every
                   test also checks that unready backends are skipped; limits lowered for the hostile tests
  seedless_gateway a gateway that refuses client seeds (allow_client_seed=false, no seed secret) (session)
  dead_url         the unused loopback address listed first
  fashion_pngs     {name: bytes} of the demo page's bundled Fashion-MNIST test images
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

from gateway_testing import ROOT, Gateway
from helpers import free_ports, running_triton


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


@pytest.fixture(scope="session")
def seedless_gateway(gateway_factory) -> Gateway:
    return gateway_factory(allow_client_seed="false")


@pytest.fixture(scope="session")
def fashion_pngs() -> dict[str, bytes]:
    """The demo page's bundled Fashion-MNIST test images (real 28x28 grayscale files)."""
    d = ROOT / "service" / "app" / "static" / "samples"
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.png"))}
