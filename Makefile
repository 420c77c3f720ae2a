# Two commands a fresh clone needs (see README):
#   make demo   - simulated federation on the built-in demo data, end to end, writes runs/demo/
#   make test   - the test suite (what .ci/run calls)
# Both create .venv and install what they need. GPU users: make a venv with your CUDA build of
# torch first and pass it, e.g. `make demo VENV=/path/to/venv`; torch is only installed (CPU
# build 2.13.0, small) when the venv has none, so a CUDA build is never replaced or downloaded.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
OUT ?= runs/demo

.PHONY: install demo test lint clean-demo

$(VENV)/.fedldm-installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import torch" || (echo "torch failed to install into $(VENV)"; exit 1)
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	@touch $@

install: $(VENV)/.fedldm-installed

demo: install
	$(VENV)/bin/fedldm simulate --out $(OUT)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf $(OUT)
