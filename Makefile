# Two commands do all setup on a fresh machine:
#   make demo   - creates .venv if needed, runs the demo on built-in synthetic data
#   make test   - creates .venv if needed, runs the whole test suite (what CI runs)
# torch is installed pinned first (a CPU wheel), then the project with its extras.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.qlty_gpu-installed

.PHONY: demo test test-fast bench lint clean venv triton-matrix

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

# the development lane: everything except tests marked slow (wheel build, AOT kernel
# compiles, subprocess tests); `make test` (CI) runs them all
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_roundtrip.py

# The Triton kernels' CPU (interpreter) tests and AOT-compile tests against every supported
# Triton release, each installed into its own folder and put first on PYTHONPATH. Triton
# 3.6's interpreter cannot convert NumPy 2.4's 1-element arrays to int, so it gets NumPy 2.3.
TRITONS ?= 3.6.0 3.7.1 3.8.0 3.9.0
triton-matrix: $(STAMP)
	@for v in $(TRITONS); do \
	  d=build/triton-$$v; extra=; \
	  case $$v in 3.6.*) extra="numpy==2.3.5";; esac; \
	  [ -d $$d ] || $(PIP) install -q --no-deps --target $$d triton==$$v $$extra || exit 1; \
	  echo "== triton $$v $$extra"; \
	  PYTHONPATH=$$d $(PY) -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
	    tests/test_triton_kernels.py tests/test_kernel_compile.py > $$d.log 2>&1; rc=$$?; \
	  tail -n 1 $$d.log; [ $$rc -eq 0 ] || exit $$rc; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) demo_out build dist *.egg-info
