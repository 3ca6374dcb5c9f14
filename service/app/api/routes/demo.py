"""GET /: the demo page (plain HTML + JS, no build step), and the test images it offers."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse

from ...core.errors import ApiError
from ...schemas import Sample

STATIC = Path(__file__).resolve().parents[2] / "static"
router = APIRouter(tags=["demo"])


def samples_dir(request: Request) -> Path:
    return request.app.state.settings.SAMPLES_DIR or STATIC / "samples"


def list_samples(request: Request) -> list[str]:
    d = samples_dir(request)
    return sorted(p.name for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
                  and p.is_file()) if d.is_dir() else []


@router.get("/", response_class=HTMLResponse, summary="Demo page: upload or pick an image, see the original, "
            "the purified image and the prediction")
async def index(request: Request) -> HTMLResponse:
    allow = request.app.state.seed_policy.allow_client_seed
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    return HTMLResponse(html.replace("__ALLOW_CLIENT_SEED__", "true" if allow else "false"))


@router.get("/demo/samples", response_model=list[Sample], summary="Test images the demo page offers")
async def samples(request: Request) -> list[Sample]:
    return [Sample(name=n, url=f"/demo/samples/{n}") for n in list_samples(request)]


@router.get("/demo/samples/{name}", response_class=FileResponse, summary="One test image",
            responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                       404: {"description": "no such sample", "content": {"application/problem+json": {
                           "schema": {"$ref": "#/components/schemas/Problem"}}}}})
async def sample(name: str, request: Request) -> FileResponse:
    if name not in list_samples(request):  # only listed names: no path traversal
        raise ApiError(404, "not_found", f"no sample named {name!r}")
    return FileResponse(samples_dir(request) / name)
