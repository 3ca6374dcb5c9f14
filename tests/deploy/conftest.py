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
    return {getattr(r, "path", None) for r in gateway_app.routes} - {None}
