"""Serving profiles through the gateway (issue 22 item 5): a real uvicorn in front of a real tritonserver whose
repository declares the test profiles (tests/helpers.py TEST_PROFILES: fast with its own card, mis with a card bound
to other settings, nocard without one). The gateway learns the profiles from Triton's purifier config."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gateway_testing import Gateway
from helpers import FAST_CARD_CLEAN, TEST_PROFILES, gateway_fallbacks, model_requests, profile_repo, running_triton

DEFAULT = {"t_star": 20, "sampler": "ddpm", "num_inference_steps": 50}  # helpers.FAST_PURIFIER


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_diffusion_ckpt, tiny_classifier_ckpt):
    root = tmp_path_factory.mktemp("gw-profiles")
    repo = profile_repo(root, tiny_diffusion_ckpt, tiny_classifier_ckpt)
    with running_triton(repo, root / "run", ready_timeout=300) as srv:
        gw = Gateway({"DBP_GATEWAY_TRITON_URLS": srv.grpc_url, "DBP_GATEWAY_PROBE_INTERVAL_S": "0.5",
                      "DBP_GATEWAY_REQUEST_TIMEOUT_S": "60", "DBP_GATEWAY_MODEL_REPOSITORY": str(repo)}).start()
        try:
            gw.wait_ready()
            yield repo, srv, gw
        finally:
            gw.stop()


def test_unknown_profile_is_422_listing_the_known_ones_and_nothing_reaches_triton(stack, fashion_pngs):
    repo, srv, gw = stack
    blob = list(fashion_pngs.values())[0]
    before = model_requests(srv, "purifier")
    with gw.client() as c:
        for route in ("/classify", "/purify"):
            r = c.post(route, params={"profile": "turbo"}, files=[("images", ("a.png", blob, "image/png"))])
            assert r.status_code == 422, r.text
            assert r.json()["reason"] == "unknown_profile"
            assert "default, fast, mis, nocard" in r.json()["detail"]
    assert model_requests(srv, "purifier") == before


def test_profile_with_its_card_classifies_and_the_receipt_names_it(stack, fashion_pngs):
    repo, srv, gw = stack
    blob = list(fashion_pngs.values())[0]
    fb0, ens0 = gateway_fallbacks(gw), model_requests(srv, "purify_classify")
    with gw.client() as c:
        fast = c.post("/classify", params={"profile": "fast", "seed": 5}, files=[("images", ("a.png", blob, "image/png"))])
    # the fast profile went through the ensemble in one call (PROFILE passed along), not the two pinned calls
    assert fast.status_code == 200, fast.text
    assert gateway_fallbacks(gw) == fb0 and model_requests(srv, "purify_classify") == ens0 + 1
    with gw.client() as c:
        plain = c.post("/classify", params={"seed": 5}, files=[("images", ("a.png", blob, "image/png"))])
        png = c.post("/purify", params={"profile": "fast", "seed": 5}, files=[("images", ("a.png", blob, "image/png"))])
        png_default = c.post("/purify", params={"seed": 5}, files=[("images", ("a.png", blob, "image/png"))])
        png_again = c.post("/purify", params={"profile": "fast", "seed": 5},
                           files=[("images", ("a.png", blob, "image/png"))])
    assert fast.status_code == plain.status_code == png.status_code == 200, fast.text + plain.text + png.text
    body, base = fast.json(), plain.json()
    assert body["profile"] == {"name": "fast", "settings": TEST_PROFILES["fast"]}
    assert body["purification"] == TEST_PROFILES["fast"]
    assert base["profile"] == {"name": "default", "settings": DEFAULT} and base["purification"] == DEFAULT
    # each receipt carries its own profile's card: fast's was written with a different clean accuracy
    card = json.loads((repo / "purifier" / "1" / "cards" / "fast.json").read_text())
    assert body["robustness"]["gate"] == "passed"
    assert body["robustness"]["clean_accuracy"] == card["clean"]["purified"]["acc"] == pytest.approx(FAST_CARD_CLEAN,
                                                                                                    abs=0.01)
    assert base["robustness"]["clean_accuracy"] == pytest.approx(0.9, abs=0.01)
    # /purify ran the fast chain: its headers say so, and its pixels are not the default chain's on the same seed
    assert png.headers["X-Purification-Profile"] == "fast" and png.headers["X-Purification-T-Star"] == "40"
    assert png.headers["X-Purification-Sampler"] == "ddim" and png_default.headers["X-Purification-Profile"] == "default"
    assert png.content == png_again.content and png.content != png_default.content


@pytest.mark.parametrize("profile", ["mis", "nocard"])
def test_a_declared_profile_without_a_valid_card_is_a_4xx(stack, fashion_pngs, profile):
    repo, srv, gw = stack
    blob = list(fashion_pngs.values())[0]
    fb0 = gateway_fallbacks(gw)
    with gw.client() as c:
        r = c.post("/classify", params={"profile": profile}, files=[("images", ("a.png", blob, "image/png"))])
        fb1 = gateway_fallbacks(gw)
        ok = c.post("/classify", files=[("images", ("a.png", blob, "image/png"))])
    assert r.status_code == 422, r.text
    assert r.json()["reason"] == "profile_not_served" and "has no valid card" in r.json()["detail"]
    assert ok.status_code == 200  # the default keeps serving
    # the ensemble refused it as INVALID_ARGUMENT: counted as "rejected" (the alert ignores it), not ensemble_error
    assert fb1["rejected"] == fb0["rejected"] + 1 and fb1["ensemble_error"] == fb0["ensemble_error"]
    assert sum(fb1.values()) == sum(fb0.values()) + 1


def test_profiles_unit_parsing():
    from service.app.triton.models import InterfaceError, profiles

    cfg = {"parameters": {"t_star": {"string_value": "20"}, "sampler": {"string_value": "ddpm"},
                          "num_inference_steps": {"string_value": "50"},
                          "profiles": {"string_value": json.dumps(TEST_PROFILES)}}}
    table = profiles(cfg)
    assert list(table) == ["default", "fast", "mis", "nocard"] and table["default"] == DEFAULT
    assert table["fast"] == TEST_PROFILES["fast"]
    with pytest.raises(InterfaceError):
        profiles({"parameters": {"profiles": {"string_value": "{nope"}}})
    assert np.array_equal(list(profiles({"parameters": {}})), ["default"])


@pytest.mark.parametrize("name", ["../../evil", "a/b", "Fast", "", "x" * 33, "_x", "fast.json"])
def test_profile_names_that_could_leave_the_cards_folder_are_skipped(name, caplog):
    """A profile name becomes the card path <version>/cards/<name>.json: only names matching
    dbp.serving.contract's pattern are kept; the others are skipped with a warning, the valid ones still served."""
    from service.app.triton.models import profiles

    table = {name: TEST_PROFILES["fast"], "fast": TEST_PROFILES["fast"]}
    cfg = {"parameters": {"t_star": {"string_value": "20"}, "sampler": {"string_value": "ddpm"},
                          "num_inference_steps": {"string_value": "50"},
                          "profiles": {"string_value": json.dumps(table)}}}
    with caplog.at_level("WARNING", logger="service.triton"):
        assert list(profiles(cfg)) == ["default", "fast"]
    assert any(repr(name) in r.getMessage() for r in caplog.records)
