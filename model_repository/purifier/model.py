"""Triton shell of the purifier (copied into each version dir by `python -m training.export`).

Only pb_utils <-> numpy here; validation is dbp.serving.contract, batching and the diffusion call
dbp.serving.services.PurifierService.
"""
import os

import triton_python_backend_utils as pb_utils

from dbp.serving.contract import PURIFIER_INPUTS, PurifierSettings, parse_parameters
from dbp.serving.services import PurifierService
from dbp.serving.triton_glue import triton_execute


class TritonPythonModel:
    def initialize(self, args):
        settings = parse_parameters(PurifierSettings, args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.service = PurifierService(version_dir, settings)
        pb_utils.Logger.log_info(f"purifier v{args['model_version']}: {settings}, input {self.service.chw}, "
                                 f"{self.service.purifier.n_unet_calls} UNet calls per purification")

    def execute(self, requests):
        return triton_execute(pb_utils, self.service, requests, PURIFIER_INPUTS)
