"""How TritonPool.run labels what happened to a /classify, with a scripted client instead of Triton (the real-Triton
counterparts are in test_gateway_profiles.py and test_gateway_onecall.py): an ensemble call refused as
INVALID_ARGUMENT is the fallback reason "rejected" (not "ensemble_error", which the alert counts), other ensemble
failures stay "ensemble_error", and a pinned call answering rows of another version is an "error" outcome (it
reached Triton), not "refused"."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")

from tritonclient.utils import InferenceServerException  # noqa: E402

from service.app.core.config import Settings  # noqa: E402
from service.app.core.errors import ApiError  # noqa: E402
from service.app.core.metrics import FALLBACK_REASONS, GatewayMetrics  # noqa: E402
from service.app.triton.models import PairInfo  # noqa: E402
from service.app.triton.pool import TritonPool  # noqa: E402

URL = "fake:8001"


class Result:
    def __init__(self, arrays):
        self.arrays = arrays

    def as_numpy(self, name):
        return self.arrays[name]


class ScriptedClient:
    """infer(model) answers script[model]: an exception to raise, or a function of the batch size."""

    def __init__(self, script):
        self.script, self.calls = script, []

    async def infer(self, model, inputs, model_version="", outputs=(), client_timeout=None):
        self.calls.append(model)
        answer = self.script[model]
        if isinstance(answer, Exception):
            raise answer
        return Result(answer(inputs[0].shape()[0]))


def pair() -> PairInfo:
    return PairInfo(version=1, channels=1, height=32, width=32, class_names=None, t_star=20, sampler="ddpm",
                    num_inference_steps=50, max_votes=4, max_batch=8,
                    dtypes={"IMAGES": "FP32", "SEED": "INT64", "VOTES": "INT64", "PURIFIED": "FP32"},
                    profiles={"default": {}}, versioned=frozenset({"purifier", "classifier"}))


def purifier(version):
    return lambda b: {"PURIFIED": np.zeros((b, 1, 32, 32), np.float32), "VERSION": np.full((b, 1), version)}


def classifier(b):
    return {"PROBS": np.full((b, 10), 0.1, np.float32), "LABEL": np.zeros((b, 1), np.int64),
            "AGREEMENT": np.ones((b, 1), np.float32), "VERSION": np.ones((b, 1), np.int64)}


def run_classify(script, one_call=True):
    metrics = GatewayMetrics()
    pool = TritonPool(Settings(TRITON_URLS=[URL], ONE_CALL=one_call), metrics)
    b = pool.backends[0]
    b.client, b.ready, b.pair, b.one_call = ScriptedClient(script), True, pair(), ""
    build = lambda p: ({"IMAGES": np.zeros((2, 1, 32, 32), np.float32)}, 1)  # noqa: E731
    err = None
    try:
        asyncio.run(pool.run("classify", build, time.monotonic() + 30))
    except ApiError as e:
        err = e
    fallbacks = {r: metrics.registry.get_sample_value("dbp_gateway_classify_fallbacks_total", {"reason": r})
                 for r in FALLBACK_REASONS}
    outcomes = {o: metrics.registry.get_sample_value("dbp_gateway_triton_requests_total", {"url": URL, "outcome": o})
                for o in ("ok", "rejected", "error", "refused")}
    return err, fallbacks, outcomes, b.client.calls


def test_an_ensemble_invalid_argument_is_a_rejected_fallback_and_the_pinned_calls_answer_the_4xx():
    no_card = InferenceServerException("profile 'nocard' has no valid card", status="StatusCode.INVALID_ARGUMENT")
    err, fb, out, calls = run_classify({"purify_classify": no_card, "purifier": no_card})
    assert err is not None and err.status == 422 and err.reason == "profile_not_served"
    assert calls == ["purify_classify", "purifier"]  # still falls back: the pinned calls give the precise error
    assert fb["rejected"] == 1 and sum(fb.values()) == 1
    assert out["rejected"] == 1 and out["error"] in (None, 0)


def test_an_older_ensemble_refusing_profile_still_answers_through_the_pinned_calls():
    old = InferenceServerException("unexpected inference input 'PROFILE'", status="StatusCode.INVALID_ARGUMENT")
    err, fb, out, calls = run_classify({"purify_classify": old, "purifier": purifier(1), "classifier": classifier})
    assert err is None and calls == ["purify_classify", "purifier", "classifier"]
    assert fb["rejected"] == 1 and sum(fb.values()) == 1 and out["ok"] == 1


def test_other_ensemble_failures_stay_ensemble_error():
    boom = InferenceServerException("stub died", status="StatusCode.INTERNAL")
    err, fb, out, calls = run_classify({"purify_classify": boom, "purifier": purifier(1), "classifier": classifier})
    assert err is None and fb["ensemble_error"] == 1 and sum(fb.values()) == 1 and out["ok"] == 1


def test_a_pinned_call_answering_another_version_is_an_error_outcome_not_refused():
    err, fb, out, calls = run_classify({"purifier": purifier(2), "classifier": classifier}, one_call=False)
    assert err is not None and err.status == 502 and "version" in err.detail
    assert calls == ["purifier"]
    assert out["error"] == 1 and out["refused"] in (None, 0)
