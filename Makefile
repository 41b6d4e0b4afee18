# Two commands for a new user: `make run` (the main job on the built-in phantom) and `make test`.
# Both create or reuse .venv from pyproject.toml; a second call installs nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
RUN_DIR ?= runs/$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup run run-cli test test-fast clean help

help:
	@echo "make run   - set up, then run the main job on the built-in phantom into runs/<timestamp>/"
	@echo "make test  - set up, then run every test (library, CLI, notebooks)"

# Reinstall only when pyproject.toml changes (the stamp is newer otherwise).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) -m ussf_lib main-job --out $(RUN_DIR)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
