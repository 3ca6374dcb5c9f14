"""Serving the models with Triton, in four layers (import the one you need; this file imports nothing):

  dbp.serving.contract     the request contract: settings, validators, vote aggregation. numpy only, no torch,
                           so the gateway (service/) can validate exactly as the models do
  dbp.serving.services     PurifierService / ClassifierService: load a version, run dynamic batches (torch)
  dbp.serving.triton_glue  TritonPythonModel (each model.py imports it): pb_utils requests <-> a service
  dbp.serving.launcher     TritonServer, the `dbp-triton` console script (`make up`): the process side
The repository layout (versions, cards, publishing) is dbp.repository.
"""
