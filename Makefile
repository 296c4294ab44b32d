# The two commands a newcomer needs (see README):
#   make serve   set up everything, register the shipped model if needed, serve on :3000
#   make test    set up everything and run the test suite
VENV ?= .venv
PYTHON ?= python3
PORT ?= 3000
BIN = $(VENV)/bin

.PHONY: setup serve test build clean
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

build: setup
	$(BIN)/infantino bootstrap
	$(BIN)/infantino bundle
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/bentoml build

clean:
	rm -rf $(VENV) .infantino
