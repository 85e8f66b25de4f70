# make serve: install into .venv and serve the default model on http://127.0.0.1:8000
#             (python -m serve_app sets Ray's high-throughput mode before it starts Ray)
# make test:  install into .venv, lint, type-check and run every test (CI runs this), on
#             TEST_WORKERS pytest workers (xdist): the tests that start servers spend most of
#             their time waiting on Ray and sockets, and a second worker uses that time
# make test-fast: the tests that start no server (pytest -m "not e2e"; a test that starts one
#             without the e2e marker fails, tests/conftest.py)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
TEST_WORKERS ?= 2
STAMP  := $(VENV)/.installed

.PHONY: install serve test test-fast lint clean

install: $(STAMP)

# One pip run resolves everything together (protobuf < 7 for tritonclient, see constraints.txt).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

serve: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m serve_app --config configs/local.yaml $(ARGS)

lint: install
	$(BIN)/ruff check serve_app tests scripts bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test-fast: install
	$(BIN)/pytest -m "not e2e"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
