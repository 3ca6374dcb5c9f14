"""The request contract of the served models: settings, validation and votes, in numpy only.

No torch here (a test imports this module in a torch-free process): the gateway validates requests with
exactly the checks the Triton models run, and reads the tensor names and limits from here.

Tensor contract (batch dim B first, as Triton's max_batch_size implies):
  purifier    IMAGES  FP32 [B, C, H, W] in [0, 1]
              SEED    INT64 [B, 1] optional: the seed of each image's noise (exactly reproducible rows)
              VOTES   INT32 [B, 1] optional: k purifications per image, the same k for the whole request
              PROFILE BYTES [B, 1] optional: the serving profile (named purification settings, config.pbtxt
                      `profiles`), the same for the whole request; absent = "default" (the top-level settings)
           -> PURIFIED FP32 [B, k*C, H, W]: the k purifications of image b stacked along channels
              (reshape to [B, k, C, H, W]); k = 1 gives the plain [B, C, H, W]
  classifier  IMAGES  FP32 [B, k*C, H, W] (a purifier output), VOTES as above
           -> LOGITS [B, n] (mean over votes), PROBS [B, n] (mean softmax over votes),
              LABEL INT64 [B, 1] (majority of the k votes), AGREEMENT FP32 [B, 1] (share of votes for LABEL)
  both        VERSION INT64 [B, 1]: the version number of the model instance that computed the row
  purifier    CARD_SHA256 BYTES [B, 1]: sha256 (hex) of the card bytes the instance checked at load for the profile
              that served the row (dbp.repository.check_version), so a receipt can show it describes that card;
              optional in config.pbtxt (a config written before it loads without it and answers no CARD_SHA256)
  ensemble    purify_classify: the purifier's inputs -> the classifier's outputs, its VERSION as CLASSIFIER_VERSION
              and the purifier's as PURIFIER_VERSION (the ensemble runs the newest version of each: a client that
              pinned a pair checks these against it; the gateway does, service/app/triton/pool.py), and the
              purifier's CARD_SHA256 as PURIFIER_CARD_SHA256
Votes travel in the channel dimension, not the batch one, so every step of the ensemble keeps the
client's batch size B (Triton rejects inputs whose batch sizes differ) and max_batch_size counts images.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

PURIFIER_INPUTS = ("IMAGES", "SEED", "VOTES", "PROFILE")
VERSION = "VERSION"  # every row's answering model version, an output of the purifier and the classifier
CARD_SHA256 = "CARD_SHA256"  # every row's card as checked at load (sha256 hex), an output of the purifier
PURIFIER_OUTPUTS = ("PURIFIED", VERSION, CARD_SHA256)
# outputs a model's config.pbtxt may leave out (written before them): the model then does not answer them
OPTIONAL_OUTPUTS = (CARD_SHA256,)
CLASSIFIER_INPUTS = ("IMAGES", "VOTES")
CLASSIFIER_OUTPUTS = ("LOGITS", "PROBS", "LABEL", "AGREEMENT", VERSION)
# the ensemble (purify_classify): the purifier's inputs; the classifier's outputs with VERSION renamed per step
PURIFIER_VERSION, CLASSIFIER_VERSION = "PURIFIER_VERSION", "CLASSIFIER_VERSION"
PURIFIER_CARD_SHA256 = "PURIFIER_CARD_SHA256"  # the purifier's CARD_SHA256
ENSEMBLE_OUTPUTS = tuple(o for o in CLASSIFIER_OUTPUTS if o != VERSION) + (PURIFIER_VERSION, CLASSIFIER_VERSION,
                                                                             PURIFIER_CARD_SHA256)
# certify (randomized smoothing, dbp.certify): per image a seed (required: an answer is reproducible) and the
# request's n, sigma, alpha (the same for every image of a request) -> LABEL (-1 = abstain), RADIUS (l_2, pixels
# in [0, 1]), P_LOWER (Clopper-Pearson lower bound of p_A), COUNT (c_A's count among n), COUNTS (per class),
# SECONDS (CERTIFY's wall time for that image)
CERTIFY_INPUTS = ("IMAGES", "SEED", "N", "SIGMA", "ALPHA")
CERTIFY_OUTPUTS = ("LABEL", "RADIUS", "P_LOWER", "COUNT", "COUNTS", "SECONDS")


class RequestError(ValueError):
    """A bad request: the message goes back to that client only; the batch and the instance carry on."""


# ---- settings from config.pbtxt `parameters` ------------------------------------------------------

@dataclass
class PurifierSettings:
    t_star: int = 100
    sampler: str = "ddim"
    num_inference_steps: int = 100  # DDIM steps (or respaced DDPM steps) over the full T=1000 grid
    threads: int = 1
    max_votes: int = 16
    max_rows: int = 256  # images per torch call; a batch with votes can be 64*16 purifications
    range_tolerance: float = 1e-3  # pixels this far outside [0, 1] are clipped, further is an error
    engine: str = "torch"  # what evaluates the UNet: one of PURIFIER_ENGINES (dbp.serving.engines)
    # serving profiles besides "default" (= t_star / sampler / num_inference_steps above): a JSON object
    # {name: {"t_star": int, "sampler": str, "num_inference_steps": int}}; each served only with its own card
    profiles: str = ""

    def profile_table(self) -> dict[str, "Profile"]:
        """{name: Profile}: "default" (the top-level settings) first, then the `profiles` parameter's."""
        return {DEFAULT_PROFILE: Profile(DEFAULT_PROFILE, self.t_star, self.sampler, self.num_inference_steps),
                **parse_profiles(self.profiles)}


DEFAULT_PROFILE = "default"
# every sampler of dbp.diffusion.SAMPLERS (tests/serving/test_contract.py ties the two; this module imports no torch):
# each draws its noise from the row's seed (Purifier.sample_noise), and vpsde / edm run on the torch UNet where the
# engine's graph takes integer timesteps (dbp.serving.services)
SERVED_SAMPLERS = ("ddpm", "ddim", "vpsde", "edm")
PROFILE_KEYS = ("t_star", "sampler", "num_inference_steps")  # = dbp.card.PURIFICATION_KEYS
_PROFILE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class Profile:
    """One serving profile: a name and the purification settings it pins (what its card is bound to)."""
    name: str
    t_star: int
    sampler: str
    num_inference_steps: int

    @property
    def purification(self) -> dict[str, Any]:
        return {"t_star": self.t_star, "sampler": self.sampler, "num_inference_steps": self.num_inference_steps}


def parse_profiles(raw: str) -> dict[str, Profile]:
    """The purifier's `profiles` parameter (JSON object name -> settings) as {name: Profile}; ValueError naming the
    problem for anything malformed, so the model refuses to load. Torch-free checks only (types, names, served
    samplers, positive numbers); dbp.serving.services checks each against dbp.diffusion (Diffusion.check_settings
    through Purifier) at load."""
    if not raw or not raw.strip():
        return {}
    where = "parameter 'profiles'"
    try:
        table = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} must be a JSON object {{name: {{t_star, sampler, num_inference_steps}}}}: {e}"
                         ) from None
    if not isinstance(table, dict):
        raise ValueError(f"{where} must be a JSON object {{name: settings}}, got {type(table).__name__}")
    out = {}
    for name, v in table.items():
        if name == DEFAULT_PROFILE:
            raise ValueError(f"{where}: {DEFAULT_PROFILE!r} is the top-level t_star / sampler / num_inference_steps; "
                             "do not declare it again")
        if not _PROFILE_NAME.match(name):
            raise ValueError(f"{where}: profile name {name!r} must match {_PROFILE_NAME.pattern}")
        if not isinstance(v, dict) or set(v) != set(PROFILE_KEYS):
            raise ValueError(f"{where}: profile {name!r} must be an object with exactly the keys "
                             f"{', '.join(PROFILE_KEYS)}, got {v!r}")
        t, sampler, steps = v["t_star"], v["sampler"], v["num_inference_steps"]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (t, steps)) or t < 1 or steps < 1:
            raise ValueError(f"{where}: profile {name!r} needs integer t_star >= 1 and num_inference_steps >= 1, "
                             f"got {t!r}, {steps!r}")
        if sampler not in SERVED_SAMPLERS:
            raise ValueError(f"{where}: profile {name!r} sampler must be one of {', '.join(SERVED_SAMPLERS)}, "
                             f"got {sampler!r}")
        out[name] = Profile(name, t, sampler, steps)
    return out


def check_profile(p: Optional[np.ndarray], batch: int, known: Sequence[str]) -> str:
    """The PROFILE of a request (one name for all its images; None: "default"), if `known` declares it; a
    RequestError listing the known profiles otherwise."""
    if p is None:
        return DEFAULT_PROFILE
    p = np.asarray(p)
    if p.dtype.kind not in ("O", "S", "U"):
        raise RequestError(f"PROFILE must be a string (BYTES) tensor, got {p.dtype}")
    if p.shape not in ((batch, 1), (batch,)):
        raise RequestError(f"PROFILE must be [B, 1] = [{batch}, 1], got {_shape(p)}")
    names = {v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in p.reshape(-1)}
    if len(names) != 1:
        raise RequestError("PROFILE must be the same for every image of a request")
    name = names.pop()
    if name not in known:
        raise RequestError(f"unknown profile {name[:64]!r}; this model's profiles: {', '.join(known)}")
    return name


# the purifier's `engine` parameter (config.pbtxt); the chain's arithmetic is dbp.diffusion's whatever the engine
PURIFIER_ENGINES = ("torch", "onnxruntime", "openvino", "onnxruntime-cuda", "tensorrt")


@dataclass
class ClassifierSettings:
    threads: int = 1
    max_votes: int = 16
    max_rows: int = 512
    range_tolerance: float = 1e-3


@dataclass
class CertifySettings:
    sigmas: str = "0.25,0.5"  # the noise levels served (comma-separated); a request must name one of them
    max_n: int = 2000  # estimation samples per image at most (the cost is linear in n0 + n)
    n0: int = 32  # selection samples per image, fixed by the deployment
    n: int = 320  # the default n: the one the version's card was measured at, so its figures describe the answer
    # samples (images x (n0 + n)) one request may ask for: what fits the gateway's timeout on this hardware, so a
    # costly request is refused up front (4xx), never cut off by a timeout
    max_samples: int = 2048
    classifier_version: int = 2  # the classifier version (in the same repository) the card was computed with
    threads: int = 1
    max_rows: int = 256  # noisy images per torch call
    range_tolerance: float = 1e-3

    @property
    def sigma_values(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.sigmas.split(",") if v.strip())


def certify_request(n: Optional[np.ndarray], sigma: Optional[np.ndarray], alpha: Optional[np.ndarray], batch: int,
                    settings: CertifySettings) -> tuple[int, float, float]:
    """(n, sigma, alpha) of a certify request: one value each for the whole request, n in [1, max_n], sigma one of
    the served sigmas, alpha in (0, 0.5); otherwise a RequestError naming the problem."""
    def one(v, name, kind):
        if v is None:
            raise RequestError(f"missing input {name}")
        v = np.asarray(v)
        if not np.issubdtype(v.dtype, kind):
            raise RequestError(f"{name} must be a{'n integer' if kind is np.integer else ' float'} tensor, "
                               f"got {v.dtype}")
        if v.shape not in ((batch, 1), (batch,)):
            raise RequestError(f"{name} must be [B, 1] = [{batch}, 1], got {_shape(v)}")
        first = v.reshape(-1)[0]
        if not np.all(v == first):
            raise RequestError(f"{name} must be the same for every image of a request")
        return first
    k = int(one(n, "N", np.integer))
    s = float(one(sigma, "SIGMA", np.floating))
    a = float(one(alpha, "ALPHA", np.floating))
    if not 1 <= k <= settings.max_n:
        raise RequestError(f"N must be in [1, {settings.max_n}] (max_n of this model), got {k}")
    if batch * (settings.n0 + k) > settings.max_samples:
        raise RequestError(f"{batch} images x (n0 {settings.n0} + N {k}) = {batch * (settings.n0 + k)} samples exceed "
                           f"this model's max_samples {settings.max_samples} per request: send fewer images or a "
                           "smaller N")
    served = settings.sigma_values
    match = [v for v in served if abs(v - s) <= 1e-6]
    if not match:
        raise RequestError(f"SIGMA must be one of the served sigmas {', '.join(f'{v:g}' for v in served)}, got {s:g}")
    if not (np.isfinite(a) and 0 < a < 0.5):
        raise RequestError(f"ALPHA must be in (0, 0.5), got {a:g}")
    return k, match[0], a


def parse_parameters(cls: type, model_config: Mapping[str, Any] | str):
    """Settings from Triton's model_config JSON; unknown keys and bad values fail the load with a message."""
    if isinstance(model_config, str):
        model_config = json.loads(model_config)
    params = model_config.get("parameters") or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, v in params.items():
        if key not in fields:
            raise ValueError(f"unknown parameter {key!r} in config.pbtxt; known: {sorted(fields)}")
        raw = v.get("string_value") if isinstance(v, Mapping) else v
        typ = type(fields[key].default)
        try:
            values[key] = typ(raw)
        except (TypeError, ValueError):
            raise ValueError(f"parameter {key!r} must be {typ.__name__}, got {raw!r}") from None
    s = cls(**values)
    if getattr(s, "sampler", "ddpm") not in SERVED_SAMPLERS:
        raise ValueError(f"parameter 'sampler' must be one of {', '.join(SERVED_SAMPLERS)}, got {s.sampler!r}")
    if getattr(s, "engine", "torch") not in PURIFIER_ENGINES:
        raise ValueError(f"parameter 'engine' must be one of {', '.join(PURIFIER_ENGINES)}, got {s.engine!r}")
    if isinstance(s, PurifierSettings):
        s.profile_table()  # a malformed `profiles` refuses the load, with its message
    if getattr(s, "max_votes", 1) < 1 or s.max_rows < 1 or s.threads < 0:
        raise ValueError("max_votes and max_rows must be >= 1, threads >= 0")
    if isinstance(s, CertifySettings):
        try:
            sigmas = s.sigma_values
        except ValueError:
            raise ValueError(f"parameter 'sigmas' must be comma-separated numbers, got {s.sigmas!r}") from None
        if not sigmas or min(sigmas) <= 0:
            raise ValueError(f"parameter 'sigmas' must name at least one sigma > 0, got {s.sigmas!r}")
        if s.max_n < 1 or s.n0 < 1:
            raise ValueError("max_n and n0 must be >= 1")
    return s


# ---- request validation ---------------------------------------------------------------------------

def _shape(a: np.ndarray) -> str:
    return "[" + ", ".join(str(d) for d in a.shape) + "]"


def check_votes(v: Optional[np.ndarray], batch: int, max_votes: int) -> int:
    if v is None:
        return 1
    v = np.asarray(v)
    if not np.issubdtype(v.dtype, np.integer):
        raise RequestError(f"VOTES must be an integer tensor, got {v.dtype}")
    if v.shape not in ((batch, 1), (batch,)):
        raise RequestError(f"VOTES must be [B, 1] = [{batch}, 1], got {_shape(v)}")
    k = int(v.reshape(-1)[0])
    if not np.all(v == k):
        raise RequestError("VOTES must be the same for every image of a request")
    if not 1 <= k <= max_votes:
        raise RequestError(f"VOTES must be in [1, {max_votes}], got {k}")
    return k


def check_seeds(s: Optional[np.ndarray], batch: int) -> Optional[list[int]]:
    if s is None:
        return None
    s = np.asarray(s)
    if not np.issubdtype(s.dtype, np.integer):
        raise RequestError(f"SEED must be an integer tensor, got {s.dtype}")
    if s.shape not in ((batch, 1), (batch,)):
        raise RequestError(f"SEED must be [B, 1] = [{batch}, 1], got {_shape(s)}")
    return [int(v) for v in s.reshape(-1)]


def check_images(x: Optional[np.ndarray], chw: tuple[int, int, int], votes: int = 1,
                 tolerance: float = 1e-3) -> np.ndarray:
    """FP32 [B, votes*C, H, W], finite, in [0, 1] up to `tolerance` (then clipped); returns a float32 copy."""
    if x is None:
        raise RequestError("missing input IMAGES")
    x = np.asarray(x)
    c, h, w = chw
    want = f"[B, {c}, {h}, {w}]" if votes == 1 else f"[B, {votes}*{c}, {h}, {w}] (VOTES={votes})"
    if x.dtype != np.float32:
        raise RequestError(f"IMAGES must be FP32, got {x.dtype}")
    if x.ndim != 4 or x.shape[1:] != (votes * c, h, w):
        raise RequestError(f"IMAGES must be {want} for this model, got {_shape(x)}")
    if x.shape[0] < 1:
        raise RequestError("IMAGES holds no image")
    if not np.isfinite(x).all():
        raise RequestError("IMAGES contains NaN or Inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < -tolerance or hi > 1 + tolerance:
        raise RequestError(f"IMAGES values must lie in [0, 1] (got min {lo:.4g}, max {hi:.4g})")
    return np.clip(x, 0.0, 1.0)


# ---- vote aggregation -----------------------------------------------------------------------------

def aggregate_votes(logits: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """[B*k, n] logits of k votes per image (image-major) -> LOGITS, PROBS, LABEL, AGREEMENT per image.

    LABEL is the most frequent per-vote argmax; a tie goes to the label with the larger mean probability.
    Computed in float32; the served dtypes are the model config's (dbp.serving.triton_glue casts to them).
    """
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[0] % k:
        raise ValueError(f"logits {logits.shape} do not split into groups of k={k}")
    n = logits.shape[1]
    per = logits.reshape(-1, k, n)
    z = per - per.max(axis=2, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=2, keepdims=True)
    mean_probs = probs.mean(axis=1)
    votes = per.argmax(axis=2)  # [B, k]
    counts = np.stack([(votes == c).sum(axis=1) for c in range(n)], axis=1)  # [B, n]
    label = np.argmax(counts + 0.5 * mean_probs, axis=1)  # the probability term is < 1 vote: ties only
    agreement = counts[np.arange(len(label)), label] / k
    return {"LOGITS": per.mean(axis=1), "PROBS": mean_probs, "LABEL": label[:, None],
            "AGREEMENT": agreement[:, None]}


# ---- dynamic batches ------------------------------------------------------------------------------

Inputs = Mapping[str, Optional[np.ndarray]]


def serve_batch(prepare: Callable[[Inputs], Any], run: Callable[[list], list],
                requests: Sequence[Inputs]) -> list[dict[str, np.ndarray] | Exception]:
    """One result per request: its outputs, or the exception to answer it with. Never raises.

    A bad request gets a RequestError of its own while the others run; if the torch call itself fails,
    every request it carried gets a RuntimeError, and the instance stays up for the next batch.
    """
    results: list[Any] = [None] * len(requests)
    items, idx = [], []
    for i, r in enumerate(requests):
        try:
            items.append(prepare(r))
            idx.append(i)
        except RequestError as e:
            results[i] = e
        except Exception as e:  # noqa: BLE001 - a malformed tensor must not take the batch down
            results[i] = RequestError(f"invalid request: {type(e).__name__}: {e}")
    if items:
        try:
            outs = run(items)
        except Exception as e:  # noqa: BLE001
            outs = [RuntimeError(f"inference failed: {type(e).__name__}: {e}")] * len(items)
        for i, o in zip(idx, outs):
            results[i] = o
    return results


def images_and_batch(r: Inputs) -> tuple[np.ndarray, int]:
    x = r.get("IMAGES")
    if x is None:
        raise RequestError("missing input IMAGES")
    x = np.asarray(x)
    if x.ndim != 4:
        raise RequestError(f"IMAGES must be a 4-d batch [B, C, H, W], got {_shape(x)}")
    return x, int(x.shape[0])
