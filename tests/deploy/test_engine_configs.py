"""The GPU engine's selection in deploy/: the purifier's configs/gpu.pbtxt (Triton's --model-config-name=gpu) is the
served config.pbtxt but for the engine and the instance kind, and the image and the StatefulSet select it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from dbp import repository
from dbp.serving.contract import PURIFIER_ENGINES, PurifierSettings, parse_parameters

ROOT = Path(__file__).resolve().parents[2]
PURIFIER = ROOT / "model_repository" / "purifier"


def _body(text: str) -> list[str]:
    """Config lines without comments, the engine parameter and the instance_group."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [ln for ln in lines if '"engine"' not in ln and not ln.startswith("instance_group")]


def test_gpu_config_is_the_served_config_but_engine_and_instance_kind():
    cpu, gpu = (PURIFIER / "config.pbtxt").read_text(), (PURIFIER / "configs" / "gpu.pbtxt").read_text()
    assert _body(gpu) == _body(cpu)
    assert "kind: KIND_GPU" in gpu
    s = parse_parameters(PurifierSettings, repository.read_parameters(PURIFIER / "configs" / "gpu.pbtxt"))
    assert s.engine in ("tensorrt", "onnxruntime-cuda") and s.engine in PURIFIER_ENGINES
    served = parse_parameters(PurifierSettings, repository.read_parameters(PURIFIER / "config.pbtxt"))
    assert served.engine in PURIFIER_ENGINES


def test_image_and_statefulset_select_the_gpu_config():
    dockerfile = (ROOT / "deploy" / "triton" / "Dockerfile").read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*?\])\s*$", dockerfile.replace("\\\n", " "), re.M | re.S).group(1))
    assert "--model-config-name=gpu" in cmd
    assert re.search(r"pip install .*onnxruntime-gpu==\d", dockerfile)
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "triton-statefulset.yaml").read_text()))
    sts = next(d for d in docs if d and d.get("kind") == "StatefulSet")
    c = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "triton")
    assert "--model-config-name=gpu" in c["args"]
