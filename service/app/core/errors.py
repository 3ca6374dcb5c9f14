"""Every error the gateway answers is `application/problem+json` (RFC 9457): type, title, status, detail.

`ApiError` carries the HTTP status, a short machine-readable `reason` (the label of
dbp_gateway_rejections_total) and optional headers such as Retry-After.
"""
from __future__ import annotations

from typing import Mapping, Optional

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_TYPE_BASE = "https://dbp.invalid/problems/"  # not dereferenceable; a stable identifier per reason
PROBLEM_MEDIA_TYPE = "application/problem+json"

TITLES = {
    400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    413: "Content Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content",
    429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


class ApiError(Exception):
    def __init__(self, status: int, reason: str, detail: str, headers: Optional[Mapping[str, str]] = None):
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail
        self.headers = dict(headers or {})


def problem_response(status: int, reason: str, detail: str, headers: Optional[Mapping[str, str]] = None,
                     instance: Optional[str] = None) -> JSONResponse:
    body = {"type": PROBLEM_TYPE_BASE + reason, "title": TITLES.get(status, "Error"), "status": status,
            "detail": detail, "reason": reason}
    if instance:
        body["instance"] = instance
    resp = JSONResponse(body, status_code=status, headers=dict(headers or {}), media_type=PROBLEM_MEDIA_TYPE)
    resp.headers["X-Rejection-Reason"] = reason  # lets the metrics middleware count it without parsing JSON
    return resp


def _loc(loc) -> str:
    return ".".join(str(p) for p in loc)


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return problem_response(exc.status, exc.reason, exc.detail, exc.headers, request.url.path)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors()[:10]:
        parts.append(f"{_loc(err.get('loc', ()))}: {err.get('msg', 'invalid')}")
    return problem_response(422, "bad_parameter", "; ".join(parts) or "invalid request", None, request.url.path)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return problem_response(exc.status_code, reason, str(exc.detail), getattr(exc, "headers", None),
                            request.url.path)


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Only reached by a bug; the message stays generic (no internals leak), the log has the traceback.
    import logging
    logging.getLogger("service").exception("unhandled error on %s", request.url.path)
    return problem_response(500, "internal", "internal error in the gateway", None, request.url.path)


def install(app) -> None:
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)
