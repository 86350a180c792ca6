# Two commands on a fresh machine: `make serve` and `make test`. Each creates .venv and
# installs what it needs first.
#
# TORCH_SPEC pins torch: where pip's config finds a CPU wheel of it (this project's CI
# machines: /opt/wheels) that is what installs; from plain PyPI it is the CUDA build, which
# runs on a CPU too. On a GPU machine pick the build and NIXL's CUDA wheel on a fresh
# checkout (the install runs once), e.g. `make test TORCH_SPEC=torch EXTRAS=test,structured,nixl-cu13`.

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
