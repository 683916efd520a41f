# Two commands do all the set-up on a fresh machine:
#   make demo   -> install, then run the main job (prep -> pretrain -> fine-tune -> evaluate) on the bundled sample
#   make test   -> install, then run the test suite (what CI runs: .ci/run)
#   make bench  -> quick runs of the throughput benchmarks (small inputs, ~2 min on 2 busy cores: they check the
#                  benchmarks run and give rough ratios; docs/results/benchmarks/ comes from the full-size runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch/torchvision are pinned here: 2.14.1/0.29.1 install from local disk on our machines (2.13.0 pairs with a
# torchvision that fails at import). Change both together.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-all bench clean-demo

install: $(VENV)/.medsass-installed

$(VENV)/.medsass-installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[dev]" $(TORCH_PINS)
	touch $@

demo: install
	$(VENV)/bin/medsass-train demo --out demo_out

test: install
	bash .ci/test.sh

BENCH_OUT ?= bench_out
bench: install
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/prep_throughput.py --n-images 100 --repeat 1 --out-json $(BENCH_OUT)/prep.json
	$(PY) benchmarks/loader_throughput.py --n-images 64 --seconds 1 --out-json $(BENCH_OUT)/loader.json
	$(PY) benchmarks/suggest_throughput.py --n 64 --size 64 --kcenter-n 10000 --out-json $(BENCH_OUT)/suggest.json

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

clean-demo:
	rm -rf demo_out
