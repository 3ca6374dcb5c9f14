"""Shared test builders: cards, throwaway model repositories, a real tritonserver on free ports, a client.

Import from test modules as `from helpers import ...` (tests/ is on sys.path through tests/conftest.py).
The fixtures at the bottom are registered in tests/conftest.py, so every test directory can use them:
  triton_server_factory  start(repo, **ServerConfig overrides) -> a started TritonServer, stopped at teardown
  export_repo_factory    build(**purifier params) -> a temporary model_repository with version 1 exported from
                         the tiny session checkpoints (the committed repository is never touched)
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from dbp import repository
from dbp.card import SCHEMA, binding_sha256, meta_sha256
from dbp.threat_models import THREAT_MODELS
from dbp.checkpoint import weights_sha256
from dbp.serving.launcher import ServerConfig, TritonServer, free_ports

ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = ROOT / repository.DEFAULT_REPO
# what the committed purifier/config.pbtxt serves: t_star 100, DDIM, 100 steps
DEFAULT_PURIFICATION = {"t_star": 100, "sampler": "ddim", "num_inference_steps": 100}


# ---- cards and repositories -------------------------------------------------------------------------

def _test_keys() -> Path:
    """One Ed25519 key pair per test session, trusted INSTEAD of the shipped keys (DBP_GATE_TRUSTED_KEYS, set at
    import so every child process, tritonserver's python stubs included, inherits it)."""
    import os
    import tempfile

    from dbp.gate import signing

    d = Path(tempfile.mkdtemp(prefix="dbp-test-keys-"))
    signing.new_key_pair(d / "gate.pem", d / "trusted")
    os.environ[signing.TRUSTED_KEYS_ENV] = str(d / "trusted")
    return d / "gate.pem"


TEST_SIGNING_KEY = _test_keys()


def _bits(n: int, ones: int) -> list[int]:
    return [1] * ones + [0] * (n - ones)


def synthetic_card(purifier: Path, classifier: Path, passed: bool = True, *, purification: dict | None = None,
                   steps: int = 20, eot: int = 10, n: dict | None = None, modes=("dwbox", "eot"),
                   threat_models=("paper", "fashion"), expected: bool = True, sign: bool = True,
                   robust: float = 0.7, bare: float = 0.05, clean: float = 0.9, baseline: str | dict | None = "self",
                   votes: int = 16, voted_robust: float | None = None) -> dict:
    """A schema-3 card bound to these weights, meta.json and purification settings, with per-image evidence
    and signed by the session's test key (no gate run: for export/serving tests). The defaults pass the pinned
    policy (dbp/gate/promotion_policy.json): the paper's budgets in both modes and Fashion l_inf 0.1 in DW-box,
    PGD-20, EoT-10 with k=10 hits per image, n 256/64, robust 70% vs a bare classifier's 5%, clean 90%, the
    sanity checks' outcomes. The keywords make it fall short on purpose (passed=False: robust equals bare).
    baseline="self": compared with a version holding these same weights that scored 10 points less (so the card
    also exports on top of a version of the same weights, as the drills' re-exports do); None: no baseline.
    votes: the served maximum VOTES attacked (the repositories' config.pbtxt serve 16), its rows at
    voted_robust (default: robust) on the EoT images."""
    from dbp.gate import signing
    from dbp.gate.policy import CLAIM_DECLARED, CLAIM_REPORTED, load_policy
    from dbp.paired import OutcomeRecord

    pur = {**DEFAULT_PURIFICATION, **(purification or {})}
    n = {"dwbox": 256, "eot": 64, **(n or {})}
    robust = robust if passed else bare
    n_all = max(n.values())
    settings, base_settings = [], {}
    for tm in threat_models:
        for norm, (eps, step) in THREAT_MODELS[tm].items():
            for md in (modes if tm == "paper" else [m for m in modes if m == "dwbox"]):
                k = n[md]
                name = f"{norm}-{md}" + ("" if tm == "paper" else f"@{tm}")
                rec = OutcomeRecord.build(_bits(k, round(robust * k)), indices=range(k), seeds=7,
                                          dataset="fashion_mnist", split="test", setting=name)
                hits = [10 if o else 0 for o in rec.outcomes]
                settings.append({
                    "name": name, "threat_model_name": tm, "threat_model": norm, "eps": eps, "step": step,
                    "mode": md, "declared": tm == "paper", "votes": 1,
                    "claim": CLAIM_DECLARED if tm == "paper" else CLAIM_REPORTED, "n": k, "attack": {"algorithm": "PGD", "steps": steps, "eot": eot if md == "eot" else 1},
                    "robust": {"acc": rec.accuracy, "ci95": [0.0, 1.0], "n": k},
                    "worst_case": {"acc": rec.accuracy, "ci95": [0.0, 1.0], "n": k},
                    "robust_expected": ({"acc": sum(hits) / (10 * k), "ci95": [0.0, 1.0], "n": k}
                                        if md == "eot" and expected else None),
                    "expected_per_image": ({"k": 10, "hits": hits, "outcomes_sha256": rec.sha256}
                                           if md == "eot" and expected else None),
                    "outcomes": rec.to_dict(), "bare_outcomes": _bits(k, round(bare * k)),
                    "clean_outcomes": _bits(k, round(clean * k)),
                    "loss_trajectory": [0.5 + 0.1 * i for i in range(steps)], "flags": {}})
                brec = OutcomeRecord.build(_bits(k, max(0, round((robust - 0.1) * k))), indices=range(k), seeds=7,
                                           dataset="fashion_mnist", split="test", setting=name)
                base_settings[name] = {"outcomes": brec.to_dict(), "expected_per_image": {
                    "k": 10, "hits": [10 if o else 0 for o in brec.outcomes], "outcomes_sha256": brec.sha256}}
    voted_robust = robust if voted_robust is None else voted_robust
    rows = []
    for norm, (eps, step) in THREAT_MODELS["paper"].items():
        k = n["eot"]
        rec = OutcomeRecord.build(_bits(k, round(voted_robust * k)), indices=range(k), seeds=9,
                                  dataset="fashion_mnist", split="test", setting=f"{norm}-voted")
        rows.append({"name": f"{norm}-eot-votes{votes}", "threat_model_name": "paper", "threat_model": norm,
                     "eps": eps, "step": step, "votes": votes, "n": k,
                     "attack": {"algorithm": "PGD", "steps": steps, "eot": -(-eot // votes)},
                     "robust": {"acc": rec.accuracy, "ci95": [0.0, 1.0], "n": k}, "outcomes": rec.to_dict(),
                     "bare_outcomes": _bits(k, round(bare * k))})
    card = {"schema": SCHEMA,
            "served_votes": {"default": 1, "max": votes, "attacked": sorted({1, votes}),
                             "rows": rows if votes > 1 else []},
            "policy": {"file": "dbp/gate/promotion_policy.json", "sha256": load_policy()["sha256"]},
            "model": {"purifier_sha256": weights_sha256(purifier), "classifier_sha256": weights_sha256(classifier),
                      "purifier_meta_sha256": meta_sha256(purifier), "classifier_meta_sha256": meta_sha256(classifier),
                      "purification": {k: type(v)(v) for k, v in pur.items()}},
            "data": {"dataset": "fashion_mnist", "split": "test", "n": n_all, "indices": list(range(n_all))},
            "clean": {"purified": {"acc": round(clean * n_all) / n_all, "ci95": [0.0, 1.0]},
                      "bare": {"acc": round(0.93 * n_all) / n_all, "ci95": [0.0, 1.0]},
                      "evidence": {"purified": _bits(n_all, round(clean * n_all)),
                                   "bare": _bits(n_all, round(0.93 * n_all))}},
            "sanity_checks": {"large_budget_not_collapsed": {"raised": False, "value": {"eps": 0.3},
                                                             "outcomes": [0] * 8},
                              "transfer_beats_white_box": {"raised": False, "outcomes": [1] * 8,
                                                           "white_box": [1] * 4 + [0] * 4}},
            "randomized": True, "git_commit": "0" * 40, "settings": settings}
    if baseline == "self":
        card["baseline"] = {"version": 1, "purifier_sha256": card["model"]["purifier_sha256"],
                            "classifier_sha256": card["model"]["classifier_sha256"], "settings": base_settings}
    elif baseline is not None:
        card["baseline"] = baseline
    card["binding"] = binding_sha256(card)
    card["gate"] = {"passed": passed, "reasons": []}  # a cache: nobody reads it
    return signing.sign(card, signing.load_private_key(TEST_SIGNING_KEY)) if sign else card


def served_purification(repo: Path) -> dict:
    """The purification settings a repository's purifier/config.pbtxt serves (its default profile), as a card
    records them."""
    return repository.profile_settings(repo)[repository.DEFAULT_PROFILE]


def write_card(path: Path, purifier: Path, classifier: Path, passed: bool = True, **kw) -> Path:
    """synthetic_card written to `path` (see there for the keywords)."""
    path.write_text(json.dumps(synthetic_card(purifier, classifier, passed, **kw)))
    return path


def copy_repo_configs(dst: Path) -> Path:
    """model_repository/ without its versions: configs and model.py shells (and the ensemble's empty v1)."""
    shutil.copytree(MODEL_REPOSITORY, dst, ignore=shutil.ignore_patterns("[0-9]*", "__pycache__"))
    return dst


def export_repo(root: Path, purifier_ckpt: Path, classifier_ckpt: Path, **purifier_params) -> Path:
    """root/model_repository with version 1 exported from the given checkpoints; purifier_params are set in
    purifier/config.pbtxt first (e.g. sampler="ddpm", t_star=20). The new version has no __pycache__, as in a
    git checkout, so the launcher must write the .pyc before the server polls."""
    from dbp import publish

    repo = copy_repo_configs(root / "model_repository")
    (repo / "purify_classify" / "1").mkdir(exist_ok=True)
    for key, value in purifier_params.items():
        repository.set_parameter(repo / "purifier" / repository.CONFIG_FILE, key, value)
    card = write_card(root / "card.json", purifier_ckpt, classifier_ckpt, purification=served_purification(repo))
    assert publish.export(purifier_ckpt, classifier_ckpt, card, repo) == 1
    shutil.rmtree(repo / "purifier" / "1" / "__pycache__")
    return repo


def load_services(repo: Path, version: int = 1):
    """(PurifierService, ClassifierService) of a version, in-process, with the settings Triton would pass."""
    from dbp.serving.contract import ClassifierSettings, PurifierSettings, parse_parameters
    from dbp.serving.services import ClassifierService, PurifierService

    def settings(role, cls):
        return parse_parameters(cls, repository.read_parameters(repo / role / repository.CONFIG_FILE))
    return (PurifierService(repository.version_dir(repo, "purifier", version), settings("purifier", PurifierSettings)),
            ClassifierService(repository.version_dir(repo, "classifier", version),
                              settings("classifier", ClassifierSettings)))


# DDPM so the reverse chain is stochastic too; t*=20 on a stride-20 grid = 2 UNet calls per request
FAST_PURIFIER = dict(sampler="ddpm", t_star=20, num_inference_steps=50, threads=1)


# a numpy-only python model: exercises the launcher without a torch start-up
TOY_CONFIG = """name: "toy"
backend: "python"
max_batch_size: 4
input [ { name: "X", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "Y", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""
TOY_MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
            "Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() + 1)]) for r in requests]
"""


def toy_repo(root: Path, model_py: str = TOY_MODEL) -> Path:
    (root / "toy" / "1").mkdir(parents=True)
    (root / "toy" / "config.pbtxt").write_text(TOY_CONFIG)
    (root / "toy" / "1" / "model.py").write_text(model_py)
    return root


# ---- a real server ------------------------------------------------------------------------------------

def server_config(repo: Path, run_dir: Path, **overrides) -> ServerConfig:
    """Loopback on three free ports (other suites run servers at the same time)."""
    h, g, m = free_ports(3)
    return ServerConfig(**{"repo": str(repo), "http_port": h, "grpc_port": g, "metrics_port": m,
                           "run_dir": str(run_dir), **overrides})


@contextmanager
def running_triton(repo: Path, run_dir: Path, **overrides) -> Iterator[TritonServer]:
    """A started TritonServer, stopped (and its stubs with it) on exit, whatever happened inside."""
    srv = TritonServer(server_config(repo, run_dir, **overrides))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


class Client:
    """The same calls over HTTP or gRPC; one connection per Client (tritonclient's are not thread-safe)."""

    def __init__(self, server: TritonServer, proto: str):
        import tritonclient.grpc
        import tritonclient.http

        self.mod = tritonclient.http if proto == "http" else tritonclient.grpc
        # generous timeout: the machine this runs on may be shared with training jobs
        self.c = (self.mod.InferenceServerClient(server.http_url, network_timeout=600.0) if proto == "http"
                  else self.mod.InferenceServerClient(server.grpc_url))
        self.is_http = proto == "http"

    def infer(self, model: str, version: str = "", **inputs: np.ndarray) -> dict[str, np.ndarray]:
        dt = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64",
              np.dtype(np.int32): "INT32"}
        ins = []
        for name, a in inputs.items():
            i = self.mod.InferInput(name, list(a.shape), dt[a.dtype])
            i.set_data_from_numpy(a)
            ins.append(i)
        r = self.c.infer(model, ins, model_version=version)
        outs = r.get_response()["outputs"] if self.is_http else r.get_response().outputs
        names = [o["name"] if isinstance(o, dict) else o.name for o in outs]
        return {n: r.as_numpy(n) for n in names}

    def close(self):
        self.c.close()


# ---- request tensors ------------------------------------------------------------------------------------

def model_requests(server: TritonServer, model: str) -> int:
    """Requests `model` has answered so far, failed ones included (Triton's statistics: requests, not images)."""
    import tritonclient.http as http

    c = http.InferenceServerClient(server.http_url)
    try:
        stats = c.get_inference_statistics(model)["model_stats"]
        return sum(int(s["inference_stats"]["success"]["count"]) + int(s["inference_stats"]["fail"]["count"])
                   for s in stats)
    finally:
        c.close()


GATEWAY_FALLBACKS = "dbp_gateway_classify_fallbacks_total"


def gateway_fallbacks(gw) -> dict[str, float]:
    """{reason: count} of the gateway's /classify fallbacks to the two pinned calls (its /metrics)."""
    return {k.split('"')[1]: v for k, v in gw.metrics().items() if k.startswith(GATEWAY_FALLBACKS + "{")}


def images(n: int, seed: int = 0, chw: tuple[int, int, int] = (1, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *chw), dtype=np.float32)


def seeds(*s: int) -> np.ndarray:
    return np.array(s, dtype=np.int64).reshape(-1, 1)


def votes(k: int, n: int) -> np.ndarray:
    return np.full((n, 1), k, np.int32)


# ---- fixtures (registered in conftest.py) ---------------------------------------------------------------

@pytest.fixture
def triton_server_factory(tmp_path_factory):
    """start(repo, **ServerConfig overrides) -> a started TritonServer on free ports; all stopped at teardown."""
    stack = []

    def start(repo: Path, **overrides) -> TritonServer:
        cm = running_triton(Path(repo), tmp_path_factory.mktemp("triton-run"), **overrides)
        srv = cm.__enter__()
        stack.append(cm)
        return srv

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def export_repo_factory(tmp_path_factory, tiny_diffusion_ckpt, tiny_classifier_ckpt):
    """build(**purifier params) -> a fresh temporary model_repository with version 1 of the tiny models."""
    def build(**purifier_params) -> Path:
        return export_repo(tmp_path_factory.mktemp("repo"), tiny_diffusion_ckpt, tiny_classifier_ckpt,
                           **purifier_params)
    return build


# ---- serving profiles -------------------------------------------------------------------------------------

# a repository's profiles for the profile tests (besides "default" = FAST_PURIFIER's DDPM t*=20): "fast" with a card
# of its own, "mis" with a card bound to other settings (copied in by hand), "nocard" without one
TEST_PROFILES = {"fast": {"t_star": 40, "sampler": "ddim", "num_inference_steps": 50},
                 "mis": {"t_star": 60, "sampler": "ddpm", "num_inference_steps": 50},
                 "nocard": {"t_star": 20, "sampler": "ddim", "num_inference_steps": 50}}
FAST_CARD_CLEAN = 0.87  # (the policy floor is 85%) the fast card's clean accuracy (the default card's is synthetic_card's 0.9)


def profile_repo(root: Path, purifier_ckpt: Path, classifier_ckpt: Path) -> Path:
    """export_repo (FAST_PURIFIER) with TEST_PROFILES declared: fast's card attached by `training.profiles add`,
    mis's card (bound to the default settings) copied in by hand, nocard none."""
    from training import profiles

    repo = export_repo(root, purifier_ckpt, classifier_ckpt, **FAST_PURIFIER)
    repository.set_parameter(repo / "purifier" / repository.CONFIG_FILE, "profiles", json.dumps(TEST_PROFILES))
    fast = write_card(root / "fast-card.json", purifier_ckpt, classifier_ckpt, purification=TEST_PROFILES["fast"],
                      clean=FAST_CARD_CLEAN)
    profiles.add(repo, 1, "fast", fast, log=lambda *a: None)
    v = repository.version_dir(repo, "purifier", 1)
    (v / repository.CARDS_DIR).mkdir(exist_ok=True)
    shutil.copy(v / repository.CARD_FILE, repository.card_path(v, "mis"))
    shutil.rmtree(v / "__pycache__", ignore_errors=True)
    return repo
