# Two set-up commands: `make demo` (the main job) and `make test` (the whole test suite).
# Both create or reuse a virtual environment in the checkout and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install test test-fast lint typecheck check demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU torch wheel; an unpinned torch would pull a several-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check peft_masm recipes tests benchmarks
	$(VENV)/bin/ruff format --check peft_masm recipes tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# What CI runs (.ci/run): lint, type check, then the whole test suite.
check: lint typecheck test

demo: $(STAMP)
	$(VENV)/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no --num_cpu_threads_per_process 2 recipes/train.py --config recipes/configs/demo.yaml --overwrite_output_dir

clean:
	rm -rf $(VENV) outputs .pytest_cache
