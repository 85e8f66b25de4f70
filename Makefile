# make serve: install into .venv and serve the default model on http://127.0.0.1:8000
# make serve-fast: the same URLs, HAProxy in front and the model inside the ingress replica
# make test:  install into .venv, lint, type-check and run every test (CI runs this)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve serve-fast test test-fast lint clean

install: $(STAMP)

# One pip run resolves everything together (protobuf < 7 for tritonclient, see constraints.txt).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

serve: install
	HF_HUB_OFFLINE=1 $(BIN)/serve run configs/local.yaml

# Ray's throughput-optimized mode with HAProxy: see configs/fast.yaml and docs/benchmarks.md.
serve-fast: install
	HF_HUB_OFFLINE=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1 \
	  RAY_SERVE_HAPROXY_NBTHREAD=1 $(BIN)/serve run configs/fast.yaml

lint: install
	$(BIN)/ruff check serve_app tests scripts bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not e2e"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
