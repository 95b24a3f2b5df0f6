# Two entry points: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DEMO_DIR ?= demo_out
# The versions the suite was run with (see constraints.txt); `make test-latest` drops them.
CONSTRAINTS := -c constraints.txt
# setuptools' editable-install notice (about folders shadowing packages) is not ours to act on.
PIP_INSTALL = PYTHONWARNINGS=ignore $(PY) -m pip install -q

.PHONY: demo test test-latest lint format bench clean browser gpu-wheels

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): setup.cfg pyproject.toml constraints.txt | $(PY)
	$(PIP_INSTALL) $(CONSTRAINTS) -e '.[onnx]'
	touch $@

# torch is only a numerical reference for tests (CPU build from the local wheel);
# when it cannot be installed the tests that need it are skipped with that reason.
$(TEST_STAMP): $(STAMP)
	$(PIP_INSTALL) $(CONSTRAINTS) -e '.[test]'
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
	$(VENV)/bin/ruff check cardiac_core tavr_jax perfusion experiments tests cardiac_web
	$(VENV)/bin/ruff format --check cardiac_core tavr_jax perfusion experiments tests cardiac_web

format: $(TEST_STAMP)
	$(VENV)/bin/ruff format cardiac_core tavr_jax perfusion experiments tests cardiac_web
	$(VENV)/bin/ruff check --fix cardiac_core tavr_jax perfusion experiments tests cardiac_web

test: $(TEST_STAMP) browser lint
	$(PY) -m pytest -n 2 --durations=15 tests

# The same suite on the newest versions setup.cfg allows, in a venv of its own.
test-latest: browser
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

# Wheels the GPU image lacks (CPython 3.12, manylinux x86-64), carried to the device machine
# in the ignored .whl/ (docs/gpu/README.md); versions are the ones the tests run with here.
# xgboost-cpu: the `xgboost` module without its CUDA build (which alone is over 200 MB).
GPU_WHEELS := array-record==0.8.6 dm-tree==0.1.10 docstring-parser==0.18.0 \
	googleapis-common-protos==1.76.0 grain==0.2.18 immutabledict==4.3.1 ml-collections==1.1.0 \
	portpicker==1.6.0 pydicom==3.0.2 simple-parsing==0.1.9 tensorboardX==2.6.5 \
	tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2 \
	xgboost-cpu==3.2.0
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
	manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64,--platform $(p))

gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp $(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	# promise is published as a source archive only
	$(PYTHON) -m pip wheel -q --no-deps --no-binary=:all: -w .whl promise==2.3
	du -sh .whl

clean:
	rm -rf $(VENV) .venv-latest $(DEMO_DIR)
