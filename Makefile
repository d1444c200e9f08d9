# bertstream: `make run` and `make test` do the whole set-up first (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= models/bert_sentiment
# Extra flags for `model build` (the tests pass --tiny) and for the job `make run` starts.
MODEL_BUILD_FLAGS ?=
RUN_ARGS ?=
export BERTSTREAM_CACHE ?= $(HOME)/.cache/bertstream
PYTEST_ARGS ?=
PRISM := $(BERTSTREAM_CACHE)/bin/prism
PRISM_VERSION := v2.77.0

.PHONY: help setup venv redis emulator model jars crd prism run test bench lint reliability screenshot constraints clean

help:
	@echo "make run          set up, then run the pipeline on its embedded defaults (DirectRunner)"
	@echo "make test         set up, then run the whole test suite"
	@echo "make bench        set up, then run the benchmarks (JSON on the last line of each)"
	@echo "make reliability  set up, then the full fault and load suite"
	@echo "make screenshot   set up, then save the README's dashboard picture (docs/dashboard.png:"
	@echo "                  the default model, a version rejected and one promoted in shadow)"
	@echo "make lint         ruff over the project"
	@echo "make setup        everything any target needs: venv + pip install, redis-server, the"
	@echo "                  default model (cached), the Pub/Sub emulator check, the Flink jars,"
	@echo "                  the Flink operator CRD, Prism, chromium"

# `make run` needs only venv, redis and model; the rest is set up by the targets that use it.
setup: venv redis emulator model jars crd prism chromium

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	@if [ ! -x $(PY) ]; then \
	  $(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	    if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); \
	    else echo "python3 -m venv failed: install python3-venv (sudo apt-get install -y python3-venv)"; exit 1; fi; }; \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

redis:
	@if ! command -v redis-server >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing redis-server with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	  else \
	    echo "redis-server is missing: run 'sudo apt-get install -y redis-server' (or make setup as root)"; exit 1; \
	  fi; \
	fi

emulator: venv
	@$(PY) -c "from runners.local_servers import find_pubsub_emulator, EMULATOR_HINT as h; import sys; \
	p = find_pubsub_emulator(); print('Pub/Sub emulator:', p or 'NOT FOUND - ' + h); sys.exit(0 if p else 1)"

model: venv
	$(PY) -m model build --out $(MODEL_DIR) $(MODEL_BUILD_FLAGS)

# The Beam Flink job server and the GCP expansion service (Maven, cached once).
jars: venv
	@if command -v mvn >/dev/null && command -v javac >/dev/null; then \
	  $(PY) -m launcher fetch-jars; \
	else \
	  echo "mvn and a JDK (javac) are needed for the Flink runner's jars: sudo apt-get install -y maven openjdk-17-jdk-headless"; exit 1; \
	fi

# The Flink operator's FlinkDeployment CRD for the manifest tests (Maven Central, once).
crd: venv
	@$(PY) -m launcher fetch-crd

# TensorFlow as tensorflow/serving:2.19.1 runs it, in a venv of its own (cached once):
# tests/k8s/test_deployment.py loads the exported model with it. The versions are that
# test's SERVING_TF and SERVING_TF_TEXT_PYPI.
TF_SERVING_VENV := $(BERTSTREAM_CACHE)/venvs/tf-serving-2.19
.PHONY: tf-serving-venv
tf-serving-venv: venv $(TF_SERVING_VENV)/.installed

$(TF_SERVING_VENV)/.installed:
	$(PYTHON) -m venv $(TF_SERVING_VENV)
	$(TF_SERVING_VENV)/bin/python -m pip install -q --upgrade pip
	$(TF_SERVING_VENV)/bin/python -m pip install -q tensorflow==2.19.1 tensorflow-text==2.19.0
	@touch $@

# Hugging Face's MPNet (transformers 4.x: TFMPNetModel, TensorFlow, no PyTorch) in a venv of
# its own (cached once): tests/test_mpnet.py checks model/mpnet.py against it. PyPI's torch
# wheels pull gigabytes of CUDA packages, and the checkpoint ships no ONNX export.
MPNET_REFERENCE_VENV := $(BERTSTREAM_CACHE)/venvs/mpnet-reference-4.57
.PHONY: mpnet-reference-venv
mpnet-reference-venv: $(MPNET_REFERENCE_VENV)/.installed

$(MPNET_REFERENCE_VENV)/.installed:
	$(PYTHON) -m venv $(MPNET_REFERENCE_VENV)
	$(MPNET_REFERENCE_VENV)/bin/python -m pip install -q --upgrade pip
	$(MPNET_REFERENCE_VENV)/bin/python -m pip install -q tensorflow==2.19.1 tf-keras==2.19.0 \
	  transformers==4.57.6 tokenizers==0.22.2 safetensors==0.8.0 numpy==2.1.3
	@touch $@

# Prism, Beam's portable local runner (a Go binary), for the PrismRunner tests.
prism: $(PRISM)

$(PRISM):
	@if command -v go >/dev/null; then \
	  echo "building Prism $(PRISM_VERSION) with go install (about two minutes, once)"; \
	  GOBIN=$(BERTSTREAM_CACHE)/bin go install github.com/apache/beam/sdks/v2/go/cmd/prism@$(PRISM_VERSION); \
	else \
	  echo "go is needed to build Prism (the PrismRunner tests run on it): install Go 1.26 or later (https://go.dev/dl/), or put a prism binary at $(PRISM)"; exit 1; \
	fi

run: venv redis model
	$(PY) -m pipeline --runner=DirectRunner --model_dir $(MODEL_DIR) $(RUN_ARGS)

# Headless Chromium + its WebDriver for the dashboard's browser tests (tests/test_dashboard.py).
.PHONY: chromium
chromium:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing chromium and chromium-driver with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else \
	    echo "chromium is missing (the dashboard's browser tests need it): run 'sudo apt-get install -y chromium chromium-driver' (or make chromium as root)"; exit 1; \
	  fi; \
	fi

# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero code.
test: setup tf-serving-venv mpnet-reference-venv
	$(PY) -m pytest $(PYTEST_ARGS)

# The README's picture of the dashboard, saved by its browser test.
screenshot: setup
	BERTSTREAM_SCREENSHOT=$(CURDIR)/docs/dashboard.png $(PY) -m pytest tests/test_model_rollout.py -k streaming

reliability: venv redis emulator model jars
	$(PY) -m tests.reliability.run

bench: venv redis emulator model jars
	$(PY) benchmarks/model_throughput.py --model $(MODEL_DIR)
	$(PY) benchmarks/throughput.py --model_dir $(MODEL_DIR)
	$(PY) benchmarks/runners.py --model_dir $(MODEL_DIR)
	$(PY) benchmarks/latency.py --model_dir $(MODEL_DIR) --loads 0.5,0.7,0.8 --seconds 60
	$(PY) benchmarks/ingest_throughput.py

lint: venv
	$(VENV)/bin/ruff check .

constraints: venv
	{ echo "# The exact set that installs together (Python 3.11, Linux x86_64). Regenerate with"; \
	  echo "# \`make constraints\` after changing setup.py, and check that \`make test\` still passes."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^bertstream'; } > constraints.txt

clean:
	rm -rf $(VENV) models .pytest_cache
