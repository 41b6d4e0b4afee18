# Two commands for a new user: `make run` (the main job on the built-in phantom) and `make test`.
# Both create or reuse .venv from pyproject.toml; a second call installs nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
RUN_DIR ?= runs/$(shell date +%Y%m%d-%H%M%S)

NBVAL  := --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: setup run test clean help

help:
	@echo "make run   - set up, then execute the notebooks on the built-in phantom into runs/<timestamp>/"
	@echo "make test  - set up, then run every test (library, CLI, torchrun, then nbval over the notebooks)"

# Reinstall only when pyproject.toml changes (the stamp is newer otherwise).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,cluster]'
	@touch $(STAMP)

setup: $(STAMP)

# The main job: notebooks 01-06 in order; 04 cross-validates the CPU-sized US-SFNet, 05 evaluates it.
run: setup
	$(PY) -m ussf_lib main-job --out $(RUN_DIR)

test: setup
	$(PY) -m pytest -q
	$(PY) -m pytest -q $(NBVAL) notebooks/

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
