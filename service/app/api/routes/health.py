"""GET /livez (the process answers) and GET /readyz (a Triton backend serves a ready version pair)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ...schemas import Liveness, Readiness
from ..deps import PoolDep, SettingsDep

router = APIRouter(tags=["health"])


@router.get("/livez", response_model=Liveness, summary="The gateway process is alive (checks nothing else)")
async def livez() -> Liveness:
    return Liveness()


@router.get("/readyz", response_model=Readiness, summary="Ready to serve: some Triton backend is ready and serves "
            "purifier N and classifier N", responses={503: {"model": Readiness, "description": "not ready; "
                                                           "detail and backends say why"}})
async def readyz(pool: PoolDep, settings: SettingsDep) -> JSONResponse:
    backends = [{"url": b.url, "ready": b.ready, "reason": b.reason,
                 "version_pair": b.pair.version if b.pair else None, "ensemble_ready": b.ensemble_ready}
                for b in pool.backends]
    n = sum(1 for b in backends if b["ready"])
    if n:
        body = {"status": "ready", "detail": f"{n} of {len(backends)} Triton backends ready", "backends": backends}
        return JSONResponse(Readiness.model_validate(body).model_dump(mode="json"))
    why = "; ".join(f"{b['url']}: {b['reason']}" for b in backends)
    body = {"status": "not ready", "detail": f"no Triton backend is ready ({why})", "backends": backends}
    return JSONResponse(Readiness.model_validate(body).model_dump(mode="json"), status_code=503,
                        headers={"Retry-After": str(settings.RETRY_AFTER_S)})
