# `make demo` and `make test` create and use the local virtual environment .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-fast lint clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/keras-newton demo

lint: $(STAMP)
	$(BIN)/ruff check .

# The suite on TensorFlow (slow-marked tests included, heavy ones left out), then
# the backend-agnostic layer/model tests on JAX (the ones that compile for 20 s or more
# there left out). `make test-all` adds the heavy and jax_heavy tests.
# JOBS pytest-xdist workers (one per core of the 2-core CI machine); a test module stays
# on one worker, so its module-scoped fixtures are built once. JOBS=0 runs in-process.
JOBS ?= 2
PYTEST := $(BIN)/pytest -q -p no:cacheprovider -n $(JOBS) --dist loadscope

test: lint
	KERAS_BACKEND=tensorflow $(PYTEST) -m "not heavy" --durations=15
	KERAS_BACKEND=jax $(PYTEST) -m "backend_agnostic and not heavy and not jax_heavy" --durations=5

test-all: lint
	KERAS_BACKEND=tensorflow $(PYTEST)
	KERAS_BACKEND=jax $(PYTEST) -m backend_agnostic

test-fast: lint
	KERAS_BACKEND=tensorflow $(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
