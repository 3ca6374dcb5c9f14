"""training.verify: a user's one-command check of a served version's receipt."""
from __future__ import annotations

import json

from dbp import repository
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


# ---- serving profiles: every profile the purifier's config.pbtxt declares, each with its own card -----------------

def _committed_purifier_v2(root):
    """root/model_repository with only what checking purifier version 2 reads: purifier/config.pbtxt, version 2's
    weights, robustness_card.json and cards/, and legacy.json (copies, so the committed files are never touched)."""
    import shutil

    repo = root / "model_repository"
    src = MODEL_REPOSITORY / "purifier" / "2"
    dst = repo / "purifier" / "2"
    dst.mkdir(parents=True)
    shutil.copy(MODEL_REPOSITORY / "purifier" / repository.CONFIG_FILE, repo / "purifier")
    shutil.copy(MODEL_REPOSITORY / repository.LEGACY_FILE, repo)
    shutil.copytree(src / repository.WEIGHTS_DIR, dst / repository.WEIGHTS_DIR)
    shutil.copytree(src / repository.CARDS_DIR, dst / repository.CARDS_DIR)
    shutil.copy(src / repository.CARD_FILE, dst)
    return dst


def _lines(out: str, status: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(status)]


def test_verify_checks_every_declared_profile_of_the_committed_version_2(tmp_path, capsys):
    v2 = _committed_purifier_v2(tmp_path)
    assert verify.main([str(v2)]) == 1  # legacy: served, but not passed
    out = capsys.readouterr().out
    assert out.startswith(f"LEGACY   {v2}: ")  # the default profile first, in the format it always had
    legacy = _lines(out, "LEGACY")
    assert len(legacy) == 2 and legacy[1].startswith(f"LEGACY   {v2} profile fast: ")
    assert out.count("approved by dbp maintainers") == 2 and "issue 22" in out
    assert "REFUSED" not in out and "PASSED" not in out
    rows = verify.check_version(v2, "purifier")
    assert [(r["profile"], r["status"], r["card"]) for r in rows] == [
        ("default", "legacy", str(repository.card_path(v2, "default"))),
        ("fast", "legacy", str(repository.card_path(v2, "fast")))]
    assert verify.main([str(v2), "--profile", "fast"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"LEGACY   {v2} profile fast: ") and len(_lines(out, "LEGACY")) == 1
    assert verify.main([str(v2), "--profile", "turbo"]) == 2
    assert "declares no profile 'turbo'" in capsys.readouterr().err


def test_verify_fails_naming_the_profile_whose_card_was_edited(tmp_path, capsys):
    v2 = _committed_purifier_v2(tmp_path)
    fast = repository.card_path(v2, "fast")
    card = json.loads(fast.read_text())
    card["settings"][0]["worst_case"]["acc"] = 0.99  # one nicer number, written by hand
    fast.write_text(json.dumps(card))
    assert verify.main([str(v2)]) == 1
    out = capsys.readouterr().out
    assert _lines(out, "LEGACY")[0].startswith(f"LEGACY   {v2}: ")  # the default card is untouched
    refused = _lines(out, "REFUSED")
    assert len(refused) == 1 and refused[0].startswith(f"REFUSED  {v2} profile fast: ")
    assert "refusing to serve" in refused[0]
    assert {r["profile"]: r["status"] for r in verify.check_version(v2, "purifier")} == {
        "default": "legacy", "fast": "refused"}
    assert verify.main([str(v2), "--profile", "fast"]) == 1
    assert _lines(capsys.readouterr().out, "REFUSED")[0].startswith(f"REFUSED  {v2} profile fast: ")


def test_verify_reports_a_declared_profile_without_a_card_as_not_served(tmp_path, capsys):
    v2 = _committed_purifier_v2(tmp_path)
    repository.card_path(v2, "fast").unlink()
    assert verify.main([str(v2)]) == 1  # the default card is legacy: that alone is exit 1
    out = capsys.readouterr().out
    assert _lines(out, "NOT SERVED") and _lines(out, "NOT SERVED")[0].startswith(f"NOT SERVED {v2} profile fast: ")
    assert "no robustness card" in out and "REFUSED" not in out
    fast = verify.check_version(v2, "purifier", "fast")
    assert [(r["status"], r["ok"]) for r in fast] == [("not served", True)]


def test_verify_passes_a_version_whose_profiles_pass_or_have_no_card(tmp_path, capsys, tiny_diffusion_ckpt,
                                                                     tiny_classifier_ckpt):
    from helpers import profile_repo

    repo = profile_repo(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt)  # fast: own card, mis: wrong, nocard
    v1 = repo / "purifier" / "1"
    capsys.readouterr()
    assert {r["profile"]: r["status"] for r in verify.check_version(v1, "purifier")} == {
        "default": "passed", "fast": "passed", "mis": "refused", "nocard": "not served"}
    assert verify.main([str(v1)]) == 1  # mis's card is bound to other settings
    out = capsys.readouterr().out
    assert out.startswith(f"PASSED   {v1}: ") and f"REFUSED  {v1} profile mis: " in out
    assert "purification settings served are not the ones" in out
    assert verify.main([str(v1), "--profile", "fast"]) == 0
    assert verify.main([str(v1), "--profile", "nocard"]) == 0
    repository.card_path(v1, "mis").unlink()
    capsys.readouterr()
    assert verify.main([str(repo)]) == 0  # a declared profile without a card fails nothing by itself
    out = capsys.readouterr().out
    assert f"PASSED   {v1} profile fast: " in out and f"NOT SERVED {v1} profile nocard: " in out


def test_verify_refuses_a_version_whose_declared_profile_the_server_cannot_load(tmp_path, capsys, tiny_diffusion_ckpt,
                                                                                 tiny_classifier_ckpt):
    """A profile's settings off the timestep grid make the server refuse the whole purifier (PurifierService builds
    a Purifier per declared profile: Diffusion.check_settings), card or not; verify says so, naming the profile."""
    from helpers import TEST_PROFILES, profile_repo

    repo = profile_repo(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt)
    v1 = repo / "purifier" / "1"
    repository.card_path(v1, "mis").unlink()
    capsys.readouterr()
    assert verify.main([str(v1)]) == 0  # the valid repository passes
    assert "REFUSED" not in capsys.readouterr().out
    odd = {**TEST_PROFILES, "odd": {"t_star": 100, "sampler": "ddim", "num_inference_steps": 30}}  # stride 33
    repository.set_parameter(repo / "purifier" / repository.CONFIG_FILE, "profiles", json.dumps(odd))
    assert verify.main([str(v1)]) == 1
    out = capsys.readouterr().out
    refused = _lines(out, "REFUSED")
    assert len(refused) == 1 and refused[0].startswith(
        f"REFUSED  {v1}: the server refuses to load this version: profile odd: ")
    assert "not on the grid" in refused[0]
    assert "PASSED" not in out and "NOT SERVED" not in out  # no profile of a version that does not load is served
    rows = verify.check_version(v1, "purifier")
    assert [(r["status"], r["ok"]) for r in rows] == [("refused", False)]
    assert verify.main([str(v1), "--profile", "fast"]) == 1  # fast's card passes, but the version does not load
    assert "profile odd: " in _lines(capsys.readouterr().out, "REFUSED")[0]
    assert verify.main([str(repo)]) == 1
