# gmeta: quick start is `make train` then `make test` (both create the venv on first use).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXPERIMENT ?= movielens_maml
ARGS ?=

.PHONY: setup data train eval test test-slow test-all test-slurm lint typecheck check bench clean-data

setup: $(STAMP)

# Idempotent: reinstalls only when the dependency pins change. torch goes first and pinned, so that
# pip finds it satisfied and never pulls a multi-GB CUDA build on a CPU machine.
$(STAMP): pyproject.toml requirements-lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-lock.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Fetch MovieLens-1M into the git-ignored cache and build the experiment's task shards (skipped
# when present).
data: setup
	$(PY) scripts/prepare_data.py +experiment=$(EXPERIMENT)

train: data
	$(PY) train.py +experiment=$(EXPERIMENT) $(ARGS)

eval: setup
	$(PY) eval.py $(ARGS)

# Tests. `test` is the fast suite (under 5 minutes on 2 cores): every test not marked `slow` (a
# faster test covers the same behaviour) or `slurm`. `test-slow` is its complement without the
# SLURM jobs, so `test` + `test-slow` run every test once; .ci/run does that instead of `test-all`,
# which would run the fast suite a second time. `test-all` runs everything in one go (the `slurm`
# tests only where a SLURM controller answers, else they are skipped; `test-slurm` starts one).
# --durations: the slowest tests of every run are in the log, for keeping within the time budgets
test: setup
	$(PY) -m pytest -q -m "not slow and not slurm" --durations=10 $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m "slow and not slurm" --durations=10 $(ARGS)

test-all: setup
	$(PY) -m pytest -q $(ARGS)

# Real SLURM jobs on a one-node cluster on this machine (root; installs slurm-wlm + munge if missing):
# start it, run the tests marked `slurm`, stop it whatever they did.
test-slurm: setup
	@status=0; \
	conf="$$(scripts/slurm/local_cluster.sh start)" && eval "$$conf" && \
	  GMETA_SLURM_REQUIRED=1 $(PY) -m pytest -q -m slurm tests/slurm $(ARGS) || status=$$?; \
	scripts/slurm/local_cluster.sh stop; \
	exit $$status

# Training-step and Meta-IO benchmarks (tables + JSON lines; docs/benchmarks.md)
bench: setup
	$(PY) scripts/bench_train.py $(ARGS)
	$(PY) scripts/bench_io.py
	$(PY) scripts/bench_comm.py

lint: setup
	$(PY) -m ruff check src tests scripts train.py eval.py
	$(PY) -m ruff format --check src tests scripts train.py eval.py

# mypy over src/ (settings: [tool.mypy] in pyproject.toml; the same check as the pre-commit hook)
typecheck: setup
	$(PY) -m mypy

# what a commit should pass before the tests: lint + types
check: lint typecheck

clean-data:
	rm -rf data/movielens1m/shards data/movielens1m_train_window data/synthetic
