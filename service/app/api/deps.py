"""Typed dependency aliases: routes declare what they need; tests may swap any of them through
`app.dependency_overrides`.

Every dependency is `async def`: FastAPI runs a plain `def` dependency in the thread pool, a thread hand-off
per dependency per request that the gateway's profile showed on the hot path (benchmarks/profile_gateway.py).
None of them blocks."""
from __future__ import annotations

import hmac
from typing import Annotated, Optional

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from ..cards import CardReader
from ..core.config import Settings
from ..core.errors import ApiError
from ..core.metrics import GatewayMetrics
from ..core.seeds import SeedPolicy
from ..triton.pool import TritonPool

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="required on /classify and /purify when the gateway has an API key")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_pool(request: Request) -> TritonPool:
    return request.app.state.pool


async def get_metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics


async def get_cards(request: Request) -> CardReader:
    return request.app.state.cards


async def get_seed_policy(request: Request) -> SeedPolicy:
    return request.app.state.seed_policy


SettingsDep = Annotated[Settings, Depends(get_settings)]
PoolDep = Annotated[TritonPool, Depends(get_pool)]
MetricsDep = Annotated[GatewayMetrics, Depends(get_metrics)]
CardsDep = Annotated[CardReader, Depends(get_cards)]
SeedPolicyDep = Annotated[SeedPolicy, Depends(get_seed_policy)]


async def check_api_key(settings: SettingsDep, key: Annotated[Optional[str], Depends(api_key_header)]) -> None:
    if settings.API_KEY is None:
        return
    expected = settings.API_KEY.get_secret_value().encode()
    # compare_digest takes the same time wherever the first differing byte is
    if key is None or not hmac.compare_digest(key.encode("utf-8", "surrogateescape"), expected):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header" if key else
                       "this gateway needs an X-API-Key header", {"WWW-Authenticate": 'APIKey header="X-API-Key"'})


ApiKeyDep = Annotated[None, Depends(check_api_key)]


def auth_dependencies(settings: Settings) -> list:
    """The key check for a route, only when a key is configured: the OpenAPI schema then declares the
    X-API-Key scheme, and an open gateway does not claim to need one."""
    return [Depends(check_api_key)] if settings.API_KEY is not None else []
