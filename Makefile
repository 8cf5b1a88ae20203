# VMAT Planner: `make serve` and `make test` do all the set-up on a fresh machine.
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
HOST      ?= 127.0.0.1
PORT      ?= 5006
PYTEST_ARGS ?=

.PHONY: serve test setup phantom browser lint bench clean-venv

$(STAMP): pyproject.toml tools/find-python
	@PYBIN=$$(tools/find-python) || exit 1; \
	if [ ! -x $(PY) ]; then echo "Creating $(VENV) with $$PYBIN"; $$PYBIN -m venv $(VENV) || exit 1; fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

phantom: $(STAMP)
	$(VENV)/bin/vmat-planner phantom

# The browser tests drive the system Chromium; install it once when missing (needs root, as on CI machines).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "Installing Chromium for the browser tests"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	    { echo "Could not install Chromium: install the 'chromium' package, then re-run make test"; exit 1; }; }

serve: phantom
	$(VENV)/bin/vmat-planner serve --host $(HOST) --port $(PORT)

test: phantom browser
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check vmat_core app tests bench

bench: phantom
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
