# Two entry points, each doing all set-up on a fresh machine:
#   make train   -> creates .venv (once), trains the default recipe into runs/
#   make test    -> creates .venv (once), runs the test suite (offline, a few minutes on 2 cores)
PYTHON ?= python3
VENV ?= .venv
ARGS ?=

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

.PHONY: setup train test lint
setup: $(VENV)/.installed

train: $(VENV)/.installed
	$(VENV)/bin/cifar-transfer train --recipe default $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
