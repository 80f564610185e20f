# The two commands (README): `make run` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test setup bench bench-quick lint clean

setup: $(VENV)/.installed

# torch==2.13.0 first and by exact version: it is the CPU build on disk, where an open range would pull
# the newest CUDA build (several GB).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: setup  ## the main job: SeLa self-labelling on scikit-learn's digits, then the results table
	$(PY) examples/sela.py

test: setup  ## the whole test suite (Triton kernels run under TRITON_INTERPRET=1 without a GPU)
	$(PY) -m pytest -q

bench: setup
	$(PY) -m benchmarks

bench-quick: setup
	$(PY) -m benchmarks --quick

lint: setup
	$(VENV)/bin/ruff check otlabel kernels benchmarks examples tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
