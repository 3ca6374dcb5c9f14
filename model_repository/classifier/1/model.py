"""Triton shell of the classifier (copied into each version dir by `python -m training.export`).

Only pb_utils <-> numpy here; validation is dbp.serving.contract, batching and the forward pass
dbp.serving.services.ClassifierService.
"""
import os

import triton_python_backend_utils as pb_utils

from dbp.serving.contract import CLASSIFIER_INPUTS, ClassifierSettings, parse_parameters
from dbp.serving.services import ClassifierService
from dbp.serving.triton_glue import triton_execute


class TritonPythonModel:
    def initialize(self, args):
        settings = parse_parameters(ClassifierSettings, args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.service = ClassifierService(version_dir, settings)
        pb_utils.Logger.log_info(f"classifier v{args['model_version']}: {settings}, input {self.service.chw}")

    def execute(self, requests):
        return triton_execute(pb_utils, self.service, requests, CLASSIFIER_INPUTS)
