"""Triton hosting: dbp.serving in-process, then a real tritonserver (python backend, ensemble) on free ports.

One server per module, on a temporary copy of model_repository/ with version 1 exported from the tiny
session checkpoints; the committed repository is never touched.
"""
from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from dbp import serving
from dbp.checkpoint import weights_sha256
from dbp.triton_server import (SHM_PREFIX, ServerConfig, TritonServer, TritonServerError, free_ports,
                               remove_stale_shm_regions)

ROOT = Path(__file__).resolve().parent.parent
tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402



def write_card(path: Path, purifier: Path, classifier: Path, passed: bool = True) -> Path:
    card = {"schema": "dbp.robustness_card/1",
            "model": {"purifier_sha256": weights_sha256(purifier), "classifier_sha256": weights_sha256(classifier)},
            "gate": {"passed": passed, "reasons": [] if passed else ["robust accuracy 0.10 < 0.30"]},
            "settings": [{"name": "tiny-test", "robust": {"acc": 0.5}}]}
    path.write_text(json.dumps(card))
    return path


def set_param(config: Path, key: str, value: str) -> None:
    text, n = re.subn(rf'(key: "{key}" value: {{ string_value: )"[^"]*"', rf'\1"{value}"', config.read_text())
    assert n == 1, f"{key} not in {config}"
    config.write_text(text)


# ---- dbp.serving without a server -----------------------------------------------------------------

def test_aggregate_votes_majority_agreement_and_ties():
    # image 0: votes 2,2,1 -> label 2, agreement 2/3; image 1: votes 0,3 tie, vote for 3 is more confident
    logits = np.full((5, 4), -5.0, np.float32)
    for row, (c, v) in enumerate([(2, 3.0), (2, 3.0), (1, 3.0), (0, 1.0), (3, 4.0)]):
        logits[row, c] = v
    out0 = serving.aggregate_votes(logits[:3], 3)
    assert out0["LABEL"].tolist() == [[2]] and out0["AGREEMENT"][0, 0] == pytest.approx(2 / 3)
    out1 = serving.aggregate_votes(logits[3:], 2)
    assert out1["LABEL"].tolist() == [[3]] and out1["AGREEMENT"][0, 0] == pytest.approx(0.5)
    assert np.allclose(out1["PROBS"].sum(1), 1) and out1["LOGITS"].shape == (1, 4)
    single = serving.aggregate_votes(logits, 1)
    assert single["LABEL"].ravel().tolist() == [2, 2, 1, 0, 3] and np.all(single["AGREEMENT"] == 1)
    with pytest.raises(ValueError):
        serving.aggregate_votes(logits, 2)


@pytest.mark.parametrize("x, votes, match", [
    (np.full((1, 1, 32, 32), np.nan, np.float32), 1, "NaN"),
    (np.full((1, 1, 32, 32), 1.2, np.float32), 1, r"\[0, 1\]"),
    (np.zeros((1, 3, 32, 32), np.float32), 1, r"\[B, 1, 32, 32\]"),
    (np.zeros((1, 1, 28, 28), np.float32), 1, r"\[B, 1, 32, 32\]"),
    (np.zeros((1, 1, 32, 32), np.float64), 1, "FP32"),
    (np.zeros((2, 32, 32), np.float32), 1, "IMAGES must be"),
    (np.zeros((1, 1, 32, 32), np.float32), 3, r"3\*1"),
])
def test_check_images_names_the_problem(x, votes, match):
    with pytest.raises(serving.RequestError, match=match):
        serving.check_images(x, (1, 32, 32), votes)


def test_check_images_clips_within_tolerance_and_votes_seeds():
    x = np.full((2, 1, 32, 32), 1.0005, np.float32)
    assert serving.check_images(x, (1, 32, 32)).max() == 1.0
    assert serving.check_votes(None, 2, 16) == 1 and serving.check_votes(np.array([[3], [3]]), 2, 16) == 3
    for bad, match in [(np.array([[0], [0]]), r"\[1, 16\]"), (np.array([[17], [17]]), r"\[1, 16\]"),
                       (np.array([[2], [3]]), "same"), (np.array([[2.0], [2.0]]), "integer"),
                       (np.array([[2]]), r"\[2, 1\]")]:
        with pytest.raises(serving.RequestError, match=match):
            serving.check_votes(bad, 2, 16)
    assert serving.check_seeds(np.array([[5], [6]]), 2) == [5, 6]
    with pytest.raises(serving.RequestError, match="SEED"):
        serving.check_seeds(np.array([[5]]), 2)


def test_parse_parameters():
    # the committed configs parse
    for model, cls in (("purifier", serving.PurifierSettings), ("classifier", serving.ClassifierSettings)):
        serving.parse_parameters(cls, _params(ROOT / "model_repository" / model / "config.pbtxt"))
    cfg = {"parameters": {"t_star": {"string_value": "50"}, "sampler": {"string_value": "ddpm"}}}
    s = serving.parse_parameters(serving.PurifierSettings, json.dumps(cfg))
    assert (s.t_star, s.sampler, s.num_inference_steps) == (50, "ddpm", 100)
    with pytest.raises(ValueError, match="unknown parameter"):
        serving.parse_parameters(serving.PurifierSettings, {"parameters": {"tstar": {"string_value": "5"}}})
    with pytest.raises(ValueError, match="sampler"):
        serving.parse_parameters(serving.PurifierSettings, {"parameters": {"sampler": {"string_value": "euler"}}})


# ---- a repository with version 1 --------------------------------------------------------------------

@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_diffusion_ckpt, tiny_classifier_ckpt) -> Path:
    import export
    tmp = tmp_path_factory.mktemp("triton")
    repo = tmp / "model_repository"
    shutil.copytree(ROOT / "model_repository", repo, ignore=shutil.ignore_patterns("[0-9]*", "__pycache__"))
    (repo / "purify_classify" / "1").mkdir(exist_ok=True)
    # DDPM so the reverse chain is stochastic too; t*=20 on a stride-20 grid = 2 UNet calls per request
    set_param(repo / "purifier" / "config.pbtxt", "sampler", "ddpm")
    set_param(repo / "purifier" / "config.pbtxt", "t_star", "20")
    set_param(repo / "purifier" / "config.pbtxt", "num_inference_steps", "50")
    set_param(repo / "purifier" / "config.pbtxt", "threads", "1")
    card = write_card(tmp / "card.json", tiny_diffusion_ckpt, tiny_classifier_ckpt)
    assert export.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, card, repo) == 1
    # as in a git checkout (no __pycache__): the launcher must write the .pyc before the server polls
    shutil.rmtree(repo / "purifier" / "1" / "__pycache__")
    return repo


def _params(config: Path) -> dict:
    """config.pbtxt `parameters` as Triton hands them to model.py."""
    pairs = re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', config.read_text())
    return {"parameters": {k: {"string_value": v} for k, v in pairs}}


@pytest.fixture(scope="module")
def services(repo):
    settings = serving.parse_parameters(serving.PurifierSettings, _params(repo / "purifier" / "config.pbtxt"))
    return (serving.PurifierService(repo / "purifier" / "1", settings),
            serving.ClassifierService(repo / "classifier" / "1"))


def test_service_rows_depend_only_on_their_seed(services):
    pur, _ = services
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    alone = pur([{"IMAGES": x[:1], "SEED": np.array([[7]])}])[0]["PURIFIED"]
    batched = pur([{"IMAGES": x[1:], "SEED": np.array([[1], [2]])},
                   {"IMAGES": x[:1], "SEED": np.array([[7]])}])
    # same noise whatever the batch; only float rounding of batched kernels may differ
    np.testing.assert_allclose(batched[1]["PURIFIED"], alone, atol=1e-5)
    assert np.abs(batched[0]["PURIFIED"][:1] - alone).max() > 1e-3


def test_service_batch_isolates_bad_request(services):
    pur, cls = services
    good = np.random.default_rng(1).random((2, 1, 32, 32), dtype=np.float32)
    bad = good.copy()
    bad[0, 0, 0, 0] = np.nan
    res = pur([{"IMAGES": good}, {"IMAGES": bad}, {"IMAGES": good, "VOTES": np.array([[2], [2]], np.int32)}])
    assert res[0]["PURIFIED"].shape == (2, 1, 32, 32)
    assert isinstance(res[1], serving.RequestError) and "NaN" in str(res[1])
    assert res[2]["PURIFIED"].shape == (2, 2, 32, 32)
    out = cls([{"IMAGES": res[2]["PURIFIED"], "VOTES": np.array([[2], [2]], np.int32)}, {"IMAGES": None}])
    assert out[0]["LABEL"].shape == (2, 1) and isinstance(out[1], serving.RequestError)


def test_version_without_passing_card_is_refused(repo, tmp_path):
    v = tmp_path / "1"
    shutil.copytree(repo / "classifier" / "1", v)
    card = json.loads((v / serving.CARD_FILE).read_text())
    card["gate"]["passed"] = False
    (v / serving.CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ValueError, match="gate did not pass"):
        serving.ClassifierService(v)
    (v / serving.CARD_FILE).unlink()
    with pytest.raises(ValueError, match="no robustness_card"):
        serving.ClassifierService(v)


# ---- the real server --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(repo):
    h, g, m = free_ports(3)
    srv = TritonServer(ServerConfig(repo=str(repo), http_port=h, grpc_port=g, metrics_port=m,
                                    run_dir=str(repo.parent / "run"), model_control_mode="poll", poll_secs=1,
                                    ready_timeout=240))
    srv.start()
    yield srv
    srv.stop()
    # exit code 1 only means unloading outlasted --exit-timeout-secs on a busy machine; what must hold is
    # that the server and its stubs are gone and left no shared memory behind
    assert not srv.is_alive() and not list(Path("/dev/shm").glob(srv.shm_prefix + "*"))


class Client:
    """The same calls over HTTP or gRPC; one connection per Client (tritonclient's are not thread-safe)."""

    def __init__(self, server: TritonServer, proto: str):
        self.mod = tritonclient_http if proto == "http" else tritonclient_grpc
        # generous timeout: the machine this runs on may be shared with training jobs
        self.c = (self.mod.InferenceServerClient(server.http_url, network_timeout=600.0) if proto == "http"
                  else self.mod.InferenceServerClient(server.grpc_url))

    def infer(self, model: str, version: str = "", **inputs: np.ndarray) -> dict[str, np.ndarray]:
        dt = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64",
              np.dtype(np.int32): "INT32"}
        ins = []
        for name, a in inputs.items():
            i = self.mod.InferInput(name, list(a.shape), dt[a.dtype])
            i.set_data_from_numpy(a)
            ins.append(i)
        r = self.c.infer(model, ins, model_version=version)
        outs = r.get_response()["outputs"] if self.mod is tritonclient_http else r.get_response().outputs
        return {(o["name"] if isinstance(o, dict) else o.name): r.as_numpy(o["name"] if isinstance(o, dict) else o.name)
                for o in outs}

    def close(self):
        self.c.close()


@pytest.fixture
def http(server):
    c = Client(server, "http")
    yield c
    c.close()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 32, 32), dtype=np.float32)


def seeds(*s: int) -> np.ndarray:
    return np.array(s, dtype=np.int64).reshape(-1, 1)


def votes(k: int, n: int) -> np.ndarray:
    return np.full((n, 1), k, np.int32)


def test_server_loads_all_models(server, http):
    index = {(m["name"], m["version"]): m["state"] for m in http.c.get_model_repository_index()}
    assert index == {("purifier", "1"): "READY", ("classifier", "1"): "READY", ("purify_classify", "1"): "READY"}
    time.sleep(2.5)  # > 2 poll intervals: nothing the stubs wrote may look like a new version to the poller
    log = server.log_path.read_text()
    assert log.count('"loading: purifier:1"') == 1 and log.count('"loading: classifier:1"') == 1, server.log_tail()


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_infer_all_three_models(server, services, proto):
    pur, cls = services
    c = Client(server, proto)
    try:
        x = images(3, seed=1)
        p = c.infer("purifier", IMAGES=x, SEED=seeds(1, 2, 3))["PURIFIED"]
        assert p.shape == x.shape and p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
        # the server runs exactly the in-process computation (same noise from the same seeds)
        np.testing.assert_allclose(p, pur([{"IMAGES": x, "SEED": seeds(1, 2, 3)}])[0]["PURIFIED"], atol=1e-5)

        out = c.infer("classifier", IMAGES=p)
        with torch.inference_mode():
            ref = cls.model(torch.from_numpy(p.copy())).numpy()
        np.testing.assert_allclose(out["LOGITS"], ref, atol=1e-4)
        np.testing.assert_allclose(out["PROBS"].sum(1), 1, atol=1e-5)
        assert out["LABEL"].ravel().tolist() == ref.argmax(1).tolist()

        ens = c.infer("purify_classify", IMAGES=x, SEED=seeds(1, 2, 3))
        assert set(ens) == {"LOGITS", "PROBS", "LABEL", "AGREEMENT"}
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


def test_bad_and_good_request_in_one_batch(server, http):
    """While a slow request occupies the instance, a bad and a good one queue up and share the next execute()."""
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
        time.sleep(0.15)
        res = list(pool.map(call, [dict(IMAGES=bad), dict(IMAGES=good)]))
        assert isinstance(slow.result(), dict)
    assert isinstance(res[0], InferenceServerException) and "NaN" in str(res[0])
    assert res[1]["PURIFIED"].shape == (1, 1, 32, 32)
    assert _batches(http, "purifier") - before == {8: 1, 2: 1}  # the slow one, then bad+good together


def test_new_version_is_picked_up_with_no_failed_request(server, repo, tiny_diffusion_ckpt, tiny_classifier_ckpt,
                                                          tmp_path, http):
    import export
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
        card = write_card(tmp_path / "card.json", tiny_diffusion_ckpt, tiny_classifier_ckpt)
        assert export.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, card, repo) == 2
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


# ---- launcher failure modes (no torch models: numpy-only toy repositories) ---------------------------

TOY_CONFIG = """name: "toy"
backend: "python"
max_batch_size: 4
input [ { name: "X", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""
TOY_MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
            "Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() + 1)]) for r in requests]
"""


def toy_repo(root: Path, model_py: str = TOY_MODEL) -> Path:
    (root / "toy" / "1").mkdir(parents=True)
    (root / "toy" / "config.pbtxt").write_text(TOY_CONFIG)
    (root / "toy" / "1" / "model.py").write_text(model_py)
    return root


def test_server_that_cannot_load_fails_loudly_with_log_tail(tmp_path):
    repo = toy_repo(tmp_path / "repo", "raise RuntimeError('toy model is broken on purpose')\n")
    h, g, m = free_ports(3)
    srv = TritonServer(ServerConfig(repo=str(repo), http_port=h, grpc_port=g, metrics_port=m,
                                    model_control_mode="none", ready_timeout=60, run_dir=str(tmp_path / "run")))
    with pytest.raises(TritonServerError, match="broken on purpose"):
        srv.start()
    assert not srv.is_alive()


def test_missing_version_is_a_clear_error(tmp_path):
    repo = toy_repo(tmp_path / "repo")
    shutil.rmtree(repo / "toy" / "1")
    with pytest.raises(TritonServerError, match="export"):
        TritonServer(ServerConfig(repo=str(repo))).start()


def test_stale_shm_regions_of_dead_servers_only_are_removed(tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    dead, live = "0123456789ab", "ba9876543210"
    (shm / f"{SHM_PREFIX}{dead}_x").write_bytes(b"")
    (shm / f"{SHM_PREFIX}{live}_y").write_bytes(b"")
    (shm / "triton_python_backend_shm_region_someone-else").write_bytes(b"")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"{SHM_PREFIX}{live}_y"])
    try:
        time.sleep(0.2)
        removed = remove_stale_shm_regions(shm)
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in removed] == [f"{SHM_PREFIX}{dead}_x"]
    assert sorted(p.name for p in shm.iterdir()) == sorted([f"{SHM_PREFIX}{live}_y",
                                                            "triton_python_backend_shm_region_someone-else"])


def test_cli_serves_until_interrupted(tmp_path):
    import signal
    import urllib.request
    repo = toy_repo(tmp_path / "repo")
    h, g, m = free_ports(3)
    proc = subprocess.Popen([sys.executable, "-m", "dbp.triton_server", "--repo", str(repo), "--http-port", str(h),
                             "--grpc-port", str(g), "--metrics-port", str(m), "--quiet",
                             "--run-dir", str(tmp_path / "run")],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # printed once ready
        assert "Triton ready" in line, line + proc.stderr.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{h}/v2/models/toy/ready", timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
