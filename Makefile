# Two commands do all the set-up on a fresh machine:
#   make demo   -> install, then run the main job (prep -> pretrain -> fine-tune -> evaluate) on the bundled sample
#   make test   -> install, then run the test suite (what CI runs: .ci/run)
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

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

clean-demo:
	rm -rf demo_out
