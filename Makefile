# The two commands a newcomer needs (see README):
#   make serve   set up everything, register the shipped model if needed, serve on :3000
#                (plain `bentoml serve` registers it too when the registry is empty; bootstrap
#                 first just fails early and clearly when the registry cannot be reached)
#   make test    set up everything and run the test suite
VENV ?= .venv
PYTHON ?= python3
PORT ?= 3000
BIN = $(VENV)/bin

.PHONY: setup serve test build build-gpu container clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $@

serve: setup
	$(BIN)/infantino bootstrap
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/bentoml serve --port $(PORT)

test: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest

# The Bento without torch (backbone on ONNX Runtime; tests/test_bento.py checks it); build-gpu: with torch.
build: setup
	$(BIN)/infantino bootstrap
	$(BIN)/infantino bundle
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/bentoml build

build-gpu: setup
	$(BIN)/infantino bootstrap
	$(BIN)/infantino bundle
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/bentoml build -f bentofile.gpu.yaml

# The torch-free Bento in a real container (buildah, podman; see README "Build a Bento and a
# container"): base image (a registry's python:3.11-slim, or one built from Debian packages),
# make build if needed, containerize, run, /readyz, /predict; writes bench/results/containerize.json.
container: setup
	VENV=$(VENV) scripts/containerize.sh

clean:
	rm -rf $(VENV) .infantino
