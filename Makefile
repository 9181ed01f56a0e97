# depthkit developer entry points. `make quickstart` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 CPU lies on this project's build machines; override with TORCH=torch (or a CUDA build) elsewhere.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.depthkit-installed

.PHONY: setup fetch quickstart test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,vlm,serve,bench]"
	touch $(STAMP)

setup: $(STAMP)

fetch: setup
	$(BIN)/depthkit fetch all

quickstart: fetch
	$(BIN)/depthkit run --out runs/quickstart

test: fetch
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check .

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
