# UB-SMoE: `make train` and `make test` set up .venv themselves on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# W&B never needs an account; the hub stays reachable for data and models that are not
# carried in data/ (tests and CI set offline mode themselves).
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install train smoke test bench compare results ablation sweep plots notebooks clean

help: ## list the targets
	@grep -E '^[a-z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP) ## create or refresh .venv with the pinned dependencies (nothing else)

train: $(STAMP) ## the default experiment: python src/train.py experiment=glue_hetero
	$(PY) src/train.py experiment=glue_hetero $(ARGS)

smoke: $(STAMP) ## the same path on a small budget (experiment=smoke; 66 s measured, docs/performance.md)
	$(PY) src/train.py experiment=smoke $(ARGS)

# Test processes (pytest-xdist); each gets cores / TEST_WORKERS torch threads (tests/conftest.py).
TEST_WORKERS ?= 2
test: $(STAMP) ## the whole test suite (offline; uses the carried data/), on TEST_WORKERS processes
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(ARGS)

bench: $(STAMP) ## six speed, overhead, memory and quality benchmarks, JSON into logs/bench/ (docs/performance.md)
	$(PY) benchmarks/smoe_speed.py
	$(PY) benchmarks/round_overhead.py
	$(PY) benchmarks/backend_overhead.py
	$(PY) benchmarks/native_moe_speed.py
	$(PY) benchmarks/soak.py
	$(PY) benchmarks/moefy_quality.py

compare: $(STAMP) ## every method on the same split, one table per tier (experiment=compare)
	$(PY) -m ubsmoe.compare $(ARGS)

results: $(STAMP) ## every method over seeds 42,43,44 on experiment=compare (27 runs): tables with bootstrap CIs, figures (logs/results/)
	$(PY) -m ubsmoe.results $(ARGS)

ablation: $(STAMP) ## UB-SMoE with one switch changed at a time (DMR, PG parts, N_p), seed 42, compare budget (logs/ablation/)
	$(PY) -m ubsmoe.ablation $(ARGS)

SWEEP ?= ablation
sweep: $(STAMP) ## create a W&B grid sweep (SWEEP=ablation|methods), then run the printed `wandb agent`
	WANDB_MODE=online $(VENV)/bin/wandb sweep configs/sweeps/$(SWEEP).yaml

plots: $(STAMP) ## PNGs from run directories: make plots RUNS="logs/runs/..."
	$(PY) -m ubsmoe.plots $(RUNS) $(ARGS)

notebooks: $(STAMP) ## open notebooks/ in JupyterLab (installs the notebooks extra the first time)
	@test -x $(VENV)/bin/jupyter || $(VENV)/bin/pip install --quiet -e ".[dev,notebooks]"
	$(VENV)/bin/jupyter lab notebooks/

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf logs/runs logs/multiruns logs/bench .cache .pytest_cache
