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
from dbp.card import SCHEMA, THREAT_MODELS, binding_sha256, meta_sha256
from dbp.checkpoint import weights_sha256
from dbp.serving.launcher import ServerConfig, TritonServer, free_ports

ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = ROOT / repository.DEFAULT_REPO
# what the committed purifier/config.pbtxt serves: t_star 100, DDIM, 100 steps
DEFAULT_PURIFICATION = {"t_star": 100, "sampler": "ddim", "num_inference_steps": 100}


# ---- cards and repositories -------------------------------------------------------------------------

def synthetic_card(purifier: Path, classifier: Path, passed: bool = True, *, purification: dict | None = None,
                   steps: int = 20, eot: int = 10, n: dict | None = None, modes=("dwbox", "eot"),
                   threat_models=("paper", "fashion"), expected: bool = True, commit: str = "0" * 40) -> dict:
    """A card bound to these weights, meta.json and purification settings (no gate run: for export/serving
    tests). The defaults meet the attack-strength rules of dbp.card (both threat models and modes, PGD-20,
    EoT-10 with expected accuracy, n 64/16, a clean commit); the keywords make it fall short on purpose."""
    pur = {**DEFAULT_PURIFICATION, **(purification or {})}
    n = {"dwbox": 64, "eot": 16, **(n or {})}
    settings = []
    for tm in threat_models:
        for norm, (eps, step) in THREAT_MODELS[tm].items():
            for md in modes:
                settings.append({"name": f"{norm}-{md}" + ("" if tm == "paper" else f"@{tm}"), "threat_model_name": tm,
                                 "threat_model": norm, "eps": eps, "step": step, "mode": md, "n": n[md],
                                 "attack": {"algorithm": "PGD", "steps": steps, "eot": eot if md == "eot" else 1},
                                 "robust": {"acc": 0.5, "ci95": [0.4, 0.6], "n": n[md]},
                                 "robust_expected": ({"acc": 0.5, "ci95": [0.4, 0.6], "n": n[md]}
                                                     if md == "eot" and expected else None)})
    card = {"schema": SCHEMA,
            "model": {"purifier_sha256": weights_sha256(purifier), "classifier_sha256": weights_sha256(classifier),
                      "purifier_meta_sha256": meta_sha256(purifier), "classifier_meta_sha256": meta_sha256(classifier),
                      "purification": {k: type(v)(v) for k, v in pur.items()}},
            "data": {"dataset": "fashion_mnist", "n": n["dwbox"]},
            "clean": {"purified": {"acc": 0.8, "ci95": [0.7, 0.9]}},
            "randomized": True, "git_commit": commit,
            "requirements": {"threat_models": list(threat_models), "modes": list(modes), "min_n": {"dwbox": 64, "eot": 16},
                             "min_steps": 20, "min_eot": 10},
            "gate": {"passed": passed, "reasons": [] if passed else ["robust accuracy 0.10 < 0.30"]},
            "settings": settings}
    card["binding"] = binding_sha256(card)
    return card


def served_purification(repo: Path) -> dict:
    """The purification settings a repository's purifier/config.pbtxt serves, typed as a card records them."""
    served = repository.purification_settings(repo)
    return {"t_star": int(served["t_star"]), "sampler": served["sampler"],
            "num_inference_steps": int(served["num_inference_steps"])}


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
    from training import export

    repo = copy_repo_configs(root / "model_repository")
    (repo / "purify_classify" / "1").mkdir(exist_ok=True)
    for key, value in purifier_params.items():
        repository.set_parameter(repo / "purifier" / repository.CONFIG_FILE, key, value)
    card = write_card(root / "card.json", purifier_ckpt, classifier_ckpt, purification=served_purification(repo))
    assert export.export(purifier_ckpt, classifier_ckpt, card, repo) == 1
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
