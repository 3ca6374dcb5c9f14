"""The seed policy: client seeds become noise seeds through an HMAC keyed by a server secret.

First the derivation itself (no servers), then real gateways in front of the session's tritonserver: one
secret repeats its answers (on every replica that shares it), another secret answers differently, neither
uses the raw client seed, a gateway set to refuse client seeds refuses them and serves the rest, and the
secret is never shown anywhere.
"""
from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from gateway_testing import png_bytes
from helpers import Client

from service.app.core.config import ENV_PREFIX, Settings, load_settings
from service.app.core.seeds import SEED_MAX, SeedPolicy, derive_seed, image_digest

# distinctive strings, so a leak cannot hide behind a coincidence
SECRET_A = "seed-secret-A-" + "0f1e2d3c4b5a6978" * 3
SECRET_B = "seed-secret-B-" + "8796a5b4c3d2e1f0" * 3
SEED = 4242


# ---- the derivation ---------------------------------------------------------------------------------------

def test_derive_seed_is_deterministic_keyed_and_in_range():
    key_a, key_b = SECRET_A.encode(), SECRET_B.encode()
    d1, d2 = image_digest(np.zeros((1, 32, 32), np.float32)), image_digest(np.ones((1, 32, 32), np.float32))
    values = {derive_seed(key_a, s, d1) for s in range(256)}
    assert len(values) == 256 and all(0 <= v <= SEED_MAX for v in values)
    # the full 63 bits are used: with 256 draws, the top one is set somewhere (odds against: 2^-256)
    assert max(values) >= 2**62
    for s in (0, 1, SEED, SEED_MAX):
        v = derive_seed(key_a, s, d1)
        assert v == derive_seed(key_a, s, d1), "deterministic"
        assert v != derive_seed(key_b, s, d1), "another secret, other noise"
        assert v != derive_seed(key_a, s, d2), "another image, other noise"
        assert v != s, "never the raw seed"
    for bad in (-1, SEED_MAX + 1):
        with pytest.raises(ValueError):
            derive_seed(key_a, bad, d1)
    # pinned: changing the derivation changes every deployment's answers to a given seed, so do it knowingly
    assert derive_seed(bytes(range(32)), 0, bytes(32)) == 7204383187838465761


def test_image_digest_sees_dtype_shape_and_values():
    z = np.zeros((1, 4, 4), np.float32)
    digests = {image_digest(z), image_digest(z.reshape(1, 2, 8)), image_digest(z.astype(np.float64)),
               image_digest(z + np.float32(1e-7))}
    assert len(digests) == 4
    assert image_digest(z) == image_digest(np.zeros((1, 4, 4), np.float32))


def test_each_image_index_gets_its_own_noise_and_reports_the_client_seed():
    policy = SeedPolicy(SECRET_A, allow_client_seed=True)
    x = np.full((1, 32, 32), 0.5, np.float32)
    reported, noise = policy.seeds(SEED, [x, x, x])
    assert reported == [SEED, SEED + 1, SEED + 2]
    assert len(set(noise)) == 3, "the same image at other positions draws other noise"
    # image i of a batch is reproduced alone with the seed the answer reported for it
    for s, n in zip(reported, noise):
        assert policy.seeds(s, [x]) == ([s], [n]) and n == derive_seed(SECRET_A.encode(), s, image_digest(x))
    assert policy.seeds(SEED_MAX, [x, x])[0] == [SEED_MAX, 0]  # wraps inside Triton's INT64 range
    # without a client seed: a fresh draw each time, still reported
    (r1,), _ = policy.seeds(None, [x])
    (r2,), _ = policy.seeds(None, [x])
    assert r1 != r2 and 0 <= r1 <= SEED_MAX


def test_a_missing_secret_means_a_random_key_per_process():
    x = np.zeros((1, 32, 32), np.float32)
    one, two = SeedPolicy(None, True), SeedPolicy(None, True)
    assert one.generated and one.seeds(SEED, [x]) == one.seeds(SEED, [x])
    assert one.seeds(SEED, [x])[1] != two.seeds(SEED, [x])[1]


def test_the_secret_shows_in_no_repr_and_no_settings_error(monkeypatch, capsys):
    s = Settings(SEED_SECRET=SECRET_A)
    policy = SeedPolicy(SECRET_A, True)
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.SEED_SECRET), repr(policy), str(policy)):
        assert SECRET_A not in text
    for k in [k for k in __import__("os").environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(k)
    short = "too-short-secret-value"
    monkeypatch.setenv(ENV_PREFIX + "SEED_SECRET", short)
    with pytest.raises(SystemExit) as e:
        load_settings()
    msg = str(e.value)
    assert f"{ENV_PREFIX}SEED_SECRET: Value error, SEED_SECRET must be at least 32 characters" in msg
    assert short not in msg
    with pytest.raises(Exception) as e2:
        Settings()
    assert short not in str(e2.value)


# ---- real gateways ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(gateway_factory):
    """Two replicas sharing SECRET_A, and one deployment with SECRET_B."""
    return {"a": gateway_factory(seed_secret=SECRET_A), "a2": gateway_factory(seed_secret=SECRET_A),
            "b": gateway_factory(seed_secret=SECRET_B)}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), np.int16)


def model_sized_png(seed: int) -> tuple[bytes, np.ndarray]:
    """A 32x32 grayscale PNG (taken as is: no conversion) and the float32 tensor the gateway makes of it."""
    png = png_bytes((32, 32), "L", seed=seed)
    return png, np.asarray(Image.open(io.BytesIO(png)), np.float32)[None] / 255.0


def purify(gw, png: bytes, **params) -> httpx.Response:
    with gw.client() as c:
        r = c.post("/purify", params=params, files=[("images", ("x.png", png, "image/png"))])
    assert r.status_code == 200, r.text
    return r


def direct_purify(triton, x: np.ndarray, noise_seed: int) -> np.ndarray:
    """The purifier called without the gateway, with a noise seed chosen here; quantised as /purify does."""
    c = Client(triton, "grpc")
    try:
        out = c.infer("purifier", "1", IMAGES=x[None], SEED=np.array([[noise_seed]], np.int64))["PURIFIED"][0]
    finally:
        c.close()
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.int16)[0]


def test_a_seed_repeats_on_one_deployment_and_not_across_secrets(keyed, triton):
    png, x = model_sized_png(21)
    a1, a2 = purify(keyed["a"], png, seed=SEED), purify(keyed["a"], png, seed=SEED)
    replica, b = purify(keyed["a2"], png, seed=SEED), purify(keyed["b"], png, seed=SEED)
    assert a1.headers["X-Seed"] == b.headers["X-Seed"] == str(SEED), "the client's seed is echoed"
    assert a1.content == a2.content == replica.content, "one secret: the same answer, whichever replica"
    pa, pb = pixels(a1.content), pixels(b.content)
    assert np.abs(pa - pb).mean() > 1, "another secret draws other noise"
    # what Triton got: the seed derived with the gateway's secret, never the client's seed itself
    raw = direct_purify(triton, x, SEED)
    assert np.abs(raw - pa).mean() > 1 and np.abs(raw - pb).mean() > 1
    np.testing.assert_array_equal(direct_purify(triton, x, derive_seed(SECRET_A.encode(), SEED, image_digest(x))), pa)
    np.testing.assert_array_equal(direct_purify(triton, x, derive_seed(SECRET_B.encode(), SEED, image_digest(x))), pb)


def test_classify_repeats_per_image_and_reports_client_seeds(keyed):
    (p0, _), (p1, _) = model_sized_png(30), model_sized_png(31)
    files = [("images", ("0.png", p0, "image/png")), ("images", ("1.png", p1, "image/png"))]
    with keyed["a"].client() as c:
        one = c.post("/classify", params={"seed": SEED, "votes": 3}, files=files).json()
        two = c.post("/classify", params={"seed": SEED, "votes": 3}, files=files).json()
        alone = c.post("/classify", params={"seed": SEED + 1, "votes": 3}, files=files[1:]).json()
        pur = c.post("/purify", params={"seed": SEED, "format": "json"}, files=files).json()
    assert [p["seed"] for p in one["predictions"]] == [SEED, SEED + 1]
    assert [i["seed"] for i in pur["images"]] == [SEED, SEED + 1]
    assert [p["probabilities"] for p in one["predictions"]] == [p["probabilities"] for p in two["predictions"]]
    # image 1 of the batch, sent alone with the seed reported for it, gets the same answer
    assert alone["predictions"][0]["seed"] == SEED + 1
    assert alone["predictions"][0]["probabilities"] == one["predictions"][1]["probabilities"]


def test_requests_without_a_seed_get_fresh_noise(keyed):
    png, _ = model_sized_png(22)
    r1, r2 = purify(keyed["a"], png), purify(keyed["a"], png)
    assert r1.headers["X-Seed"] != r2.headers["X-Seed"]
    assert np.abs(pixels(r1.content) - pixels(r2.content)).mean() > 1
    # the drawn seed it reports reproduces the answer on this deployment
    again = purify(keyed["a"], png, seed=int(r1.headers["X-Seed"]))
    assert again.content == r1.content


def test_client_seeds_refused_when_so_set(seedless_gateway):
    gw = seedless_gateway
    png, _ = model_sized_png(23)
    before = gw.metrics().get('dbp_gateway_rejections_total{reason="seed_refused"}', 0.0)
    with gw.client() as c:
        refused = [c.post("/classify", params={"seed": 1}, files=[("images", ("x.png", png, "image/png"))]),
                   c.post("/purify", params={"seed": 0, "format": "json"},
                          json={"images": [base64.b64encode(png).decode()]})]
        ok = c.post("/classify", files=[("images", ("x.png", png, "image/png"))])
        docs = c.get("/openapi.json").json()
    for r in refused:
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
        body = r.json()
        assert body["reason"] == "seed_refused" and body["status"] == 422
        assert f"{ENV_PREFIX}ALLOW_CLIENT_SEED=false" in body["detail"] and "without `seed`" in body["detail"]
    assert ok.status_code == 200, ok.text
    assert isinstance(ok.json()["predictions"][0]["seed"], int)
    a, b = purify(gw, png), purify(gw, png)
    assert np.abs(pixels(a.content) - pixels(b.content)).mean() > 1, "fresh noise for every request"
    assert gw.metrics()['dbp_gateway_rejections_total{reason="seed_refused"}'] == before + 2
    seed_param = next(p for p in docs["paths"]["/classify"]["post"]["parameters"] if p["name"] == "seed")
    assert "refused (422)" in seed_param["description"]
    # no secret was given: the gateway said at start that it made a key of its own
    assert f"{ENV_PREFIX}SEED_SECRET is not set" in gw.log_tail(300)


def test_the_secret_appears_in_no_response_metric_or_log(keyed):
    gw = keyed["a"]
    png, _ = model_sized_png(24)
    seen = []
    with gw.client() as c:
        mp = [("images", ("x.png", png, "image/png"))]
        seen += [c.post("/classify", params={"seed": SEED, "votes": 2}, files=mp),
                 c.post("/classify", files=mp),
                 c.post("/purify", params={"seed": SEED}, files=mp),
                 c.post("/purify", params={"seed": SEED, "format": "json"}, files=mp),
                 c.post("/classify", params={"seed": -1}, files=mp),            # 422 from validation
                 c.post("/classify", params={"seed": SEED}, content=b"x",
                        headers={"Content-Type": "text/plain"})]                # 415
        seen += [c.get(p) for p in ("/", "/docs", "/openapi.json", "/readyz", "/livez", "/metrics", "/demo/samples",
                                    "/no-such-page")]
    assert {r.status_code for r in seen} >= {200, 404, 415, 422}
    for r in seen:
        blob = r.content + "".join(f"{k}: {v}\n" for k, v in r.headers.items()).encode()
        assert SECRET_A.encode() not in blob, r.request.url
        assert SECRET_A.encode().hex().encode() not in blob and base64.b64encode(SECRET_A.encode()) not in blob
    assert SECRET_A not in gw.log_tail(300) and "SEED_SECRET is not set" not in gw.log_tail(300)
