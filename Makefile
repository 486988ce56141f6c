# QuickNet Serving. `make serve` and `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: lock bench-peers image serve test test-tools test-audit lint venv-serve venv-dev protos bench clean gpu-data gpu-train gpu-wheels gpu-serve gpu-rehearse gpu-adopt

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The lock files pin every transitive version (pyproject.toml pins only direct ones); `make lock`
# rewrites them after a pin changes (tests/test_packaging.py fails while they disagree).
# Each install leaves a stamp in the venv: `make serve` and `make test` run pip again only when the
# lock or pyproject.toml changed since (otherwise every start re-ran it, seconds of pip's output).
venv-serve: $(VENV)/.installed-serve
$(VENV)/.installed-serve: requirements/serve.lock pyproject.toml | $(BIN)/python
	$(PIP) -c requirements/serve.lock -e '.[serve,client]'
	touch $@

venv-dev: $(VENV)/.installed-dev
$(VENV)/.installed-dev: requirements/dev.lock pyproject.toml | $(BIN)/python
	$(PIP) -c requirements/dev.lock -e '.[serve,client,build,dev]'
	touch $@

LOCK := $(BIN)/pip-compile --quiet --strip-extras --no-emit-find-links --no-emit-index-url
lock: venv-dev
	$(LOCK) --extra serve --extra client -o requirements/serve.lock pyproject.toml
	$(LOCK) --extra serve --extra client --extra build --extra dev -o requirements/dev.lock pyproject.toml

## Serve the published models in model_store/ (the default, quicknet, at /classify) on CPU with ONNX Runtime (REST :8000, gRPC :8001).
serve: venv-serve
	$(BIN)/quicknet serve

## Set up and run the whole test suite (ruff, then pytest; -rs prints every skip with its reason).
test: venv-dev test-tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -rs --durations=15 -n auto --maxprocesses 2 --dist loadfile

## What the tests need besides Python: promtool (Debian's prometheus package) unit-tests the alert
## rules (tests/test_deploy.py). Installed when missing if we are root; otherwise one line says how.
test-tools:
	@command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing promtool (Debian package prometheus) for tests/test_deploy.py"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "make test needs promtool (tests/test_deploy.py): apt-get install prometheus as root, or put promtool on PATH"; \
	    exit 2; \
	  fi; }
	@command -v promtool >/dev/null || { echo "promtool still missing after installing prometheus"; exit 2; }

## Every README claim next to its test (tests/CLAIMS.md), then exactly those tests.
test-audit: venv-dev test-tools
	cat tests/CLAIMS.md
	$(BIN)/python -m pytest -q -rs -p no:randomly $$(grep -o 'tests/test_[a-z_]*\.py::test_[a-z0-9_]*' tests/CLAIMS.md | sort -u)

lint: venv-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

## The peers' own venv (.venv-peers: PyTriton needs numpy<2) and wrk, for `python -m benchmarks.peers`.
bench-peers: venv-dev
	test -x .venv-peers/bin/python || $(PYTHON) -m venv .venv-peers
	.venv-peers/bin/pip install --quiet --disable-pip-version-check -r benchmarks/peer_servers/requirements.txt
	command -v wrk >/dev/null || apt-get install -y -qq wrk

## The CPU image (torch-free), with podman or docker; its base is made from Debian packages when
## it cannot be pulled (deploy/podman/base-images.sh). `--format docker` keeps the HEALTHCHECK.
ENGINE ?= $(shell command -v podman || command -v docker)
IMAGE ?= quicknet-serving:cpu
image:
	@test -n "$(ENGINE)" || { echo "no container engine: apt-get install podman (or install docker)"; exit 2; }
	ENGINE=$(ENGINE) deploy/podman/base-images.sh python
	$(ENGINE) build --network host $(if $(findstring podman,$(ENGINE)),--format docker --pull=never) \
		-f deploy/docker/Dockerfile.cpu -t $(IMAGE) .
	@$(ENGINE) image inspect $(IMAGE) --format '$(IMAGE): {{.Size}} bytes'

## Regenerate gRPC stubs from proto/ (reproducible: pinned grpcio-tools).
protos: venv-dev
	$(BIN)/python -m quicknet.api.protos

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

## GPU jobs. They run under the GPU machine's own Python (GPU_PYTHON), not the venv: see README, "GPU runs".
GPU_PYTHON ?= python3
SHARED_NPZ ?= ../shared/data/cifar10/cifar10_jpeg.npz
TEST_NPZ := data-test/cifar10_test_jpeg.npz

## Copy the CIFAR-10 copy into data/ (git-ignored), checksum-verified: a GPU machine receives only the repo.
## Its test split alone goes to data-test/ (3 MiB, content-checked): what the serve run carries to gate on.
gpu-data: venv-dev
	mkdir -p data
	test -f data/cifar10_jpeg.npz || cp $(SHARED_NPZ) data/cifar10_jpeg.npz
	echo "a04e5bfc645b3eb3b4fd8ddbd152438b2f41e8d178c4a1ff27682bbfa52b21a8  data/cifar10_jpeg.npz" | sha256sum -c -
	$(BIN)/python -c 'from quicknet.build import data; data.write_test_split("data/cifar10_jpeg.npz", "$(TEST_NPZ)")'

## Train the three arms (quicknet, quicknet-res, quicknet-ls02) at once on this machine's GPU within
## 420 s; results in gpu-results/train/ (quicknet/build/gpu_train.py says why each arm and what it costs),
## starting warm from an earlier draw's torch.compile artifacts in gpu-cache/ where one was built for this GPU.
gpu-train:
	$(GPU_PYTHON) -m quicknet gpu-train --data data/cifar10_jpeg.npz --out gpu-results/train --budget-s 420 \
		--handoff .gpu-handoff --compile-cache gpu-cache

## The serving stack as Python 3.12 wheels in .whl/ and `hey` (a static-enough Go binary, libc only)
## in .gpu/bin/, both git-ignored: what a GPU machine without a package index needs to run gpu-serve.
gpu-wheels: venv-dev
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl -r benchmarks/gpu-wheels.txt
	mkdir -p .gpu/bin
	test -x .gpu/bin/hey || (cd /tmp && apt-get download hey >/dev/null && dpkg -x hey_*.deb /tmp/hey-deb \
		&& cp /tmp/hey-deb/usr/bin/hey $(CURDIR)/.gpu/bin/hey)

## Both GPU jobs' dry runs here, under the GPU machine's Python 3.12 and torch 2.11 and with the
## repo and wheels as the device tool delivers them (benchmarks/gpu_rehearse.sh says what it covers).
gpu-rehearse: gpu-data gpu-wheels
	benchmarks/gpu_rehearse.sh

## The serving proof on this machine's GPU within 420 s; results in gpu-results/serve/.
gpu-serve:
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
	PYTHONPATH=/tmp/site $(GPU_PYTHON) -m benchmarks.gpu_serve --data $(TEST_NPZ) --out gpu-results/serve --from-train .gpu-handoff

## Back here after a draw, with what the GPU runs returned copied into gpu-results/ (train/, serve/):
## the compile cache into gpu-cache/, the handed-off arm exported, scored and published, its fused
## engine attached (quicknet/build/adopt.py; run it again after a refusal to finish what is left).
gpu-adopt: venv-dev
	$(BIN)/python -m quicknet adopt-gpu-run gpu-results
