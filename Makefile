# The two commands that matter: `make demo` and `make test`. Both install first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := offline
export TOKENIZERS_PARALLELISM := false
export USE_HUB_KERNELS := NO

.PHONY: install test demo lint bench clean

# Idempotent: re-runs only when the dependency files change. torch/torchvision are pinned by
# constraints.txt so that pip never swaps in another build.
install: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	# transformers >= 5.2x requires `kernels`, which makes bitsandbytes' CPU 4-bit path fetch a kernel from
	# the hub at run time (a network call, and another code path than the one tested): never keep it.
	$(BIN)/python -m pip uninstall --yes --quiet kernels 2>/dev/null || true
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m misp.demo

lint: $(STAMP)
	$(BIN)/ruff check misp tests bench

# The bench extra (TRL, for bench/trl_dpo.py) is installed on demand, never by `make install`.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,bench]"
	$(BIN)/python -m pip uninstall --yes --quiet kernels 2>/dev/null || true
	touch $(BENCH_STAMP)

# e.g. make bench BENCH_ARGS="trl_dpo negatives --threads 1", or BENCH_ARGS=--quick for a smoke run.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf runs worlds cache lightning_logs wandb
