"""Triton shell of the classifier (copied into each version dir by training/export.py).

Only pb_utils <-> numpy here; validation, batching and the forward pass are dbp.serving.ClassifierService.
"""
import os

import triton_python_backend_utils as pb_utils

from dbp import serving

INPUTS = ("IMAGES", "VOTES")


class TritonPythonModel:
    def initialize(self, args):
        settings = serving.parse_parameters(serving.ClassifierSettings, args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.service = serving.ClassifierService(version_dir, settings)
        pb_utils.Logger.log_info(f"classifier v{args['model_version']}: {settings}, input {self.service.chw}")

    def execute(self, requests):
        return serving.triton_execute(pb_utils, self.service, requests, INPUTS)
