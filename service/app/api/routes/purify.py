"""POST /purify: the purified image(s), as image/png (one image) or JSON with base64 PNGs."""

import base64
import time
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from ...core.config import Settings
from ...core.errors import ApiError
from ...images import to_png
from ...schemas import PurifyResponse
from ...triton.models import PURIFIED
from ..common import (PROFILE_DOC, ImageOptions, builder, card_receipt, check_profile, check_seed_allowed,
                      current_pair, image_options, json_response, model_info, problem_responses, profile_receipt,
                      request_seeds, timings, version_headers)
from ..deps import CardsDep, MetricsDep, PoolDep, SeedPolicyDep, SettingsDep, auth_dependencies
from ..uploads import read_images, request_body_openapi, run_sized


def wants_json(fmt: Optional[str], accept: str, n: int) -> bool:
    if fmt is not None:
        return fmt == "json"
    accept = accept.lower()
    return n > 1 or ("application/json" in accept and "image/png" not in accept)


def router(settings: Settings) -> APIRouter:
    r = APIRouter(tags=["inference"])
    responses = problem_responses(400, 401, 413, 415, 422, 429, 502, 503, 504)
    responses[200] = {"description": "image/png for one image (default), JSON with base64 PNGs when asked for "
                      "(format=json or Accept: application/json) or for several images",
                      "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}

    @r.post("/purify", response_model=PurifyResponse, openapi_extra=request_body_openapi(settings),
            dependencies=auth_dependencies(settings),
            responses=responses, summary="Purify one or several images")
    async def purify(
        request: Request, cfg: SettingsDep, pool: PoolDep, metrics: MetricsDep, cards: CardsDep,
        policy: SeedPolicyDep,
        opts: Annotated[ImageOptions, Depends(image_options(settings))],
        format: Annotated[Optional[Literal["png", "json"]], Query(description="png (one image only) or json; "
                                                                  "default: png for one image unless Accept "
                                                                  "asks for application/json")] = None,
        profile: Annotated[Optional[str], Query(max_length=64, description=PROFILE_DOC)] = None,
    ) -> Response:
        t0 = time.perf_counter()
        check_seed_allowed(policy, opts.seed)  # before any decoding or Triton call
        pair = current_pair(pool)
        profile = check_profile(pair, profile)  # 422 for an unknown one, before any decoding or Triton call
        shape = (pair.channels, pair.height, pair.width)
        images, decode_s = await read_images(request, cfg, shape, opts.convert, opts.fit)
        as_json = wants_json(format, request.headers.get("accept", ""), len(images))
        if not as_json and len(images) > 1:
            raise ApiError(422, "bad_parameter", f"format=png returns one image but {len(images)} were sent; "
                           "use format=json")
        seeds, noise_seeds = request_seeds(policy, opts.seed, images)
        deadline = time.monotonic() + cfg.REQUEST_TIMEOUT_S
        out = await pool.run("purify", builder(images, noise_seeds, 1, cfg, shape, profile), deadline)
        pair = out.pair
        purified = out.outputs[PURIFIED]
        pngs = await run_sized(int(purified[0].size) * len(purified), lambda: [to_png(p) for p in purified])
        metrics.triton_duration.labels("/purify").observe(out.triton_s)
        metrics.images.labels("/purify").observe(len(images))
        # also for a PNG answer, which carries no receipt: a mismatch is an operator's concern either way
        card = card_receipt(cards, metrics, "/purify", out, profile, len(images))
        t = timings(t0, out.triton_s, decode_s)
        headers = version_headers(pair, False, t)
        if not as_json:
            info = images[0].info
            used = pair.purification_for(profile)
            headers.update({
                "X-Seed": str(seeds[0]), "X-Purification-Profile": profile,
                "X-Purification-Sampler": str(used["sampler"]),
                "X-Purification-Steps": str(used["num_inference_steps"]), "X-Purification-T-Star": str(used["t_star"]),
                "X-Input-Size": f"{info['width']}x{info['height']}", "X-Input-Mode": info["mode"],
                "X-Input-Conversions": "; ".join(info["conversions"]) or "none"})
            return Response(pngs[0], media_type="image/png", headers=headers)
        mode = {1: "L", 3: "RGB"}.get(pair.channels, "?")
        body = PurifyResponse.model_validate({
            "model": model_info(cfg, pair, False), "purification": pair.purification_for(profile),
            "profile": profile_receipt(pair, profile), **card, "timings": t,
            "images": [{"index": i, "seed": seeds[i], "width": pair.width, "height": pair.height, "mode": mode,
                        "png_base64": base64.b64encode(png).decode(), "input": d.info}
                       for i, (d, png) in enumerate(zip(images, pngs))]})
        return json_response(body, headers)

    return r
