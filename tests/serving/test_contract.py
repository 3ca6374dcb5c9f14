"""dbp.serving.contract: validators, vote aggregation and settings, numpy only (no torch, no server)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from dbp import repository
from dbp.serving import contract
from helpers import MODEL_REPOSITORY, ROOT


def test_contract_imports_without_torch():
    """The gateway's process has no torch: the contract (and the repository layout) must import without it."""
    code = ("import sys; import dbp.serving.contract, dbp.repository; "
            "print(sorted(m for m in ('torch', 'diffusers', 'safetensors') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_tensor_names_match_the_configs():
    for role, inputs, outputs in (("purifier", contract.PURIFIER_INPUTS, contract.PURIFIER_OUTPUTS),
                                  ("classifier", contract.CLASSIFIER_INPUTS, contract.CLASSIFIER_OUTPUTS)):
        text = (MODEL_REPOSITORY / role / repository.CONFIG_FILE).read_text()
        blocks = {k: re.findall(r'name:\s*"(\w+)"', v) for k, v in
                  re.findall(r"^(input|output)\s*\[(.*?)^\]", text, re.S | re.M)}
        assert set(blocks["input"]) == set(inputs) and set(blocks["output"]) == set(outputs), text

def test_the_ensemble_reports_which_versions_answered():
    """purify_classify: the purifier's inputs, the classifier's outputs but VERSION, and each step's VERSION under
    its own name (PURIFIER_VERSION, CLASSIFIER_VERSION), declared INT64 [1] like the models'."""
    text = (MODEL_REPOSITORY / "purify_classify" / repository.CONFIG_FILE).read_text()
    blocks = {k: re.findall(r'name:\s*"(\w+)"', v) for k, v in
              re.findall(r"^(input|output)\s*\[(.*?)^\]", text, re.S | re.M)}
    assert blocks["input"] == list(contract.PURIFIER_INPUTS) and blocks["output"] == list(contract.ENSEMBLE_OUTPUTS)
    for name in (contract.PURIFIER_VERSION, contract.CLASSIFIER_VERSION):
        assert re.search(rf'name: "{name}", data_type: TYPE_INT64, dims: \[ 1 \]', text)
    steps = dict(re.findall(r'model_name: "(\w+)".*?output_map \{ key: "VERSION" value: "(\w+)" \}', text, re.S))
    assert steps == {"purifier": contract.PURIFIER_VERSION, "classifier": contract.CLASSIFIER_VERSION}


def test_aggregate_votes_majority_agreement_and_ties():
    # image 0: votes 2,2,1 -> label 2, agreement 2/3; image 1: votes 0,3 tie, vote for 3 is more confident
    logits = np.full((5, 4), -5.0, np.float32)
    for row, (c, v) in enumerate([(2, 3.0), (2, 3.0), (1, 3.0), (0, 1.0), (3, 4.0)]):
        logits[row, c] = v
    out0 = contract.aggregate_votes(logits[:3], 3)
    assert out0["LABEL"].tolist() == [[2]] and out0["AGREEMENT"][0, 0] == pytest.approx(2 / 3)
    out1 = contract.aggregate_votes(logits[3:], 2)
    assert out1["LABEL"].tolist() == [[3]] and out1["AGREEMENT"][0, 0] == pytest.approx(0.5)
    assert np.allclose(out1["PROBS"].sum(1), 1) and out1["LOGITS"].shape == (1, 4)
    single = contract.aggregate_votes(logits, 1)
    assert single["LABEL"].ravel().tolist() == [2, 2, 1, 0, 3] and np.all(single["AGREEMENT"] == 1)
    with pytest.raises(ValueError):
        contract.aggregate_votes(logits, 2)


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
    with pytest.raises(contract.RequestError, match=match):
        contract.check_images(x, (1, 32, 32), votes)


def test_check_images_clips_within_tolerance_and_votes_seeds():
    x = np.full((2, 1, 32, 32), 1.0005, np.float32)
    assert contract.check_images(x, (1, 32, 32)).max() == 1.0
    assert contract.check_votes(None, 2, 16) == 1 and contract.check_votes(np.array([[3], [3]]), 2, 16) == 3
    for bad, match in [(np.array([[0], [0]]), r"\[1, 16\]"), (np.array([[17], [17]]), r"\[1, 16\]"),
                       (np.array([[2], [3]]), "same"), (np.array([[2.0], [2.0]]), "integer"),
                       (np.array([[2]]), r"\[2, 1\]")]:
        with pytest.raises(contract.RequestError, match=match):
            contract.check_votes(bad, 2, 16)
    assert contract.check_seeds(np.array([[5], [6]]), 2) == [5, 6]
    with pytest.raises(contract.RequestError, match="SEED"):
        contract.check_seeds(np.array([[5]]), 2)


def test_parse_parameters():
    # the committed configs parse
    for model, cls in (("purifier", contract.PurifierSettings), ("classifier", contract.ClassifierSettings)):
        contract.parse_parameters(cls, repository.read_parameters(MODEL_REPOSITORY / model / "config.pbtxt"))
    cfg = {"parameters": {"t_star": {"string_value": "50"}, "sampler": {"string_value": "ddpm"}}}
    s = contract.parse_parameters(contract.PurifierSettings, json.dumps(cfg))
    assert (s.t_star, s.sampler, s.num_inference_steps) == (50, "ddpm", 100)
    with pytest.raises(ValueError, match="unknown parameter"):
        contract.parse_parameters(contract.PurifierSettings, {"parameters": {"tstar": {"string_value": "5"}}})
    with pytest.raises(ValueError, match="sampler"):
        contract.parse_parameters(contract.PurifierSettings, {"parameters": {"sampler": {"string_value": "euler"}}})


def test_serve_batch_answers_each_request_and_survives_a_failing_run():
    def prepare(r):
        if r.get("bad"):
            raise contract.RequestError("bad one")
        if r.get("broken"):
            raise KeyError("no such tensor")
        return r["x"]

    out = contract.serve_batch(prepare, lambda xs: [{"Y": np.asarray(x) + 1} for x in xs],
                               [{"x": 1}, {"bad": True}, {"broken": True}, {"x": 2}])
    assert [o["Y"].item() for o in (out[0], out[3])] == [2, 3]
    assert isinstance(out[1], contract.RequestError) and "bad one" in str(out[1])
    assert isinstance(out[2], contract.RequestError) and "KeyError" in str(out[2])

    def crash(xs):
        raise RuntimeError("out of memory")
    out = contract.serve_batch(prepare, crash, [{"x": 1}, {"bad": True}])
    assert isinstance(out[0], RuntimeError) and "out of memory" in str(out[0])
    assert isinstance(out[1], contract.RequestError)


def test_certify_request_limits():
    """The certify model's own checks (a request that bypasses the gateway): n within max_n, images x (n0 + n)
    within max_samples, one served sigma, alpha in (0, 0.5), one value per request; the committed config parses."""
    s = contract.parse_parameters(contract.CertifySettings,
                                  repository.read_parameters(MODEL_REPOSITORY / "certify" / repository.CONFIG_FILE))
    # one image at max_n must fit the budget, or max_n would promise what max_samples refuses
    assert s.n <= s.max_n and s.n0 + s.max_n <= s.max_samples and s.sigma_values == (0.25, 0.5)

    def req(n, sigma=0.25, alpha=0.001, batch=1):
        col = np.ones((batch, 1))
        return contract.certify_request((col * n).astype(np.int32), (col * sigma).astype(np.float32),
                                        (col * alpha).astype(np.float32), batch, s)
    assert req(s.n) == (s.n, 0.25, pytest.approx(0.001))
    fit = s.max_samples // (s.n0 + s.n)
    req(s.n, batch=fit)
    for args, match in (((s.max_n + 1,), "max_n"), ((s.n,), "max_samples"), ((s.n, 0.3), "served sigmas"),
                        ((s.n, 0.25, 0.5), "ALPHA")):
        with pytest.raises(contract.RequestError, match=match):
            req(*args, batch=fit + 1 if match == "max_samples" else 1)
    with pytest.raises(contract.RequestError, match="same for every image"):
        contract.certify_request(np.array([[8], [9]], np.int32), np.full((2, 1), 0.25, np.float32),
                                 np.full((2, 1), 0.001, np.float32), 2, s)


def test_served_samplers_are_the_library_samplers():
    """The contract (torch-free) names dbp.diffusion's samplers itself: a sampler added there is served only once it
    is added here too, and a served name the library lacks would fail every load."""
    from dbp.diffusion import SAMPLERS

    assert contract.SERVED_SAMPLERS == SAMPLERS
