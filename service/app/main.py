"""The gateway app: `uvicorn service.app.main:app` (settings from DBP_GATEWAY_* environment variables).

REST in front of Triton: POST /classify, POST /purify and POST /certify take ordinary image files, GET /livez, /readyz
and /metrics serve operations, GET / is the demo page, /docs and /openapi.json document it all.
No torch and no dbp import here: the gateway talks to Triton over gRPC only.
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .api.routes import certify, classify, demo, health, metrics, purify
from .cards import CardReader, CertifyCardReader
from .core import errors
from .core.config import Settings, load_settings
from .core.metrics import GatewayMetrics
from .core.middleware import GatewayMiddleware
from .core.seeds import policy_from_settings
from .schemas import Problem
from .triton.pool import TritonPool

VERSION = "1.0.0"
log = logging.getLogger("service")


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    settings = settings or load_settings()
    gateway_metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool = TritonPool(settings, gateway_metrics)
        app.state.pool = pool
        await pool.start()  # one gRPC client per URL for the process's lifetime; the probe runs from here
        states = ", ".join(f"{b.url} {'ready' if b.ready else 'NOT ready: ' + b.reason}" for b in pool.backends)
        log.info("gateway up; Triton: %s", states)
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(title="Diffusion-purification gateway", version=VERSION, lifespan=lifespan,
                  description="Purify images with a diffusion model and classify them, served by Triton. "
                              "Send image files (multipart parts named `images`, or JSON with base64). Errors "
                              "are `application/problem+json`. See also `/` (demo page) and `/metrics`.")
    app.state.settings = settings
    app.state.metrics = gateway_metrics
    app.state.cards = CardReader(settings.MODEL_REPOSITORY, settings.PURIFIER_MODEL)
    app.state.certify_cards = CertifyCardReader(settings.MODEL_REPOSITORY, settings.CERTIFY_MODEL)
    app.state.seed_policy = policy_from_settings(settings)  # the key is made once, here, never per request
    errors.install(app)
    app.include_router(classify.router(settings))
    app.include_router(purify.router(settings))
    app.include_router(certify.router(settings))
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(demo.router)
    app.add_middleware(GatewayMiddleware, settings=settings, metrics=gateway_metrics)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            comps["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
            problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    r422 = op.get("responses", {}).get("422")
                    if r422 and "application/json" in r422.get("content", {}):
                        r422["content"] = problem  # our validation errors are problem+json too
            for name in ("HTTPValidationError", "ValidationError"):
                comps.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def __getattr__(name: str):
    # `uvicorn service.app.main:app` builds the app on first access, so importing this module (tests,
    # tools) does not need valid settings
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
