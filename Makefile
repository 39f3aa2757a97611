# Set-up and entry points. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
CONFIG ?= experiments/demo.py

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# Train the default model on the bundled corpus, then sample and evaluate it. Rerunning resumes
# the run in $(WORKDIR) (or finds it complete) and samples and evaluates again.
demo: $(STAMP)
	@start=$$(date +%s); \
	$(BIN)/python -m diffusion_text train --config=$(CONFIG) --workdir=$(WORKDIR) && \
	trained=$$(date +%s) && \
	$(BIN)/python -m diffusion_text sample --workdir=$(WORKDIR) --num_samples=8 && \
	sampled=$$(date +%s) && \
	$(BIN)/python -m diffusion_text eval --workdir=$(WORKDIR) && \
	done=$$(date +%s) && \
	echo "demo: train $$((trained - start)) s, sample $$((sampled - trained)) s, eval $$((done - sampled)) s; outputs in $(WORKDIR)/"

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The benchmark suite (scripts/bench.py): the full one writes docs/benchmarks.md and its plots
# (about 30 min on a 2-core CPU); `make bench QUICK=1` runs tiny sizes into runs/bench_quick/
# in under 5 min. Extra flags go in BENCH_FLAGS, e.g. BENCH_FLAGS=--sections=ceilings,training.
BENCH_FLAGS ?=
bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(if $(QUICK),--quick) $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
