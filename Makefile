# Two entry points: `make train` (install + the enwik8 run) and `make test` (install + tests).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
WORKDIR ?= runs/megalodon
# Everything by default, the slow tests included (plain `pytest` skips them), in two worker
# processes (pytest-xdist), each test file whole in one of them so that module fixtures are
# built once. Most tests wait on one-threaded XLA compiles or on child processes, so two
# workers nearly halve the wall time on two cores (together they peaked at 14 GB).
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?= -m "slow or not slow" --durations=25 -n $(PYTEST_WORKERS) --dist loadfile
EXTRAS ?= test
PY_SOURCES := megalodon_flax configs tests benchmarks main.py

# The Megalodon-vs-Llama comparison on a CPU budget (see RESULTS.md); runs go to runs/.
COMPARE_ARGS ?= --config.num_train_steps=400 --config.batch_size=8 \
	--config.schedule.warmup_steps=40 --config.eval.every_steps=100 --config.eval.num_batches=16 \
	--config.checkpoint.every_steps=200 --config.sampling.every_steps=400 --config.profile.num_steps=0

# The same Megalodon trained on 4,096-byte sequences: as many bytes per step (1 × 4,096) and
# validation on as many bytes (16 batches of 2 × 4,096).
LONG_ARGS ?= --config.seq_len=4096 --config.batch_size=1 --config.eval.batch_size=2

.PHONY: install train test bench lint compare

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

compare: install
	$(PY) main.py --config=configs/megalodon.py --workdir=runs/megalodon $(COMPARE_ARGS)
	$(PY) main.py --config=configs/llama.py --workdir=runs/llama $(COMPARE_ARGS)
	$(PY) main.py --config=configs/megalodon.py --workdir=runs/megalodon_4096 $(COMPARE_ARGS) \
		$(LONG_ARGS)
	$(PY) -m megalodon_flax.cli.evaluate --workdir=runs/megalodon \
		--also=runs/megalodon_4096,runs/llama --mode=context --split=test \
		--out_dir=results/context_curve
	$(PY) -m megalodon_flax.cli.compare --workdirs=runs/megalodon,runs/llama,runs/megalodon_4096 \
		--out=RESULTS.md --plots_dir=results/plots --intro=results/intro.md \
		--appendix=results/long_context.md,results/context_curve/context_curve.md
