"""POST /classify: purify each image (purifier version N) and classify it (classifier version N)."""

import time
from typing import Annotated, Optional

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from ...core.config import Settings
from ...schemas import ClassifyResponse
from ...triton.models import AGREEMENT, LABEL, PROBS
from ..common import (PROFILE_DOC, ImageOptions, builder, card_receipt, check_profile, check_seed_allowed,
                      current_pair, image_options, json_response, model_info, problem_responses, profile_receipt,
                      request_seeds, timings, version_headers)
from ..deps import CardsDep, MetricsDep, PoolDep, SeedPolicyDep, SettingsDep, auth_dependencies
from ..uploads import read_images, request_body_openapi


def router(settings: Settings) -> APIRouter:
    r = APIRouter(tags=["inference"])

    @r.post("/classify", response_model=ClassifyResponse, openapi_extra=request_body_openapi(settings),
            dependencies=auth_dependencies(settings),
            responses=problem_responses(400, 401, 413, 415, 422, 429, 502, 503, 504),
            summary="Purify and classify one or several images")
    async def classify(
        request: Request, cfg: SettingsDep, pool: PoolDep, metrics: MetricsDep, cards: CardsDep,
        policy: SeedPolicyDep,
        opts: Annotated[ImageOptions, Depends(image_options(settings))],
        votes: Annotated[int, Query(ge=1, le=settings.MAX_VOTES, description="independent purifications per "
                                    "image; the label is their majority, `agreement` its share")] = 1,
        profile: Annotated[Optional[str], Query(max_length=64, description=PROFILE_DOC)] = None,
    ) -> Response:
        t0 = time.perf_counter()
        check_seed_allowed(policy, opts.seed)  # before any decoding or Triton call
        pair = current_pair(pool)
        profile = check_profile(pair, profile)  # 422 for an unknown one, before any decoding or Triton call
        shape = (pair.channels, pair.height, pair.width)
        images, decode_s = await read_images(request, cfg, shape, opts.convert, opts.fit)
        seeds, noise_seeds = request_seeds(policy, opts.seed, images)
        deadline = time.monotonic() + cfg.REQUEST_TIMEOUT_S
        out = await pool.run("classify", builder(images, noise_seeds, votes, cfg, shape, profile), deadline)
        pair = out.pair
        probs, labels, agree = out.outputs[PROBS], out.outputs[LABEL].reshape(-1), out.outputs[AGREEMENT].reshape(-1)
        names = pair.names_for(probs.shape[1])
        preds = []
        for i, d in enumerate(images):
            label = int(labels[i])
            preds.append({"index": i, "label": label, "class_name": names[label] if 0 <= label < len(names)
                          else str(label), "probabilities": {n: round(float(p), 6) for n, p in zip(names, probs[i])},
                          "agreement": round(float(agree[i]), 6) if votes > 1 else None, "seed": seeds[i],
                          "input": d.info})
        metrics.triton_duration.labels("/classify").observe(out.triton_s)
        metrics.images.labels("/classify").observe(len(images))
        metrics.votes.observe(votes)
        if votes > 1:
            for a in agree:
                metrics.agreement.observe(float(a))
        t = timings(t0, out.triton_s, decode_s)
        body = ClassifyResponse.model_validate({
            "model": model_info(cfg, pair, True), "purification": pair.purification_for(profile),
            "profile": profile_receipt(pair, profile), **card_receipt(cards, metrics, "/classify", out, profile,
                                                                     len(images)),
            "votes": votes, "predictions": preds, "timings": t})
        return json_response(body, version_headers(pair, True, t))

    return r
