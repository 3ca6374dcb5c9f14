"""What /classify and /purify share: the image options, seeds, the per-pair request tensors, metadata and headers.

No `from __future__ import annotations` here: FastAPI reads the dependency's annotations at runtime, and the
documentation of `seed` is built from the deployment's settings inside `image_options`.
"""

import logging
import time
from dataclasses import dataclass
from typing import Annotated, Callable, Literal, Optional

import numpy as np
from fastapi import Query, Response
from pydantic import BaseModel

from ..cards import MISMATCH, CardReader, bind_summary
from ..core.config import ENV_PREFIX, Settings
from ..core.errors import ApiError
from ..core.metrics import GatewayMetrics
from ..core.seeds import SeedPolicy
from ..images import Decoded
from ..schemas import SEED_MAX
from ..triton.models import DEFAULT_PROFILE, IMAGES, PROFILE, SEED, VOTES, PairInfo
from ..triton.pool import Outcome, TritonPool

log = logging.getLogger("service.cards")

PROBLEM_CODES = (400, 401, 413, 415, 422, 429, 502, 503, 504)
ERROR_TEXT = {
    400: "Triton rejected the input", 401: "missing or wrong X-API-Key", 413: "body or image too large",
    415: "not an accepted content type, image format or pixel mode", 422: "invalid parameter or image",
    429: "too many requests in flight (see Retry-After)", 502: "Triton failed on the request",
    503: "no Triton backend ready (see Retry-After)", 504: "Triton did not answer within the request timeout",
}


def problem_responses(*codes: int) -> dict:
    return {c: {"description": ERROR_TEXT.get(c, "error"),
                "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for c in codes}


def seed_doc(settings: Settings) -> str:
    if not settings.ALLOW_CLIENT_SEED:
        return (f"refused (422) by this gateway ({ENV_PREFIX}ALLOW_CLIENT_SEED=false): every image gets fresh "
                "noise")
    return ("image i reports seed + i; the same seed and image repeat the answer on this deployment (the noise "
            "is keyed by a server secret); omitted: the gateway draws one and reports it")


@dataclass(frozen=True)
class ImageOptions:
    """The query parameters every image route takes: the noise seed and how an upload is made to fit."""
    seed: Optional[int]
    convert: bool
    fit: str


def image_options(settings: Settings) -> Callable[..., ImageOptions]:
    """The dependency that parses ImageOptions; built per deployment because `seed`'s documentation says
    whether this gateway accepts client seeds."""
    async def options(  # async: a plain def dependency would run in the thread pool (api/deps.py)
        seed: Annotated[Optional[int], Query(ge=0, le=SEED_MAX, description=seed_doc(settings))] = None,
        convert: Annotated[bool, Query(description="convert mode and size to what the model takes; false: "
                                       "refuse (422) images that would need it")] = True,
        fit: Annotated[Literal["pad", "stretch"], Query(description="pad: shrink to fit keeping the aspect "
                                                        "ratio, centre on black; stretch: resize to exactly the "
                                                        "model size")] = "pad",
    ) -> ImageOptions:
        return ImageOptions(seed, convert, fit)
    return options


def check_seed_allowed(policy: SeedPolicy, seed: Optional[int]) -> None:
    if seed is not None and not policy.allow_client_seed:
        raise ApiError(422, "seed_refused", f"this gateway does not accept client seeds ({ENV_PREFIX}"
                       "ALLOW_CLIENT_SEED=false): every image gets fresh noise; send the request without `seed`")


def request_seeds(policy: SeedPolicy, seed: Optional[int], images: list[Decoded]) -> tuple[list[int], list[int]]:
    """(seeds to report, seeds for Triton): image i reports seed + i, its noise is keyed by the server secret
    and the image (service/app/core/seeds.py); without a seed the gateway draws one."""
    return policy.seeds(seed, [d.array for d in images])


def current_pair(pool: TritonPool) -> PairInfo:
    pair = pool.any_pair()
    if pair is None:
        reasons = "; ".join(f"{b.url}: {b.reason}" for b in pool.backends)
        raise pool.unavailable(f"no Triton backend is ready ({reasons})")
    return pair


PROFILE_DOC = ("a serving profile of the deployed purifier: named purification settings, each with its own "
               "robustness card (the receipt names the profile and that card); default: 'default'. Unknown: 422 "
               "listing the known ones")


def check_profile(pair: PairInfo, profile: Optional[str]) -> str:
    """The profile name (None -> "default") if the deployed purifier declares it; 422 listing them otherwise. Nothing
    reaches Triton for an unknown profile; a declared one whose card the served version refused is Triton's 4xx."""
    name = DEFAULT_PROFILE if profile is None else profile
    if name not in pair.profiles and not (name == DEFAULT_PROFILE and not pair.profiles):
        known = ", ".join(pair.profiles) or DEFAULT_PROFILE
        raise ApiError(422, "unknown_profile", f"unknown profile {name[:64]!r}; the deployed purifier (version "
                       f"{pair.version}) serves the profiles: {known}")
    return name


def profile_receipt(pair: PairInfo, profile: str) -> dict:
    return {"name": profile, "settings": pair.purification_for(profile)}


def check_limits(pair: PairInfo, settings: Settings, n: int, votes: int) -> None:
    if n > pair.max_batch:
        raise ApiError(422, "too_many_images", f"{n} images in one request; the deployed model takes at most "
                       f"{pair.max_batch}")
    max_votes = min(settings.MAX_VOTES, pair.max_votes)
    if not 1 <= votes <= max_votes:
        raise ApiError(422, "bad_parameter", f"votes must be in [1, {max_votes}], got {votes}")


def builder(images: list[Decoded], seeds: list[int], votes: int, settings: Settings, shape: tuple[int, int, int],
            profile: str = DEFAULT_PROFILE):
    """build(pair) for TritonPool.run: the purifier's inputs for the pair the chosen backend serves (PROFILE only
    for a profile other than "default", so a purifier without profiles serves the default as before)."""
    def build(pair: PairInfo):
        check_profile(pair, profile)
        if (pair.channels, pair.height, pair.width) != shape:
            raise ApiError(503, "triton_unavailable", "the deployed model changed its input shape while this "
                           "request was being read; retry", {"Retry-After": str(settings.RETRY_AFTER_S)})
        check_limits(pair, settings, len(images), votes)
        feeds = {IMAGES: np.stack([d.array for d in images]), SEED: np.array(seeds, dtype=np.int64)[:, None]}
        if votes > 1:
            feeds[VOTES] = np.full((len(images), 1), votes, dtype=np.int32)
        if profile != DEFAULT_PROFILE:
            feeds[PROFILE] = np.array([[profile.encode()]] * len(images), dtype=np.object_)
        return feeds, votes
    return build


def model_info(settings: Settings, pair: PairInfo, with_classifier: bool) -> dict:
    return {"name": settings.ENSEMBLE_MODEL if with_classifier else settings.PURIFIER_MODEL,
            "purifier_version": pair.version, "classifier_version": pair.version if with_classifier else None,
            "input_shape": [pair.channels, pair.height, pair.width],
            "class_names": list(pair.class_names) if pair.class_names else None}


def card_receipt(cards: CardReader, metrics: GatewayMetrics, endpoint: str, out: Outcome, profile: str,
                 rows: int) -> dict:
    """The receipt's `robustness` and `card_sha256`: the summary of the profile's card as the gateway reads it, shown
    only if it is the card the server checked at load (cards.bind_summary); a mismatch is counted and logged."""
    summary, served, binding = bind_summary(cards.summary(out.pair.version, profile), out.card_sha256, rows)
    if binding == MISMATCH:
        metrics.card_mismatch.labels(endpoint).inc()
        log.warning("%s: the card of purifier %d profile %r that the gateway read (sha256 %s) is not the one Triton "
                    "checked at load (%s): its figures are withheld from the receipt", endpoint, out.pair.version,
                    profile, summary["card_sha256"], ", ".join(summary["served_card_sha256"]) or "none")
    return {"robustness": summary, "card_sha256": served}


def timings(t0: float, triton_s: float, decode_s: float) -> dict:
    return {"total_ms": round((time.perf_counter() - t0) * 1000, 3), "triton_ms": round(triton_s * 1000, 3),
            "decode_ms": round(decode_s * 1000, 3)}


def version_headers(pair: PairInfo, with_classifier: bool, t: dict) -> dict[str, str]:
    h = {"X-Purifier-Version": str(pair.version),
         "Server-Timing": f"total;dur={t['total_ms']:.1f}, triton;dur={t['triton_ms']:.1f}, "
                          f"decode;dur={t['decode_ms']:.1f}"}
    if with_classifier:
        h["X-Classifier-Version"] = str(pair.version)
    return h


def json_response(body: BaseModel, headers: dict[str, str]) -> Response:
    """The validated response model serialised once by pydantic-core (what JSONResponse(model_dump()) did in two
    passes: Python objects, then the stdlib encoder)."""
    return Response(body.model_dump_json(), media_type="application/json", headers=headers)
