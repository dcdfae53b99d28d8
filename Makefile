# gentrain: `make demo` sets everything up and trains; `make test` runs the test suite.
VENV      ?= .venv
PY        := $(VENV)/bin/python
GENTRAIN  := $(VENV)/bin/gentrain
PYTEST_ARGS ?=
# `make test` runs the suite in two pytest-xdist workers, one per core (each test process and its
# trainers on one OpenMP thread, tests/conftest.py): 587 s against 998 s serial on a 2-core Zen 4.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal)
# DeepSpeed JIT-builds a small C++ op on every process-group init; keep the build cache across runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/gentrain/torch_extensions
export WANDB_MODE ?= offline

.PHONY: install demo test test-quick test-slurm test-multinode test-report bench bench-vae clean

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

# The SLURM and multi-node tests need root and run under their own targets below.
test: install
	$(PY) -m pytest -m "not slurm and not multinode" $(XDIST) $(PYTEST_ARGS)

test-quick: install
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

# Need root: installs Debian's SLURM + munge (no services started) and runs a real 2-node cluster.
test-slurm: install
	@[ "$$(id -u)" = 0 ] || { echo "make test-slurm needs root (it installs and starts SLURM)"; exit 1; }
	bash tests/cluster/install_slurm.sh
	GENTRAIN_TEST_SLURM=1 $(PY) -m pytest -m slurm -s tests/test_slurm.py $(PYTEST_ARGS)

# Needs root: two network namespaces as two hosts, one torchrun in each.
test-multinode: install
	@[ "$$(id -u)" = 0 ] || { echo "make test-multinode needs root (it creates network namespaces)"; exit 1; }
	$(PY) -m pytest -m multinode -s tests/test_multinode.py $(PYTEST_ARGS)

# `gentrain report` and its page in a real headless Chromium (Debian's package, installed here when
# root; without it the browser test is skipped with the reason).
test-report: install
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } || \
	  echo "chromium not installed: the report's browser test will be skipped"
	$(PY) -m pytest tests/test_report.py $(PYTEST_ARGS)

bench: install
	$(PY) -m bench.run

# The VAE against pythae (same ConvVAE, likelihood, optimizer, budget): throughput and IW-NLL.
# Installs the pinned pythae into the venv (it coexists with our pins: `pip check` is clean).
bench-vae: install
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) -m bench.vae_vs_pythae $(BENCH_ARGS)

clean:
	rm -rf runs data .pytest_cache
