"""/classify in one call to the ensemble, without giving up the pinned pair (issue 21), on a real tritonserver and
real gateways: the answer is the pinned two-call answer bit for bit; a repository whose newest purifier has no
classifier of its version makes the gateway take the two pinned calls (the receipt names the pair that answered)
and count it, both when its probe sees the newer version and when the version arrives between two probes."""
from __future__ import annotations

import shutil
import time

import httpx
import numpy as np
import pytest

from helpers import Client, gateway_fallbacks, images, model_requests, running_triton, seeds, votes

pytest.importorskip("tritonclient.grpc")

SECRET = "onecall-test-seed-secret-" + "0" * 32


def classify(gw, png: bytes, **params):
    with gw.client() as c:
        r = c.post("/classify", files=[("images", ("a.png", png, "image/png"))] * 2, params={"seed": 11, **params})
    assert r.status_code == 200, r.text
    return r


def test_the_models_and_the_ensemble_answer_the_version_of_every_row(triton):
    c = Client(triton, "grpc")
    try:
        x = images(3, seed=4)
        p = c.infer("purifier", "1", IMAGES=x, SEED=seeds(5, 6, 7))
        assert p["VERSION"].dtype == np.int64 and p["VERSION"].tolist() == [[1]] * 3
        k = c.infer("classifier", "1", IMAGES=p["PURIFIED"])
        assert k["VERSION"].dtype == np.int64 and k["VERSION"].tolist() == [[1]] * 3
        e = c.infer("purify_classify", IMAGES=x, SEED=seeds(5, 6, 7), VOTES=votes(2, 3))
        assert e["PURIFIER_VERSION"].tolist() == e["CLASSIFIER_VERSION"].tolist() == [[1]] * 3
        assert "VERSION" not in e
        # the ensemble is the two pinned calls, bit for bit (same seeds, votes included)
        p2 = c.infer("purifier", "1", IMAGES=x, SEED=seeds(5, 6, 7), VOTES=votes(2, 3))
        k2 = c.infer("classifier", "1", IMAGES=p2["PURIFIED"], VOTES=votes(2, 3))
        for name in ("LOGITS", "PROBS", "LABEL", "AGREEMENT"):
            assert np.array_equal(e[name], k2[name]), name
    finally:
        c.close()


def test_one_call_answers_exactly_what_the_two_pinned_calls_answer(gateway_factory, triton, fashion_pngs):
    one = gateway_factory(seed_secret=SECRET)
    two = gateway_factory(seed_secret=SECRET, one_call="false")
    png = next(iter(fashion_pngs.values()))
    for params in ({}, {"votes": 3}):
        before = model_requests(triton, "purify_classify")
        a = classify(one, png, **params)
        assert model_requests(triton, "purify_classify") == before + 1  # one ensemble request, nothing else
        b = classify(two, png, **params)
        assert model_requests(triton, "purify_classify") == before + 1  # the pinned calls do not touch the ensemble
        ja, jb = a.json(), b.json()
        assert ja["predictions"] == jb["predictions"] and ja["model"] == jb["model"]
        assert ja["model"]["purifier_version"] == ja["model"]["classifier_version"] == 1
        assert a.headers["X-Purifier-Version"] == a.headers["X-Classifier-Version"] == "1"
    assert set(gateway_fallbacks(one).values()) == {0.0}  # every reason listed, none taken


@pytest.fixture
def uneven_repo(gateway_repo, tmp_path):
    """gateway_repo's version 1 pair: purifier/2 (a copy of purifier/1, its card bound to the same weights) is added
    by the test, with no classifier/2: the newest pair stays 1 while the ensemble runs purifier 2."""
    repo = tmp_path / "model_repository"
    shutil.copytree(gateway_repo, repo, ignore=shutil.ignore_patterns("__pycache__"))
    return repo


def wait_ready_version(triton, model: str, version: str, timeout: float = 300) -> None:
    c = Client(triton, "grpc")
    try:
        deadline = time.monotonic() + timeout
        while True:
            index = {(m["name"], m["version"]): m["state"]
                     for m in c.c.get_model_repository_index(as_json=True).get("models", [])}
            if index.get((model, version)) == "READY":
                return
            assert time.monotonic() < deadline, f"{model}/{version} not loaded: {index}\n{triton.log_tail()}"
            time.sleep(0.5)
    finally:
        c.close()


def test_a_newer_purifier_without_its_classifier_falls_back_to_the_pinned_pair(uneven_repo, tmp_path,
                                                                                 gateway_factory, fashion_pngs):
    png = next(iter(fashion_pngs.values()))
    with running_triton(uneven_repo, tmp_path / "run", ready_timeout=300) as srv:
        # a gateway whose probe saw only the pair 1 (and will not look again during the test)
        stale = gateway_factory(urls=[srv.grpc_url], seed_secret=SECRET, probe_interval_s=300,
                                model_repository=uneven_repo)
        ref = classify(stale, png).json()
        assert set(gateway_fallbacks(stale).values()) == {0.0}
        shutil.copytree(uneven_repo / "purifier" / "1", uneven_repo / "purifier" / "2")
        wait_ready_version(srv, "purifier", "2")
        # between two probes: the ensemble answers with purifier 2, the rows say so, the gateway asks the pair 1
        r = classify(stale, png)
        assert r.json()["model"]["purifier_version"] == r.json()["model"]["classifier_version"] == 1
        assert r.headers["X-Purifier-Version"] == r.headers["X-Classifier-Version"] == "1"
        assert r.json()["predictions"] == ref["predictions"]  # purifier/2 holds the same weights: same answer
        assert gateway_fallbacks(stale)["version_mismatch"] == 1 and sum(gateway_fallbacks(stale).values()) == 1
        # a gateway that probes now knows beforehand: no ensemble call at all
        fresh = gateway_factory(urls=[srv.grpc_url], seed_secret=SECRET, model_repository=uneven_repo)
        before = model_requests(srv, "purify_classify")
        r = classify(fresh, png)
        assert r.json()["model"]["purifier_version"] == r.json()["model"]["classifier_version"] == 1
        assert r.json()["robustness"] is not None and r.json()["predictions"] == ref["predictions"]
        assert model_requests(srv, "purify_classify") == before
        assert gateway_fallbacks(fresh)["not_newest"] == 1 and sum(gateway_fallbacks(fresh).values()) == 1
        # /purify was one call already: purifier/1, its VERSION checked
        with fresh.client() as c:
            assert c.post("/purify", files=[("images", ("a.png", png, "image/png"))],
                          params={"seed": 11}).headers["X-Purifier-Version"] == "1"
        for gw in (stale, fresh):
            gw.stop()
