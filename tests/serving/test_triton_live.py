"""A real tritonserver (python backend, ensemble) on free ports serving the tiny models.

One server per module, on a temporary model_repository with version 1 exported from the tiny session
checkpoints; the committed repository is never touched. In-process counterparts: test_services.py.
"""
from __future__ import annotations

import collections
import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import Client, images, running_triton, seeds, served_purification, votes, write_card
from dbp import publish, repository
from dbp.serving.contract import CLASSIFIER_OUTPUTS, ENSEMBLE_OUTPUTS, PURIFIER_OUTPUTS

pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def server(repo):
    with running_triton(repo, repo.parent / "run", model_control_mode="poll", poll_secs=1, ready_timeout=240) as srv:
        yield srv
    # exit code 1 only means unloading outlasted --exit-timeout-secs on a busy machine; what must hold is
    # that the server and its stubs are gone and left no shared memory behind
    assert not srv.is_alive() and not list(Path("/dev/shm").glob(srv.shm_prefix + "*"))


@pytest.fixture
def http(server):
    c = Client(server, "http")
    yield c
    c.close()


def test_server_loads_all_models(server, http):
    index = {(m["name"], m["version"]): m["state"] for m in http.c.get_model_repository_index()}
    assert index == {("purifier", "1"): "READY", ("classifier", "1"): "READY", ("purify_classify", "1"): "READY"}
    time.sleep(2.5)  # > 2 poll intervals: nothing the stubs wrote may look like a new version to the poller
    log = server.log_path.read_text()
    assert log.count('"loading: purifier:1"') == 1 and log.count('"loading: classifier:1"') == 1, server.log_tail()


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_infer_all_three_models(server, services, proto, repo):
    pur, cls = services
    c = Client(server, proto)
    try:
        x = images(3, seed=1)
        pout = c.infer("purifier", IMAGES=x, SEED=seeds(1, 2, 3))
        p = pout["PURIFIED"]
        # every model answers which version computed each row (INT64 [B, 1])
        assert set(pout) == set(PURIFIER_OUTPUTS) and pout["VERSION"].dtype == np.int64
        assert pout["VERSION"].tolist() == [[1]] * 3
        # and which card it checked at load: the sha256 of the card file's bytes, on every row, also via the ensemble
        card_sha = hashlib.sha256(repository.card_path(repository.version_dir(repo, "purifier", 1)).read_bytes())
        assert pout["CARD_SHA256"].tolist() == [[card_sha.hexdigest().encode()]] * 3
        assert p.shape == x.shape and p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
        # the server runs exactly the in-process computation (same noise from the same seeds)
        np.testing.assert_allclose(p, pur([{"IMAGES": x, "SEED": seeds(1, 2, 3)}])[0]["PURIFIED"], atol=1e-5)

        out = c.infer("classifier", IMAGES=p)
        assert set(out) == set(CLASSIFIER_OUTPUTS) and out["VERSION"].tolist() == [[1]] * 3
        with torch.inference_mode():
            ref = cls.model(torch.from_numpy(p.copy())).numpy()
        np.testing.assert_allclose(out["LOGITS"], ref, atol=1e-4)
        np.testing.assert_allclose(out["PROBS"].sum(1), 1, atol=1e-5)
        assert out["LABEL"].ravel().tolist() == ref.argmax(1).tolist()

        ens = c.infer("purify_classify", IMAGES=x, SEED=seeds(1, 2, 3))
        assert set(ens) == set(ENSEMBLE_OUTPUTS)
        assert ens["PURIFIER_VERSION"].tolist() == ens["CLASSIFIER_VERSION"].tolist() == [[1]] * 3
        assert ens["PURIFIER_CARD_SHA256"].tolist() == pout["CARD_SHA256"].tolist()
        np.testing.assert_allclose(ens["LOGITS"], out["LOGITS"], atol=1e-4)  # purifier then classifier
        assert np.all(ens["AGREEMENT"] == 1)
    finally:
        c.close()


def test_seed_makes_a_request_reproducible(server, http):
    x = images(2, seed=2)
    a = http.infer("purifier", IMAGES=x, SEED=seeds(5, 6))["PURIFIED"]
    b = http.infer("purifier", IMAGES=x, SEED=seeds(5, 6))["PURIFIED"]
    other = http.infer("purifier", IMAGES=x, SEED=seeds(5, 7))["PURIFIED"]
    unseeded = [http.infer("purifier", IMAGES=x)["PURIFIED"] for _ in range(2)]
    assert np.array_equal(a, b)
    assert np.array_equal(a[0], other[0]) and np.abs(a[1] - other[1]).max() > 1e-3  # rows are independent
    assert np.abs(unseeded[0] - unseeded[1]).max() > 1e-3


def test_votes_give_majority_label_and_agreement(server, http):
    x, k = images(3, seed=3), 5
    p = http.infer("purifier", IMAGES=x, SEED=seeds(1, 2, 3), VOTES=votes(k, 3))["PURIFIED"]
    assert p.shape == (3, k, 32, 32)
    assert np.abs(p[:, 0] - p[:, 1]).max() > 1e-3  # the k purifications are independent draws
    ens = http.infer("purify_classify", IMAGES=x, SEED=seeds(1, 2, 3), VOTES=votes(k, 3))
    assert ens["LABEL"].shape == (3, 1) and ens["AGREEMENT"].shape == (3, 1)
    agree = ens["AGREEMENT"].ravel()
    assert np.all((agree > 0) & (agree <= 1)) and np.allclose(agree * k, np.round(agree * k), atol=1e-4)
    # the ensemble's vote aggregation equals classifying the k purifications by hand
    per_vote = http.infer("classifier", IMAGES=np.ascontiguousarray(p.reshape(3 * k, 1, 32, 32)))["LABEL"].reshape(3, k)
    for b in range(3):
        counts = np.bincount(per_vote[b], minlength=10)
        assert counts[ens["LABEL"][b, 0]] == counts.max()
        assert agree[b] == pytest.approx(counts.max() / k)


BAD = {
    "nan": (dict(IMAGES=np.full((1, 1, 32, 32), np.nan, np.float32)), "NaN"),
    "out_of_range": (dict(IMAGES=np.full((1, 1, 32, 32), 1.5, np.float32)), "[0, 1]"),
    "channels": (dict(IMAGES=np.zeros((1, 3, 32, 32), np.float32)), "[B, 1, 32, 32]"),
    "size": (dict(IMAGES=np.zeros((1, 1, 16, 16), np.float32)), "[B, 1, 32, 32]"),
    "rank": (dict(IMAGES=np.zeros((1, 32, 32), np.float32)), "IMAGES"),
    "dtype": (dict(IMAGES=np.zeros((1, 1, 32, 32), np.float64)), "FP64"),
    "votes_zero": (dict(IMAGES=np.zeros((1, 1, 32, 32), np.float32), VOTES=votes(0, 1)), "VOTES"),
    "votes_too_many": (dict(IMAGES=np.zeros((1, 1, 32, 32), np.float32), VOTES=votes(99, 1)), "VOTES"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_request_gets_an_error_and_server_keeps_serving(server, http, case):
    inputs, msg = BAD[case]
    for model in ("purify_classify", "purifier"):
        with pytest.raises(InferenceServerException) as e:
            http.infer(model, **inputs)
        assert msg in str(e.value) and "400" in str(e.value)
    assert http.infer("purify_classify", IMAGES=images(1))["LABEL"].shape == (1, 1)
    assert server.is_alive()


def _batches(c: Client, model: str) -> collections.Counter:
    """How many execute() calls ran each batch size (rows summed over the requests of a call)."""
    stats = c.c.get_inference_statistics(model)["model_stats"]
    return collections.Counter({int(b["batch_size"]): int(b["compute_infer"]["count"])
                                for m in stats for b in m.get("batch_stats", [])})


def _batches_since(c: Client, model: str, before: collections.Counter, expect: dict,
                   timeout: float = 10.0) -> collections.Counter:
    """The batches run since `before`, read until they equal `expect` or `timeout` passes: the backend reports
    an execute()'s statistics after its responses are sent, so a client can hold its answer before the count
    moves (seen in a fresh-clone run under load, 2026-12-06)."""
    deadline = time.monotonic() + timeout
    while True:
        got = _batches(c, model) - before
        if got == expect or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_bad_and_good_request_in_one_batch(server, http):
    """While a slow request occupies the instance, a bad and a good one queue up and share the next execute().

    The wait before sending them must cover the slow request's way into execute() (client, transfer, the
    20 ms batching delay), which a loaded machine stretches, and stay below its execution (~2 s here, and
    longer under load): 0.5 s, where 0.15 s left little room on the side that load eats into.
    Checked by mutation of dbp/serving/triton_glue.py (2026-12-06): one bad request failing its whole
    execute() fails."""
    before = _batches(http, "purifier")
    good, bad = images(1, seed=4), images(1, seed=4)
    bad[0, 0, 5, 5] = np.nan

    def call(inputs):
        c = Client(server, "http")
        try:
            return c.infer("purifier", **inputs)
        except InferenceServerException as e:
            return e
        finally:
            c.close()

    with ThreadPoolExecutor(3) as pool:
        slow = pool.submit(call, dict(IMAGES=images(8), VOTES=votes(16, 8)))
        time.sleep(0.5)
        res = list(pool.map(call, [dict(IMAGES=bad), dict(IMAGES=good)]))
        assert isinstance(slow.result(), dict)
    assert isinstance(res[0], InferenceServerException) and "NaN" in str(res[0])
    assert res[1]["PURIFIED"].shape == (1, 1, 32, 32)
    assert _batches_since(http, "purifier", before, {8: 1, 2: 1}) == {8: 1, 2: 1}  # the slow one, then bad+good


def test_new_version_is_picked_up_with_no_failed_request(server, repo, tiny_diffusion_ckpt, tiny_classifier_ckpt,
                                                          tmp_path, http):
    stop, results = threading.Event(), []

    def traffic(proto):
        c = Client(server, proto)
        try:
            while not stop.is_set():
                try:
                    c.infer("purify_classify", IMAGES=images(2), VOTES=votes(2, 2))
                    results.append("ok")
                    time.sleep(0.05)
                except Exception as e:  # noqa: BLE001 - any failure is what this test looks for
                    results.append(repr(e))
        finally:
            c.close()

    threads = [threading.Thread(target=traffic, args=(p,)) for p in ("http", "grpc")]
    for t in threads:
        t.start()
    try:
        card = write_card(tmp_path / "card.json", tiny_diffusion_ckpt, tiny_classifier_ckpt,
                          purification=served_purification(repo))
        assert publish.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, card, repo) == 2
        deadline = time.monotonic() + 300  # two torch stubs starting on a possibly busy 2-core machine
        while True:
            index = {(m["name"], m["version"]): m["state"] for m in http.c.get_model_repository_index()}
            if index.get(("purifier", "2")) == "READY" and index.get(("classifier", "2")) == "READY":
                break
            assert time.monotonic() < deadline, f"version 2 not loaded: {index}\n{server.log_tail()}"
            time.sleep(0.5)
        n_at_swap = len(results)
        time.sleep(2.5)  # > 2 poll intervals
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failures = [r for r in results if r != "ok"]
    assert not failures, failures[:3]
    assert len(results) > n_at_swap > 0
    log = server.log_path.read_text()
    assert log.count('"loading: purifier:2"') == 1, server.log_tail()  # loaded once, not reloaded after
    # version 1 stays loaded (latest 2); requests now reach version 2
    assert index[("purifier", "1")] == "READY"
    assert _stats_version(http, "purifier", "2") > 0
    assert http.infer("purifier", version="2", IMAGES=images(1))["PURIFIED"].shape == (1, 1, 32, 32)


def _stats_version(c: Client, model: str, version: str) -> int:
    s = c.c.get_inference_statistics(model, version)["model_stats"]
    return sum(int(m["inference_stats"]["success"]["count"]) for m in s)
