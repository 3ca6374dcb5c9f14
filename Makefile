# Two commands: `make up` (the serving stack) and `make test` (set up everything, run the suite).
# Both are idempotent: the venv is rebuilt only when requirements.lock changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-$(shell cat requirements.lock pyproject.toml 2>/dev/null | cksum | cut -d' ' -f1)
FASHION_DIR ?= $(or $(DBP_FASHION_MNIST_DIR),/usr/share/datasets/fashion-mnist)

.PHONY: up triton test venv data system bench loadtest drills dashboard dashboard-plot help
# Debian packages the tests drive for real: a Prometheus server (+promtool), headless Chromium (demo page),
# docker-compose 1.x (parses the compose file without an engine). Installed when running as root.
DEB_PACKAGES := prometheus chromium docker-compose
DEB_PROBES := /usr/bin/prometheus /usr/bin/promtool /usr/bin/chromium /usr/bin/docker-compose
help:
	@echo "make up    - start the serving stack (Triton + REST gateway; Ctrl-C stops both)"
	@echo "make triton - start Triton alone with model_repository/"
	@echo "make test  - create .venv, install pinned deps and data, run the test suite"
	@echo "make bench - run the benchmarks/ scripts (slow; figures go in README)"
	@echo "make loadtest - locust, headless, against a local stack it starts (CSV + HTML under runs/loadtest)"
	@echo "make drills   - soak, overload, Triton SIGKILL and version-swap drills, long form (JSON report)"
	@echo "make dashboard / dashboard-plot - regenerate the Grafana JSON / plot its queries over a load test"

venv: $(STAMP)
$(STAMP): requirements.lock pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@$(VPY) -c 'import sysconfig,sys; sys.exit(0 if sysconfig.get_config_var("Py_ENABLE_SHARED") else "error: $(PYTHON) is not a shared-library build; Triton'"'"'s python stub needs libpython (use e.g. pyenv with --enable-shared)")'
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@# foolbox only for the 20 real CIFAR-10 test PNGs its wheel carries (read as files, never imported)
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps foolbox==3.3.4
	@# torchattacks for the Square query attack (experiments/served_attacks/square_attack.py). --no-deps: its metadata
	@# asks for torchvision and requests~=2.25.1, neither of which it imports; torch stays requirements.lock's 2.13.0
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps torchattacks==3.5.1
	@rm -f $(VENV)/.stamp-* && touch $@

data:
	@if [ -f "$(FASHION_DIR)/t10k-images-idx3-ubyte.gz" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
	  echo "error: Fashion-MNIST not found in $(FASHION_DIR). As root run 'apt-get install dataset-fashion-mnist'," \
	       "or put train-/t10k-{images-idx3,labels-idx1}-ubyte.gz in a folder and set DBP_FASHION_MNIST_DIR to it." >&2; \
	  exit 1; \
	fi

system:
	@missing=0; for f in $(DEB_PROBES); do [ -x $$f ] || missing=1; done; \
	if [ $$missing = 0 ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages: $(DEB_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEB_PACKAGES) >/dev/null; \
	else \
	  echo "warning: some of $(DEB_PROBES) are missing and this is not root: run 'apt-get install $(DEB_PACKAGES)';" \
	       "the tests that need them will fail" >&2; \
	fi

test: venv data system
	$(VPY) -m pytest -q

bench: venv data
	@for b in benchmarks/bench_*.py; do m=$$(basename $$b .py); echo "== benchmarks.$$m"; $(VPY) -m benchmarks.$$m || exit 1; done

# The serving stack: Triton with model_repository/ (loopback HTTP :8000, gRPC :8001, metrics :8002), then the
# REST gateway on :8080; waits for the gateway's /readyz, prints the API/docs/demo URLs, Ctrl-C stops both.
# Override e.g. make up STACK_ARGS="--port 9080 --api-key ...". New version dirs written by
# `python -m training.export` are picked up by Triton's polling; the gateway switches pairs by itself.
up: venv
	$(VPY) -m service.stack $(STACK_ARGS)

# Triton alone (dbp-triton is the console script of dbp.serving.launcher, pyproject [project.scripts]).
triton: venv
	$(VENV)/bin/dbp-triton --repo model_repository $(TRITON_ARGS)

# Operations (loopback only, bounded in users and time): see monitoring/README.md.
loadtest: venv data system
	$(VPY) -m loadtests.run $(LOADTEST_ARGS)
drills: venv data system
	$(VPY) -m loadtests.drills --long $(DRILLS_ARGS)
dashboard: venv
	$(VPY) -m monitoring.grafana.dashboard
dashboard-plot: venv data system
	$(VPY) -m monitoring.plot --duration 90s --out docs/figures/ops_dashboard.png
