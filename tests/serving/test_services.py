"""dbp.serving.services in-process: real tiny models in a temporary repository, no Triton server."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from dbp import repository
from dbp.serving import triton_glue
from dbp.serving.contract import RequestError
from dbp.serving.services import ClassifierService
from helpers import load_services


def test_service_rows_depend_only_on_their_seed(services):
    pur, _ = services
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    alone = pur([{"IMAGES": x[:1], "SEED": np.array([[7]])}])[0]["PURIFIED"]
    batched = pur([{"IMAGES": x[1:], "SEED": np.array([[1], [2]])},
                   {"IMAGES": x[:1], "SEED": np.array([[7]])}])
    # same noise whatever the batch; only float rounding of batched kernels may differ
    np.testing.assert_allclose(batched[1]["PURIFIED"], alone, atol=1e-5)
    assert np.abs(batched[0]["PURIFIED"][:1] - alone).max() > 1e-3


def test_service_rows_do_not_depend_on_max_rows(repo, services):
    """A batch split into several torch calls (max_rows) gets exactly the noise of one call."""
    pur, _ = services
    x = np.random.default_rng(5).random((3, 1, 32, 32), dtype=np.float32)
    reqs = [{"IMAGES": x, "SEED": np.array([[1], [2], [3]]), "VOTES": np.array([[2], [2], [2]], np.int32)}]
    whole = pur(reqs)[0]["PURIFIED"]
    small, _ = load_services(repo)
    small.settings.max_rows = 4  # 6 purifications: calls of 4 and 2 rows
    np.testing.assert_allclose(small(reqs)[0]["PURIFIED"], whole, atol=1e-5)
    assert whole.shape == (3, 2, 32, 32)


def test_service_batch_isolates_bad_request(services):
    pur, cls = services
    good = np.random.default_rng(1).random((2, 1, 32, 32), dtype=np.float32)
    bad = good.copy()
    bad[0, 0, 0, 0] = np.nan
    res = pur([{"IMAGES": good}, {"IMAGES": bad}, {"IMAGES": good, "VOTES": np.array([[2], [2]], np.int32)}])
    assert res[0]["PURIFIED"].shape == (2, 1, 32, 32)
    assert isinstance(res[1], RequestError) and "NaN" in str(res[1])
    assert res[2]["PURIFIED"].shape == (2, 2, 32, 32)
    out = cls([{"IMAGES": res[2]["PURIFIED"], "VOTES": np.array([[2], [2]], np.int32)}, {"IMAGES": None}])
    assert out[0]["LABEL"].shape == (2, 1) and isinstance(out[1], RequestError)


def test_version_without_passing_card_is_refused(repo, tmp_path):
    v = tmp_path / "1"
    shutil.copytree(repo / "classifier" / "1", v)
    card = json.loads((v / repository.CARD_FILE).read_text())
    card["gate"]["passed"] = False  # the cache is not read; the edit breaks the gate's signature
    (v / repository.CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ValueError, match="signature does not match the card's content"):
        ClassifierService(v)
    (v / repository.CARD_FILE).unlink()
    with pytest.raises(ValueError, match="no robustness card"):
        ClassifierService(v)


def test_card_sha256_is_of_the_card_checked_at_load(repo, services):
    """What the purifier answers as CARD_SHA256 is the card it checked when it loaded, not what the file holds
    later: the same card re-serialised on disk changes nothing in the answer."""
    pur, _ = services
    path = repository.card_path(repository.version_dir(repo, "purifier", 1))
    raw = path.read_bytes()
    serve = triton_glue.with_card_sha256(pur, pur.card_sha256)
    x = np.random.default_rng(2).random((2, 1, 32, 32), dtype=np.float32)
    try:
        path.write_text(json.dumps(json.loads(raw), indent=3))
        assert path.read_bytes() != raw
        out = serve([{"IMAGES": x}])[0]
    finally:
        path.write_bytes(raw)
    assert pur.card_sha256 == {"default": hashlib.sha256(raw).hexdigest()}
    assert out["CARD_SHA256"].tolist() == [[hashlib.sha256(raw).hexdigest().encode()]] * 2
