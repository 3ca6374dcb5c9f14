"""One real stack for the ops tests: Triton with the tiny test models + the gateway (real uvicorn), on free
loopback ports, started through loadtests.stack (the code `make loadtest` and the drills run).

The model repository comes from the shared export_repo_factory (tests/helpers.py), with the fast purifier
settings the gateway tests use (FAST_PURIFIER).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import FAST_PURIFIER

ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = Path(os.environ.get("DBP_TEST_ARTEFACTS", ROOT / "runs" / "test-artefacts")) / "ops"


@pytest.fixture(scope="session")
def ops_repo(export_repo_factory) -> Path:
    return export_repo_factory(**FAST_PURIFIER)


@pytest.fixture(scope="session")
def ops_images(tmp_path_factory) -> list[tuple[str, bytes]]:
    from loadtests.images import load_pngs, render_pngs
    d = tmp_path_factory.mktemp("pngs")
    render_pngs(d, n=16)
    return load_pngs(d)


@pytest.fixture(scope="session")
def ops_stack(ops_repo, tmp_path_factory):
    from loadtests.drills import MAIN_IN_FLIGHT
    from loadtests.stack import GatewayConfig, Stack
    with Stack(ops_repo, run_dir=tmp_path_factory.mktemp("ops-stack"),
               gateway=GatewayConfig(max_in_flight=MAIN_IN_FLIGHT, request_timeout_s=60)) as s:
        yield s


@pytest.fixture(scope="session")
def artefacts() -> Path:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    return ARTEFACTS


