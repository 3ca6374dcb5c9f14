"""dbp.serving.triton_glue without a server: the generic model's dtypes and responses (the live server: test_triton_live)."""
from __future__ import annotations

import importlib.util
import re
from types import SimpleNamespace

import numpy as np

from dbp import repository
from dbp.serving import contract, triton_glue
from dbp.serving.launcher import triton_root
from helpers import MODEL_REPOSITORY


def real_pb_utils():
    """The wheel's triton_python_backend_utils.py (pure Python: the config helpers, no tensors)."""
    path = triton_root() / "backends" / "python" / "triton_python_backend_utils.py"
    spec = importlib.util.spec_from_file_location("triton_python_backend_utils", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def model_config(role: str) -> dict:
    """The `output` entries of a shipped config.pbtxt as Triton hands them to initialize() (JSON)."""
    text = (MODEL_REPOSITORY / role / repository.CONFIG_FILE).read_text()
    block = re.search(r"^output\s*\[(.*?)^\]", text, re.S | re.M).group(1)
    return {"name": role, "output": [{"name": n, "data_type": t}
                                     for n, t in re.findall(r'name:\s*"(\w+)",\s*data_type:\s*(\w+)', block)]}


def test_every_shipped_model_py_is_the_generic_model():
    shells = sorted(MODEL_REPOSITORY.glob(f"*/**/{repository.MODEL_FILE}"))
    assert len(shells) >= 2 and {p.read_text() for p in shells} == {
        "from dbp.serving.triton_glue import TritonPythonModel  # noqa: F401 (the model directory's name picks "
        "the service)\n"}
    assert {p.parent.name if not p.parent.name.isdigit() else p.parent.parent.name for p in shells} == set(
        triton_glue.ROLES)


def test_output_dtypes_come_from_the_model_config():
    pb = real_pb_utils()
    assert triton_glue.output_dtypes(pb, model_config("classifier"), contract.CLASSIFIER_OUTPUTS) == {
        "LOGITS": np.float32, "PROBS": np.float32, "LABEL": np.int64, "AGREEMENT": np.float32, "VERSION": np.int64}
    assert triton_glue.output_dtypes(pb, model_config("purifier"), contract.PURIFIER_OUTPUTS) == {
        "PURIFIED": np.float32, "VERSION": np.int64, "CARD_SHA256": np.object_}
    # a purifier config written before CARD_SHA256 still loads, and its model then does not answer it
    older = model_config("purifier")
    older["output"] = [o for o in older["output"] if o["name"] != contract.CARD_SHA256]
    assert triton_glue.output_dtypes(pb, older, contract.PURIFIER_OUTPUTS) == {"PURIFIED": np.float32,
                                                                                "VERSION": np.int64}
    config = model_config("classifier")
    config["output"][3]["data_type"] = "TYPE_FP64"
    assert triton_glue.output_dtypes(pb, config, contract.CLASSIFIER_OUTPUTS)["AGREEMENT"] == np.float64
    for name in ("AGREEMENT", "VERSION"):
        config = model_config("classifier")
        config["output"] = [o for o in config["output"] if o["name"] != name]
        try:
            triton_glue.output_dtypes(pb, config, contract.CLASSIFIER_OUTPUTS)
            raise AssertionError(f"a config without {name} must fail the load")
        except ValueError as e:
            assert name in str(e)


def fake_pb_utils():
    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, msg, code):
            self.msg, self.code = msg, code

    return SimpleNamespace(
        TritonError=TritonError,
        Tensor=lambda name, a: (name, a),
        InferenceResponse=lambda output_tensors=None, error=None: SimpleNamespace(outputs=output_tensors, error=error),
        get_input_tensor_by_name=lambda req, name: (SimpleNamespace(as_numpy=lambda: req[name]) if name in req
                                                    else None))


def test_triton_execute_sends_the_config_dtypes_and_one_answer_per_request():
    pb = fake_pb_utils()
    logits = np.array([[0.0, 2.0], [0.0, 1.0], [3.0, 0.0]], np.float32)

    def service(reqs):
        assert reqs[0] == {"IMAGES": 1, "VOTES": None}
        return [contract.aggregate_votes(logits, 3), contract.RequestError("bad"), RuntimeError("boom")]

    dtypes = {"LOGITS": np.float32, "PROBS": np.float32, "LABEL": np.int64, "AGREEMENT": np.float32}
    good, bad, failed = triton_glue.triton_execute(pb, service, [{"IMAGES": 1}, {}, {}],
                                                   contract.CLASSIFIER_INPUTS, dtypes)
    assert {k: a.dtype for k, a in good.outputs} == dtypes and good.error is None
    assert dict(good.outputs)["AGREEMENT"].tolist() == [[np.float32(2 / 3)]]
    assert (bad.error.code, bad.error.msg) == ("INVALID_ARG", "bad") and failed.error.code == "INTERNAL"
    # a model.py exported before the generic model passes no dtypes: floats go as float32, integers as int64
    legacy, *_ = triton_glue.triton_execute(pb, service, [{"IMAGES": 1}, {}, {}], contract.CLASSIFIER_INPUTS)
    assert {k: a.dtype for k, a in legacy.outputs} == dtypes


def test_with_version_adds_the_instance_version_to_every_answer():
    """VERSION [B, 1] = the model version on each answered request's rows; errors pass through untouched."""
    logits = np.array([[0.0, 2.0], [0.0, 1.0], [3.0, 0.0]], np.float32)
    bad = contract.RequestError("bad")
    serve = triton_glue.with_version(lambda reqs: [contract.aggregate_votes(logits, 1), bad,
                                                   {"PURIFIED": np.zeros((2, 1, 4, 4), np.float32)}], 7)
    good, err, purified = serve([{}, {}, {}])
    assert good["VERSION"].tolist() == [[7], [7], [7]] and good["VERSION"].dtype == np.int64
    assert set(good) == set(contract.CLASSIFIER_OUTPUTS) and err is bad
    assert purified["VERSION"].tolist() == [[7], [7]] and set(purified) == {"PURIFIED", "VERSION"}


def test_with_card_sha256_answers_the_card_of_each_requests_profile():
    """CARD_SHA256 [B, 1] = the sha the service recorded at load for the profile the request named (absent:
    "default"); errors pass through untouched and a bad PROFILE never reaches the lookup."""
    shas = {"default": "a" * 64, "fast": "b" * 64}
    bad = contract.RequestError("bad")

    def service(reqs):
        return [bad if r.get("bad") else {"PURIFIED": np.zeros((len(r["IMAGES"]), 2, 4, 4), np.float32)}
                for r in reqs]
    serve = triton_glue.with_card_sha256(triton_glue.with_version(service, 3), shas)
    plain, fast, err = serve([{"IMAGES": [0, 0]}, {"IMAGES": [0], "PROFILE": np.array([[b"fast"]], np.object_)},
                              {"IMAGES": [0], "PROFILE": np.array([[b"nope"]], np.object_), "bad": True}])
    assert plain["CARD_SHA256"].tolist() == [[b"a" * 64]] * 2 and plain["CARD_SHA256"].dtype == np.object_
    assert fast["CARD_SHA256"].tolist() == [[b"b" * 64]] and fast["VERSION"].tolist() == [[3]]
    assert set(plain) == set(contract.PURIFIER_OUTPUTS) and err is bad
