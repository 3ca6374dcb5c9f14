# Triton Inference Server with the dbp purifier/classifier models, for GPU hosts.
# Triton 2.51 = NGC 24.10, the same server line the nvidia-pytriton wheel runs on CPU machines.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

WORKDIR /opt/dbp
COPY requirements-serving.txt .
RUN pip install --no-cache-dir -r requirements-serving.txt
# The core library is what every model.py imports: install it, do not copy formulas into the repository.
COPY pyproject.toml .
COPY dbp/ dbp/
RUN pip install --no-cache-dir --no-deps .
COPY model_repository/ /models/

EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=5 \
  CMD curl -fsS localhost:8000/v2/health/ready || exit 1
# poll: a new exported version directory is picked up without a restart; the ensemble follows it.
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=poll", "--repository-poll-secs=15", \
     "--disable-auto-complete-config", "--exit-timeout-secs=30"]
