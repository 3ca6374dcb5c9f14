"""dbp.publish and its CLI training.export: gated, atomic, numbered versions in a temporary copy of model_repository/."""
from __future__ import annotations

import filecmp
import json
import re
import shutil
from pathlib import Path

import pytest

from dbp import publish, repository
from dbp.checkpoint import load_meta, weights_sha256
from dbp.serving.services import load_version
from helpers import copy_repo_configs, write_card
from training import export


@pytest.fixture
def repo(tmp_path) -> Path:
    return copy_repo_configs(tmp_path / "model_repository")


def entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# each model dir's files besides its versions (the purifier's configs/gpu.pbtxt: deploy/'s GPU engine)
SHELL = {"purifier": ["config.pbtxt", "configs", "model.py"], "classifier": ["config.pbtxt", "model.py"]}


def test_export_refuses_without_a_passing_card(repo, tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt):
    failed = write_card(tmp_path / "failed.json", tiny_diffusion_ckpt, tiny_classifier_ckpt, passed=False)
    # a passing card, but computed on other weights (the classifier's hash where the purifier's belongs)
    other = write_card(tmp_path / "other.json", tiny_classifier_ckpt, tiny_classifier_ckpt)
    for card, msg in [(failed, r"does not pass under the pinned policy: vs_bare \(paper linf"),
                      (other, "purifier weights .* are not the weights the card was computed on"),
                      (tmp_path / "missing.json", "no robustness card")]:
        with pytest.raises(publish.ExportError, match=msg):
            publish.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, card, repo)
    for model in ("purifier", "classifier"):
        assert entries(repo / model) == SHELL[model]  # no version, no temp dir


def test_export_cli_errors_name_the_problem(repo, tmp_path, capsys, tiny_diffusion_ckpt, tiny_classifier_ckpt):
    card = write_card(tmp_path / "card.json", tiny_diffusion_ckpt, tiny_classifier_ckpt)
    cases = [
        (["--purifier", str(tmp_path / "nope")], "--purifier: .*nope is not a directory"),
        (["--purifier", str(tiny_classifier_ckpt)], "'classifier' checkpoint; a purifier needs kind diffusion or addt"),
        (["--purifier", str(tiny_diffusion_ckpt), "--repo", str(tmp_path)], "is not the model repository"),
    ]
    for args, msg in cases:
        argv = ["--classifier", str(tiny_classifier_ckpt), "--card", str(card), "--repo", str(repo)] + args
        assert export.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and re.search(msg, err), err
    with pytest.raises(SystemExit) as e:  # argparse: a required flag is missing
        export.main(["--purifier", str(tiny_diffusion_ckpt)])
    assert e.value.code == 2


def test_export_writes_gated_versions_and_keeps_the_last_two(repo, tmp_path, tiny_diffusion_ckpt,
                                                             tiny_classifier_ckpt):
    card = write_card(tmp_path / "card.json", tiny_diffusion_ckpt, tiny_classifier_ckpt)
    argv = ["--purifier", str(tiny_diffusion_ckpt), "--classifier", str(tiny_classifier_ckpt), "--card", str(card),
            "--repo", str(repo)]
    assert export.main(argv) == 0
    v1 = repo / "purifier" / "1"
    assert entries(v1) == ["__pycache__", "engine", "export.json", "model.py", "robustness_card.json", "weights"]
    assert entries(v1 / "engine") == ["engine.json", "unet.onnx"]  # the UNet as ONNX, bound to the card's weights
    assert not (repo / "classifier" / "1" / "engine").exists()
    assert filecmp.cmp(v1 / "model.py", repo / "purifier" / "model.py", shallow=False)
    # only the serving weights: EMA when the checkpoint has it, never the optimizer
    assert entries(v1 / "weights") == ["ema.safetensors", "meta.json"]
    assert entries(repo / "classifier" / "1" / "weights") == sorted(
        ["meta.json", "ema.safetensors" if (tiny_classifier_ckpt / "ema.safetensors").exists()
         else "model.safetensors"])
    assert "optimizer" not in load_meta(v1 / "weights") and "optimizer" in load_meta(tiny_diffusion_ckpt)
    assert weights_sha256(v1 / "weights") == weights_sha256(tiny_diffusion_ckpt)
    assert json.loads((v1 / "robustness_card.json").read_text()) == json.loads(card.read_text())
    for role in ("purifier", "classifier"):  # what the server checks at load time
        load_version(repo / role / "1", role)
    assert not repository.ensure_bytecode(v1 / "model.py")  # export left a valid .pyc: the stub writes nothing

    assert export.main(argv) == 0 and export.main(argv) == 0
    for model in ("purifier", "classifier"):
        assert entries(repo / model) == ["2", "3", *SHELL[model]]  # version_policy latest 2
    # a rollback is deleting the newest dir; the next export continues after the highest remaining one
    shutil.rmtree(repo / "purifier" / "3")
    shutil.rmtree(repo / "classifier" / "3")
    assert export.main(argv) == 0
    assert entries(repo / "purifier") == ["2", "3", *SHELL["purifier"]]
    assert json.loads((repo / "classifier" / "3" / "export.json").read_text())["version"] == 3


@pytest.mark.parametrize("card_kw, words", [
    (dict(modes=("dwbox",)), "strength (paper linf eps=0.03137 eot): setting missing"),  # randomized, no EoT
    (dict(steps=2, eot=2), "PGD-2 < 20 steps"),  # --preset smoke
    (dict(n={"dwbox": 64, "eot": 16}), "n=64 < 256"),  # the old CPU sizes
    (dict(purification={"t_star": 50}), "t_star: served 100 vs card 50"),
    (dict(expected=False), "no per-image expected accuracy over k >= 10"),
    (dict(clean=0.7), "clean (purified): 69.9%"),
    (dict(robust=0.12), "vs_bare (paper l2 eps=0.5 eot)"),  # 12% vs 5% on 64 images: lower bound < +10 points
    (dict(sign=False), "signature: the card is not signed"),
])
def test_export_refuses_weak_or_unbound_cards(repo, tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt, card_kw,
                                              words):
    card = write_card(tmp_path / "card.json", tiny_diffusion_ckpt, tiny_classifier_ckpt, **card_kw)
    with pytest.raises(publish.ExportError, match="refusing to export") as e:
        publish.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, card, repo)
    assert words in str(e.value)
    assert entries(repo / "purifier") == SHELL["purifier"]


def _tamper(card: dict, how: str) -> dict:
    """Edits a forger with no signing key could make to a card (the signature stays the original's)."""
    card = json.loads(json.dumps(card))
    s = card["settings"][0]
    if how == "passed_flipped":
        card["gate"]["passed"] = not card["gate"]["passed"]
    elif how == "figures_edited":
        s["worst_case"]["acc"] = s["robust"]["acc"] = 0.99
    elif how == "outcomes_fabricated":  # a whole new, self-consistent record: only the signature can tell
        from dbp.paired import OutcomeRecord
        rec = OutcomeRecord.build([1] * s["n"], indices=range(s["n"]), seeds=7, dataset="fashion_mnist",
                                  split="test", setting=s["name"])
        s["outcomes"], s["worst_case"]["acc"], s["robust"]["acc"] = rec.to_dict(), 1.0, 1.0
    elif how == "other_key":
        from dbp.gate import signing
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        card = signing.sign(card, Ed25519PrivateKey.generate())
    return card


@pytest.mark.parametrize("how, words", [
    ("passed_flipped", "signature does not match the card's content"),
    ("figures_edited", "signature does not match the card's content"),
    ("outcomes_fabricated", "signature does not match the card's content"),
    ("other_key", "which is not trusted"),
])
def test_export_refuses_tampered_cards(repo, tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt, how, words):
    """The card's own `gate.passed` is never trusted, and evidence only counts under the gate's signature."""
    from helpers import synthetic_card
    path = tmp_path / "card.json"
    path.write_text(json.dumps(_tamper(synthetic_card(tiny_diffusion_ckpt, tiny_classifier_ckpt), how)))
    with pytest.raises(publish.ExportError, match=words):
        publish.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, path, repo)


def test_export_refuses_a_card_measured_under_another_policy(repo, tmp_path, tiny_diffusion_ckpt,
                                                             tiny_classifier_ckpt):
    """Signed and otherwise passing, but measured under a policy that is not the pinned file."""
    from dbp.gate import signing
    from helpers import TEST_SIGNING_KEY, synthetic_card
    card = synthetic_card(tiny_diffusion_ckpt, tiny_classifier_ckpt)
    card["policy"]["sha256"] = "0" * 64
    path = tmp_path / "card.json"
    path.write_text(json.dumps(signing.sign(card, signing.load_private_key(TEST_SIGNING_KEY))))
    with pytest.raises(publish.ExportError, match=r"policy \(card\): measured under policy 000000000000"):
        publish.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, path, repo)


def test_export_needs_the_deployed_version_as_baseline(repo, tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt):
    """Once a version is deployed, a new card must have been compared with it (same images and seeds), must be
    non-inferior on every setting and significantly better on one."""
    first = write_card(tmp_path / "first.json", tiny_diffusion_ckpt, tiny_classifier_ckpt, baseline=None)
    assert publish.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, first, repo) == 1  # nothing deployed yet
    with pytest.raises(publish.ExportError, match="baseline is not the deployed version"):
        publish.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, first, repo)
    from helpers import synthetic_card
    card = synthetic_card(tiny_diffusion_ckpt, tiny_classifier_ckpt, sign=False)
    for name, b in card["baseline"]["settings"].items():  # the deployed version was as good: no superiority
        s = next(s for s in card["settings"] if s["name"] == name)
        b["outcomes"], b["expected_per_image"] = s["outcomes"], s["expected_per_image"]
    from dbp.gate import signing
    from helpers import TEST_SIGNING_KEY
    path = tmp_path / "same.json"
    path.write_text(json.dumps(signing.sign(card, signing.load_private_key(TEST_SIGNING_KEY))))
    with pytest.raises(publish.ExportError, match=r"superiority \(Holm, declared settings\)"):
        publish.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, path, repo)
    better = write_card(tmp_path / "better.json", tiny_diffusion_ckpt, tiny_classifier_ckpt)
    assert publish.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, better, repo) == 2


def test_provenance_records_no_absolute_paths(repo, tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt):
    card = write_card(tmp_path / "card.json", tiny_diffusion_ckpt, tiny_classifier_ckpt)
    publish.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, card, repo)
    prov = (repo / "purifier" / "1" / "export.json").read_text()
    assert str(tmp_path) not in prov and "/tmp" not in prov and json.loads(prov)["sources"]["purifier"]["sha256"]
