# Two commands for a new user: `make run` (the main job on the built-in phantom) and `make test`.
# Both create or reuse .venv from pyproject.toml; a second call installs nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
RUN_DIR ?= runs/$(shell date +%Y%m%d-%H%M%S)
CHROMIUM ?= chromium

NBVAL  := --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: setup run test lab browser clean help

help:
	@echo "make run     - set up, then execute the notebooks on the built-in phantom into runs/<timestamp>/"
	@echo "make test    - set up, then run every test (library, CLI, torchrun, browser, then nbval over the notebooks)"
	@echo "make lab     - set up, then open the notebooks in JupyterLab on 127.0.0.1"
	@echo "make browser - install Debian's chromium for the browser test when missing (root and apt-get only)"

# Reinstall only when pyproject.toml changes (the stamp is newer otherwise).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,export,cluster]'
	@touch $(STAMP)

setup: $(STAMP)

# The main job: notebooks 01-06 in order; 04 cross-validates the CPU-sized US-SFNet, 05 evaluates it.
run: setup
	$(PY) -m ussf_lib main-job --out $(RUN_DIR)

# tests/test_browser.py drives JupyterLab in Debian's chromium (Playwright's own browser downloads are not used).
# Installed only where make runs as root with apt-get; elsewhere this says why and the test skips (fails under CI).
browser:
	@if command -v $(CHROMIUM) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser test (apt-get)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
			|| echo "make browser: apt-get could not install chromium; the browser test skips (fails under CI)"; \
	else echo "make browser: no chromium, and no root with apt-get to install it; the browser test skips (fails under CI)"; fi

test: setup browser
	$(PY) -m pytest -q
	$(PY) -m pytest -q $(NBVAL) notebooks/

# JupyterLab for students, on this machine only; --allow-root only where make runs as root.
lab: setup
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --ServerApp.root_dir=notebooks $$([ "$$(id -u)" = 0 ] && echo --allow-root)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
