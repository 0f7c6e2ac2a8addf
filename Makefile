# `make demo` and `make test` work from a fresh clone: they create .venv and install what they need
# (`make demo` the package alone, `make test` also the dev tools). `make demo CPU=1` installs PyTorch's
# CPU-only wheels first (no CUDA libraries).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BASE   := $(VENV)/.installed
STAMP  := $(VENV)/.installed-dev
CPU    ?=

.PHONY: setup demo test test-fast golden lint check bench clean

$(BASE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(CPU),$(BIN)/python -m pip install --quiet torch torchvision --index-url https://download.pytorch.org/whl/cpu)
	$(BIN)/python -m pip install --quiet -e .
	touch $(BASE)

$(STAMP): $(BASE)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(BASE)
	$(BIN)/distillistic demo
	@echo
	@echo "distillistic is installed in .venv: run 'source .venv/bin/activate' to put it on the PATH for the"
	@echo "commands above (or call .venv/bin/distillistic)."

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q --durations=25

# The inner loop: every test marked unit (every module at unit level, every method's golden steps), about a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m unit

# Record a method's golden steps (tests/golden/steps.json) after adding its variant to tests/test_golden_steps.py:
# make golden NAME=<variant> (several names separated by spaces; no NAME re-records every variant).
golden: $(STAMP)
	$(BIN)/python tests/test_golden_steps.py --record $(NAME)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

check: lint test

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
