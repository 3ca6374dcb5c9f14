"""The receipt describes the card the server checked, not whatever the gateway's disk holds: a real uvicorn in front of
a real tritonserver on the test's own copy of a model repository (tests/helpers.py profile_repo: "default" and "fast"
with their cards). The purifier answers, per row, the sha256 of the card bytes it checked at load (CARD_SHA256); a
card rewritten on disk after the load (the same JSON, other whitespace) must lose its figures in the receipt."""
from __future__ import annotations

import hashlib
import json
import re

import pytest

from dbp import repository
from gateway_testing import Gateway
from helpers import FAST_PURIFIER, export_repo, gateway_fallbacks, profile_repo, running_triton

MISMATCH = "dbp_gateway_card_mismatch_total"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_diffusion_ckpt, tiny_classifier_ckpt):
    """(repo, one-call gateway, pinned-calls gateway), both in front of one Triton and reading `repo` as it does."""
    root = tmp_path_factory.mktemp("gw-card-binding")
    repo = profile_repo(root, tiny_diffusion_ckpt, tiny_classifier_ckpt)
    with running_triton(repo, root / "run", ready_timeout=300) as srv:
        env = {"DBP_GATEWAY_TRITON_URLS": srv.grpc_url, "DBP_GATEWAY_PROBE_INTERVAL_S": "0.5",
               "DBP_GATEWAY_REQUEST_TIMEOUT_S": "60", "DBP_GATEWAY_MODEL_REPOSITORY": str(repo)}
        gws = [Gateway(env).start(), Gateway({**env, "DBP_GATEWAY_ONE_CALL": "false"}).start()]
        try:
            for gw in gws:
                gw.wait_ready()
            yield repo, *gws
        finally:
            for gw in gws:
                gw.stop()


def card(repo, profile: str):
    return repository.card_path(repository.version_dir(repo, "purifier", 1), profile)


def receipts(gw, blob: bytes, profile: str) -> dict[str, dict]:
    """{route: JSON receipt} of /classify and /purify for one image under `profile`."""
    out = {}
    with gw.client() as c:
        for route in ("/classify", "/purify"):
            r = c.post(route, params={"profile": profile, "seed": 3, "format": "json"} if route == "/purify" else
                       {"profile": profile, "seed": 3}, files=[("images", ("a.png", blob, "image/png"))])
            assert r.status_code == 200, r.text
            out[route] = r.json()
    return out


def mismatches(gw) -> dict[str, float]:
    return {k.split('"')[1]: v for k, v in gw.metrics().items() if k.startswith(MISMATCH + "{")}


@pytest.mark.parametrize("profile", ["default", "fast"])
def test_receipts_carry_the_sha256_of_the_card_the_server_checked(stack, fashion_pngs, profile):
    """The one ensemble call, the pinned calls and /purify all report the card file's sha256, and the summary of that
    same card, marked verified."""
    repo, one_call, pinned = stack
    sha = hashlib.sha256(card(repo, profile).read_bytes()).hexdigest()
    blob = list(fashion_pngs.values())[0]
    fallbacks = gateway_fallbacks(one_call)
    for gw in (one_call, pinned):
        for route, body in receipts(gw, blob, profile).items():
            assert body["card_sha256"] == sha, (route, body["card_sha256"])
            assert body["robustness"]["card_sha256"] == sha and body["robustness"]["card_binding"] == "verified"
            assert body["robustness"]["gate"] == "passed" and body["robustness"]["clean_accuracy"] is not None
    assert gateway_fallbacks(one_call) == fallbacks  # its /classify was the one ensemble call
    assert set(mismatches(one_call).values()) == set(mismatches(pinned).values()) == {0.0}


def test_a_card_rewritten_after_the_load_is_withheld_from_the_receipt(stack, fashion_pngs):
    """The same card re-serialised on disk (other bytes, other sha256) is not what the server checked at load: the
    receipt shows no figures of it, reports both sha256 and the counter goes up; the untouched profile is unaffected."""
    repo, one_call, pinned = stack
    path = card(repo, "fast")
    raw = path.read_bytes()
    loaded = hashlib.sha256(raw).hexdigest()
    blob = list(fashion_pngs.values())[0]
    before = {gw.url: mismatches(gw) for gw in (one_call, pinned)}
    try:
        path.write_text(json.dumps(json.loads(raw), indent=1))
        on_disk = hashlib.sha256(path.read_bytes()).hexdigest()
        assert on_disk != loaded
        for gw in (one_call, pinned):
            for route, body in receipts(gw, blob, "fast").items():
                rob = body["robustness"]
                assert body["card_sha256"] == loaded, route
                assert rob["gate"] == "card_mismatch" and rob["card_binding"] == "mismatch", route
                assert rob["card_sha256"] == on_disk and rob["served_card_sha256"] == [loaded]
                assert rob["clean_accuracy"] is None and rob["settings"] == [] and rob["signed_by"] is None
            assert {k: v - before[gw.url][k] for k, v in mismatches(gw).items()} == {"/classify": 1, "/purify": 1}
            default = receipts(gw, blob, "default")["/classify"]
            assert default["robustness"]["card_binding"] == "verified"
    finally:
        path.write_bytes(raw)
    # the card the server checked is back: verified again
    body = receipts(one_call, blob, "fast")["/classify"]
    assert body["robustness"]["card_binding"] == "verified" and body["robustness"]["gate"] == "passed"


def test_a_model_config_older_than_the_card_sha256_still_serves_unchecked(tmp_path, tiny_diffusion_ckpt,
                                                                       tiny_classifier_ckpt, fashion_pngs):
    """A repository whose purifier and ensemble configs predate CARD_SHA256: Triton loads them, the gateway learns
    from the configs that no sha is answered, and the receipts keep the card's figures marked unchecked."""
    repo = export_repo(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt, **FAST_PURIFIER)
    for model in ("purifier", "purify_classify"):
        cfg = repo / model / repository.CONFIG_FILE
        text = re.sub(r',\n\s*\{ name: "(PURIFIER_)?CARD_SHA256"[^\n]*\}', "", cfg.read_text())
        text = re.sub(r'\n\s*output_map \{ key: "CARD_SHA256"[^\n]*', "", text)
        assert "CARD_SHA256\"," not in text and 'key: "CARD_SHA256"' not in text
        cfg.write_text(text)
    with running_triton(repo, tmp_path / "run", ready_timeout=300) as srv:
        gw = Gateway({"DBP_GATEWAY_TRITON_URLS": srv.grpc_url, "DBP_GATEWAY_REQUEST_TIMEOUT_S": "60",
                      "DBP_GATEWAY_MODEL_REPOSITORY": str(repo)}).start()
        try:
            gw.wait_ready()
            fallbacks = gateway_fallbacks(gw)
            for route, body in receipts(gw, list(fashion_pngs.values())[0], "default").items():
                assert body["card_sha256"] is None, route
                assert body["robustness"]["card_binding"] == "unchecked" and body["robustness"]["gate"] == "passed"
                assert body["robustness"]["clean_accuracy"] is not None
            assert gateway_fallbacks(gw) == fallbacks and set(mismatches(gw).values()) == {0.0}
        finally:
            gw.stop()
