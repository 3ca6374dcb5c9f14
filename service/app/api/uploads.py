"""Reading the images of a /classify or /purify request, in either form, and the OpenAPI text for both."""
from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

import anyio
from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from ..core.config import Settings
from ..core.errors import ApiError
from ..images import Decoded, b64decode, decode, header_pixels
from ..schemas import ImagesJSON

FIELD = "images"
# image work on at most this many pixels runs on the event loop (well under 1 ms); more goes to a thread
INLINE_PIXELS = 65_536
T = TypeVar("T")


def request_body_openapi(settings: Settings) -> dict[str, Any]:
    json_schema = ImagesJSON.model_json_schema()
    json_schema["properties"]["images"]["maxItems"] = settings.MAX_IMAGES
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": [FIELD],
            "properties": {FIELD: {"type": "array", "minItems": 1, "maxItems": settings.MAX_IMAGES,
                                   "items": {"type": "string", "format": "binary"},
                                   "description": "one file part per image, all named 'images'"}}}},
        "application/json": {"schema": json_schema, "example": json_schema.get("examples", [None])[0]},
    }}}


def _too_many(n: Any, limit: int) -> ApiError:
    return ApiError(422, "too_many_images", f"{n} images in one request; the limit is {limit}")


async def read_files(request: Request, settings: Settings) -> list[tuple[str, bytes]]:
    """[(name, file bytes)] from multipart/form-data (parts named 'images') or JSON (base64)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = settings.MAX_IMAGES
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=limit, max_fields=limit + 16)
        except (MultiPartException, StarletteHTTPException) as e:  # starlette wraps the first in the second
            msg = str(getattr(e, "message", None) or getattr(e, "detail", None) or e)
            if "Too many files" in msg:
                raise _too_many("more than " + str(limit), limit) from None
            raise ApiError(422, "bad_multipart", f"malformed multipart body: {msg}") from None
        try:
            parts = form.getlist(FIELD)
            if not parts:
                raise ApiError(422, "no_images", f"no file parts named '{FIELD}' in the multipart body "
                               f"(fields: {sorted(set(form.keys())) or 'none'})")
            out = []
            for i, p in enumerate(parts):
                if not isinstance(p, UploadFile):
                    raise ApiError(422, "bad_parameter", f"part {i} of '{FIELD}' is a text field, not a file")
                out.append((p.filename or f"#{i}", await p.read()))
            return out
        finally:
            await form.close()
    if ctype in ("application/json", "") or ctype.endswith("+json"):
        body = await request.body()
        if not body:
            raise ApiError(422, "no_images", "empty request body: send multipart/form-data with file parts "
                           f"named '{FIELD}', or JSON {{\"images\": [<base64>, ...]}}")
        try:
            req = ImagesJSON.model_validate_json(body)
        except ValidationError as e:
            errs = "; ".join(f"{'.'.join(str(p) for p in er['loc']) or 'body'}: {er['msg']}" for er in e.errors()[:5])
            raise ApiError(422, "bad_parameter", f"invalid JSON body: {errs}") from None
        if len(req.images) > limit:
            raise _too_many(len(req.images), limit)
        names = req.filenames or []
        if names and len(names) != len(req.images):
            raise ApiError(422, "bad_parameter", f"{len(names)} filenames for {len(req.images)} images")
        return [(names[i] if names else f"#{i}", b64decode(names[i] if names else f"#{i}", data))
                for i, data in enumerate(req.images)]
    raise ApiError(415, "bad_content_type", f"content type {ctype!r} is not accepted: send multipart/form-data "
                   f"with file parts named '{FIELD}', or application/json {{\"images\": [<base64>, ...]}}")


async def read_images(request: Request, settings: Settings, shape: tuple[int, int, int], convert: bool,
                      fit: str) -> tuple[list[Decoded], float]:
    """Files -> model-shaped arrays. Returns (images, decode seconds). Small images (by the pixel count their
    headers claim, so a small file that inflates to a large image does not count as small) decode on the event
    loop: a 28x28 PNG takes tens of microseconds, less than the hand-off to a worker thread and back, which the
    profile showed on every request (benchmarks/profile_gateway.py). Larger ones decode in a worker thread so they
    never block other requests."""
    files = await read_files(request, settings)
    if len(files) > settings.MAX_IMAGES:
        raise _too_many(len(files), settings.MAX_IMAGES)
    t0 = time.perf_counter()

    def work() -> list[Decoded]:
        return [decode(name, raw, shape, settings.MAX_PIXELS, convert, fit) for name, raw in files]

    decoded = await run_sized(sum(header_pixels(raw) for _, raw in files), work)
    return decoded, time.perf_counter() - t0


async def run_sized(pixels: int, work: Callable[[], T]) -> T:
    """work() on the event loop when it touches at most INLINE_PIXELS pixels, else in a worker thread."""
    if pixels <= INLINE_PIXELS:
        return work()
    return await anyio.to_thread.run_sync(work)
