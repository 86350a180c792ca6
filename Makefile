# Two commands on a fresh machine: `make serve` and `make test`. Each creates .venv and
# installs what it needs first.
#
# CPU-only machines get PyTorch's CPU build (TORCH_SPEC). On a GPU machine, install the
# CUDA build instead, e.g. `make test TORCH_SPEC=torch EXTRAS=test,nixl-cu13` (CUDA 13).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,structured,nixl-cu12
CLUSTER ?= cluster.yaml
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

serve: $(STAMP)
	$(BIN)/pdcluster up $(CLUSTER)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
