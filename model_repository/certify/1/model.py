from dbp.serving.triton_glue import TritonPythonModel  # noqa: F401 (the model directory's name picks the service)
