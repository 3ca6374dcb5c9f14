"""Purifier engines: the UNet (eps-network) exported to ONNX and evaluated by ONNX Runtime or OpenVINO.

The purification chain stays in dbp.diffusion (one definition of the steps); an engine only replaces the
network evaluation: `EngineEpsNet` is the eps_model(x_t, t) -> eps callable the chain calls, numpy or torch in,
torch out, with no gradient (serving only; attacks and training keep the torch network).

  engine            runtime                                   precision   where
  torch             the diffusers UNet in torch (default)     fp32        CPU
  onnxruntime       ONNX Runtime, CPU execution provider      fp32        CPU
  openvino          OpenVINO runtime, CPU plugin              fp32        CPU
  onnxruntime-cuda  ONNX Runtime, CUDA EP, fp16 ONNX graph    fp16        NVIDIA GPU (onnxruntime-gpu)
  tensorrt          ONNX Runtime, TensorRT EP (fp16), CUDA EP fallback    NVIDIA GPU (onnxruntime-gpu + TensorRT)

A version's ONNX file lives in <version>/engine/unet.onnx beside engine/engine.json, which binds it to the
version: the file's sha256, the sha256 of the torch weights and meta.json it was exported from (the card's
purifier_sha256 / purifier_meta_sha256, which the gate signed) and the card's binding hash, plus the parity
measured at export. Export writes both (dbp.publish) and refuses a file whose outputs differ from torch's beyond
TOLERANCE; the server (PurifierService) re-checks the hashes against the card and re-measures parity at load
(a few UNet calls), so an ONNX file swapped in by hand, or exported from other weights, is never served.

The graph's timestep input t is float32 in exports since the continuous-time samplers (dbp.diffusion
CONTINUOUS_TIME_SAMPLERS: vpsde, edm) call the network at 999 t; graphs exported before take int64 t.
`EngineEpsNet.continuous_time` says which one a file has; an int64 graph refuses a non-integer t (EngineError)
rather than truncating it, and PurifierService runs such profiles on the torch network instead.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .contract import PURIFIER_ENGINES as ENGINES
CPU_ENGINES = ("onnxruntime", "openvino")
GPU_ENGINES = ("onnxruntime-cuda", "tensorrt")
ENGINE_DIR = "engine"
ONNX_FILE = "unet.onnx"
MANIFEST_FILE = "engine.json"
OPSET = 17
# max |eps_engine - eps_torch| on PARITY_TIMESTEPS with seeded inputs (eps is ~N(0, 1)); fp32 engines agree to
# ~1e-6 here, so 1e-4 leaves room for other CPUs' kernels but not for other weights. fp16 engines: 2e-2.
TOLERANCE = 1e-4
TOLERANCE_FP16 = 2e-2
PARITY_TIMESTEPS = (0, 50, 100, 500, 999)
# a float-t graph is also measured between the integers, where vpsde/edm evaluate it (an int64 graph cannot be)
PARITY_TIMESTEPS_CONTINUOUS = (0, 0.5, 37.25, 50, 99.9, 100, 500, 999)
PARITY_BATCH = 4
PARITY_SEED = 0


class EngineError(ValueError):
    """An engine cannot be built or does not match the torch network; the message says why."""


def tolerance(engine: str) -> float:
    return TOLERANCE_FP16 if engine in GPU_ENGINES else TOLERANCE


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def chw_of(eps_net: nn.Module) -> tuple[int, int, int]:
    cfg = eps_net.unet.config
    return int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size)


# ---- export ---------------------------------------------------------------------------------------

def export_onnx(eps_net: nn.Module, path: str | Path, chw: Optional[tuple[int, int, int]] = None) -> str:
    """The eps-network as ONNX (inputs x [B,C,H,W] fp32 in [-1,1]-ish, t [B] fp32; output eps), dynamic batch.
    Returns the file's sha256. The legacy TorchScript exporter (dynamo=False): the dynamo one needs onnxscript.
    t is traced as float32, the dtype dbp.samplers passes at continuous time, so the graph keeps the fraction of
    t that vpsde/edm evaluate (an int64 trace would bake the truncation into the file)."""
    import warnings

    chw = chw or chw_of(eps_net)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = eps_net.training
    eps_net.eval()
    x, t = torch.zeros(2, *chw), torch.full((2,), 50.5, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of diffusers' shape checks, the exporter's deprecation note
        torch.onnx.export(eps_net, (x, t), str(path), input_names=["x", "t"], output_names=["eps"],
                          dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, "eps": {0: "batch"}},
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    eps_net.train(was_training)
    return file_sha256(path)


def to_fp16_onnx(src: str | Path, dst: str | Path) -> Path:
    """An fp16 copy of the graph for the CUDA EP (inputs/outputs keep their types: fp32, or int64 t in old graphs).
    Inside, t is fp16 too (steps of 0.5 near 999): within TOLERANCE_FP16, which parity checks at load."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return Path(dst)


# ---- runtimes -------------------------------------------------------------------------------------

class EngineEpsNet(nn.Module):
    """eps_model(x_t, t) -> eps evaluated by an ONNX engine. Takes torch or numpy, returns torch (float32, CPU).

    No autograd: use under torch.no_grad / inference_mode, in serving only."""

    def __init__(self, engine: str, onnx_path: str | Path, threads: int = 1, cache_dir: Optional[str | Path] = None):
        super().__init__()
        if engine not in ENGINES or engine == "torch":
            raise EngineError(f"engine must be one of {', '.join(e for e in ENGINES if e != 'torch')}, got {engine!r}")
        self.engine, self.onnx_path, self.threads = engine, Path(onnx_path), int(threads)
        if engine == "openvino":
            self._run = self._openvino(cache_dir)
        else:
            self._run = self._onnxruntime(cache_dir)

    def _onnxruntime(self, cache_dir):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise EngineError(f"engine {self.engine!r} needs onnxruntime ({e})") from None
        so = ort.SessionOptions()
        if self.threads > 0:
            so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        model = str(self.onnx_path)
        if self.engine == "onnxruntime":
            providers = ["CPUExecutionProvider"]
        else:
            have = ort.get_available_providers()
            want = "CUDAExecutionProvider" if self.engine == "onnxruntime-cuda" else "TensorrtExecutionProvider"
            if want not in have:
                raise EngineError(f"engine {self.engine!r} needs ONNX Runtime's {want} (onnxruntime-gpu on a CUDA "
                                  f"host; this onnxruntime has {', '.join(have)})")
            cache = Path(cache_dir or os.environ.get("DBP_ENGINE_CACHE") or "/tmp/dbp-engine-cache")
            cache.mkdir(parents=True, exist_ok=True)
            if self.engine == "onnxruntime-cuda":
                model = str(to_fp16_onnx(self.onnx_path, cache / f"{file_sha256(self.onnx_path)[:16]}-fp16.onnx"))
                providers = ["CUDAExecutionProvider"]
            else:  # TensorRT builds fp16 kernels from the fp32 graph; its engines are cached across restarts
                providers = [("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                                           "trt_engine_cache_path": str(cache)}),
                             "CUDAExecutionProvider"]
        try:
            self.session = ort.InferenceSession(model, so, providers=providers)
        except Exception as e:  # noqa: BLE001 - a broken file or provider: say which
            raise EngineError(f"ONNX Runtime cannot load {self.onnx_path}: {type(e).__name__}: {e}") from None
        types = {i.name: i.type for i in self.session.get_inputs()}
        self._set_t_dtype(types.get("t"), {"tensor(float)": np.float32, "tensor(int64)": np.int64})

        def run(x: np.ndarray, t: np.ndarray) -> np.ndarray:
            return self.session.run(None, {"x": x, "t": t})[0]
        return run

    def _openvino(self, cache_dir):
        try:
            import openvino as ov
        except ImportError as e:
            raise EngineError(f"engine 'openvino' needs openvino ({e})") from None
        core = ov.Core()
        cfg = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if self.threads > 0:
            cfg["INFERENCE_NUM_THREADS"] = self.threads
        try:
            model = core.read_model(str(self.onnx_path))
            self.compiled = core.compile_model(model, "CPU", cfg)
            t_type = next((p.get_element_type() for p in model.inputs if "t" in p.get_names()), None)
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"OpenVINO cannot load {self.onnx_path}: {type(e).__name__}: {e}") from None
        self._set_t_dtype(t_type, {ov.Type.f32: np.float32, ov.Type.i64: np.int64})
        request, out = self.compiled.create_infer_request(), self.compiled.output(0)

        def run(x: np.ndarray, t: np.ndarray) -> np.ndarray:
            return request.infer({"x": x, "t": t})[out]
        return run

    def _set_t_dtype(self, found, known: Mapping[Any, Any]) -> None:
        if found not in known:
            raise EngineError(f"{self.onnx_path}: the graph's timestep input 't' is {found}, expected float32 or "
                              f"int64 (an ONNX file exported by dbp.serving.engines.export_onnx)")
        self.t_dtype = known[found]
        # False: a graph exported before float t (int64 t): it evaluates ddpm/ddim, and PurifierService gives vpsde/edm
        # profiles the torch UNet
        self.continuous_time = self.t_dtype == np.float32

    def forward(self, x, t) -> torch.Tensor:
        xn = np.ascontiguousarray(x.detach().cpu().numpy() if torch.is_tensor(x) else x, dtype=np.float32)
        tn = np.asarray(t.detach().cpu().numpy() if torch.is_tensor(t) else t)
        if not self.continuous_time and tn.dtype.kind not in "iub":
            frac = tn[~(tn == np.floor(tn))]  # NaN and inf land here too
            if frac.size:
                raise EngineError(
                    f"engine {self.engine!r}: {self.onnx_path} takes integer timesteps (int64 t, exported before "
                    f"float t) and was called at t = {float(frac.reshape(-1)[0])!r}, which it would truncate. A "
                    f"sampler that calls the network at continuous time (vpsde, edm) needs the torch network or an "
                    f"engine file exported with float t")
        tn = np.ascontiguousarray(tn, dtype=self.t_dtype)
        if tn.ndim == 0:
            tn = np.full((xn.shape[0],), tn.item(), dtype=self.t_dtype)
        return torch.from_numpy(np.array(self._run(xn, tn), dtype=np.float32, copy=True))


# ---- parity ---------------------------------------------------------------------------------------

def parity_timesteps(engine_net: nn.Module) -> tuple[float, ...]:
    """The timesteps parity is measured at for this engine: between the integers too when its graph takes float t."""
    return PARITY_TIMESTEPS_CONTINUOUS if getattr(engine_net, "continuous_time", False) else PARITY_TIMESTEPS


def parity_inputs(chw: tuple[int, int, int], timesteps: Sequence[float] = PARITY_TIMESTEPS,
                  batch: int = PARITY_BATCH, seed: int = PARITY_SEED) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed seeded inputs: x_t ~ N(0, 1) (the chain's range at large t, wider than at small t) at each t; t as
    int64 where it is an integer (what ddpm/ddim pass), float32 otherwise (what vpsde/edm pass)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *chw, generator=g),
             torch.full((batch,), int(t), dtype=torch.long) if float(t).is_integer()
             else torch.full((batch,), float(t), dtype=torch.float32))
            for t in timesteps]


def max_abs_diff(torch_net: nn.Module, engine_net: nn.Module, chw: tuple[int, int, int], **kw) -> float:
    worst = 0.0
    with torch.no_grad():
        for x, t in parity_inputs(chw, **kw):
            worst = max(worst, float((engine_net(x, t) - torch_net(x, t)).abs().max()))
    return worst


def check_parity(torch_net: nn.Module, engine_net: EngineEpsNet, chw: Optional[tuple[int, int, int]] = None,
                 tol: Optional[float] = None) -> float:
    """max |eps_engine - eps_torch| on the fixed inputs; raises EngineError beyond the engine's tolerance."""
    tol = tolerance(engine_net.engine) if tol is None else tol
    timesteps = parity_timesteps(engine_net)
    d = max_abs_diff(torch_net, engine_net, chw or chw_of(torch_net), timesteps=timesteps)
    if not d <= tol:  # NaN fails too
        raise EngineError(f"engine {engine_net.engine!r} on {engine_net.onnx_path.name} differs from the torch UNet "
                          f"by max |d eps| = {d:.3g} > {tol:g} on the fixed parity inputs (seed {PARITY_SEED}, "
                          f"t in {list(timesteps)}): not the same network")
    return d


# ---- the version's engine files -------------------------------------------------------------------

def manifest(onnx_sha256: str, purifier_sha256: str, purifier_meta_sha256: Optional[str], card_binding: Optional[str],
             parity: Mapping[str, float], continuous_time: bool = True) -> dict[str, Any]:
    """continuous_time: whether the graph takes float t (what parity was measured at follows from it)."""
    import onnx
    return {"onnx": f"{ONNX_FILE}", "onnx_sha256": onnx_sha256, "purifier_sha256": purifier_sha256,
            "purifier_meta_sha256": purifier_meta_sha256, "card_binding": card_binding,
            "exporter": {"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__, "opset": OPSET,
                         "dynamo": False, "t": "float32" if continuous_time else "int64"},
            "parity": {"max_abs_diff_eps": dict(parity), "tolerance": TOLERANCE,
                       "timesteps": list(PARITY_TIMESTEPS_CONTINUOUS if continuous_time else PARITY_TIMESTEPS),
                       "batch": PARITY_BATCH, "seed": PARITY_SEED}}


def check_engine_files(version_dir: str | Path, card: Mapping[str, Any]) -> Path:
    """The version's ONNX file, if engine.json binds it (by sha256) to the card's purifier weights and meta.json
    and the file hashes as recorded. Returns the ONNX path; raises EngineError otherwise."""
    d = Path(version_dir) / ENGINE_DIR
    onnx_path = d / ONNX_FILE
    if not (d / MANIFEST_FILE).exists() or not onnx_path.exists():
        raise EngineError(f"{Path(version_dir)} has no {ENGINE_DIR}/{ONNX_FILE} + {MANIFEST_FILE}: export the version "
                          f"with `python -m training.export` (or add them with `python -m training.export "
                          f"--attach_engine {version_dir}`)")
    try:
        m = json.loads((d / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"cannot read {d / MANIFEST_FILE}: {e}") from None
    model = card.get("model") or {}
    if m.get("purifier_sha256") != model.get("purifier_sha256"):
        raise EngineError(f"{d / MANIFEST_FILE} was exported from weights {str(m.get('purifier_sha256'))[:12]}..., "
                          f"the card binds {str(model.get('purifier_sha256'))[:12]}...")
    if model.get("purifier_meta_sha256") and m.get("purifier_meta_sha256") != model.get("purifier_meta_sha256"):
        raise EngineError(f"{d / MANIFEST_FILE} was exported from another meta.json than the card's")
    have = file_sha256(onnx_path)
    if have != m.get("onnx_sha256"):
        raise EngineError(f"{onnx_path} (sha256 {have[:12]}...) is not the file export bound "
                          f"(sha256 {str(m.get('onnx_sha256'))[:12]}...)")
    return onnx_path


def load_engine(engine: str, version_dir: str | Path, card: Optional[Mapping[str, Any]], torch_net: nn.Module,
                threads: int = 1) -> tuple[EngineEpsNet, float]:
    """The served eps-network of a version for `engine`: bound files checked against the card (when there is one),
    parity with the torch network re-measured. Returns (engine net, max abs diff)."""
    if card is not None:
        onnx_path = check_engine_files(version_dir, card)
    else:
        onnx_path = Path(version_dir) / ENGINE_DIR / ONNX_FILE
        if not onnx_path.exists():
            raise EngineError(f"no {onnx_path}")
    net = EngineEpsNet(engine, onnx_path, threads)
    return net, check_parity(torch_net, net)
