"""Purifier engines (dbp/serving/engines.py): each engine against torch on fixed inputs, the export refusing an
ONNX file that is not the gated network, the server refusing a swapped file, a version served with the
onnxruntime engine by a real tritonserver, and the GPU engines where a GPU is present."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (FAST_PURIFIER, Client, copy_repo_configs, images, load_services, seeds, served_purification,
                     write_card)
from dbp import publish, repository
from dbp.models import Purifier
from dbp.nets import EpsNet, build_unet
from dbp.serving import engines
from dbp.serving.contract import PurifierSettings, parse_parameters
from dbp.serving.services import PurifierService

pytest.importorskip("onnxruntime")
CPU = list(engines.CPU_ENGINES)


@pytest.fixture(scope="module")
def onnx_file(tiny_models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / engines.ONNX_FILE
    engines.export_onnx(tiny_models[0], path)
    return path


@pytest.mark.parametrize("engine", CPU)
def test_engine_matches_torch_on_fixed_inputs(tiny_models, onnx_file, engine):
    eps = tiny_models[0]
    net = engines.EngineEpsNet(engine, onnx_file, threads=1)
    d = engines.check_parity(eps, net)
    assert d <= engines.TOLERANCE
    # numpy in, torch out; a scalar t is broadcast over the batch; other batch sizes than the export's
    x = np.random.default_rng(0).standard_normal((5, 1, 32, 32), dtype=np.float32)
    out = net(x, np.int64(30))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (5, 1, 32, 32)
    with torch.no_grad():
        ref = eps(torch.from_numpy(x), torch.full((5,), 30, dtype=torch.long))
    assert float((out - ref).abs().max()) <= engines.TOLERANCE
    # the whole chain (dbp.diffusion's arithmetic, the engine only evaluating the UNet), same noise
    x01 = torch.from_numpy(images(3, seed=2))
    p_torch = Purifier(eps, t_star=100, sampler="ddpm", num_inference_steps=100)
    p_eng = Purifier(net, t_star=100, sampler="ddpm", num_inference_steps=100)
    noise = p_torch.sample_noise(x01, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((p_eng(x01, noise=noise) - p_torch(x01, noise=noise)).abs().max()) <= 1e-4


# ---- timesteps between the integers (vpsde, edm) --------------------------------------------------

NON_INTEGER_T = (99.9, 37.25, 0.5)


@pytest.fixture(scope="module")
def int64_onnx_file(tiny_models, tmp_path_factory) -> Path:
    """The tiny network exported the way every committed version's engine was: t traced as int64."""
    import warnings
    path = tmp_path_factory.mktemp("onnx-int64") / engines.ONNX_FILE
    x, t = torch.zeros(2, 1, 32, 32), torch.full((2,), 50, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny_models[0], (x, t), str(path), input_names=["x", "t"], output_names=["eps"],
                          dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, "eps": {0: "batch"}},
                          opset_version=engines.OPSET, dynamo=False)
    return path


@pytest.mark.parametrize("engine", CPU)
def test_float_t_export_matches_torch_between_the_integers(tiny_models, onnx_file, engine):
    eps = tiny_models[0]
    net = engines.EngineEpsNet(engine, onnx_file)
    assert net.continuous_time and net.t_dtype == np.float32
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((3, 1, 32, 32), dtype=np.float32))
    with torch.no_grad():
        for tv in NON_INTEGER_T + (30, 999):
            t = torch.full((3,), float(tv))
            ref = eps(x, t)
            assert float((net(x, t) - ref).abs().max()) <= engines.TOLERANCE, tv
            if tv != int(tv):  # the fraction matters at these sizes: what truncating would have served instead
                assert float((eps(x, t.long()) - ref).abs().max()) > 10 * engines.TOLERANCE
        # an integer t given as int64 (ddpm/ddim) still reaches the float graph
        assert float((net(x, torch.full((3,), 30, dtype=torch.long)) - eps(x, torch.full((3,), 30.0))).abs().max()
                     ) <= engines.TOLERANCE
    # parity at export/load covers a non-integer timestep for such a graph
    assert engines.parity_timesteps(net) == engines.PARITY_TIMESTEPS_CONTINUOUS
    assert any(not float(t).is_integer() for t in engines.PARITY_TIMESTEPS_CONTINUOUS)


@pytest.mark.parametrize("engine", CPU)
def test_float_t_engine_runs_the_continuous_samplers_as_torch_does(tiny_models, onnx_file, engine):
    eps = tiny_models[0]
    net = engines.EngineEpsNet(engine, onnx_file)
    x01 = torch.from_numpy(images(2, seed=4))
    for sampler, steps in (("vpsde", 100), ("edm", 3)):
        p_torch = Purifier(eps, t_star=40, sampler=sampler, num_inference_steps=steps)
        p_eng = Purifier(net, t_star=40, sampler=sampler, num_inference_steps=steps)
        noise = p_torch.sample_noise(x01, torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert float((p_eng(x01, noise=noise) - p_torch(x01, noise=noise)).abs().max()) <= 1e-4, sampler


@pytest.mark.parametrize("engine", CPU)
def test_int64_t_graph_refuses_non_integer_timesteps(tiny_models, int64_onnx_file, engine):
    eps = tiny_models[0]
    net = engines.EngineEpsNet(engine, int64_onnx_file)
    assert not net.continuous_time and net.t_dtype == np.int64
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((2, 1, 32, 32), dtype=np.float32))
    for tv in NON_INTEGER_T:
        with pytest.raises(engines.EngineError, match="takes integer timesteps.*would truncate"):
            net(x, torch.full((2,), tv))
        with pytest.raises(engines.EngineError, match="integer timesteps"):
            net(x.numpy(), np.float32(tv))  # a scalar t too
    # integer t, as int64 or as an integer-valued float, is what the graph was made for
    with torch.no_grad():
        for t in (torch.full((2,), 30, dtype=torch.long), torch.full((2,), 30.0)):
            assert float((net(x, t) - eps(x, t)).abs().max()) <= engines.TOLERANCE
    # its parity stays on the integer timesteps it can evaluate
    assert engines.parity_timesteps(net) == engines.PARITY_TIMESTEPS
    assert engines.check_parity(eps, net) <= engines.TOLERANCE
    # the chains: ddim serves, vpsde refuses (never a truncated purification)
    x01 = torch.from_numpy(images(1, seed=4))
    with torch.no_grad():
        Purifier(net, t_star=40, sampler="ddim", num_inference_steps=50)(x01, generator=torch.Generator().manual_seed(0))
        with pytest.raises(engines.EngineError, match="integer timesteps"):
            Purifier(net, t_star=40, sampler="vpsde", num_inference_steps=100)(
                x01, generator=torch.Generator().manual_seed(0))


def test_committed_engine_files_take_int64_t():
    """Every committed version's engine predates float t: read-only, the engine says so."""
    from helpers import MODEL_REPOSITORY
    files = sorted(MODEL_REPOSITORY.glob(f"purifier/*/{engines.ENGINE_DIR}/{engines.ONNX_FILE}"))
    if not files:
        pytest.skip("no committed engine file")
    for f in files:
        assert not engines.EngineEpsNet("onnxruntime", f).continuous_time, f


def test_fp16_copy_keeps_float_io(onnx_file, tmp_path):
    import onnx
    m = onnx.load(str(engines.to_fp16_onnx(onnx_file, tmp_path / "fp16.onnx")))
    io = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.input) + list(m.graph.output)}
    assert io == {"x": onnx.TensorProto.FLOAT, "t": onnx.TensorProto.FLOAT, "eps": onnx.TensorProto.FLOAT}


def test_parity_check_refuses_another_network(tiny_models, tmp_path):
    torch.manual_seed(123)
    other = EpsNet(build_unet("small")).eval()
    path = tmp_path / "other.onnx"
    engines.export_onnx(other, path)
    with pytest.raises(engines.EngineError, match="differs from the torch UNet"):
        engines.check_parity(tiny_models[0], engines.EngineEpsNet("onnxruntime", path))


def test_unknown_engine_is_a_config_error():
    with pytest.raises(ValueError, match="engine"):
        parse_parameters(PurifierSettings, {"parameters": {"engine": {"string_value": "tflite"}}})
    assert parse_parameters(PurifierSettings, {"parameters": {"engine": {"string_value": "openvino"}}}).engine == "openvino"


# ---- the gated export -----------------------------------------------------------------------------

def _fresh_repo(root: Path, purifier: Path, classifier: Path, **params):
    repo = copy_repo_configs(root / "model_repository")
    (repo / "purify_classify" / "1").mkdir(exist_ok=True)
    for k, v in params.items():
        repository.set_parameter(repo / "purifier" / repository.CONFIG_FILE, k, v)
    card = write_card(root / "card.json", purifier, classifier, purification=served_purification(repo))
    return repo, card


def test_export_binds_the_onnx_file_to_the_card(export_repo_factory):
    repo = export_repo_factory(**FAST_PURIFIER)
    vdir = repository.version_dir(repo, "purifier", 1)
    card = json.loads((vdir / repository.CARD_FILE).read_text())
    m = json.loads((vdir / engines.ENGINE_DIR / engines.MANIFEST_FILE).read_text())
    assert m["onnx_sha256"] == engines.file_sha256(vdir / engines.ENGINE_DIR / engines.ONNX_FILE)
    assert m["purifier_sha256"] == card["model"]["purifier_sha256"]
    assert m["card_binding"] == card["binding"]
    assert set(m["parity"]["max_abs_diff_eps"]) == set(CPU)
    assert max(m["parity"]["max_abs_diff_eps"].values()) <= m["parity"]["tolerance"] == engines.TOLERANCE
    assert m["exporter"]["t"] == "float32" and m["parity"]["timesteps"] == list(engines.PARITY_TIMESTEPS_CONTINUOUS)
    assert engines.check_engine_files(vdir, card) == vdir / engines.ENGINE_DIR / engines.ONNX_FILE
    assert not (repository.version_dir(repo, "classifier", 1) / engines.ENGINE_DIR).exists()


def test_export_refuses_an_onnx_file_of_other_weights(tiny_diffusion_ckpt, tiny_classifier_ckpt, tmp_path):
    torch.manual_seed(7)
    wrong = tmp_path / "wrong.onnx"
    engines.export_onnx(EpsNet(build_unet("small")).eval(), wrong)
    repo, card = _fresh_repo(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt, **FAST_PURIFIER)
    with pytest.raises(publish.ExportError, match="refusing to export: .*differs from the torch UNet"):
        publish.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, card, repo, onnx=wrong)
    assert repository.versions(repo / "purifier") == [] and repository.versions(repo / "classifier") == []


def test_export_accepts_a_matching_onnx_file(tiny_models, onnx_file, tiny_diffusion_ckpt, tiny_classifier_ckpt,
                                             tmp_path):
    repo, card = _fresh_repo(tmp_path, tiny_diffusion_ckpt, tiny_classifier_ckpt, **FAST_PURIFIER)
    assert publish.export(tiny_diffusion_ckpt, tiny_classifier_ckpt, card, repo, onnx=onnx_file) == 1
    shipped = repository.version_dir(repo, "purifier", 1) / engines.ENGINE_DIR / engines.ONNX_FILE
    assert engines.file_sha256(shipped) == engines.file_sha256(onnx_file)


# ---- the server's check ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_repo(export_repo_factory):
    return export_repo_factory(**FAST_PURIFIER)


@pytest.mark.parametrize("engine", CPU)
def test_service_with_engine_serves_what_torch_serves(engine_repo, engine):
    vdir = repository.version_dir(engine_repo, "purifier", 1)
    base = parse_parameters(PurifierSettings, repository.read_parameters(engine_repo / "purifier" / "config.pbtxt"))
    ref = PurifierService(vdir, PurifierSettings(**{**base.__dict__, "engine": "torch"}))
    svc = PurifierService(vdir, PurifierSettings(**{**base.__dict__, "engine": engine}))
    assert isinstance(svc.purifier.eps_net, engines.EngineEpsNet) and svc.engine_parity <= engines.TOLERANCE
    req = {"IMAGES": images(3, seed=5), "SEED": seeds(4, 5, 6)}
    np.testing.assert_allclose(svc([req])[0]["PURIFIED"], ref([req])[0]["PURIFIED"], atol=1e-4)


def test_server_refuses_a_swapped_onnx_file(engine_repo, tmp_path):
    src = repository.version_dir(engine_repo, "purifier", 1)
    vdir = tmp_path / "purifier" / "1"
    shutil.copytree(src, vdir)
    shutil.copy(engine_repo / "purifier" / "config.pbtxt", tmp_path / "purifier" / "config.pbtxt")
    settings = PurifierSettings(**{**FAST_PURIFIER, "engine": "onnxruntime"})
    torch.manual_seed(9)
    other = vdir / engines.ENGINE_DIR / engines.ONNX_FILE
    engines.export_onnx(EpsNet(build_unet("small")).eval(), other)
    with pytest.raises(engines.EngineError, match="is not the file export bound"):
        PurifierService(vdir, settings)
    # a manifest rewritten to the new file's hash still does not get it served: parity is re-measured at load
    mf = vdir / engines.ENGINE_DIR / engines.MANIFEST_FILE
    m = json.loads(mf.read_text())
    mf.write_text(json.dumps({**m, "onnx_sha256": engines.file_sha256(other)}))
    with pytest.raises(engines.EngineError, match="differs from the torch UNet"):
        PurifierService(vdir, settings)
    # and a version without engine files cannot be served by an ONNX engine
    shutil.rmtree(vdir / engines.ENGINE_DIR)
    with pytest.raises(engines.EngineError, match="attach_engine"):
        PurifierService(vdir, settings)
    assert PurifierService(vdir, PurifierSettings(**FAST_PURIFIER)).engine_parity is None  # torch needs none


# ---- a real tritonserver --------------------------------------------------------------------------

@pytest.mark.parametrize("engine", CPU)
def test_triton_serves_a_version_with_each_cpu_engine(export_repo_factory, triton_server_factory, engine):
    pytest.importorskip("tritonclient.http")
    repo = export_repo_factory(**FAST_PURIFIER, engine=engine)
    ref, _ = load_services(repo)  # in-process, the same engine (the settings Triton passes)
    assert isinstance(ref.purifier.eps_net, engines.EngineEpsNet)
    srv = triton_server_factory(repo, ready_timeout=240)
    c = Client(srv, "http")
    try:
        x = images(3, seed=1)
        p = c.infer("purifier", IMAGES=x, SEED=seeds(1, 2, 3))["PURIFIED"]
        np.testing.assert_allclose(p, ref([{"IMAGES": x, "SEED": seeds(1, 2, 3)}])[0]["PURIFIED"], atol=1e-5)
        torch_svc = PurifierService(repository.version_dir(repo, "purifier", 1), PurifierSettings(**FAST_PURIFIER))
        np.testing.assert_allclose(p, torch_svc([{"IMAGES": x, "SEED": seeds(1, 2, 3)}])[0]["PURIFIED"], atol=1e-4)
        assert c.infer("purify_classify", IMAGES=x, SEED=seeds(1, 2, 3))["LABEL"].shape[0] == 3
    finally:
        c.close()
    assert f"UNet on {engine} (max |eps - torch's|" in srv.log_path.read_text()  # Triton ran the engine, not torch


# ---- the GPU engines ------------------------------------------------------------------------------

def _gpu_reason() -> str | None:
    import onnxruntime as ort
    have = ort.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        return (f"no GPU engine here: onnxruntime {ort.__version__} has {', '.join(have)}; the onnxruntime-cuda and "
                f"tensorrt engines need onnxruntime-gpu and a CUDA device (deploy/triton/Dockerfile)")
    return None


@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
@pytest.mark.parametrize("engine", list(engines.GPU_ENGINES))
def test_gpu_engine_matches_torch_in_fp16(tiny_models, onnx_file, engine, tmp_path):
    import onnxruntime as ort
    if engine == "tensorrt" and "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no TensorRT execution provider in this onnxruntime-gpu")
    net = engines.EngineEpsNet(engine, onnx_file, cache_dir=tmp_path)
    assert engines.check_parity(tiny_models[0], net) <= engines.TOLERANCE_FP16
