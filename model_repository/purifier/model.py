"""Triton shell of the purifier (copied into each version dir by training/export.py).

Only pb_utils <-> numpy here; validation, batching and the diffusion call are dbp.serving.PurifierService.
"""
import os

import triton_python_backend_utils as pb_utils

from dbp import serving

INPUTS = ("IMAGES", "SEED", "VOTES")


class TritonPythonModel:
    def initialize(self, args):
        settings = serving.parse_parameters(serving.PurifierSettings, args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.service = serving.PurifierService(version_dir, settings)
        pb_utils.Logger.log_info(f"purifier v{args['model_version']}: {settings}, input {self.service.chw}, "
                                 f"{self.service.purifier.n_unet_calls} UNet calls per purification")

    def execute(self, requests):
        return serving.triton_execute(pb_utils, self.service, requests, INPUTS)
