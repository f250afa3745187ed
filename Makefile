# fedrec: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Where the CPU build of torch comes from. Empty = pip's configured sources (this machine
# keeps the CPU wheel on disk). Elsewhere: make TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_VERSION := 2.13.0

.PHONY: demo test lint typecheck unit install clean

install: $(VENV)/.installed

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (fedrec needs Python 3.11; set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# torch is asked for first and alone, so nothing resolved later can pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -c "import torch, sys; sys.exit('error: a CUDA build of torch was installed' if torch.version.cuda else 0)"
	$(BIN)/pip install --quiet -e '.[all,dev]'
	$(BIN)/python -c "import torch, sys; sys.exit('error: torch was replaced by a CUDA build' if torch.version.cuda else 0)"
	touch $@

demo: install
	$(BIN)/fedrec demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# One worker per core (at most 4), a test file per worker (module fixtures set up once).
# The real-process tests wait on process start-up much of the time, so two share 2 cores
# well: 724 s serial vs 480 s, both beside a training run; 513 s on the quiet machine.
unit: install
	$(BIN)/pytest -q -n auto --maxprocesses 4 --dist loadfile

test: lint typecheck unit

clean:
	rm -rf $(VENV) state .pytest_cache .mypy_cache .ruff_cache
