# Two entry points: `make train` (install + the enwik8 run) and `make test` (install + tests).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
WORKDIR ?= runs/megalodon
# Everything by default, the slow tests included (plain `pytest` skips them).
PYTEST_ARGS ?= -m "slow or not slow"
EXTRAS ?= test
PY_SOURCES := megalodon_flax configs tests benchmarks main.py

.PHONY: install train test bench lint

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) main.py --config=configs/megalodon.py --workdir=$(WORKDIR)

test: install
	$(PY) -m ruff check $(PY_SOURCES)
	$(PY) -m ruff format --check $(PY_SOURCES)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks.bench_model
