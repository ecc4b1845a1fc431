# Two commands do all set-up on a fresh machine:
#   make demo   - generate the bundled dataset, train deco_tiny on the CPU (~14 min), evaluate, draw
#   make test   - run the test suite
# Each creates the virtual environment in .venv and installs what it needs if missing.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CORE   := $(VENV)/.installed-core
STAMP  := $(VENV)/.installed
# --no-compile: pip would byte-compile every module of every wheel (torch's CUDA build alone has
# thousands: 38 s of a 131 s install); Python compiles, and caches, only the modules imported (12 s
# once).  So that it may cache them, make's commands run without PYTHONDONTWRITEBYTECODE (where it is
# set, every process, and the suite starts hundreds, would compile torch again).
PIP_FLAGS := --quiet --no-compile
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-one-process test-kernels test-fast lint format bench clean

# The demo needs only the package itself; the tests need every optional extra too (installed on
# top, about 20 s more), so a fresh `make demo` spends its time training.
$(CORE): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip
	$(PY) -m pip install $(PIP_FLAGS) -e .
	touch $(CORE)

$(STAMP): $(CORE)
	$(PY) -m pip install $(PIP_FLAGS) -e ".[dev,deploy,serve,video,tensorboard,supervision,openvino,pt2e]"
	touch $(STAMP)

demo: $(CORE)
	$(VENV)/bin/decodet demo

# The suite runs in worker processes (pytest-xdist), one per core up to 4.  --dist loadfile keeps
# each test file in one worker, so a file's module fixtures (trained models, exports) are built
# once.  `make test-one-process` runs the whole suite in a single process, as CI also does: the
# libraries (torch, OpenVINO, onnxruntime, NNCF, uvicorn) must live together in one process, as
# they do in `decodet serve`.
# (The cores this process may use, not nproc: nproc follows OMP_NUM_THREADS, and a run with one thread per
# process still wants a worker per core.)
TEST_WORKERS ?= $(shell n=$$($(PYTHON) -c 'import os; print(len(os.sched_getaffinity(0)))' 2>/dev/null || echo 2); \
	[ $$n -gt 4 ] && n=4; echo $$n)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

test-one-process: $(STAMP)
	$(PY) -m pytest -q -p no:xdist --durations=15

# The numerics-sensitive tests (precision, backends, int8, export, training signal) again on
# other CPUs' kernel paths: oneDNN (torch's and OpenVINO's) capped at the two instruction sets
# below this CPU's best (.ci/isa_caps), the second run with ATen's portable kernels too.  A
# margin that holds only on this CPU's kernels fails here.  CI runs it after `make test`.
NUMERIC_TESTS := tests/test_precision.py tests/test_openvino.py tests/test_quantize.py tests/test_criterion.py \
	tests/test_matcher.py tests/test_denoising.py

test-kernels: $(STAMP)
	@set -e; aten=""; for cap in $$(.ci/isa_caps); do \
	  echo "== ONEDNN_MAX_CPU_ISA=$$cap OV_CPU_MAX_ISA=$$cap $$aten"; \
	  env ONEDNN_MAX_CPU_ISA=$$cap OV_CPU_MAX_ISA=$$cap $$aten $(PY) -m pytest -q -p no:cacheprovider $(NUMERIC_TESTS); \
	  aten="ATEN_CPU_CAPABILITY=default"; \
	done

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/bench_models.py
	$(VENV)/bin/decodet benchmark --model deco_r50

clean:
	rm -rf runs .pytest_cache .ruff_cache
