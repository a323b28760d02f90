# Two commands do all setup on a fresh machine:
#   make demo   - creates .venv if needed, runs the demo on built-in synthetic data
#   make test   - creates .venv if needed, runs the whole test suite (what CI runs)
# torch is installed pinned first (a CPU wheel), then the project with its extras.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.qlty_gpu-installed

.PHONY: demo test bench lint clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,io,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m qlty_gpu.demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/bench_roundtrip.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) demo_out build dist *.egg-info
