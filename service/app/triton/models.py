"""What the gateway knows about a deployed purifier/classifier version pair, read from Triton.

Nothing about the models is hard-coded: tensor dtypes come from the model metadata of the pinned
versions, the purification settings, the serving profiles and max_votes from the purifier's config `parameters`
(`profiles`: JSON {name: {t_star, sampler, num_inference_steps}}; "default" is the top-level settings), batch limits
from `max_batch_size`, and the image shape and class names from the `parameters` of the ensemble's
config (the pair's public interface: `image_shape` "C,H,W" and `class_names` as a JSON list).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

IMAGES, SEED, VOTES, PROFILE, PURIFIED = "IMAGES", "SEED", "VOTES", "PROFILE", "PURIFIED"
DEFAULT_PROFILE = "default"  # dbp.serving.contract.DEFAULT_PROFILE: the purifier's top-level settings
PROFILE_KEYS = ("t_star", "sampler", "num_inference_steps")
# dbp.serving.contract._PROFILE_NAME: a profile's card is <version>/cards/<profile>.json, so a name the model config
# declares is used as a file name only if it matches (no "/", "..", upper case, ...)
PROFILE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
PROBS, LABEL, AGREEMENT = "PROBS", "LABEL", "AGREEMENT"
# every row's answering version (dbp.serving.contract.VERSION): an output of the purifier and the classifier, renamed
# per step by the ensemble
VERSION, PURIFIER_VERSION, CLASSIFIER_VERSION = "VERSION", "PURIFIER_VERSION", "CLASSIFIER_VERSION"
# every row's card as the purifier checked it at load (dbp.serving.contract.CARD_SHA256), renamed by the ensemble;
# optional: a model config written before them does not declare them (the receipt's card is then unchecked)
CARD_SHA256, PURIFIER_CARD_SHA256 = "CARD_SHA256", "PURIFIER_CARD_SHA256"
# the certify model (dbp.serving.contract.CERTIFY_INPUTS / CERTIFY_OUTPUTS)
N, SIGMA, ALPHA = "N", "SIGMA", "ALPHA"
RADIUS, P_LOWER, COUNT, COUNTS, SECONDS = "RADIUS", "P_LOWER", "COUNT", "COUNTS", "SECONDS"
CERTIFY_OUTPUTS = (LABEL, RADIUS, P_LOWER, COUNT, COUNTS, SECONDS)


log = logging.getLogger("service.triton")


class InterfaceError(ValueError):
    """The deployed models do not describe themselves well enough to be served (message says what is missing)."""


@dataclass(frozen=True)
class PairInfo:
    version: int  # purifier N and classifier N
    channels: int
    height: int
    width: int
    class_names: Optional[tuple[str, ...]]  # None: the ensemble config has no class_names; indices are used
    t_star: Optional[int]
    sampler: Optional[str]
    num_inference_steps: Optional[int]
    max_votes: int
    max_batch: int
    dtypes: Mapping[str, str] = field(default_factory=dict)  # tensor name -> Triton datatype ("FP32", ...)
    # serving profile -> its settings, "default" first; the purifier serves one only with a valid card of its own
    profiles: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # which of "purifier", "classifier" answer VERSION (their metadata's outputs): checked on the pinned calls
    versioned: frozenset = frozenset()
    # which of "purifier" (CARD_SHA256 in its metadata), "ensemble" (PURIFIER_CARD_SHA256 in its config) answer the
    # sha256 of the card the server checked at load: requested on the calls that touch the purifier
    card_reported: frozenset = frozenset()

    @property
    def purification(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "num_inference_steps": self.num_inference_steps, "t_star": self.t_star}

    def purification_for(self, profile: Optional[str]) -> dict[str, Any]:
        """The settings a profile pins (None or "default": the top-level ones)."""
        if profile in (None, DEFAULT_PROFILE):
            return self.purification
        p = self.profiles[profile]
        return {"sampler": p.get("sampler"), "num_inference_steps": p.get("num_inference_steps"),
                "t_star": p.get("t_star")}

    def names_for(self, n: int) -> list[str]:
        """Class names for n scores (indices as strings when the model does not name its classes)."""
        if self.class_names and len(self.class_names) == n:
            return list(self.class_names)
        return [str(i) for i in range(n)]

    @property
    def mode(self) -> str:
        """The Pillow mode the model's channels correspond to."""
        return {1: "L", 3: "RGB"}.get(self.channels, "")


def _params(config: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in (config.get("parameters") or {}).items():
        out[k] = v.get("string_value") if isinstance(v, Mapping) else str(v)
    return out


def _int(params: Mapping[str, str], key: str) -> Optional[int]:
    try:
        return int(params[key])
    except (KeyError, TypeError, ValueError):
        return None


def _dims(config: Mapping[str, Any], name: str) -> Optional[tuple[int, ...]]:
    for t in config.get("input") or []:
        if t.get("name") == name:
            return tuple(int(d) for d in t.get("dims") or [])
    return None


def image_shape(ensemble_cfg: Mapping[str, Any], purifier_cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    raw = _params(ensemble_cfg).get("image_shape")
    if raw:
        try:
            c, h, w = (int(p) for p in raw.replace("x", ",").split(","))
        except ValueError:
            raise InterfaceError(f"ensemble parameter image_shape={raw!r} is not 'C,H,W'") from None
        if min(c, h, w) < 1:
            raise InterfaceError(f"ensemble parameter image_shape={raw!r} must be positive")
        return c, h, w
    dims = _dims(purifier_cfg, IMAGES)  # fixed dims in the purifier config would do as well
    if dims and len(dims) == 3 and min(dims) > 0:
        return dims  # type: ignore[return-value]
    raise InterfaceError("the deployed models do not say which image shape they take: add "
                         'parameters: { key: "image_shape" value: { string_value: "C,H,W" } } to the ensemble\'s '
                         "config.pbtxt (or fixed IMAGES dims to the purifier's)")


def class_names(ensemble_cfg: Mapping[str, Any]) -> Optional[tuple[str, ...]]:
    raw = _params(ensemble_cfg).get("class_names")
    if not raw:
        return None
    try:
        names = json.loads(raw)
    except json.JSONDecodeError:
        names = [n.strip() for n in raw.split(",")]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise InterfaceError("ensemble parameter class_names must be a JSON list of non-empty strings")
    if len(set(names)) != len(names):
        raise InterfaceError("ensemble parameter class_names has duplicates")
    return tuple(names)


def profiles(purifier_cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{profile: settings} the purifier declares: "default" (its top-level settings), then `profiles` (JSON). A
    name that does not match PROFILE_NAME is skipped (and logged): it would name the card file cards/<name>.json, and
    the served purifier (dbp.serving.contract) refuses such a name anyway."""
    pp = _params(purifier_cfg)
    out: dict[str, dict[str, Any]] = {DEFAULT_PROFILE: {"t_star": _int(pp, "t_star"), "sampler": pp.get("sampler"),
                                                        "num_inference_steps": _int(pp, "num_inference_steps")}}
    raw = pp.get("profiles")
    if not raw:
        return out
    try:
        table = json.loads(raw)
    except json.JSONDecodeError:
        raise InterfaceError(f"purifier parameter profiles={raw[:80]!r} is not JSON") from None
    if not isinstance(table, dict) or not all(isinstance(v, dict) and set(v) == set(PROFILE_KEYS)
                                              for v in table.values()) or DEFAULT_PROFILE in table:
        raise InterfaceError("purifier parameter profiles must map names (not 'default') to {t_star, sampler, "
                             "num_inference_steps}")
    for k, v in table.items():
        if not PROFILE_NAME.match(str(k)):
            log.warning("purifier parameter profiles: skipping profile name %r (must match %s)", k,
                        PROFILE_NAME.pattern)
            continue
        out[str(k)] = {key: v[key] for key in PROFILE_KEYS}
    return out


def pair_info(version: int, purifier_cfg: Mapping[str, Any], classifier_cfg: Mapping[str, Any],
              ensemble_cfg: Mapping[str, Any], purifier_meta: Mapping[str, Any],
              classifier_meta: Mapping[str, Any]) -> PairInfo:
    c, h, w = image_shape(ensemble_cfg, purifier_cfg)
    names = class_names(ensemble_cfg)
    pp, cp = _params(purifier_cfg), _params(classifier_cfg)
    votes = [v for v in (_int(pp, "max_votes"), _int(cp, "max_votes")) if v]
    batches = [int(x) for x in (purifier_cfg.get("max_batch_size"), classifier_cfg.get("max_batch_size")) if x]
    dtypes = {}
    for meta in (purifier_meta, classifier_meta):
        for t in list(meta.get("inputs") or []) + list(meta.get("outputs") or []):
            dtypes.setdefault(t["name"], t["datatype"])
    for name in (IMAGES, PURIFIED, PROBS, LABEL):
        if name not in dtypes:
            raise InterfaceError(f"tensor {name} is missing from the model metadata")
    versioned = frozenset(role for role, meta in (("purifier", purifier_meta), ("classifier", classifier_meta))
                          if any(t.get("name") == VERSION for t in meta.get("outputs") or []))
    declared = {"purifier": {t.get("name") for t in purifier_meta.get("outputs") or []},
                "ensemble": {t.get("name") for t in ensemble_cfg.get("output") or []}}
    card_reported = frozenset(role for role, name in (("purifier", CARD_SHA256), ("ensemble", PURIFIER_CARD_SHA256))
                              if name in declared[role])
    return PairInfo(version=version, channels=c, height=h, width=w, class_names=names, t_star=_int(pp, "t_star"), sampler=pp.get("sampler"),
                    num_inference_steps=_int(pp, "num_inference_steps"), max_votes=min(votes) if votes else 1,
                    max_batch=min(batches) if batches else 1, dtypes=dtypes, profiles=profiles(purifier_cfg),
                    versioned=versioned, card_reported=card_reported)


def newest_pair(index: list[Mapping[str, Any]], purifier: str, classifier: str) -> Optional[int]:
    """Newest N with purifier N and classifier N both READY (never the latest of each independently)."""
    ready: dict[str, set[int]] = {purifier: set(), classifier: set()}
    for m in index:
        name, ver = m.get("name"), str(m.get("version", ""))
        if name in ready and m.get("state") == "READY" and ver.isdigit():
            ready[name].add(int(ver))
    both = ready[purifier] & ready[classifier]
    return max(both) if both else None


def ready_state(index: list[Mapping[str, Any]], name: str) -> bool:
    return any(m.get("name") == name and m.get("state") == "READY" for m in index)


def one_call_blocker(index: list[Mapping[str, Any]], ensemble: str, ensemble_cfg: Mapping[str, Any], purifier: str,
                     classifier: str, version: int) -> str:
    """"" when one call to the ensemble runs exactly purifier/version and classifier/version (as far as the repository
    index says now) and reports which versions answered (PURIFIER_VERSION, CLASSIFIER_VERSION); else why not, a
    metrics.FALLBACK_REASONS entry. The answer's versions are checked all the same: the index can change meanwhile."""
    if not ready_state(index, ensemble):
        return "no_ensemble"
    outs = {t.get("name") for t in ensemble_cfg.get("output") or []}
    if not {PURIFIER_VERSION, CLASSIFIER_VERSION} <= outs:
        return "no_version_outputs"
    steps = {}
    for st in (ensemble_cfg.get("ensemble_scheduling") or {}).get("step") or []:
        try:
            steps[st.get("model_name")] = int(st.get("model_version", -1))
        except (TypeError, ValueError):
            steps[st.get("model_name")] = -1
    for model in (purifier, classifier):
        if model not in steps:
            return "no_ensemble"
        runs = steps[model] if steps[model] > 0 else newest_ready(index, model)  # -1 (or unset): the newest READY
        if runs != version:
            return "not_newest"
    return ""


@dataclass(frozen=True)
class CertifyInfo:
    """The deployed certify model (newest READY version): its limits and settings from its config `parameters`
    (sigmas, max_n, n0, classifier_version), the batch limit from max_batch_size, dtypes from its metadata."""
    version: int
    sigmas: tuple[float, ...]
    max_n: int
    n0: int
    classifier_version: Optional[int]
    max_batch: int
    default_n: int = 0  # the model's `n` (its card's); 0: not given
    max_samples: int = 0  # images x (n0 + n) per request at most; 0: not given (max_batch x (n0 + max_n))
    dtypes: Mapping[str, str] = field(default_factory=dict)


def certify_info(version: int, config: Mapping[str, Any], metadata: Mapping[str, Any]) -> CertifyInfo:
    p = _params(config)
    try:
        sigmas = tuple(float(v) for v in (p.get("sigmas") or "").split(",") if v.strip())
    except ValueError:
        raise InterfaceError(f"certify parameter sigmas={p.get('sigmas')!r} is not a list of numbers") from None
    max_n, n0 = _int(p, "max_n"), _int(p, "n0")
    if not sigmas or not max_n or not n0:
        raise InterfaceError("the certify model's config must give parameters sigmas, max_n and n0")
    dtypes = {t["name"]: t["datatype"] for t in list(metadata.get("inputs") or []) + list(metadata.get("outputs") or [])}
    for name in (IMAGES, SEED, N, SIGMA, ALPHA) + CERTIFY_OUTPUTS:
        if name not in dtypes:
            raise InterfaceError(f"tensor {name} is missing from the certify model's metadata")
    max_batch = int(config.get("max_batch_size") or 1)
    return CertifyInfo(version=version, sigmas=sigmas, max_n=max_n, n0=n0,
                       classifier_version=_int(p, "classifier_version"), max_batch=max_batch,
                       default_n=min(_int(p, "n") or max_n, max_n),
                       max_samples=_int(p, "max_samples") or max_batch * (n0 + max_n), dtypes=dtypes)


def newest_ready(index: list[Mapping[str, Any]], name: str) -> Optional[int]:
    vs = [int(m["version"]) for m in index if m.get("name") == name and m.get("state") == "READY"
          and str(m.get("version", "")).isdigit()]
    return max(vs) if vs else None
