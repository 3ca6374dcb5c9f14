"""training.export (over dbp.repository): gated, atomic, numbered versions in a temporary copy of model_repository/."""
from __future__ import annotations

import filecmp
import json
import re
import shutil
from pathlib import Path

import pytest

from dbp import repository
from dbp.checkpoint import load_meta, weights_sha256
from dbp.serving.services import load_version
from helpers import copy_repo_configs, write_card
from training import export


@pytest.fixture
def repo(tmp_path) -> Path:
    return copy_repo_configs(tmp_path / "model_repository")


def entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_export_refuses_without_a_passing_card(repo, tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt):
    failed = write_card(tmp_path / "failed.json", tiny_diffusion_ckpt, tiny_classifier_ckpt, passed=False)
    # a passing card, but computed on other weights (the classifier's hash where the purifier's belongs)
    other = write_card(tmp_path / "other.json", tiny_classifier_ckpt, tiny_classifier_ckpt)
    for card, msg in [(failed, "robustness gate failed: robust accuracy 0.10 < 0.30"),
                      (other, "purifier weights .* are not the weights the card was computed on"),
                      (tmp_path / "missing.json", "no robustness card")]:
        with pytest.raises(export.ExportError, match=msg):
            export.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, card, repo)
    for model in ("purifier", "classifier"):
        assert entries(repo / model) == ["config.pbtxt", "model.py"]  # no version, no temp dir


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
    assert entries(v1) == ["__pycache__", "export.json", "model.py", "robustness_card.json", "weights"]
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
        assert entries(repo / model) == ["2", "3", "config.pbtxt", "model.py"]  # version_policy latest 2
    # a rollback is deleting the newest dir; the next export continues after the highest remaining one
    shutil.rmtree(repo / "purifier" / "3")
    shutil.rmtree(repo / "classifier" / "3")
    assert export.main(argv) == 0
    assert entries(repo / "purifier") == ["2", "3", "config.pbtxt", "model.py"]
    assert json.loads((repo / "classifier" / "3" / "export.json").read_text())["version"] == 3


@pytest.mark.parametrize("card_kw, words", [
    (dict(modes=("dwbox",)), "no paper linf eps=0.03137 eot setting"),  # randomized purifier, no EoT
    (dict(steps=2, eot=2, n={"dwbox": 8, "eot": 8}), "PGD-2 < the minimum 20"),  # --preset smoke
    (dict(purification={"t_star": 50}), "t_star: served '100' vs card 50"),
    (dict(commit="abc-dirty"), "not a clean commit"),
])
def test_export_refuses_weak_or_unbound_cards(repo, tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt, card_kw,
                                              words):
    card = write_card(tmp_path / "card.json", tiny_diffusion_ckpt, tiny_classifier_ckpt, **card_kw)
    with pytest.raises(export.ExportError, match="refusing to export") as e:
        export.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, card, repo)
    assert words in str(e.value)
    assert entries(repo / "purifier") == ["config.pbtxt", "model.py"]


def test_export_refuses_a_card_significantly_worse_than_its_baseline(repo, tmp_path, tiny_diffusion_ckpt,
                                                                     tiny_classifier_ckpt):
    from helpers import synthetic_card
    card = synthetic_card(tiny_diffusion_ckpt, tiny_classifier_ckpt)
    card["comparison"] = {"settings": {"linf-dwbox": {"verdict": "significantly_worse", "promotable": False}}}
    path = tmp_path / "card.json"
    path.write_text(json.dumps(card))
    with pytest.raises(export.ExportError, match="paired comparison linf-dwbox: significantly_worse"):
        export.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, path, repo)


def test_provenance_records_no_absolute_paths(repo, tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt):
    card = write_card(tmp_path / "card.json", tiny_diffusion_ckpt, tiny_classifier_ckpt)
    export.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, card, repo)
    prov = (repo / "purifier" / "1" / "export.json").read_text()
    assert str(tmp_path) not in prov and "/tmp" not in prov and json.loads(prov)["sources"]["purifier"]["sha256"]
