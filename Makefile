# Two entry points: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DEMO_DIR ?= demo_out

.PHONY: demo test lint format bench clean browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

# torch is only a numerical reference for tests (CPU build from the local wheel);
# when it cannot be installed the tests that need it are skipped with that reason.
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test]'
	-$(PY) -m pip install -q torch==2.13.0
	touch $@

# Headless Chromium from Debian's packages for the end-to-end browser test.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	    echo "warning: could not install chromium; the browser test will be skipped"; }

demo: $(STAMP)
	$(PY) experiments/demo.py --out=$(DEMO_DIR)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check tavr_jax perfusion experiments tests cardiac_web
	$(VENV)/bin/ruff format --check tavr_jax perfusion experiments tests cardiac_web

format: $(TEST_STAMP)
	$(VENV)/bin/ruff format tavr_jax perfusion experiments tests cardiac_web
	$(VENV)/bin/ruff check --fix tavr_jax perfusion experiments tests cardiac_web

test: $(TEST_STAMP) browser lint
	$(PY) -m pytest -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) $(DEMO_DIR)
