# Two entry points, each doing all set-up on a fresh machine:
#   make train   -> creates .venv (once), trains into runs/: the default recipe on a GPU; without
#                   one, the best plan that fits a $(BUDGET) budget (BUDGET=none: the full recipe)
#   make test    -> creates .venv (once), runs the test suite (offline, a few minutes on 2 cores)
# and the documentation:
#   make docs    -> the docs tools into .venv if missing, then mkdocs build --strict into site/
#                   (open site/index.html; .venv/bin/mkdocs serve for a live preview)
PYTHON ?= python3
VENV ?= .venv
ARGS ?=
BUDGET ?= 20m

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

.PHONY: setup train test lint docs
setup: $(VENV)/.installed

train: $(VENV)/.installed
	@if [ "$(BUDGET)" != none ] && ! $(VENV)/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		echo "no GPU: training to a $(BUDGET) budget (make train BUDGET=1h for more; BUDGET=none for the full GPU recipe)"; \
		$(VENV)/bin/cifar-transfer train --budget $(BUDGET) $(ARGS); \
	else \
		$(VENV)/bin/cifar-transfer train --recipe default $(ARGS); \
	fi

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks

docs: $(VENV)/.installed
	@$(VENV)/bin/python -c "import mkdocs, material" 2>/dev/null || \
		$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/python -m mkdocs build --strict
