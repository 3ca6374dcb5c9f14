"""Serving profiles (issue 22 item 5): named purification settings per request, each served only with its own card.

Torch-free parsing and validation (dbp.serving.contract), the card rule per profile (dbp.repository.check_version,
the legacy list, `python -m training.profiles`), the in-process PurifierService (dynamic batches mixing profiles),
and a real tritonserver (purifier and ensemble with PROFILE). The gateway side: tests/service/test_gateway_profiles.py.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import (MODEL_REPOSITORY, TEST_PROFILES, images, load_services, profile_repo,
                     running_triton, seeds, write_card)
from dbp import repository
from dbp.models import Purifier, load_unet
from dbp.serving import contract
from training import profiles as profiles_cli


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_diffusion_ckpt, tiny_classifier_ckpt):
    return profile_repo(tmp_path_factory.mktemp("profiles"), tiny_diffusion_ckpt, tiny_classifier_ckpt)


@pytest.fixture(scope="module")
def purifier(repo):
    return load_services(repo)[0]


# ---- parsing (torch-free) ---------------------------------------------------------------------------------

def test_committed_profiles_parse_to_the_pinned_settings():
    s = contract.parse_parameters(contract.PurifierSettings,
                                  repository.read_parameters(MODEL_REPOSITORY / "purifier" / repository.CONFIG_FILE))
    table = {n: p.purification for n, p in s.profile_table().items()}
    assert table == {"default": {"t_star": 100, "sampler": "ddim", "num_inference_steps": 100},
                     "fast": {"t_star": 100, "sampler": "ddim", "num_inference_steps": 40},
                     "strong": {"t_star": 100, "sampler": "vpsde", "num_inference_steps": 100}}
    gpu = contract.parse_parameters(contract.PurifierSettings, repository.read_parameters(
        MODEL_REPOSITORY / "purifier" / "configs" / "gpu.pbtxt"))
    assert gpu.profiles == s.profiles  # the GPU config serves the same profiles (the cards bind them)
    assert repository.profile_settings(MODEL_REPOSITORY) == table


@pytest.mark.parametrize("raw, match", [
    ("{not json", "JSON object"),
    ("[1, 2]", "JSON object"),
    ('{"default": {"t_star": 50, "sampler": "ddim", "num_inference_steps": 10}}', "top-level"),
    ('{"Fast!": {"t_star": 50, "sampler": "ddim", "num_inference_steps": 10}}', "must match"),
    ('{"fast": {"t_star": 50, "sampler": "ddim"}}', "exactly the keys"),
    ('{"fast": {"t_star": 50, "sampler": "ddim", "num_inference_steps": 10, "eta": 0}}', "exactly the keys"),
    ('{"fast": {"t_star": "50", "sampler": "ddim", "num_inference_steps": 10}}', "integer"),
    ('{"fast": {"t_star": 0, "sampler": "ddim", "num_inference_steps": 10}}', ">= 1"),
    ('{"fast": {"t_star": 50, "sampler": "heun", "num_inference_steps": 10}}', "ddpm, ddim, vpsde, edm"),
])
def test_malformed_profiles_refuse_the_load(raw, match):
    cfg = {"parameters": {"profiles": {"string_value": raw}}}
    with pytest.raises(ValueError, match=match):
        contract.parse_parameters(contract.PurifierSettings, cfg)


def test_check_profile():
    known = ["default", "fast"]
    assert contract.check_profile(None, 2, known) == "default"
    assert contract.check_profile(np.array([[b"fast"], [b"fast"]], dtype=object), 2, known) == "fast"
    for bad, match in [(np.array([[b"slow"]], dtype=object), "unknown profile 'slow'.*default, fast"),
                       (np.array([[b"fast"], [b"default"]], dtype=object), "same for every image"),
                       (np.array([[1]]), "string"), (np.array([[b"fast"]], dtype=object), r"\[2, 1\]")]:
        with pytest.raises(contract.RequestError, match=match):
            contract.check_profile(bad, 1 if "slow" in str(bad) else 2, known)


# ---- the card rule per profile ----------------------------------------------------------------------------

def test_check_version_per_profile(repo):
    v = repository.version_dir(repo, "purifier", 1)
    assert repository.check_version(v, "purifier")["gate_status"]["status"] == "passed"
    fast = repository.check_version(v, "purifier", profile="fast")
    assert fast["gate_status"]["status"] == "passed"
    assert fast["model"]["purification"] == TEST_PROFILES["fast"]
    with pytest.raises(repository.RepositoryError, match="profile 'mis'.*purification settings"):
        repository.check_version(v, "purifier", profile="mis")  # bound to the default settings, not mis's
    with pytest.raises(repository.RepositoryError, match="no robustness card.*training.profiles add"):
        repository.check_version(v, "purifier", profile="nocard")
    with pytest.raises(repository.RepositoryError, match="declares no profile"):
        repository.check_version(v, "purifier", profile="nonesuch")


def test_profiles_cli_checks_before_copying(repo, tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt):
    v = repository.version_dir(repo, "purifier", 1)
    assert repository.card_path(v, "fast").exists()  # attached by profile_repo through `add`
    wrong = write_card(tmp_path / "wrong.json", tiny_diffusion_ckpt, tiny_classifier_ckpt,
                       purification=TEST_PROFILES["fast"])  # fast's settings, offered for nocard
    assert profiles_cli.main(["add", "--repository", str(repo), "--version", "1", "--profile", "nocard",
                              "--card", str(wrong)]) == 1
    assert not repository.card_path(v, "nocard").exists()
    with pytest.raises(repository.RepositoryError, match="declares no profile"):
        profiles_cli.add(repo, 1, "nonesuch", wrong)
    with pytest.raises(repository.RepositoryError, match="robustness_card.json"):
        profiles_cli.add(repo, 1, "default", wrong)
    rows = {r["profile"]: r["status"] for r in profiles_cli.describe(repo, 1)}
    assert rows == {"default": "passed", "fast": "passed", "mis": "not served", "nocard": "not served"}


def test_a_legacy_entry_serves_a_failing_profile_card_of_its_profile_only(repo, tmp_path, tiny_diffusion_ckpt,
                                                                          tiny_classifier_ckpt):
    copy = tmp_path / "model_repository"
    shutil.copytree(repo, copy)
    v = repository.version_dir(copy, "purifier", 1)
    failing = write_card(tmp_path / "failing.json", tiny_diffusion_ckpt, tiny_classifier_ckpt, passed=False,
                         purification=TEST_PROFILES["nocard"])
    with pytest.raises(repository.RepositoryError, match="refusing to serve"):
        profiles_cli.add(copy, 1, "nocard", failing)
    entry = profiles_cli.legacy_entry(copy, 1, "nocard", failing, "tests", "2999-01-01", "a test")
    assert entry["profile"] == "nocard" and entry["failed_rules"]
    for listed, ok in ((dict(entry, profile="fast"), False), ({k: e for k, e in entry.items() if k != "profile"},
                                                              False), (entry, True)):
        (copy / repository.LEGACY_FILE).write_text(json.dumps({"versions": [listed]}))
        if ok:
            profiles_cli.add(copy, 1, "nocard", failing)
            assert repository.check_version(v, "purifier", profile="nocard")["gate_status"]["status"] == "legacy"
        else:  # an entry of another profile (or of "default") does not let this card in
            with pytest.raises(repository.RepositoryError, match="refusing to serve"):
                profiles_cli.add(copy, 1, "nocard", failing)
    with pytest.raises(repository.RepositoryError, match="no legacy entry can serve"):  # bound to other settings
        profiles_cli.legacy_entry(copy, 1, "mis", repository.card_path(v, "mis"), "t", "2999-01-01", "r")


def test_profiles_add_attaches_exactly_the_bytes_it_checked(repo, tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt,
                                                            monkeypatch):
    """No check-then-use race: a card swapped for another after the check is not what gets attached."""
    copy = tmp_path / "model_repository"
    shutil.copytree(repo, copy)
    v = repository.version_dir(copy, "purifier", 1)
    good = write_card(tmp_path / "good.json", tiny_diffusion_ckpt, tiny_classifier_ckpt,
                      purification=TEST_PROFILES["nocard"])
    checked = good.read_bytes()
    real = repository.check_version

    def check_then_swap(*a, **kw):
        out = real(*a, **kw)
        write_card(good, tiny_diffusion_ckpt, tiny_classifier_ckpt, passed=False,
                   purification=TEST_PROFILES["nocard"])  # the file changes once it was checked
        return out
    monkeypatch.setattr(repository, "check_version", check_then_swap)
    dst = profiles_cli.add(copy, 1, "nocard", good, log=lambda *a: None)
    assert good.read_bytes() != checked and dst.read_bytes() == checked
    monkeypatch.setattr(repository, "check_version", real)
    assert repository.check_version(v, "purifier", profile="nocard")["gate_status"]["status"] == "passed"


def test_a_profile_card_must_have_attacked_the_served_max_votes(repo, tmp_path, tiny_diffusion_ckpt,
                                                                  tiny_classifier_ckpt):
    """The server checks each profile's card with the served max_votes (config.pbtxt: 16), as training.verify
    does: a signed card that passes but attacked 1 VOTE is refused, not served as "passed" with VOTES up to 16."""
    from dbp.serving.services import PurifierService

    copy = tmp_path / "model_repository"
    shutil.copytree(repo, copy)
    v = repository.version_dir(copy, "purifier", 1)
    cfg = copy / "purifier" / repository.CONFIG_FILE
    settings = contract.parse_parameters(contract.PurifierSettings, repository.read_parameters(cfg))
    assert settings.max_votes == 16
    write_card(repository.card_path(v, "fast"), tiny_diffusion_ckpt, tiny_classifier_ckpt,
               purification=TEST_PROFILES["fast"], votes=1)  # by hand: `add` refuses it
    with pytest.raises(repository.RepositoryError, match="up to 16 VOTES but the card attacked 1"):
        repository.check_version(v, "purifier", profile="fast")
    service = PurifierService(v, settings)
    assert "fast" not in service.purifiers and "up to 16 VOTES" in service.refused["fast"]
    # one rule: the server, check_version, training.verify / training.profiles and the gate build it alike
    assert repository.served_purification(settings, "fast") == {**TEST_PROFILES["fast"], "max_votes": 16}
    assert repository.purification_settings(copy, "fast") == repository.served_purification(settings, "fast")
    out = service([{"IMAGES": images(1, seed=1), "SEED": seeds(3), "VOTES": np.array([[16]], dtype=np.int32),
                    "PROFILE": np.array([[b"fast"]], dtype=object)}])[0]
    assert isinstance(out, contract.RequestError) and "has no valid card" in str(out)
    # the legacy entry of such a card lists every check it fails: the pinned policy's rules and the VOTES
    failing = write_card(tmp_path / "failing.json", tiny_diffusion_ckpt, tiny_classifier_ckpt, passed=False,
                         purification=TEST_PROFILES["fast"], votes=1)
    rules = profiles_cli.legacy_entry(copy, 1, "fast", failing, "tests", "2999-01-01", "a test")["failed_rules"]
    assert any("VOTES" in r for r in rules) and len(rules) >= 2
    assert not any("VOTES" in r for r in profiles_cli.legacy_entry(
        copy, 1, "fast", write_card(tmp_path / "f16.json", tiny_diffusion_ckpt, tiny_classifier_ckpt, passed=False,
                                    purification=TEST_PROFILES["fast"]), "t", "2999-01-01", "r")["failed_rules"])


# ---- the in-process service ------------------------------------------------------------------------------

def _reference(repo, profile: str, x: np.ndarray, row_seeds: list[int]) -> np.ndarray:
    """dbp's Purifier at the profile's settings on the same per-image seeds (torch, not the served engine)."""
    p = TEST_PROFILES[profile]
    ref = Purifier(load_unet(repository.weights_dir(repo, "purifier", 1)), **p).eval()
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        return torch.cat([ref(xt[b:b + 1], noise=ref.sample_noise(xt[b:b + 1], torch.Generator().manual_seed(s)))
                          for b, s in enumerate(row_seeds)]).numpy()


def test_service_serves_only_profiles_with_valid_cards(purifier):
    assert set(purifier.purifiers) == {"default", "fast"}
    assert set(purifier.refused) == {"mis", "nocard"}
    assert "purification settings" in purifier.refused["mis"] and "no robustness card" in purifier.refused["nocard"]
    assert purifier.profile_cards["fast"]["model"]["purification"] == TEST_PROFILES["fast"]


def test_profile_purifies_with_its_settings_and_a_batch_mixes_profiles(repo, purifier):
    x = images(2, seed=4)
    fast_req = {"IMAGES": x, "SEED": seeds(7, 8), "PROFILE": np.array([[b"fast"]] * 2, dtype=object)}
    default_req = {"IMAGES": x, "SEED": seeds(7, 8)}
    out = purifier([default_req, fast_req, {**fast_req, "PROFILE": np.array([[b"slow"]] * 2, dtype=object)},
                    {**fast_req, "PROFILE": np.array([[b"mis"]] * 2, dtype=object)}])
    fast = out[1]["PURIFIED"]
    np.testing.assert_allclose(fast, _reference(repo, "fast", x, [7, 8]), atol=2e-4)
    assert np.abs(fast - out[0]["PURIFIED"]).max() > 1e-3  # not the default chain
    # each request of the mixed batch is answered as if alone
    np.testing.assert_array_equal(out[0]["PURIFIED"], purifier([default_req])[0]["PURIFIED"])
    np.testing.assert_array_equal(fast, purifier([fast_req])[0]["PURIFIED"])
    assert isinstance(out[2], contract.RequestError) and "default, fast, mis, nocard" in str(out[2])
    assert isinstance(out[3], contract.RequestError) and "has no valid card" in str(out[3])


def test_profile_settings_off_the_grid_refuse_the_load(repo, tmp_path):
    from dbp.serving.services import PurifierService

    copy = tmp_path / "model_repository"
    shutil.copytree(repo, copy)
    cfg = copy / "purifier" / repository.CONFIG_FILE
    repository.set_parameter(cfg, "profiles", json.dumps({"odd": {"t_star": 30, "sampler": "ddim",
                                                                  "num_inference_steps": 50}}))
    settings = contract.parse_parameters(contract.PurifierSettings, repository.read_parameters(cfg))
    with pytest.raises(ValueError, match="not on the grid"):  # Diffusion.check_settings, card or not
        PurifierService(repository.version_dir(copy, "purifier", 1), settings)


# ---- a real tritonserver ------------------------------------------------------------------------------------

def _infer(client, model: str, **inputs):
    import tritonclient.http as http

    dt = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32",
          np.dtype(object): "BYTES"}
    ins = []
    for name, a in inputs.items():
        i = http.InferInput(name, list(a.shape), dt[a.dtype])
        i.set_data_from_numpy(a)
        ins.append(i)
    r = client.infer(model, ins)
    return {o["name"]: r.as_numpy(o["name"]) for o in r.get_response()["outputs"]}


def test_triton_serves_profiles_through_purifier_and_ensemble(repo, purifier, tmp_path):
    tritonclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    x = images(3, seed=5)
    prof = lambda name: np.array([[name.encode()]] * 3, dtype=object)  # noqa: E731
    with running_triton(repo, tmp_path / "run", ready_timeout=240) as srv:
        c = tritonclient.InferenceServerClient(srv.http_url, network_timeout=600.0)
        try:
            fast = _infer(c, "purifier", IMAGES=x, SEED=seeds(1, 2, 3), PROFILE=prof("fast"))["PURIFIED"]
            ref = purifier([{"IMAGES": x, "SEED": seeds(1, 2, 3), "PROFILE": prof("fast")}])[0]["PURIFIED"]
            np.testing.assert_allclose(fast, ref, atol=1e-5)
            default = _infer(c, "purifier", IMAGES=x, SEED=seeds(1, 2, 3))["PURIFIED"]
            assert np.abs(fast - default).max() > 1e-3
            # the ensemble passes PROFILE on to the purifier, and still runs without it
            ens = _infer(c, "purify_classify", IMAGES=x, SEED=seeds(1, 2, 3), PROFILE=prof("fast"))
            np.testing.assert_allclose(ens["LOGITS"], _infer(c, "classifier", IMAGES=fast)["LOGITS"], atol=1e-4)
            plain = _infer(c, "purify_classify", IMAGES=x, SEED=seeds(1, 2, 3))
            np.testing.assert_allclose(plain["LOGITS"], _infer(c, "classifier", IMAGES=default)["LOGITS"], atol=1e-4)
            for model in ("purifier", "purify_classify"):
                for name, match in (("slow", "unknown profile 'slow'"), ("mis", "has no valid card"),
                                    ("nocard", "has no valid card")):
                    with pytest.raises(InferenceServerException, match=match):
                        _infer(c, model, IMAGES=x, PROFILE=prof(name))
            # still serving after the refusals
            np.testing.assert_array_equal(
                _infer(c, "purifier", IMAGES=x, SEED=seeds(1, 2, 3), PROFILE=prof("fast"))["PURIFIED"], fast)
        finally:
            c.close()
        log = srv.log_path.read_text()
        assert "not serving profile 'mis'" in log and "not serving profile 'nocard'" in log, srv.log_tail()


def test_gate_profile_reads_the_pinned_settings(repo):
    from dbp.gate.config import GateConfig, GateError, use_served_purification

    cfg = GateConfig(repository=str(repo), version=1, profile="fast")
    use_served_purification(cfg)
    assert {"t_star": cfg.t_star, "sampler": cfg.sampler, "num_inference_steps": cfg.num_inference_steps} \
        == TEST_PROFILES["fast"] and cfg.votes == 16
    with pytest.raises(GateError, match="contradicts"):
        use_served_purification(GateConfig(repository=str(repo), version=1, profile="fast", t_star=100))
    with pytest.raises(GateError, match="default, fast, mis, nocard"):
        use_served_purification(GateConfig(repository=str(repo), version=1, profile="turbo"))
