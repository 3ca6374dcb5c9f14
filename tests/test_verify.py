"""training.verify: a user's one-command check of a served version's receipt."""
from __future__ import annotations

import json

from helpers import MODEL_REPOSITORY, export_repo
from training import verify


def test_verify_reports_each_rule_and_refuses_an_edited_card(tmp_path, capsys, tiny_diffusion_ckpt,
                                                            tiny_classifier_ckpt):
    repo = export_repo(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt)
    capsys.readouterr()
    assert verify.main([str(repo / "purifier" / "1")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PASSED") and "PASS  vs_bare   paper linf" in out and "PASS  clean" in out
    card_file = repo / "purifier" / "1" / "robustness_card.json"
    card = json.loads(card_file.read_text())
    card["settings"][0]["worst_case"]["acc"] = 0.99  # a nicer figure, written by hand
    card_file.write_text(json.dumps(card))
    assert verify.main([str(repo)]) == 1
    assert "REFUSED" in capsys.readouterr().out
    assert verify.main(["--card", str(card_file)]) == 1
    assert "signature does not match" in capsys.readouterr().out


def test_verify_says_legacy_versions_are_legacy(capsys):
    assert verify.main([str(MODEL_REPOSITORY)]) == 1
    out = capsys.readouterr().out
    assert "LEGACY" in out and "PASSED" not in out and "approved by" in out
    assert verify.main([str(MODEL_REPOSITORY / "nope")]) == 2
