# Two commands on a fresh machine: `make demo` and `make test`. Both set everything up first:
# a virtual environment in .venv, torch only if it is missing (TORCH_SPEC, default torch==2.13.0),
# the other dependencies, and the package with its compiled extension (pip install -e .).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := numpy pytest pytest-benchmark ninja pybind11 "setuptools>=64" wheel triton nibabel SimpleITK tqdm matplotlib tensorboard
# The official GradICON package, the tests' oracle: its core (losses, network wrappers, networks) needs only the
# DEPS above; its other requirements (torchvision, itk, girder_client, footsteps) are left out.
ORACLE := icon_registration==1.1.9
# The demo's anatomy: the MNI ICBM152 template files bundled in the nilearn wheel, read by path (nilearn itself,
# and so its dependencies — scikit-learn, pandas, ... — are never imported).
DEMO_DATA := nilearn==0.14.1
# Test-only: MONAI, whose Warp and DVF2DDF the converters are tested against; those parts need only numpy and
# torch, so its other requirements are left out too (the tests skip them where it is missing).
TEST_DEPS := monai==1.6.1
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install $(DEPS)
	$(PIP) install --no-deps "$(ORACLE)" $(TEST_DEPS)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

$(VENV)/.demo-data: | $(PY)
	$(PIP) install --no-deps "$(DEMO_DATA)"
	touch $@

setup: $(VENV)/.built $(VENV)/.demo-data

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Passive OpenMP waits: on cores busy with other jobs, spinning threads wait on each other (measured on a 2-core
# machine at load 13, the same registration took 663 s with spinning threads and 10.5 s with passive ones).
demo: setup
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(PY) -m gradicon_fast demo

bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf build *.egg-info gradicon_fast/_C*.so $(VENV)/.built
