# `make demo` and `make test` each build the environment first, so they work on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.rmoe-env-stamp
CONSTRAINTS := requirements/constraints.txt
PIP_INSTALL := $(PIP) install --disable-pip-version-check -c $(CONSTRAINTS)

.PHONY: env test test-fast demo benchmark clean-env

env: $(STAMP)

# mmcv's ops compile against the installed torch, so torch goes first and mmcv builds without
# isolation; pip caches the built wheel, which makes a rebuild on the same machine quick.
$(STAMP): $(CONSTRAINTS) setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch torchvision setuptools wheel ninja
	MMCV_WITH_OPS=1 MAX_JOBS=$$(nproc) $(PIP_INSTALL) --no-build-isolation mmcv
	$(PIP_INSTALL) mmengine mmsegmentation mmdet mmpretrain timm openmim numpy opencv-python \
		ftfy regex psutil matplotlib pytest pytest-xdist
	$(PIP_INSTALL) --no-build-isolation --no-deps -e .
	$(PY) -c "import mmcv.ops, mmseg, mmdet, rmoe_plugin"
	touch $(STAMP)

test: env
	$(PY) -m pytest -q tests

# Everything but the end-to-end `mim train` runs, for quick iterations.
test-fast: env
	$(PY) -m pytest -q -m "not e2e" tests

demo: env
	$(PY) tools/demo.py

benchmark: env
	$(PY) tools/benchmark_moe.py

clean-env:
	rm -rf $(VENV)
