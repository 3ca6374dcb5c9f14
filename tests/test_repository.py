"""dbp.repository: version numbers, paths, parameters, pruning, the card check, and the CLIs' deployed defaults."""
from __future__ import annotations

import json
import shutil

import pytest

from dbp import repository
from dbp.gate import config as gate
from training.defaults import deployed_default
from helpers import MODEL_REPOSITORY, copy_repo_configs, write_card


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
    assert repository.check_version(v, "purifier")["gate_status"]["status"] == "passed"
    # the same card does not vouch for this dir as a classifier (other weights)
    with pytest.raises(repository.RepositoryError, match="classifier weights .* are not the weights"):
        repository.check_version(v, "classifier")
    write_card(v / repository.CARD_FILE, tiny_diffusion_ckpt, tiny_classifier_ckpt, passed=False)
    with pytest.raises(repository.RepositoryError, match=r"refusing to serve: .* pinned policy: vs_bare"):
        repository.check_version(v, "purifier")
    (v / repository.CARD_FILE).write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(repository.RepositoryError, match="not a valid robustness card"):
        repository.check_version(v, "purifier")


def test_committed_versions_are_served_and_legacy_ones_say_so():
    """Every shipped version is served: its signed card passes the pinned policy, or the repository's legacy list
    names its exact card, the rules it fails, an approver and an expiry (and it is reported as legacy)."""
    for role in repository.ROLES:
        vs = repository.versions(MODEL_REPOSITORY / role)
        assert vs, f"no deployed {role}"
        for v in vs:
            status = repository.check_version(repository.version_dir(MODEL_REPOSITORY, role, v), role)["gate_status"]
            assert status["status"] in ("passed", "legacy")
            if status["status"] == "legacy":
                assert status["failed_rules"] and status["approver"] and status["expires"]


def test_check_version_hashes_the_bytes_it_checked(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt, monkeypatch):
    """gate_status card_sha256 is the sha256 of the bytes that were parsed and checked: the card file is read once,
    so a rewrite while the check runs (here: during the verdict) is not what the sha describes."""
    import hashlib

    from dbp import card as card_mod
    repo, v = _version(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt)
    path = v / repository.CARD_FILE
    raw = path.read_bytes()
    passes = card_mod.card_passes_for

    def rewrite_while_checking(*a, **kw):
        path.write_text(json.dumps(json.loads(raw), indent=2))
        return passes(*a, **kw)
    monkeypatch.setattr(card_mod, "card_passes_for", rewrite_while_checking)
    status = repository.check_version(v, "purifier")["gate_status"]
    assert status["status"] == "passed" and path.read_bytes() != raw
    assert status["card_sha256"] == hashlib.sha256(raw).hexdigest()


def _version(tmp_path, ckpt, cls_ckpt, **card_kw):
    """repo/purifier/1 holding the tiny purifier and a synthetic card (keywords: see helpers.synthetic_card)."""
    repo = copy_repo_configs(tmp_path / "model_repository")
    v = repo / "purifier" / "1"
    shutil.copytree(ckpt, v / repository.WEIGHTS_DIR)
    write_card(v / repository.CARD_FILE, ckpt, cls_ckpt, **card_kw)
    return repo, v


@pytest.mark.parametrize("card_kw, words", [
    (dict(modes=("dwbox",)), "strength (paper linf eps=0.03137 eot): setting missing"),
    (dict(expected=False), "no per-image expected accuracy"),
    (dict(eot=1), "EoT-1 < 10"),
    (dict(steps=2, n={"dwbox": 8, "eot": 4}), "PGD-2 < 20 steps"),  # the smoke preset's strength
    (dict(n={"dwbox": 64}), "n=64 < 256"),
    (dict(threat_models=("fashion",)), "strength (paper l2 eps=0.5 dwbox): setting missing"),
    (dict(sign=False), "the card is not signed"),
])
def test_server_refuses_cards_that_fail_the_policy(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt, card_kw,
                                                   words):
    repo, v = _version(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt, **card_kw)
    with pytest.raises(repository.RepositoryError, match="refusing to serve") as e:
        repository.check_version(v, "purifier")
    assert words in str(e.value)


def test_card_is_bound_to_the_served_purification_and_meta(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt):
    repo, v = _version(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt)
    assert repository.check_version(v, "purifier")["gate_status"]["status"] == "passed"
    repository.set_parameter(repo / "purifier" / repository.CONFIG_FILE, "t_star", 50)  # t* 100 -> 50
    with pytest.raises(repository.RepositoryError, match="t_star: served 50 vs card 100"):  # parsed as the server does
        repository.check_version(v, "purifier")
    repository.set_parameter(repo / "purifier" / repository.CONFIG_FILE, "t_star", 100)
    assert repository.check_version(v, "purifier")
    meta = json.loads((v / "weights" / "meta.json").read_text())
    meta["arch"]["note"] = "another architecture claim"
    (v / "weights" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(repository.RepositoryError, match="meta.json .* is not the architecture"):
        repository.check_version(v, "purifier")


def test_the_legacy_list_is_bound_to_one_card_and_expires(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt):
    import hashlib
    repo, v = _version(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt, modes=("dwbox",))
    entry = {"model": "purifier", "version": 1, "failed_rules": ["strength: no EoT setting"], "approver": "a person",
             "expires": "2999-01-01",
             "card_sha256": hashlib.sha256((v / repository.CARD_FILE).read_bytes()).hexdigest()}
    legacy = repo / repository.LEGACY_FILE
    legacy.write_text(json.dumps({"versions": [entry]}))
    status = repository.check_version(v, "purifier")["gate_status"]
    assert status["status"] == "legacy" and status["failed_rules"] == ["strength: no EoT setting"]
    assert status["card_sha256"] == entry["card_sha256"]
    assert "setting missing" in status["detail"]  # the recomputed reasons travel with it
    for broken in ({"expires": "2000-01-01"}, {"approver": ""}, {"failed_rules": []}, {"version": 2}):
        legacy.write_text(json.dumps({"versions": [{**entry, **broken}]}))
        with pytest.raises(repository.RepositoryError, match="refusing to serve"):
            repository.check_version(v, "purifier")
    legacy.write_text(json.dumps({"versions": [entry]}))
    write_card(v / repository.CARD_FILE, tiny_diffusion_ckpt, tiny_classifier_ckpt, modes=("dwbox",), steps=5)
    with pytest.raises(repository.RepositoryError, match="refusing to serve"):  # another card: not listed
        repository.check_version(v, "purifier")


def test_training_clis_default_to_the_deployed_models(tmp_path, monkeypatch, capsys):
    clone = tmp_path / "clone"
    repo = copy_repo_configs(clone / "model_repository")
    for role in repository.ROLES:
        for v in (1, 3):
            (repo / role / str(v) / "weights").mkdir(parents=True)
    monkeypatch.chdir(clone)
    assert deployed_default("given/ckpt", "purifier", "--purifier", "evaluate") == "given/ckpt"
    assert deployed_default(None, "classifier", "--classifier", "evaluate") == "model_repository/classifier/3/weights"
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
        deployed_default(None, "purifier", "--init", "run_addt")
    assert e.value.code == 2 and "--init not given and no deployed purifier" in capsys.readouterr().err


def test_read_parameters_unescapes_protobuf_strings(tmp_path):
    """class_names is a JSON list inside a protobuf text string: \\" and \\\\ are escaped there."""
    cfg = tmp_path / "config.pbtxt"
    cfg.write_text('parameters: { key: "class_names" value: { string_value: "[\\"T-shirt/top\\", \\"a\\\\\\\\b\\"]" } }\n'
                   'parameters: { key: "t_star" value: { string_value: "100" } }\n')
    params = repository.read_parameters(cfg)["parameters"]
    assert json.loads(params["class_names"]["string_value"]) == ["T-shirt/top", "a\\b"]
    assert params["t_star"]["string_value"] == "100"


def test_committed_certify_versions_serve_what_their_card_measured():
    """Each committed certify version with weights: its card is bound to exactly its denoiser and the configured
    classifier (what the server checks at load), and the served settings are the card's: the default n and n0 are
    the card's, every served sigma has a complete row, and the card's attack found no broken certificate beyond
    what alpha allows. Fails when the weights, the classifier or the config drift from the card (checked
    2026-12-06: the config's n 320 -> 100 fails it)."""
    from dbp.serving.contract import CertifySettings, parse_parameters
    model = MODEL_REPOSITORY / repository.CERTIFY_MODEL
    cfg = parse_parameters(CertifySettings, repository.read_parameters(model / repository.CONFIG_FILE))
    served = [v for v in repository.versions(model) if (model / str(v) / repository.WEIGHTS_DIR).is_dir()]
    assert served, "no certify version with weights is committed"
    classifier = repository.weights_dir(MODEL_REPOSITORY, "classifier", cfg.classifier_version)
    for v in served:
        card = repository.check_certify_version(model / str(v), classifier)
        assert (card["binding"]["n0"], card["binding"]["n"]) == (cfg.n0, cfg.n)
        rows = {s["sigma"]: s for s in card["sigmas"]}
        for sigma in cfg.sigma_values:
            assert rows[sigma]["complete"] and rows[sigma]["images"] >= 500, sigma
            emp = rows[sigma]["empirical"]
            assert emp and len(emp["broken_certificates"]) <= emp["broken_allowed"], sigma


def test_relative_paths_keeps_committed_evidence_free_of_machine_paths(tmp_path):
    """relative_paths makes absolute paths relative to the checkout (outside it: the name only) and leaves the rest;
    and no JSON committed as evidence holds an absolute path of the machine that wrote it."""
    import subprocess
    from helpers import ROOT
    rec = repository.relative_paths({"repo": str(ROOT / "model_repository"), "out": str(tmp_path / "x.json"),
                                     "n": 3, "rel": "runs/a", "p": ROOT / "docs"})
    assert rec == {"repo": "model_repository", "out": "x.json", "n": 3, "rel": "runs/a", "p": "docs"}
    files = subprocess.run(["git", "ls-files", "*.json"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    assert files
    bad = [f for f in files if any(f'"{prefix}' in (ROOT / f).read_text(errors="replace")
                                   for prefix in ("/work/", "/tmp/", "/root/", "/home/"))]
    assert not bad, f"absolute machine paths in committed JSON: {bad}"
