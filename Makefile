# The README's two commands: `make run` (main job on the default model) and `make test`.
# Both create the virtual environment on first use. torch is installed first and pinned: a bare
# `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.finemoe-installed

.PHONY: setup native run test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[dev,server,bench]"
	touch $(STAMP)

# Opt-in: compile the hot modules in place (setup.py; Cython from the dev extra). Run again after
# editing one of them: until then the edited module runs as source (src/finemoe/_native.py).
native: setup
	FINEMOE_NATIVE=1 $(BIN)/python setup.py -q build_ext --inplace

run: setup
	$(BIN)/finemoe generate --prompt "What is the capital of France? Answer in one sentence." --expert-budget 40% --max-new-tokens 48

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) build src/finemoe/*.so src/finemoe/_native_build.json
