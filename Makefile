# QuickNet Serving. `make serve` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: serve test lint venv-serve venv-dev protos bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

venv-serve: $(BIN)/python
	$(PIP) -e '.[serve]'

venv-dev: $(BIN)/python
	$(PIP) -e '.[serve,build,dev]'

## Serve the default model from model_store/ on CPU with ONNX Runtime (REST :8000, gRPC :8001).
serve: venv-serve
	$(BIN)/quicknet serve

## Set up and run the whole test suite (ruff, then pytest).
test: venv-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: venv-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

## Regenerate gRPC stubs from proto/ (reproducible: pinned grpcio-tools).
protos: venv-dev
	$(BIN)/python -m service.protos

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
