# raygpt: `make train` (set up, prepare the built-in corpus, train the demo) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch goes in first, pinned to the version the tests run with, on GPU and CPU machines alike
# (an unpinned torch pulled in by a dependency would fetch whatever is newest, gigabytes). One
# pin gives each machine its build: PyPI's Linux wheel of torch 2.13.0 is the CUDA build, and
# the local package index of the CPU machines serves the CPU wheel of that version.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup train test test-drills ci test-fast lint format bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	touch $@

train: setup
	$(PY) -m data_pipeline.prepare +experiment=demo
	$(PY) -m trainer.train +experiment=demo

# Two pytest workers, one test file each at a time (most e2e time is waiting on process
# start-up, Ray and the fault drills), then the tests that must have the machine to themselves.
# The long multi-node and fault drills (marker `drill`) run in `make test-drills`: `make test`
# must end within 20 minutes on a 2-core machine, install included.
test: setup
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 -n 2 --dist loadfile -m "not serial and not drill" $(PYTEST_ARGS)
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 -m "serial and not drill" $(PYTEST_ARGS)

# The drills on two pytest workers, one file each at a time: each drill file starts its own Ray
# (own ports and temp dirs, tests/ray_nodes.py) and its own S3 server when it needs one.
test-drills: setup
	$(PY) -m pytest -q -p no:cacheprovider --timeout=1800 -n 2 --dist loadfile -m drill $(PYTEST_ARGS)

# What CI runs on every landing (.ci/run): the suite, then every drill.
ci: test test-drills

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -n 2 tests/unit $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf runs data/smoke outputs multirun .pytest_cache
