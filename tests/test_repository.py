"""dbp.repository: version numbers, paths, parameters, pruning, the card check, and the CLIs' deployed defaults."""
from __future__ import annotations

import json
import shutil

import pytest

from dbp import config as C
from dbp import repository
from helpers import MODEL_REPOSITORY, copy_repo_configs, write_card
from training import gate


def test_versions_ignore_temporary_and_foreign_dirs(tmp_path):
    d = tmp_path / "purifier"
    for name in ("2", "10", "1", ".export-11-ab12cd34", "notes", "3.bak"):
        (d / name).mkdir(parents=True)
    (d / "4").write_text("a file, not a version")
    assert repository.versions(d) == [1, 2, 10]
    assert repository.newest_version(d) == 10
    assert repository.versions(tmp_path / "missing") == [] and repository.newest_version(tmp_path / "missing") is None
    assert repository.weights_dir(tmp_path, "purifier", 10) == d / "10" / "weights"


def test_prune_keeps_the_newest_and_reads_the_policy(tmp_path):
    repo = copy_repo_configs(tmp_path / "model_repository")
    d = repo / "purifier"
    for v in (1, 2, 3, 5):
        (d / str(v)).mkdir()
    keep = repository.num_versions_kept(d)
    assert keep == 2  # the committed config: latest { num_versions: 2 }
    assert [p.name for p in repository.prune(d, keep)] == ["1", "2"]
    assert repository.versions(d) == [3, 5]
    (d / "config.pbtxt").write_text('name: "purifier"\n')
    with pytest.raises(repository.RepositoryError, match="version_policy"):
        repository.num_versions_kept(d)


def test_parameters_round_trip_and_unknown_key_is_an_error(tmp_path):
    cfg = copy_repo_configs(tmp_path / "model_repository") / "purifier" / "config.pbtxt"
    repository.set_parameter(cfg, "sampler", "ddpm")
    repository.set_parameter(cfg, "t_star", 20)
    params = repository.read_parameters(cfg)["parameters"]
    assert params["sampler"] == {"string_value": "ddpm"} and params["t_star"] == {"string_value": "20"}
    with pytest.raises(repository.RepositoryError, match="'tstar' not found"):
        repository.set_parameter(cfg, "tstar", 5)
    with pytest.raises(repository.RepositoryError, match="not the model repository"):
        repository.check_layout(tmp_path)


def test_check_version_binds_the_card_to_the_weights(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt):
    v = tmp_path / "purifier" / "1"
    shutil.copytree(tiny_diffusion_ckpt, v / repository.WEIGHTS_DIR)
    write_card(v / repository.CARD_FILE, tiny_diffusion_ckpt, tiny_classifier_ckpt)
    assert repository.check_version(v, "purifier")["gate"]["passed"] is True
    # the same card does not vouch for this dir as a classifier (other weights)
    with pytest.raises(repository.RepositoryError, match="classifier weights .* are not the weights"):
        repository.check_version(v, "classifier")
    write_card(v / repository.CARD_FILE, tiny_diffusion_ckpt, tiny_classifier_ckpt, passed=False)
    with pytest.raises(repository.RepositoryError, match="refusing to serve: robustness gate failed"):
        repository.check_version(v, "purifier")
    (v / repository.CARD_FILE).write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(repository.RepositoryError, match="not a valid robustness card"):
        repository.check_version(v, "purifier")


def test_committed_versions_pass_their_cards():
    for role in repository.ROLES:
        vs = repository.versions(MODEL_REPOSITORY / role)
        assert vs, f"no deployed {role}"
        for v in vs:
            repository.check_version(repository.version_dir(MODEL_REPOSITORY, role, v), role)


def test_training_clis_default_to_the_deployed_models(tmp_path, monkeypatch, capsys):
    clone = tmp_path / "clone"
    repo = copy_repo_configs(clone / "model_repository")
    for role in repository.ROLES:
        for v in (1, 3):
            (repo / role / str(v) / "weights").mkdir(parents=True)
    monkeypatch.chdir(clone)
    assert C.deployed_default("given/ckpt", "purifier", "--purifier", "evaluate") == "given/ckpt"
    assert C.deployed_default(None, "classifier", "--classifier", "evaluate") == "model_repository/classifier/3/weights"
    assert "evaluate: no --classifier given; using the deployed classifier model_repository/classifier/3" \
        in capsys.readouterr().err
    cfg = gate.GateConfig()
    gate.validate(cfg)
    gate.use_deployed(cfg)
    assert (cfg.repository, cfg.version) == ("model_repository", 3)
    assert [str(p) for p in gate.resolve_dirs(cfg)] == ["model_repository/purifier/3/weights",
                                                       "model_repository/classifier/3/weights"]
    assert "gating version 3 of model_repository" in capsys.readouterr().err
    for role in repository.ROLES:
        shutil.rmtree(repo / role / "1")
        shutil.rmtree(repo / role / "3")
    with pytest.raises(SystemExit) as e:
        C.deployed_default(None, "purifier", "--init", "run_addt")
    assert e.value.code == 2 and "--init not given and no deployed purifier" in capsys.readouterr().err
