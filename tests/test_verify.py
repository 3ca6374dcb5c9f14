"""training.verify: a user's one-command check of a served version's receipt."""
from __future__ import annotations

import json
import subprocess
import sys

from dbp import receipts, repository
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
    assert len(legacy) == 3 and legacy[1].startswith(f"LEGACY   {v2} profile fast: ")
    assert legacy[2].startswith(f"LEGACY   {v2} profile strong: ")
    assert out.count("approved by dbp maintainers") == 3 and "issue 22" in out
    assert "REFUSED" not in out and "PASSED" not in out
    rows = verify.check_version(v2, "purifier")
    assert [(r["profile"], r["status"], r["card"]) for r in rows] == [
        ("default", "legacy", str(repository.card_path(v2, "default"))),
        ("fast", "legacy", str(repository.card_path(v2, "fast"))),
        ("strong", "legacy", str(repository.card_path(v2, "strong")))]
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
        "default": "legacy", "fast": "refused", "strong": "legacy"}
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


# ---- receipts: a saved /classify or /purify response, bound to the repository's card by its sha256 ---------------

def test_receipts_module_is_torch_free():
    """Anyone checks a receipt without torch; the receipt section left dbp/repository.py for dbp/receipts.py."""
    code = "import sys, dbp.receipts; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def _receipt(repo, version: int, profile: str = "default", served="card") -> dict:
    """A /purify response as the gateway builds it: the summary its CardReader reads from `repo`, bound by
    bind_summary to `served`, the sha256 the purifier answered ("card": the sha of the card on disk, i.e. what
    Triton checked; None: a server older than CARD_SHA256), through the response schema and JSON."""
    from service.app.cards import CardReader, bind_summary
    from service.app.schemas import PurifyResponse

    summary = CardReader(repo, "purifier").summary(version, profile)
    sha = summary["card_sha256"] if served == "card" else served
    robustness, card_sha256, _ = bind_summary(summary, None if sha is None else [sha], 1)
    body = PurifyResponse(
        model={"name": "purifier", "purifier_version": version, "input_shape": [1, 32, 32]},
        purification={}, profile={"name": profile, "settings": {}}, robustness=robustness, card_sha256=card_sha256,
        images=[], timings={"total_ms": 1.0, "triton_ms": 1.0, "decode_ms": 0.1})
    return json.loads(body.model_dump_json())


def _verify_receipt(tmp_path, repo, receipt) -> int:
    f = tmp_path / "receipt.json"
    f.write_text(json.dumps(receipt) if not isinstance(receipt, str) else receipt)
    return verify.main([str(repo), "--receipt", str(f)])


def _sha(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_receipt_of_a_passing_version_passes_and_one_with_other_figures_fails(tmp_path, capsys,
                                                                               tiny_diffusion_ckpt,
                                                                               tiny_classifier_ckpt):
    repo = export_repo(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt)
    card = repository.card_path(repo / "purifier" / "1")
    receipt = _receipt(repo, 1)
    assert receipt["card_sha256"] == _sha(card) and receipt["robustness"]["card_binding"] == "verified"
    capsys.readouterr()
    assert _verify_receipt(tmp_path, repo, receipt) == 0
    out = capsys.readouterr().out
    assert f"BOUND    receipt {tmp_path / 'receipt.json'}" in out and f"card sha256 {_sha(card)} is {card}" in out
    assert f"PASSED   {repo / 'purifier' / '1'}: card sha256 {_sha(card)}; " in out  # the version's own line
    assert "FIGURES  equal" in out and out.splitlines()[-1].startswith("PASSED   receipt ")

    nicer = json.loads(json.dumps(receipt))
    nicer["robustness"]["settings"][0]["robust_accuracy"] = 0.99  # the card's sha, another figure
    assert _verify_receipt(tmp_path, repo, nicer) == 1
    out = capsys.readouterr().out
    assert "FIGURES  differ" in out and f"{receipt['robustness']['settings'][0]['setting']} robust accuracy 0.99" in out
    assert out.splitlines()[-1].endswith("its robustness figures are not the card's")
    nicer = json.loads(json.dumps(receipt))
    nicer["robustness"]["clean_accuracy"] = 1.0
    assert _verify_receipt(tmp_path, repo, nicer) == 1
    assert "clean accuracy 1.0 on the receipt" in capsys.readouterr().out

    # the gateway read another card than the one Triton checked: the figures are withheld, the receipt still names
    # the card that served it, and that card is checked
    withheld = _receipt(repo, 1, served="f" * 64)
    withheld["card_sha256"] = _sha(card)
    assert withheld["robustness"]["gate"] == "card_mismatch"
    assert _verify_receipt(tmp_path, repo, withheld) == 0
    assert "FIGURES  none on the receipt" in capsys.readouterr().out
    # "withheld" with figures shown anyway is no withheld receipt: its figures are compared
    forged = json.loads(json.dumps(withheld))
    forged["robustness"].update(clean_accuracy=0.99, settings=[{"setting": "linf-dwbox", "robust_accuracy": 0.99}])
    assert _verify_receipt(tmp_path, repo, forged) == 1
    assert "FIGURES  differ" in capsys.readouterr().out

    monkey = tmp_path / "stdin.json"
    monkey.write_text(json.dumps(receipt))
    import sys

    with monkey.open() as stdin:
        saved, sys.stdin = sys.stdin, stdin
        try:
            assert verify.main([str(repo), "--receipt", "-"]) == 0
        finally:
            sys.stdin = saved
    assert "PASSED   receipt -" in capsys.readouterr().out


def test_a_receipt_of_the_committed_card_is_bound_and_reported_legacy(tmp_path, capsys):
    v2 = _committed_purifier_v2(tmp_path)
    repo = v2.parent.parent
    fast = repository.card_path(v2, "fast")
    receipt = _receipt(repo, 2, "fast")
    assert receipt["card_sha256"] == _sha(fast)
    assert _verify_receipt(tmp_path, repo, receipt) == 1  # bound, figures equal, but the card is legacy
    out = capsys.readouterr().out
    assert f"card sha256 {_sha(fast)} is {fast}" in out
    assert _lines(out, "LEGACY")[0].startswith(f"LEGACY   {v2} profile fast: card sha256 {_sha(fast)}; ")
    assert "FIGURES  equal to the card's: clean accuracy and 6 settings" in out
    assert out.splitlines()[-1].endswith("the check of its card above says legacy, not passed")


def test_a_receipt_naming_another_card_fails_naming_both(tmp_path, capsys):
    v2 = _committed_purifier_v2(tmp_path)
    repo = v2.parent.parent
    other = _receipt(repo, 2, "default")
    other["card_sha256"] = _sha(repository.card_path(v2, "fast"))  # the fast card's sha on a default receipt
    assert _verify_receipt(tmp_path, repo, other) == 1
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and out.startswith("FAILED   receipt ")
    assert f"it names card sha256 {other['card_sha256']}" in out
    assert f"has sha256 {_sha(repository.card_path(v2))}" in out


def test_a_receipt_without_card_sha256_cannot_be_bound(tmp_path, capsys):
    v2 = _committed_purifier_v2(tmp_path)
    repo = v2.parent.parent
    old = _receipt(repo, 2, served=None)  # a model config older than CARD_SHA256: unchecked, card_sha256 null
    assert old["card_sha256"] is None and old["robustness"]["card_binding"] == "unchecked"
    assert _verify_receipt(tmp_path, repo, old) == 1
    assert "cannot be bound to a card" in capsys.readouterr().out
    del old["card_sha256"]  # a server older than the field
    assert _verify_receipt(tmp_path, repo, old) == 1
    assert "cannot be bound to a card" in capsys.readouterr().out


def test_a_receipt_of_a_version_or_profile_the_repository_lacks_fails(tmp_path, capsys):
    v2 = _committed_purifier_v2(tmp_path)
    repo = v2.parent.parent
    receipt = _receipt(repo, 2, "fast")
    assert _verify_receipt(tmp_path, repo, {**receipt, "model": {**receipt["model"], "purifier_version": 7}}) == 1
    assert "has no purifier version 7 (it has: 2)" in capsys.readouterr().out
    assert _verify_receipt(tmp_path, repo, {**receipt, "profile": {"name": "turbo", "settings": {}}}) == 1
    assert "declares no serving profile 'turbo'" in capsys.readouterr().out
    repository.card_path(v2, "fast").unlink()
    assert _verify_receipt(tmp_path, repo, receipt) == 1
    assert "has no card for profile 'fast'" in capsys.readouterr().out


def test_a_malformed_receipt_is_a_cli_error(tmp_path, capsys):
    v2 = _committed_purifier_v2(tmp_path)
    repo = v2.parent.parent
    receipt = _receipt(repo, 2, "fast")
    for bad, says in [("{not json", "receipt"), ("[1, 2]", "a receipt is a JSON object"),
                      ({**receipt, "model": {"name": "purifier"}}, "model.purifier_version"),
                      ({**receipt, "profile": {"name": "../../etc"}}, "profile.name"),
                      ({**receipt, "card_sha256": "abc"}, "card_sha256: expected 64"),
                      ({**receipt, "robustness": [1]}, "robustness: expected an object")]:
        assert _verify_receipt(tmp_path, repo, bad) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("error: receipt ") and says in err, (bad, err)
    assert verify.main([str(repo), "--receipt", str(tmp_path / "missing.json")]) == 2
    assert verify.main([str(repo), "--receipt", str(tmp_path / "receipt.json"), "--profile", "fast"]) == 2


def test_the_figures_a_receipt_is_checked_against_are_the_ones_the_gateway_shows():
    """dbp.receipts.shown_figures reads a card as service/app/cards.py summarize does (the gateway imports no
    dbp): on every committed card, the same clean accuracy and (setting, robust accuracy) rows in the same order."""
    from service.app.cards import summarize

    cards = sorted(MODEL_REPOSITORY.glob("purifier/*/robustness_card.json")) + \
        sorted(MODEL_REPOSITORY.glob("purifier/*/cards/*.json"))
    assert len(cards) >= 3
    for f in cards:
        card = json.loads(f.read_text())
        shown = summarize(card)
        assert receipts.shown_figures(card) == {
            "clean_accuracy": shown["clean_accuracy"],
            "settings": [[s["setting"], s["robust_accuracy"]] for s in shown["settings"]]}, f
        assert receipts.receipt_figure_differences(shown, card) == []


def test_a_profile_receipt_fails_when_the_version_default_card_does_not_pass(tmp_path, capsys, tiny_diffusion_ckpt,
                                                                             tiny_classifier_ckpt):
    """The server loads no profile of a version whose default card it refuses, so a `fast` receipt whose own card
    passes still fails when the default card is edited."""
    from helpers import profile_repo

    repo = profile_repo(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt)
    v1 = repo / "purifier" / "1"
    receipt = _receipt(repo, 1, "fast")
    capsys.readouterr()
    assert _verify_receipt(tmp_path, repo, receipt) == 0
    default = repository.card_path(v1)
    card = json.loads(default.read_text())
    card["settings"][0]["worst_case"]["acc"] = 0.99  # one nicer number, written by hand: the signature fails
    default.write_text(json.dumps(card))
    assert _verify_receipt(tmp_path, repo, receipt) == 1
    out = capsys.readouterr().out
    assert f"REFUSED  {v1}: " in out and out.splitlines()[-1].endswith(
        "the check of the version's default card above says refused, not passed")
