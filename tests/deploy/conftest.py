"""Fixtures of the deployment tests; helpers live in deploy_support.py."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def gateway_app():
    """The gateway's real FastAPI app (no Triton is contacted before start-up), for its route table."""
    from service.app.core.config import Settings
    from service.app.main import create_app
    return create_app(Settings())


@pytest.fixture(scope="session")
def gateway_paths(gateway_app) -> set[str]:
    """Paths the gateway answers GET on, from its route table as FastAPI publishes it (the OpenAPI document is
    built from app.routes; FastAPI >= 0.16x keeps included routers unflattened in app.routes itself)."""
    paths = {p for p, ops in gateway_app.openapi()["paths"].items() if "get" in ops}
    return paths | {r.path for r in gateway_app.routes if "GET" in (getattr(r, "methods", None) or ())}
