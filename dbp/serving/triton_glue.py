"""The python-backend side of every model.py: one generic TritonPythonModel, pb_utils requests -> a service.

Each version's model.py is the one line `from dbp.serving.triton_glue import TritonPythonModel`; the model's
name (args["model_name"], its directory in the repository) picks the service, its settings and its inputs
(ROLES). Output dtypes come from the model config, as in python_backend's examples (add_sub). `pb_utils`
exists only inside the Triton stub, and the services need torch: both are imported in initialize(), so this
module needs neither.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from .contract import (CARD_SHA256, CERTIFY_INPUTS, CERTIFY_OUTPUTS, CLASSIFIER_INPUTS, CLASSIFIER_OUTPUTS,
                       OPTIONAL_OUTPUTS, PURIFIER_INPUTS, PURIFIER_OUTPUTS, VERSION, CertifySettings,
                       ClassifierSettings, PurifierSettings, RequestError, check_profile, parse_parameters)


@dataclass(frozen=True)
class Role:
    settings: type  # the dataclass config.pbtxt's `parameters` fill (dbp.serving.contract)
    service: str  # the class in dbp.serving.services
    inputs: Sequence[str]
    outputs: Sequence[str]
    describe: Callable[[object], str]  # the service -> what the load log adds about it


ROLES = {
    "purifier": Role(PurifierSettings, "PurifierService", PURIFIER_INPUTS, PURIFIER_OUTPUTS,
                     lambda s: f", UNet on {s.settings.engine}"
                               + ("" if s.engine_parity is None
                                  else f" (max |eps - torch's| {s.engine_parity:.1e} at load)")
                               + f", {s.purifier.n_unet_calls} UNet calls per purification, profiles served: "
                               + ", ".join(f"{n} ({p.n_unet_calls} calls"
                                           + ("" if s.profile_engines[n] == s.settings.engine
                                              else f", on {s.profile_engines[n]}") + ")"
                                           for n, p in s.purifiers.items())
                               + "".join(f"; {n} NOT served (no valid card)" for n in s.refused)),
    "classifier": Role(ClassifierSettings, "ClassifierService", CLASSIFIER_INPUTS, CLASSIFIER_OUTPUTS, lambda s: ""),
    "certify": Role(CertifySettings, "CertifyService", CERTIFY_INPUTS, CERTIFY_OUTPUTS, lambda s: s.describe),
}


def output_dtypes(pb_utils, model_config: Mapping, names: Sequence[str]) -> dict[str, np.dtype]:
    """{output name: numpy dtype} from the model config (TYPE_FP32 -> float32, ...); every name must be there but
    OPTIONAL_OUTPUTS, left out of the result when the config does not declare them."""
    dtypes = {}
    for name in names:
        out = pb_utils.get_output_config_by_name(model_config, name)
        if out is None and name in OPTIONAL_OUTPUTS:
            continue
        if out is None:
            raise ValueError(f"config.pbtxt of {model_config.get('name')!r} has no output {name!r}")
        dtypes[name] = np.dtype(pb_utils.triton_string_to_numpy(out["data_type"]))
    return dtypes


def _shell_dtype(a: np.ndarray) -> type:
    # what the per-model shells exported before TritonPythonModel sent (they pass no dtypes): float32, int64
    return np.float32 if np.issubdtype(np.asarray(a).dtype, np.floating) else np.int64


def triton_execute(pb_utils, service: Callable, requests: Sequence, input_names: Sequence[str],
                   dtypes: Optional[Mapping[str, np.dtype]] = None) -> list:
    """pb_utils requests -> service -> one InferenceResponse per request, in order.

    `pb_utils` is passed in because it only exists inside the Triton stub; each output is sent with its
    dtype from `dtypes` (output_dtypes; None only from a version's model.py exported before the generic
    model, still in copies of a repository). A RequestError becomes that request's INVALID_ARG error, any
    other exception an INTERNAL one; the instance keeps serving.
    """
    def as_numpy(request, name):
        t = pb_utils.get_input_tensor_by_name(request, name)
        return None if t is None else t.as_numpy()

    def response(result):
        if isinstance(result, Exception):
            code = (pb_utils.TritonError.INVALID_ARG if isinstance(result, RequestError)
                    else pb_utils.TritonError.INTERNAL)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result), code))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(k, np.asarray(v, dtype=_shell_dtype(v) if dtypes is None else dtypes[k]))
            for k, v in result.items()])

    return [response(r) for r in service([{n: as_numpy(q, n) for n in input_names} for q in requests])]


def with_version(service: Callable, version: int) -> Callable:
    """The service, each answer with VERSION [B, 1] = `version` added (B: the rows of its first output): which model
    version computed the rows, so a client that pinned a version pair can check what answered (the ensemble runs the
    newest version of each model; dbp.serving.contract)."""
    def run(requests):
        out = []
        for r in service(requests):
            if not isinstance(r, Exception):
                rows = len(np.asarray(next(iter(r.values()))))
                r = {**r, VERSION: np.full((rows, 1), version, dtype=np.int64)}
            out.append(r)
        return out
    return run


def with_card_sha256(service: Callable, card_sha256: Mapping[str, str]) -> Callable:
    """The purifier service, each answer with CARD_SHA256 [B, 1] = `card_sha256` of the request's profile (B: the
    rows of its first output): the card the instance checked at load for the profile that served the rows. A request
    whose PROFILE is invalid was answered with its error, so the profile is read only for answered ones."""
    def run(requests):
        out = []
        for req, r in zip(requests, service(requests)):
            if not isinstance(r, Exception):
                rows = len(np.asarray(next(iter(r.values()))))
                sha = card_sha256[check_profile(req.get("PROFILE"), rows, list(card_sha256))]
                r = {**r, CARD_SHA256: np.full((rows, 1), sha.encode(), dtype=np.object_)}
            out.append(r)
        return out
    return run


class TritonPythonModel:
    """The purifier, the classifier or certify, by the model's name: its settings from config.pbtxt `parameters`, its
    service from the version dir (weights + card), its output dtypes from the config's `output` entries."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        from . import services

        self.pb_utils = pb_utils
        name = args["model_name"]
        if name not in ROLES:
            raise ValueError(f"no served model is called {name!r} (known: {', '.join(ROLES)})")
        self.role = ROLES[name]
        config = json.loads(args["model_config"])
        settings = parse_parameters(self.role.settings, config)
        self.dtypes = output_dtypes(pb_utils, config, self.role.outputs)
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.service = getattr(services, self.role.service)(version_dir, settings)
        # VERSION (the purifier's and the classifier's outputs): the version number of this instance, every row
        self.serve = (with_version(self.service, int(args["model_version"])) if VERSION in self.role.outputs
                      else self.service)
        if CARD_SHA256 in self.dtypes:  # absent from a config.pbtxt written before it: not answered
            self.serve = with_card_sha256(self.serve, self.service.card_sha256)
        pb_utils.Logger.log_info(f"{name} v{args['model_version']}: {settings}, input {self.service.chw}"
                                 f"{self.role.describe(self.service)}")

    def execute(self, requests):
        return triton_execute(self.pb_utils, self.serve, requests, self.role.inputs, self.dtypes)
