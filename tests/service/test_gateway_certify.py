"""POST /certify and the Triton model `certify` (randomized smoothing, dbp.certify), against a real tritonserver and a
real gateway (issue 23 item 3).

The repository is built here: the committed version pair 2 (the purifier on the torch engine, so no ONNX parity check
at load), and certify/1 whose denoiser is model_repository/purifier/1/weights (the real fine-tuned denoiser is not
committed yet) with a small card generated for it, bound with dbp.checkpoint.weights_sha256 (the helper
experiments.certify.card.binding and dbp.repository use). Cheap settings: n0 = 8, max_n = 64, two 28x28 Fashion-MNIST
test images padded to 32x32.

Mutation checks done by hand when this was written (each made the named test fail):
- test_served_certificate_equals_in_process: the gateway sending the client's seed + i to Triton instead of the
  HMAC-derived seed (service/app/api/routes/certify.py `noise_seeds` -> `seeds`): the counts differ at sigma 0.5.
- test_limits_refused_before_triton: check_request's `n <= limit` removed: n = 65 reached Triton (400 from the
  model, and the Triton request counter moved).
- test_card_bound_to_other_weights_refused: repository.check_certify_version comparing only the denoiser hash.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dbp import repository
from dbp.checkpoint import weights_sha256
from gateway_testing import ROOT, Gateway
from helpers import copy_repo_configs, running_triton

COMMITTED = ROOT / "model_repository"
SECRET = "certify-test-secret-0123456789abcdef0123456789"
N0, MAX_N = 8, 64
DEFAULT_N = 24  # the model's `n` parameter: the default when a request names none
MAX_SAMPLES = 2 * (N0 + 48)  # two images at n = 48 fit exactly; at n = 49 they are refused
IMAGES = ("fashion-test-0000-ankle-boot.png", "fashion-test-0013-dress.png")


def write_certify_card(version: Path, classifier_weights: Path, *, denoiser_sha: str | None = None,
                       classifier_sha: str | None = None) -> dict:
    """A small certification card (the fields experiments/certify/card.py writes that serving reads), bound to the
    version's weights and `classifier_weights` unless other hashes are given."""
    card = {"schema": "certify-card/1",
            "claim": "an l_2 certificate at the stated radius for the smoothed classifier at that sigma, n and alpha; "
                     "no other threat",
            "config": {"n0": N0, "n": 32, "alpha": 0.001},
            "binding": {"unet_sha256": denoiser_sha or weights_sha256(version / repository.WEIGHTS_DIR),
                        "classifier_sha256": classifier_sha or weights_sha256(classifier_weights),
                        "images": "test card: no images measured", "n0": N0, "n": 32, "alpha": 0.001, "seed": 0},
            "sigmas": [{"sigma": 0.25, "images": 4, "abstain": 1, "certified_accuracy": {
                "0.0": {"acc": 0.75, "ci95": [0.3, 0.95], "k": 3}, "0.25": {"acc": 0.5, "ci95": [0.15, 0.85], "k": 2}}}]}
    (version / repository.CERTIFY_CARD_FILE).write_text(json.dumps(card))
    return card


def certify_repo(root: Path) -> Path:
    repo = copy_repo_configs(root / "model_repository")
    for role in ("purifier", "classifier"):
        shutil.copytree(COMMITTED / role / "2", repo / role / "2", ignore=shutil.ignore_patterns("__pycache__"))
    repository.set_parameter(repo / "purifier" / repository.CONFIG_FILE, "engine", "torch")
    (repo / "purify_classify" / "1").mkdir(exist_ok=True)
    cfg = repo / repository.CERTIFY_MODEL / repository.CONFIG_FILE
    for key, value in (("max_n", MAX_N), ("n0", N0), ("n", DEFAULT_N), ("max_samples", MAX_SAMPLES),
                       ("classifier_version", 2), ("max_rows", 72)):
        repository.set_parameter(cfg, key, value)
    v = repo / repository.CERTIFY_MODEL / "1"
    v.mkdir()
    shutil.copy2(repo / repository.CERTIFY_MODEL / repository.MODEL_FILE, v / repository.MODEL_FILE)
    shutil.copytree(COMMITTED / "purifier" / "1" / repository.WEIGHTS_DIR, v / repository.WEIGHTS_DIR)
    write_certify_card(v, repo / "classifier" / "2" / repository.WEIGHTS_DIR)
    return repo


@pytest.fixture(scope="module")
def cert_repo(tmp_path_factory) -> Path:
    return certify_repo(tmp_path_factory.mktemp("certify-repo"))


@pytest.fixture(scope="module")
def cert_triton(cert_repo, tmp_path_factory):
    # explicit control: test_card_bound_to_other_weights_refused reloads certify by hand
    with running_triton(cert_repo, tmp_path_factory.mktemp("certify-triton"), ready_timeout=300,
                        model_control_mode="explicit", load_models=("*",)) as srv:
        yield srv


def start_gateway(triton, **settings) -> Gateway:
    env = {"DBP_GATEWAY_TRITON_URLS": triton.grpc_url, "DBP_GATEWAY_PROBE_INTERVAL_S": "0.5",
           "DBP_GATEWAY_REQUEST_TIMEOUT_S": "120", "DBP_GATEWAY_SEED_SECRET": SECRET}
    env.update({f"DBP_GATEWAY_{k.upper()}": str(v) for k, v in settings.items()})
    gw = Gateway(env).start()
    try:
        gw.wait_ready()
    except BaseException:
        gw.stop()
        raise
    return gw


@pytest.fixture(scope="module")
def cert_gateway(cert_triton, cert_repo):
    gw = start_gateway(cert_triton, model_repository=cert_repo)
    yield gw
    gw.stop()


def wait_certify(client, timeout: float = 30.0):
    """The gateway's probe finds the certify model within a second or two of start."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        r = client.post("/certify?n=1", files=[])
        if r.status_code != 503 or time.monotonic() > deadline:
            return
        time.sleep(0.3)


def post_certify(client, pngs: dict, query: str):
    files = [("images", (name, pngs[name], "image/png")) for name in IMAGES]
    return client.post(f"/certify?{query}", files=files, timeout=300)


def in_process(repo: Path, pngs: dict, sigma: float, n: int, alpha: float, client_seed: int) -> list:
    """dbp.certify.certify on the tensors the gateway sends, with the noise seeds it derives (service seeds.py)."""
    import torch

    from dbp.certify import SmoothingConfig, certify, smoothed_base
    from dbp.models import load_classifier, load_unet
    from service.app.core.seeds import derive_seed, image_digest
    from service.app.images import decode

    model = smoothed_base(load_classifier(repo / "classifier" / "2" / "weights"), sigma,
                          load_unet(repo / "certify" / "1" / "weights"))
    cfg = SmoothingConfig(sigma=sigma, n0=N0, n=n, alpha=alpha, max_rows=72)
    out = []
    for i, name in enumerate(IMAGES):
        x = decode(name, pngs[name], (1, 32, 32), 1 << 22, True, "pad").array
        seed = derive_seed(SECRET.encode(), client_seed + i, image_digest(x))
        out.append(certify(model, torch.from_numpy(x), cfg, torch.Generator().manual_seed(seed)))
    return out


@pytest.mark.parametrize("sigma", [0.25, 0.5])
def test_served_certificate_equals_in_process(cert_gateway, cert_repo, fashion_pngs, sigma):
    """(a) The served certificate is dbp.certify.certify's with the same weights and the noise seed the gateway
    derives: label, radius, p_lower and every class count. At sigma 0.5 the purifier-1 denoiser is poor, so the
    counts spread over classes and depend on the seed (a wrong seed shows)."""
    n, alpha, seed = 48, 0.001, 7
    with cert_gateway.client() as c:
        wait_certify(c)
        r = post_certify(c, fashion_pngs, f"n={n}&sigma={sigma}&alpha={alpha}&seed={seed}")
        assert r.status_code == 200, r.text
        body = r.json()
    ref = in_process(cert_repo, fashion_pngs, sigma, n, alpha, seed)
    names = body["model"]["class_names"]
    assert body["model"]["n0"] == N0 and body["model"]["max_n"] == MAX_N and body["model"]["classifier_version"] == 2
    for got, want in zip(body["certificates"], ref):
        assert got["label"] == want.label
        assert got["class_name"] == ("abstain" if want.label == -1 else names[want.label])
        assert got["radius"] == pytest.approx(want.radius, abs=1e-5)
        assert got["p_lower"] == pytest.approx(want.p_a_lower, abs=1e-5)
        assert got["count"] == want.count_a
        assert got["counts"] == {names[k]: c for k, c in enumerate(want.counts) if c}
        assert (got["n"], got["n0"], got["alpha"], got["sigma"]) == (n, N0, alpha, sigma)
        assert got["seconds"] > 0
    assert [c["seed"] for c in body["certificates"]] == [seed, seed + 1]


def test_receipt_states_l2_certificate(cert_gateway, fashion_pngs):
    """(d) The receipt: an l_2 certificate at the returned radius for this smoothed classifier (sigma, n, alpha), no
    other threat model; the card's certified accuracy at the served sigma."""
    with cert_gateway.client() as c:
        wait_certify(c)
        body = post_certify(c, fashion_pngs, "n=32&sigma=0.25&seed=3").json()
    rec = body["receipt"]
    assert rec["certificate"] == "l_2"
    assert "l_2" in rec["statement"] and "no other threat model" in rec["statement"]
    assert any("l_inf" in s for s in rec["not_claimed"])
    assert (rec["sigma"], rec["n"], rec["n0"], rec["alpha"]) == (0.25, 32, N0, 0.001)  # alpha: the default
    card = rec["card"]
    assert card["sigma"] == 0.25 and card["n"] == 32
    assert [(a["radius"], a["accuracy"]) for a in card["certified_accuracy"]] == [(0.0, 0.75), (0.25, 0.5)]
    for cert in body["certificates"]:
        if cert["certified"]:
            assert cert["certificate"].startswith("l_2 certificate")
            assert f"{cert['radius']:.4f}" in cert["certificate"] and "sigma 0.25, n 32, alpha 0.001" in \
                cert["certificate"] and "no other threat model" in cert["certificate"]
        else:
            assert cert["class_name"] == "abstain" and cert["radius"] == 0 and "no certificate" in cert["certificate"]


def test_limits_refused_before_triton(cert_gateway, fashion_pngs):
    """(b) n above max_n, a sigma not served, alpha outside (0, 0.5), images x (n0 + n) above max_samples: 422 with a
    message, and no Triton call; without n, the model's default n. (Mutation-checked 2026-12-06: check_budget's
    max_samples test removed -> n=49 reached Triton.)"""
    def triton_calls(gw):
        return sum(v for k, v in gw.metrics().items() if k.startswith("dbp_gateway_triton_requests_total"))

    with cert_gateway.client() as c:
        wait_certify(c)
        before = triton_calls(cert_gateway)
        for query, words in ((f"n={MAX_N + 1}", [f"n must be in [1, {MAX_N}]", f"got {MAX_N + 1}"]),
                             ("n=1000000", ["n must be in", "max_n is 64"]),
                             ("sigma=0.3", ["sigma must be one of the served sigmas 0.25, 0.5", "got 0.3"]),
                             ("alpha=0.6", ["alpha"]), ("alpha=0", ["alpha"]),
                             # within max_n, but 2 x (8 + 49) samples exceed max_samples: refused, not timed out
                             ("n=49", [f"2 images x (n0 {N0} + n 49) = 114 samples exceed", f"{MAX_SAMPLES}",
                                       "send at most 1 image at n = 49"])):
            r = post_certify(c, fashion_pngs, query)
            assert r.status_code == 422, (query, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            for w in words:
                assert w in r.json()["detail"], (query, r.json()["detail"])
        assert triton_calls(cert_gateway) == before
        r = post_certify(c, fashion_pngs, "")  # no n: the model's n (its card's)
        assert r.status_code == 200, r.text
        assert r.json()["receipt"]["n"] == DEFAULT_N and {d["n"] for d in r.json()["certificates"]} == {DEFAULT_N}
        doc = c.get("/openapi.json").json()["paths"]["/certify"]["post"]
        assert {p["name"] for p in doc["parameters"]} >= {"n", "sigma", "alpha", "seed"}
        assert "503" in doc["responses"] and "422" in doc["responses"]


def test_absent_certify_model_is_503_rest_served(cert_triton, fashion_pngs):
    """A gateway whose certify model Triton does not have: /certify 503 naming it, /classify still 200."""
    gw = start_gateway(cert_triton, certify_model="no_such_model")
    try:
        with gw.client() as c:
            r = post_certify(c, fashion_pngs, "n=8")
            assert r.status_code == 503, r.text
            assert "no_such_model" in r.json()["detail"] and "not affected" in r.json()["detail"]
            r = c.post("/classify", files=[("images", (IMAGES[0], fashion_pngs[IMAGES[0]], "image/png"))])
            assert r.status_code == 200, r.text
    finally:
        gw.stop()


def test_card_bound_to_other_weights_refused(cert_repo, cert_triton, cert_gateway, fashion_pngs, tmp_path):
    """(c) A certify card bound to other weights: the service refuses to start (in-process, both hashes), Triton
    refuses to load that version, and the rest of the server keeps serving."""
    import tritonclient.grpc
    from tritonclient.utils import InferenceServerException

    from dbp.serving.contract import CertifySettings
    from dbp.serving.services import CertifyService

    v = cert_repo / "certify" / "1"
    good = (v / repository.CERTIFY_CARD_FILE).read_text()
    cls_w = cert_repo / "classifier" / "2" / "weights"
    other = weights_sha256(cert_repo / "classifier" / "2" / "weights")  # a real hash, of the wrong file
    settings = CertifySettings(max_n=MAX_N, n0=N0, classifier_version=2)
    try:
        for kw, what in (({"denoiser_sha": other}, "denoiser"),
                         ({"classifier_sha": weights_sha256(v / "weights")}, "classifier")):
            write_certify_card(v, cls_w, **kw)
            with pytest.raises(repository.RepositoryError, match=f"refusing to serve: the {what} weights"):
                CertifyService(v, settings)
        client = tritonclient.grpc.InferenceServerClient(cert_triton.grpc_url)
        try:
            with pytest.raises(InferenceServerException, match="refusing to serve"):
                client.load_model("certify")
            assert client.is_server_live()
        finally:
            client.close()
        with cert_gateway.client() as c:
            r = c.post("/classify", files=[("images", (IMAGES[0], fashion_pngs[IMAGES[0]], "image/png"))])
            assert r.status_code == 200, r.text
    finally:
        (v / repository.CERTIFY_CARD_FILE).write_text(good)


def test_launcher_skips_certify_without_weights(tmp_path):
    """Until the lead copies the weights in, the committed repository's certify/ has no weights: the launcher leaves
    it out of the repository Triton sees (a view of symlinks), and serves everything else."""
    from dbp.serving.launcher import check_repository, repository_view

    repo = copy_repo_configs(tmp_path / "model_repository")
    (repo / "certify" / "1").mkdir()
    shutil.copy2(repo / "certify" / "model.py", repo / "certify" / "1" / "model.py")
    assert repository.unservable_optional_models(repo) == ["certify"]
    view = repository_view(repo, ["certify"], tmp_path / "run")
    assert sorted(p.name for p in view.iterdir()) == sorted(p.name for p in repo.iterdir() if p.name != "certify")
    assert (view / "purifier").resolve() == (repo / "purifier").resolve()
    (repo / "certify" / "1" / "weights").mkdir()
    assert repository.unservable_optional_models(repo) == []
    assert repository.unservable_optional_models(COMMITTED) in ([], ["certify"])  # as committed / once deployed
