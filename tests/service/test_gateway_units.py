"""Pure parts of the gateway, no servers: version pairs, the model interface, conversion to another shape."""
from __future__ import annotations

import pytest

from gateway_testing import png_bytes
from service.app.core.errors import ApiError
from service.app.images import decode
from service.app.triton.models import InterfaceError, newest_pair, one_call_blocker, pair_info


def idx(**versions):
    return [{"name": m, "version": str(v), "state": s} for m, vs in versions.items() for v, s in vs]


def test_newest_pair_is_the_newest_version_ready_for_both():
    assert newest_pair(idx(purifier=[(1, "READY"), (2, "READY")], classifier=[(1, "READY")]),
                       "purifier", "classifier") == 1
    assert newest_pair(idx(purifier=[(1, "READY"), (3, "READY")], classifier=[(3, "READY"), (4, "READY")]),
                       "purifier", "classifier") == 3
    assert newest_pair(idx(purifier=[(2, "UNAVAILABLE")], classifier=[(2, "READY")]), "purifier", "classifier") is None


def ensemble_cfg(outputs=("PROBS", "LABEL", "PURIFIER_VERSION", "CLASSIFIER_VERSION"), purifier="-1",
                 classifier="-1"):
    """The ensemble's config as Triton's get_model_config(as_json=True) gives it (int64 as strings)."""
    return {"output": [{"name": n} for n in outputs], "ensemble_scheduling": {"step": [
        {"model_name": "purifier", "model_version": purifier}, {"model_name": "classifier", "model_version": classifier}]}}


def test_one_call_only_when_the_ensemble_runs_the_pinned_pair_and_says_so():
    both2 = idx(purifier=[(1, "READY"), (2, "READY")], classifier=[(1, "READY"), (2, "READY")],
                purify_classify=[(1, "READY")])
    def blocker(index, cfg, n):
        return one_call_blocker(index, "purify_classify", cfg, "purifier", "classifier", n)
    assert blocker(both2, ensemble_cfg(), 2) == ""
    assert blocker(both2, ensemble_cfg(), 1) == "not_newest"  # pinned 1 (e.g. by a probe), the ensemble runs 2
    newer_purifier = idx(purifier=[(1, "READY"), (2, "READY")], classifier=[(1, "READY")],
                         purify_classify=[(1, "READY")])
    assert newest_pair(newer_purifier, "purifier", "classifier") == 1
    assert blocker(newer_purifier, ensemble_cfg(), 1) == "not_newest"
    assert blocker(newer_purifier, ensemble_cfg(purifier="1"), 1) == ""  # a step that pins version 1
    assert blocker(both2, ensemble_cfg(outputs=("PROBS", "LABEL")), 2) == "no_version_outputs"  # an older config
    assert blocker(idx(purifier=[(2, "READY")], classifier=[(2, "READY")], purify_classify=[(1, "UNAVAILABLE")]),
                   ensemble_cfg(), 2) == "no_ensemble"


def meta(*names):
    return {"inputs": [{"name": "IMAGES", "datatype": "FP32"}], "outputs": [{"name": n, "datatype": "FP32"}
                                                                          for n in names]}


def test_a_cifar_interface_needs_no_gateway_change():
    ens = {"parameters": {"image_shape": {"string_value": "3,32,32"},
                          "class_names": {"string_value": '["airplane", "automobile", "bird"]'}}}
    pur = {"max_batch_size": 8, "parameters": {"t_star": {"string_value": "50"}, "sampler": {"string_value": "ddpm"},
                                               "num_inference_steps": {"string_value": "200"},
                                               "max_votes": {"string_value": "4"}}}
    cls = {"max_batch_size": 64, "parameters": {"max_votes": {"string_value": "16"}}}
    p = pair_info(7, pur, cls, ens, meta("PURIFIED"), {"outputs": [{"name": "PROBS", "datatype": "FP32"},
                                                                     {"name": "LABEL", "datatype": "INT64"}]})
    assert (p.channels, p.height, p.width, p.mode) == (3, 32, 32, "RGB")
    assert p.class_names == ("airplane", "automobile", "bird") and p.max_votes == 4 and p.max_batch == 8
    assert p.purification == {"sampler": "ddpm", "num_inference_steps": 200, "t_star": 50}
    d = decode("g.png", png_bytes((28, 28), "L"), (3, 32, 32), 1 << 20)
    assert d.array.shape == (3, 32, 32) and d.info["conversions"][0] == "mode L -> RGB"
    with pytest.raises(ApiError, match="mode L \\(model takes RGB\\)"):
        decode("g.png", png_bytes((32, 32), "L"), (3, 32, 32), 1 << 20, convert=False)


@pytest.mark.parametrize("params, match", [
    ({}, "image_shape"),
    ({"image_shape": {"string_value": "1,32"}}, "C,H,W"),
    ({"image_shape": {"string_value": "1,32,32"}, "class_names": {"string_value": '["a", "a"]'}}, "duplicates"),
])
def test_an_incomplete_interface_says_what_is_missing(params, match):
    pur = {"input": [{"name": "IMAGES", "dims": ["-1", "-1", "-1"]}]}
    with pytest.raises(InterfaceError, match=match):
        pair_info(1, pur, {}, {"parameters": params}, meta("PURIFIED"), meta("PROBS", "LABEL"))


def test_card_summary_reads_both_card_schemas():
    from service.app.cards import summarize
    v2 = {"schema": "dbp.robustness_card/2", "gate": {"passed": True}, "data": {"dataset": "fashion_mnist", "n": 64},
          "clean": {"purified": {"acc": 0.9, "ci95": [0.8, 0.95]}},
          "settings": [{"name": "linf-eot", "mode": "eot", "threat_model": "linf", "eps": 0.03, "n": 32,
                        "robust": {"acc": 0.7, "ci95": [0.5, 0.8]}, "worst_case": {"acc": 0.6, "ci95": [0.4, 0.7]},
                        "robust_expected": {"acc": 0.65}}]}
    s = summarize(v2)
    assert s["gate"] == "unverified" and s["clean_accuracy"] == 0.9 and s["n"] == 64  # its passed=True is no proof
    assert s["settings"][0]["robust_accuracy"] == 0.6 and s["settings"][0]["expected_robust_accuracy"] == 0.65
    v1 = {"settings": [{"name": "tiny", "robust": {"acc": 0.5}}, "junk"], "gate": "bad"}
    s1 = summarize(v1)
    assert s1["settings"][0]["robust_accuracy"] == 0.5 and s1["gate"] == "unverified" and len(s1["settings"]) == 1
    legacy = summarize(v2, {"failed_rules": ["vs_bare (paper l2 eps=0.5 dwbox)"], "expires": "2027-01-31"})
    assert legacy["gate"] == "legacy" and legacy["failed_rules"] and "gate_passed" not in legacy
    signed = summarize({**v2, "schema": "dbp.robustness_card/3", "signature": {"key_id": "k"},
                        "policy": {"sha256": "p"}})
    assert signed["gate"] == "passed" and signed["signed_by"] == "k" and signed["policy_sha256"] == "p"


def test_what_the_gateway_restates_of_dbp_is_the_same():
    """The gateway may not import dbp (its own deployable), so it restates a few names; like diffusers' "Copied
    from" checker, this ties every one of them to the definition in dbp: the repository's files and model
    names, the signed card schema, and the tensor names of the served contract."""
    from dbp import repository
    from dbp.gate.verdict import SCHEMA
    from dbp.serving import contract
    from service.app import cards
    from service.app.core.config import Settings
    from service.app.triton import models
    assert cards.CARD_FILE == repository.CARD_FILE and cards.LEGACY_FILE == repository.LEGACY_FILE
    assert cards.CARDS_DIR == repository.CARDS_DIR and cards.DEFAULT_PROFILE == repository.DEFAULT_PROFILE
    assert models.DEFAULT_PROFILE == contract.DEFAULT_PROFILE and models.PROFILE_KEYS == contract.PROFILE_KEYS
    assert models.PROFILE_NAME.pattern == contract._PROFILE_NAME.pattern
    assert cards.SIGNED_SCHEMA == SCHEMA
    s = Settings()
    assert (s.PURIFIER_MODEL, s.CLASSIFIER_MODEL) == tuple(repository.ROLES)
    assert (repository.default_repository() / s.ENSEMBLE_MODEL / repository.CONFIG_FILE).exists()
    assert (models.IMAGES, models.SEED, models.VOTES, models.PROFILE) == contract.PURIFIER_INPUTS
    assert (models.PURIFIED, models.VERSION, models.CARD_SHA256) == contract.PURIFIER_OUTPUTS
    assert models.VERSION == contract.VERSION and models.CARD_SHA256 == contract.CARD_SHA256
    assert models.PURIFIER_CARD_SHA256 == contract.PURIFIER_CARD_SHA256 in contract.ENSEMBLE_OUTPUTS
    assert (models.PURIFIER_VERSION, models.CLASSIFIER_VERSION) == (contract.PURIFIER_VERSION,
                                                                    contract.CLASSIFIER_VERSION)
    assert {models.PROBS, models.LABEL, models.AGREEMENT, models.PURIFIER_VERSION,
            models.CLASSIFIER_VERSION} <= set(contract.ENSEMBLE_OUTPUTS)
    assert {models.PROBS, models.LABEL, models.AGREEMENT} <= set(contract.CLASSIFIER_OUTPUTS)


def _card_summary(tmp_path, text: str):
    """CardReader's summary of a default card with this exact text, in a repository of its own."""
    from service.app.cards import CardReader
    path = tmp_path / "purifier" / "1" / "robustness_card.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return CardReader(tmp_path, "purifier").summary(1)


def test_a_card_summary_names_the_sha256_of_the_bytes_it_read(tmp_path):
    import hashlib
    import json
    card = {"schema": "dbp.robustness_card/2", "gate": {"passed": True}, "clean": {"purified": {"acc": 0.9}}}
    for text in (json.dumps(card), json.dumps(card, indent=2)):  # the same card, other bytes, another sha
        s = _card_summary(tmp_path, text)
        assert s["card_sha256"] == hashlib.sha256(text.encode()).hexdigest() and s["clean_accuracy"] == 0.9


def test_the_summary_is_shown_only_for_the_card_the_server_checked(tmp_path):
    """cards.bind_summary, including what a real server cannot be made to answer: rows naming different cards, or
    fewer shas than rows."""
    from service.app.cards import bind_summary
    from service.app.schemas import ClassifyResponse, RobustnessSummary
    s = _card_summary(tmp_path, '{"schema": "dbp.robustness_card/2", "gate": {"passed": true}, "settings": []}')
    mine, other = s["card_sha256"], "0" * 64
    shown, served, binding = bind_summary(s, [mine] * 3, 3)
    assert (binding, served, shown["card_binding"], shown["gate"]) == ("verified", mine, "verified", "unverified")
    # a model config older than CARD_SHA256: nothing to compare, the figures stay and say so
    shown, served, binding = bind_summary(s, None, 3)
    assert (binding, served, shown["card_binding"]) == ("unchecked", None, "unchecked")
    for rows, n, server_sha in (([other] * 2, 2, other), ([mine, other], 2, None), ([mine], 2, None)):
        shown, served, binding = bind_summary(s, rows, n)
        assert binding == "mismatch" and served == server_sha, rows
        assert shown == {"gate": "card_mismatch", "card_binding": "mismatch", "card_sha256": mine,
                         "served_card_sha256": sorted(set(rows))}
        summary = RobustnessSummary.model_validate(shown)  # the receipt's schema takes it, with no figures
        assert summary.settings == [] and summary.clean_accuracy is None
    assert "card_mismatch" in ClassifyResponse.model_json_schema()["$defs"]["RobustnessSummary"]["properties"][
        "gate"]["description"]
    assert bind_summary(None, [other], 1) == (None, other, None)  # no card read: nothing shown, nothing to bind


def test_a_mismatch_is_counted_and_logged(tmp_path, caplog):
    import hashlib
    from service.app.api.common import card_receipt
    from service.app.cards import CardReader
    from service.app.core.metrics import GatewayMetrics
    from service.app.triton.pool import Outcome
    text = '{"schema": "dbp.robustness_card/2", "gate": {"passed": true}, "data": {"n": 8}}'
    _card_summary(tmp_path, text)
    sha = hashlib.sha256(text.encode()).hexdigest()
    p = pair_info(1, {"input": [{"name": "IMAGES", "dims": ["1", "32", "32"]}]}, {}, {}, meta("PURIFIED"),
                  meta("PROBS", "LABEL"))
    cards, metrics = CardReader(tmp_path, "purifier"), GatewayMetrics()

    def count():
        return metrics.registry.get_sample_value("dbp_gateway_card_mismatch_total", {"endpoint": "/purify"})
    assert count() == 0
    ok = card_receipt(cards, metrics, "/purify", Outcome(p, "u", {}, 0.0, card_sha256=[sha, sha]), "default", 2)
    assert ok["card_sha256"] == sha and ok["robustness"]["n"] == 8 and count() == 0
    with caplog.at_level("WARNING", logger="service.cards"):
        bad = card_receipt(cards, metrics, "/purify", Outcome(p, "u", {}, 0.0, card_sha256=[sha, "f" * 64]),
                           "default", 2)
    assert bad["card_sha256"] is None and bad["robustness"]["gate"] == "card_mismatch" and count() == 1
    assert "withheld" in caplog.text and "f" * 64 in caplog.text


def test_the_gateway_learns_which_models_report_the_card_they_checked():
    ens = {"parameters": {"image_shape": {"string_value": "1,32,32"}}}
    both = pair_info(1, {}, {}, {**ens, "output": [{"name": "PURIFIER_CARD_SHA256"}]}, meta("PURIFIED", "CARD_SHA256"),
                     meta("PROBS", "LABEL"))
    assert both.card_reported == {"purifier", "ensemble"}
    older = pair_info(1, {}, {}, ens, meta("PURIFIED", "VERSION"), meta("PROBS", "LABEL"))
    assert older.card_reported == frozenset()


def test_a_card_replaced_with_its_old_mtime_is_read_again(tmp_path):
    """CardReader caches per file identity: a card replaced by a copy that keeps the old mtime (cp -p, rsync -a)
    must not keep the old summary and sha."""
    import hashlib
    import json
    import os

    from service.app.cards import CardReader
    path = tmp_path / "purifier" / "1" / "robustness_card.json"
    path.parent.mkdir(parents=True)
    card = {"schema": "dbp.robustness_card/2", "gate": {"passed": True}, "clean": {"purified": {"acc": 0.9}}}
    path.write_text(json.dumps(card))
    st = path.stat()
    reader = CardReader(tmp_path, "purifier")
    assert reader.summary(1)["clean_accuracy"] == 0.9
    new = tmp_path / "new.json"
    new.write_text(json.dumps({**card, "clean": {"purified": {"acc": 0.5}}}, indent=1))
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(new, path)  # the same mtime, another file
    s = reader.summary(1)
    assert s["clean_accuracy"] == 0.5 and s["card_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_card_sha_requested_but_not_answered_is_a_mismatch_not_unchecked():
    """pool._card_rows: an output the gateway asked for (the model declares it) and did not get must not downgrade
    the receipt to 'unchecked' with figures shown; only an output never requested is unchecked."""
    import numpy as np

    from service.app.cards import MISMATCH, UNCHECKED, bind_summary
    from service.app.triton.pool import _card_rows
    sha = "a" * 64
    out = {"CARD_SHA256": np.array([[sha.encode()]], dtype=object)}
    assert _card_rows(dict(out), "CARD_SHA256", True) == [sha]
    assert _card_rows({}, "CARD_SHA256", True) == []
    assert _card_rows(dict(out), "CARD_SHA256", False) is None
    summary = {"gate": "passed", "card_sha256": sha, "clean_accuracy": 0.9, "settings": []}
    assert bind_summary(summary, _card_rows({}, "CARD_SHA256", True), 1)[2] == MISMATCH
    assert bind_summary(summary, _card_rows({}, "CARD_SHA256", False), 1)[2] == UNCHECKED
