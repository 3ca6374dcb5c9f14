"""tests/serving: each module gets its own temporary repository (the live tests export into theirs)."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import FAST_PURIFIER, load_services


@pytest.fixture(scope="module")
def repo(export_repo_factory) -> Path:
    """model_repository with version 1 of the tiny models, purifier on DDPM with 2 UNet calls."""
    return export_repo_factory(**FAST_PURIFIER)


@pytest.fixture(scope="module")
def services(repo):
    """(PurifierService, ClassifierService) of version 1, in-process."""
    return load_services(repo)
