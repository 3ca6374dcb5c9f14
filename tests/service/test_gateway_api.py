"""The gateway served by a real uvicorn in front of a real tritonserver with the tiny test models."""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from gateway_testing import ROOT, png_bytes

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def files(*blobs: bytes, name="img.png"):
    return [("images", (f"{i}-{name}", b, "image/png")) for i, b in enumerate(blobs)]


def b64(*blobs: bytes) -> dict:
    return {"images": [base64.b64encode(b).decode() for b in blobs]}


def test_gateway_imports_neither_torch_nor_dbp():
    code = ("import sys; import service.app.main as m; app = m.create_app(); "
            "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'dbp', 'diffusers')); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "DBP_GATEWAY_TRITON_URLS": "127.0.0.1:1"})
    assert r.returncode == 0, r.stdout + r.stderr


def test_classify_multipart_several_images_with_metadata(gateway, fashion_pngs, gateway_repo):
    blobs = list(fashion_pngs.values())[:3]
    with gateway.client() as c:
        r = c.post("/classify", files=files(*blobs))
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["X-Purifier-Version"] == r.headers["X-Classifier-Version"] == "1"
    assert body["model"] == {"name": "purify_classify", "purifier_version": 1, "classifier_version": 1,
                             "input_shape": [1, 32, 32], "class_names": FASHION}
    assert body["purification"] == {"sampler": "ddpm", "num_inference_steps": 50, "t_star": 20}
    assert body["votes"] == 1 and len(body["predictions"]) == 3
    for i, p in enumerate(body["predictions"]):
        assert p["index"] == i and p["agreement"] is None
        assert p["class_name"] == FASHION[p["label"]] and set(p["probabilities"]) == set(FASHION)
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert p["input"]["width"] == 28 and p["input"]["mode"] == "L"
        assert p["input"]["conversions"] == ["padded 28x28 -> 32x32 with black, centred"]
    seeds = [p["seed"] for p in body["predictions"]]
    assert seeds[1] == seeds[0] + 1 and seeds[2] == seeds[0] + 2
    # the card of version 1 (whatever the test helpers wrote) is summarised from the repository
    card = json.loads((gateway_repo / "purifier" / "1" / "robustness_card.json").read_text())
    assert body["robustness"]["gate"] == "passed" and body["robustness"]["signed_by"]
    voted = card["served_votes"]["rows"]  # the served maximum VOTES, attacked too (issue 20)
    assert [s["setting"] for s in body["robustness"]["settings"]] == [s["name"] for s in card["settings"] + voted]
    assert body["robustness"]["votes_attacked"] == card["served_votes"]["attacked"] == [1, 16]
    assert [s["votes"] for s in body["robustness"]["settings"]][-len(voted):] == [16] * len(voted)
    reported = [s for s in body["robustness"]["settings"] if s["declared"] is False]
    assert reported and all(s["claim"].startswith("reported: not defended at this budget") for s in reported)
    first = card["settings"][0]
    assert body["robustness"]["settings"][0]["robust_accuracy"] == (first.get("worst_case") or first["robust"])["acc"]
    t = body["timings"]
    assert 0 < t["triton_ms"] <= t["total_ms"] and "triton;dur=" in r.headers["Server-Timing"]


def test_classify_json_seed_reproducible_and_votes(gateway, fashion_pngs):
    blob = list(fashion_pngs.values())[0]
    with gateway.client() as c:
        a = c.post("/classify", params={"seed": 42, "votes": 4}, json=b64(blob)).json()
        b = c.post("/classify", params={"seed": 42, "votes": 4}, json=b64(blob)).json()
        other = c.post("/classify", params={"seed": 43, "votes": 4}, json=b64(blob)).json()
    pa, pb = a["predictions"][0], b["predictions"][0]
    assert a["votes"] == 4 and pa["seed"] == 42
    assert pa["label"] == pb["label"] and pa["agreement"] == pb["agreement"]
    for k in pa["probabilities"]:
        assert pa["probabilities"][k] == pytest.approx(pb["probabilities"][k], abs=1e-5)
    assert pa["agreement"] in (0.25, 0.5, 0.75, 1.0)
    # another seed draws other noise: the mean probabilities differ
    assert any(abs(pa["probabilities"][k] - other["predictions"][0]["probabilities"][k]) > 1e-6
               for k in pa["probabilities"])


def test_purify_png_default_and_json(gateway, fashion_pngs):
    blob = list(fashion_pngs.values())[1]
    with gateway.client() as c:
        r = c.post("/purify", params={"seed": 7}, files=files(blob))
        j = c.post("/purify", params={"seed": 7}, json=b64(blob), headers={"Accept": "application/json"})
        two = c.post("/purify", params={"seed": 7}, json=b64(blob, blob))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (32, 32) and img.mode == "L"
    assert r.headers["X-Purifier-Version"] == "1" and r.headers["X-Seed"] == "7"
    assert r.headers["X-Purification-Sampler"] == "ddpm" and r.headers["X-Purification-T-Star"] == "20"
    assert r.headers["X-Input-Size"] == "28x28" and "padded" in r.headers["X-Input-Conversions"]
    assert j.status_code == 200 and j.headers["content-type"] == "application/json"
    body = j.json()
    assert body["model"]["purifier_version"] == 1 and body["model"]["classifier_version"] is None
    # same seed, same purified image, whichever form
    assert base64.b64decode(body["images"][0]["png_base64"]) == r.content
    assert two.status_code == 200 and [i["seed"] for i in two.json()["images"]] == [7, 8]
    # the purified image is not the input: noise was added and removed
    orig = np.zeros((32, 32), np.uint8)
    orig[2:30, 2:30] = np.asarray(Image.open(io.BytesIO(blob)))
    assert np.abs(np.asarray(img, np.int16) - orig).mean() > 1


def test_conversion_reported_or_refused(gateway):
    rgb = png_bytes((64, 48), "RGB")
    with gateway.client() as c:
        ok = c.post("/classify", files=files(rgb), params={"fit": "pad"})
        stretch = c.post("/classify", files=files(rgb), params={"fit": "stretch"})
        refused = c.post("/classify", files=files(rgb), params={"convert": "false"})
        exact = c.post("/classify", files=files(png_bytes((32, 32), "L")), params={"convert": "false"})
    inp = ok.json()["predictions"][0]["input"]
    assert inp["converted"] and inp["conversions"] == ["mode RGB -> L", "resized 64x48 -> 32x24 (aspect kept)",
                                                       "padded 32x24 -> 32x32 with black, centred"]
    assert stretch.json()["predictions"][0]["input"]["conversions"][-1] == "resized 64x48 -> 32x32 (stretch)"
    assert refused.status_code == 422 and refused.headers["content-type"] == "application/problem+json"
    assert "mode RGB (model takes L)" in refused.json()["detail"] and "64x48" in refused.json()["detail"]
    assert exact.status_code == 200 and exact.json()["predictions"][0]["input"]["converted"] is False


def test_readyz_livez_and_backend_readiness(gateway, dead_url, triton):
    r = httpx.get(gateway.url + "/readyz")
    assert r.status_code == 200, r.text
    states = {b["url"]: b for b in r.json()["backends"]}
    assert states[triton.grpc_url]["ready"] and states[triton.grpc_url]["version_pair"] == 1
    assert not states[dead_url]["ready"] and "UNAVAILABLE" in states[dead_url]["reason"]
    assert httpx.get(gateway.url + "/livez").json() == {"status": "alive"}
    m = gateway.metrics()
    assert m[f'dbp_gateway_triton_backend_ready{{url="{triton.grpc_url}"}}'] == 1
    assert m[f'dbp_gateway_triton_backend_ready{{url="{dead_url}"}}'] == 0
    assert m['dbp_gateway_model_info{classifier_version="1",model="purify_classify",purifier_version="1"}'] == 1


def test_balances_over_ready_backends(gateway_factory, triton):
    """Two URLs (the same Triton under two names): sequential requests alternate between them."""
    urls = [triton.grpc_url, "localhost:" + triton.grpc_url.rsplit(":", 1)[1]]
    gw = gateway_factory(urls=urls)
    deadline = time.monotonic() + 30
    while not all(b["ready"] for b in httpx.get(gw.url + "/readyz").json()["backends"]):
        assert time.monotonic() < deadline, httpx.get(gw.url + "/readyz").text
        time.sleep(0.2)
    with gw.client() as c:
        for _ in range(6):
            assert c.post("/purify", files=files(png_bytes())).status_code == 200
    m = gw.metrics()
    counts = [m.get(f'dbp_gateway_triton_requests_total{{outcome="ok",url="{u}"}}', 0) for u in urls]
    assert counts == [3, 3], counts


def test_metrics_count_what_happened(gateway, fashion_pngs):
    blob = list(fashion_pngs.values())[0]
    before = gateway.metrics()
    with gateway.client() as c:
        assert c.post("/classify", params={"votes": 3}, files=files(blob, blob)).status_code == 200
        assert c.post("/purify", files=files(b"not an image")).status_code == 415
        assert c.post("/classify", params={"votes": 0}, files=files(blob)).status_code == 422
    after = gateway.metrics()

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta('dbp_gateway_requests_total{endpoint="/classify",status="200"}') == 1
    assert delta('dbp_gateway_requests_total{endpoint="/classify",status="422"}') == 1
    assert delta('dbp_gateway_requests_total{endpoint="/purify",status="415"}') == 1
    assert delta('dbp_gateway_rejections_total{reason="bad_image"}') == 1
    assert delta('dbp_gateway_rejections_total{reason="bad_parameter"}') == 1
    assert delta('dbp_gateway_votes_count') == 1 and delta('dbp_gateway_votes_sum') == 3
    assert delta('dbp_gateway_agreement_count') == 2
    assert delta('dbp_gateway_images_per_request_sum{endpoint="/classify"}') == 2
    assert delta('dbp_gateway_triton_duration_seconds_count{endpoint="/classify"}') == 1
    assert delta('dbp_gateway_request_duration_seconds_count{endpoint="/purify"}') == 1
    assert after["dbp_gateway_in_flight_requests"] == 0
    # process metrics of the gateway itself (the soak drill's memory growth, the dashboard's memory panel)
    assert after["process_resident_memory_bytes"] > 10e6 and after["process_cpu_seconds_total"] > 0


def test_api_key_on_and_off(gateway_factory, gateway, fashion_pngs):
    key = "k" * 20 + "-secret"
    locked = gateway_factory(api_key=key)
    blob = list(fashion_pngs.values())[0]
    with locked.client() as c:
        missing = c.post("/classify", files=files(blob))
        wrong = c.post("/classify", files=files(blob), headers={"X-API-Key": key[:-1] + "X"})
        ok = c.post("/classify", files=files(blob), headers={"X-API-Key": key})
        assert c.get("/readyz").status_code == 200 and c.get("/metrics").status_code == 200
        assert c.get("/livez").status_code == 200 and c.get("/").status_code == 200
    assert missing.status_code == wrong.status_code == 401
    assert missing.headers["content-type"] == "application/problem+json" and "X-API-Key" in missing.json()["detail"]
    assert ok.status_code == 200, ok.text
    m = locked.metrics()
    assert m['dbp_gateway_rejections_total{reason="unauthorized"}'] == 2
    with gateway.client() as c:  # the default gateway has no key: no header needed
        assert c.post("/classify", files=files(blob)).status_code == 200


def test_bad_settings_fail_at_start_with_a_clear_message():
    env = {"PATH": "/usr/bin:/bin", "DBP_GATEWAY_TRITON_URLS": "localhost", "DBP_GATEWAY_MAX_IN_FLIGHT": "0",
           "DBP_GATEWAY_API_KEY": "short"}
    r = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    for name in ("DBP_GATEWAY_TRITON_URLS", "DBP_GATEWAY_MAX_IN_FLIGHT", "DBP_GATEWAY_API_KEY"):
        assert name in r.stderr, r.stderr
    assert "host:port" in r.stderr and "Traceback" not in r.stderr


def test_openapi_documents_models_and_examples(gateway):
    spec = httpx.get(gateway.url + "/openapi.json").json()
    post = spec["paths"]["/classify"]["post"]
    assert set(post["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("ClassifyResponse")
    assert "application/problem+json" in post["responses"]["503"]["content"]
    assert "image/png" in spec["paths"]["/purify"]["post"]["responses"]["200"]["content"]
    schemas = spec["components"]["schemas"]
    for name in ("ClassifyResponse", "Prediction", "PurifyResponse", "Problem", "Readiness"):
        assert name in schemas
    assert schemas["Problem"].get("examples") and schemas["Prediction"]["properties"]["label"].get("examples")
    assert json.dumps(spec).count('"examples"') > 30
    assert httpx.get(gateway.url + "/docs").status_code == 200
