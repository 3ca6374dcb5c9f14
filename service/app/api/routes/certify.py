"""POST /certify: a certified l_2 radius per image (randomized smoothing with the diffusion model as a one-shot
denoiser, Cohen et al. 2019 / Carlini et al. 2023), computed by the Triton model `certify` (dbp.certify.certify).

The limits (served sigmas, max_n, n0, batch) come from the deployed certify model's config through Triton, and a
request outside them is refused (422) before anything reaches Triton: a large n is a 4xx, never a timeout.
"""

import math
import time
from typing import Annotated, Optional

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from ...core.config import ENV_PREFIX, Settings
from ...core.errors import ApiError
from ...schemas import CertifyResponse
from ...triton.models import ALPHA, COUNT, COUNTS, IMAGES, LABEL, N, P_LOWER, RADIUS, SECONDS, SEED, SIGMA, CertifyInfo
from ..common import (ImageOptions, check_seed_allowed, current_pair, image_options, json_response, problem_responses,
                      request_seeds, timings)
from ..deps import MetricsDep, PoolDep, SeedPolicyDep, SettingsDep, auth_dependencies
from ..uploads import read_images, request_body_openapi

ABSTAIN = -1


def _served_sigma(sigma: float, sigmas: tuple[float, ...]) -> Optional[float]:
    return next((s for s in sigmas if abs(s - sigma) <= 1e-6), None)


def check_request(info: CertifyInfo, settings: Settings, n: int, sigma: float, alpha: float) -> float:
    """n, sigma, alpha against the deployed model's limits; returns the served sigma. Raises 422 otherwise."""
    limit = min(settings.CERTIFY_MAX_N, info.max_n)
    if not 1 <= n <= limit:
        raise ApiError(422, "bad_parameter", f"n must be in [1, {limit}] on this deployment (the certify model's "
                       f"max_n is {info.max_n}, {ENV_PREFIX}CERTIFY_MAX_N {settings.CERTIFY_MAX_N}), got {n}: the "
                       f"cost is linear in n0 + n ({info.n0} + n model calls per image)")
    served = _served_sigma(sigma, info.sigmas)
    if served is None:
        raise ApiError(422, "bad_parameter", f"sigma must be one of the served sigmas "
                       f"{', '.join(f'{s:g}' for s in info.sigmas)}, got {sigma:g}")
    if not (math.isfinite(alpha) and 0 < alpha < 0.5):
        raise ApiError(422, "bad_parameter", f"alpha must be in (0, 0.5), got {alpha:g}")
    return served


def check_budget(info: CertifyInfo, images: int, n: int) -> None:
    """At most max_batch images and max_samples = images x (n0 + n) per request: the model's cost bound, sized to
    the timeout, so a costly request is a 422 here rather than a 504 later."""
    if images > info.max_batch:
        raise ApiError(422, "too_many_images", f"{images} images in one request; the certify model takes at most "
                       f"{info.max_batch}")
    if info.max_samples and images * (info.n0 + n) > info.max_samples:
        fit = info.max_samples // (info.n0 + n)
        raise ApiError(422, "too_many_samples", f"{images} images x (n0 {info.n0} + n {n}) = "
                       f"{images * (info.n0 + n)} samples exceed the certify model's max_samples {info.max_samples} "
                       f"per request: send at most {fit} image{'' if fit == 1 else 's'} at n = {n}, or a smaller n")


def statement(class_name: str, certified: bool, radius: float, sigma: float, n: int, alpha: float) -> str:
    if not certified:
        return (f"no certificate: the smoothed classifier (sigma {sigma:g}, n {n}, alpha {alpha:g}) abstained "
                "(p_lower <= 1/2); nothing is claimed for this image")
    return (f"l_2 certificate: the smoothed classifier (sigma {sigma:g}, n {n}, alpha {alpha:g}) answers "
            f"'{class_name}' for every input within l_2 distance {radius:.4f} of this image (pixels in [0, 1]), "
            f"with probability >= {1 - alpha:g} over the noise drawn; no other threat model")


def router(settings: Settings) -> APIRouter:
    r = APIRouter(tags=["inference"])

    @r.post("/certify", response_model=CertifyResponse, openapi_extra=request_body_openapi(settings),
            dependencies=auth_dependencies(settings),
            responses=problem_responses(400, 401, 413, 415, 422, 429, 502, 503, 504),
            summary="Certified l_2 radius per image (randomized smoothing, one-shot diffusion denoiser)",
            description="CERTIFY of Cohen et al. (2019) on the smoothed classifier g(x) = argmax_c P(classifier("
                        "denoise(x + sigma delta)) = c): per image the certified class or 'abstain' and the l_2 "
                        "radius within which g's answer cannot change, with probability >= 1 - alpha over the "
                        "noise. l_2 only, at that radius; no other threat model. n above the deployment's limit, "
                        "a sigma it does not serve or alpha outside (0, 0.5) are refused (422) before any model "
                        "call. 503 when no Triton backend serves the certify model.")
    async def certify(
        request: Request, cfg: SettingsDep, pool: PoolDep, metrics: MetricsDep, policy: SeedPolicyDep,
        opts: Annotated[ImageOptions, Depends(image_options(settings))],
        n: Annotated[Optional[int], Query(ge=1, description="estimation samples per image (default "
                                          + (f"{settings.CERTIFY_N}" if settings.CERTIFY_N else "the certify model's n, "
                                             "the one its card was measured at") + ", or the limit if lower); at most "
                                          f"the certify model's max_n (and {ENV_PREFIX}CERTIFY_MAX_N = "
                                          f"{settings.CERTIFY_MAX_N}), and images x (n0 + n) at most its "
                                          "max_samples")] = None,
        sigma: Annotated[Optional[float], Query(gt=0, description="noise level, one of the certify model's sigmas "
                                                "(default: " + (f"{settings.CERTIFY_SIGMA:g}" if settings.CERTIFY_SIGMA
                                                                else "its first") + ")")] = None,
        alpha: Annotated[Optional[float], Query(gt=0, lt=0.5, description="probability that a certificate is "
                                                f"wrong (default {settings.CERTIFY_ALPHA:g})")] = None,
    ) -> Response:
        t0 = time.perf_counter()
        check_seed_allowed(policy, opts.seed)  # before any decoding or Triton call
        info = pool.any_certify()
        if info is None:
            raise pool.certify_unavailable()
        if n is None:  # a default never exceeds the limit
            n = min(cfg.CERTIFY_N or info.default_n or info.max_n, cfg.CERTIFY_MAX_N, info.max_n)
        alpha = cfg.CERTIFY_ALPHA if alpha is None else alpha
        sigma = (cfg.CERTIFY_SIGMA or info.sigmas[0]) if sigma is None else sigma
        sigma = check_request(info, cfg, n, sigma, alpha)
        pair = current_pair(pool)
        shape = (pair.channels, pair.height, pair.width)
        images, decode_s = await read_images(request, cfg, shape, opts.convert, opts.fit)
        check_budget(info, len(images), n)
        seeds, noise_seeds = request_seeds(policy, opts.seed, images)

        def build(p, c: CertifyInfo):
            if (p.channels, p.height, p.width) != shape:
                raise ApiError(503, "triton_unavailable", "the deployed model changed its input shape while this "
                               "request was being read; retry", {"Retry-After": str(cfg.RETRY_AFTER_S)})
            check_request(c, cfg, n, sigma, alpha)
            check_budget(c, len(images), n)
            b = len(images)
            return {IMAGES: np.stack([d.array for d in images]), SEED: np.array(noise_seeds, dtype=np.int64)[:, None],
                    N: np.full((b, 1), n, dtype=np.int32), SIGMA: np.full((b, 1), sigma, dtype=np.float32),
                    ALPHA: np.full((b, 1), alpha, dtype=np.float32)}

        out = await pool.run("certify", build, time.monotonic() + cfg.REQUEST_TIMEOUT_S)
        info, pair = out.certify, out.pair
        o = out.outputs
        labels, counts = o[LABEL].reshape(-1), o[COUNTS].reshape(len(images), -1)
        names = pair.names_for(counts.shape[1])
        certs = []
        for i, d in enumerate(images):
            label = int(labels[i])
            ok = label != ABSTAIN
            name = (names[label] if 0 <= label < len(names) else str(label)) if ok else "abstain"
            radius = float(o[RADIUS].reshape(-1)[i]) if ok else 0.0
            certs.append({"index": i, "label": label, "class_name": name, "certified": ok, "radius": round(radius, 6),
                          "p_lower": round(float(o[P_LOWER].reshape(-1)[i]), 6),
                          "count": int(o[COUNT].reshape(-1)[i]),
                          "counts": {nm: int(k) for nm, k in zip(names, counts[i]) if k},
                          "n": n, "n0": info.n0, "alpha": alpha, "sigma": sigma, "seed": seeds[i],
                          "seconds": round(float(o[SECONDS].reshape(-1)[i]), 4),
                          "certificate": statement(name, ok, radius, sigma, n, alpha), "input": d.info})
        metrics.triton_duration.labels("/certify").observe(out.triton_s)
        metrics.images.labels("/certify").observe(len(images))
        cards = request.app.state.certify_cards
        t = timings(t0, out.triton_s, decode_s)
        body = CertifyResponse.model_validate({
            "model": {"name": cfg.CERTIFY_MODEL, "version": info.version,
                      "classifier_version": info.classifier_version, "input_shape": list(shape),
                      "class_names": list(pair.class_names) if pair.class_names else None,
                      "sigmas": list(info.sigmas), "max_n": min(cfg.CERTIFY_MAX_N, info.max_n), "n0": info.n0},
            "receipt": {"sigma": sigma, "n": n, "n0": info.n0, "alpha": alpha,
                        "card": cards.summary(info.version, sigma)},
            "certificates": certs, "timings": t})
        return json_response(body, {"X-Certify-Version": str(info.version),
                                    "Server-Timing": f"total;dur={t['total_ms']:.1f}, triton;dur={t['triton_ms']:.1f}, "
                                                     f"decode;dur={t['decode_ms']:.1f}"})

    return r
