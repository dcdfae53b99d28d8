# gentrain: `make demo` sets everything up and trains; `make test` runs the test suite.
VENV      ?= .venv
PY        := $(VENV)/bin/python
GENTRAIN  := $(VENV)/bin/gentrain
PYTEST_ARGS ?=
# DeepSpeed JIT-builds a small C++ op on every process-group init; keep the build cache across runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/gentrain/torch_extensions
export WANDB_MODE ?= offline

.PHONY: install demo test test-quick bench clean

install: $(VENV)/.installed

# torch is pinned in constraints.txt (the CPU wheel on this machine), not in pyproject.
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: install
	$(PY) -m launcher.demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-quick: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) -m bench.run

clean:
	rm -rf runs data .pytest_cache
