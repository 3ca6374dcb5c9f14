"""Triton shell of the purifier (copied into each version dir by training/export.py).

Only pb_utils <-> numpy here; validation, batching and the diffusion call are dbp.serving.PurifierService.
"""
import os

import triton_python_backend_utils as pb_utils

from dbp import serving

INPUTS = ("IMAGES", "SEED", "VOTES")


def _numpy(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def _response(result):
    if isinstance(result, Exception):
        bad_request = isinstance(result, serving.RequestError)
        code = pb_utils.TritonError.INVALID_ARG if bad_request else pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result), code))
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in result.items()])


class TritonPythonModel:
    def initialize(self, args):
        settings = serving.parse_parameters(serving.PurifierSettings, args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.service = serving.PurifierService(version_dir, settings)
        pb_utils.Logger.log_info(f"purifier v{args['model_version']}: {settings}, input {self.service.chw}, "
                                 f"{self.service.purifier.n_unet_calls} UNet calls per purification")

    def execute(self, requests):
        return [_response(r) for r in self.service([{n: _numpy(q, n) for n in INPUTS} for q in requests])]
