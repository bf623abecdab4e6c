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
test: lint
	KERAS_BACKEND=tensorflow $(BIN)/pytest -q -p no:cacheprovider -m "not heavy" --durations=15
	KERAS_BACKEND=jax $(BIN)/pytest -q -p no:cacheprovider \
	    -m "backend_agnostic and not heavy and not jax_heavy" --durations=5

test-all: lint
	KERAS_BACKEND=tensorflow $(BIN)/pytest -q -p no:cacheprovider
	KERAS_BACKEND=jax $(BIN)/pytest -q -p no:cacheprovider -m backend_agnostic

test-fast: lint
	KERAS_BACKEND=tensorflow $(BIN)/pytest -q -p no:cacheprovider -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
